"""Typed configuration: one dataclass schema per Hydra config group.

Every group (model, data, sharding, optimizer, trainer, launcher, logger) has a schema registered in
Hydra's ConfigStore under ``<group>/schema``; each YAML option in ``pipeline/conf/<group>/`` lists it first in
its defaults, so a misspelled key or a wrongly typed value fails when the config is composed, naming
the key. The primary config ``train`` is typed by :class:`TrainConfig`. Rules that span fields or
need the world size are checked by :func:`validate`, whose messages name the fix.
"""

from __future__ import annotations

import enum
import importlib.util
from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from pipeline.errors import ConfigError  # noqa: F401 - re-exported: the config's own error
from pipeline.redact import redact_text
from pipeline.storage import is_remote

NUM_DENSE_FEATURES = 13  # Criteo: I1..I13 (the default data.dense_columns)
NUM_SPARSE_FEATURES = 26  # Criteo: C1..C26 (the default data.sparse_columns)
SPARSE_FEATURE_NAMES = [
    f"cat_{i}" for i in range(NUM_SPARSE_FEATURES)
]  # KJT keys / tables t_<name> (TorchRec's Criteo naming)


class ModelName(str, enum.Enum):
    dlrm = "dlrm"  # bottom MLP, interaction, top MLP (Naumov et al. 2019)
    mf = "mf"  # matrix factorisation: <user, item> + bias


class Interaction(str, enum.Enum):
    dot = "dot"  # pairwise dot products (the paper's)
    dcn = "dcn"  # DCNv2's low-rank cross network over the concatenated vectors
    projection = "projection"  # two MLP projections, then their dot products


class Precision(str, enum.Enum):
    """Compute precision of the dense part (MLPs, interaction) in training and evaluation."""

    fp32 = "fp32"
    bf16 = "bf16"  # torch.autocast: bf16 matmuls (tensor cores on GPUs; AMX / AVX-512 BF16 on CPUs that have them)


class EmbeddingDtype(str, enum.Enum):
    """Precision the embedding tables are stored (and updated) in by FBGEMM's kernels."""

    fp32 = "fp32"
    fp16 = "fp16"  # half the memory and bandwidth; FBGEMM's CPU and CUDA kernels both have it
    bf16 = "bf16"  # CUDA kernels only


class EmbeddingOptimizer(str, enum.Enum):
    """Sparse optimizers FBGEMM can fuse into the embedding backward."""

    sgd = "sgd"
    adagrad = "adagrad"
    row_wise_adagrad = "row_wise_adagrad"
    adam = "adam"


class DenseOptimizer(str, enum.Enum):
    sgd = "sgd"
    adagrad = "adagrad"
    adam = "adam"


class LrDecay(str, enum.Enum):
    none = "none"  # constant after warmup
    linear = "linear"  # linear from decay_start to final_lr_fraction at the last step


class IdMode(str, enum.Enum):
    """How raw 32-bit categorical hashes become table rows."""

    vocab = "vocab"  # contiguous ids from a first pass over the training split (frequency threshold)
    hash = "hash"  # raw value modulo the per-feature cap


class CategoricalFormat(str, enum.Enum):
    """How a raw categorical field is written."""

    hex = "hex"  # 8 hex digits, a 32-bit hash (Criteo)
    int = "int"  # a decimal non-negative integer id below 2^63 (user ids, item ids, ...)


class Pooling(str, enum.Enum):
    """How a table's bag of embeddings (a multi-hot feature's ids) becomes one vector."""

    sum = "sum"  # the sum (weighted by the ids' weights where the data has them)
    mean = "mean"  # the mean over the bag's ids (an empty bag pools to zeros)


class MultiHotDistribution(str, enum.Enum):
    """How MLPerf's materialisation draws the extra ids of a bag."""

    uniform = "uniform"  # uniform over the table's rows (MLPerf DLRM-DCNv2's setting)


class SplitMode(str, enum.Enum):
    files = "files"  # one raw file per split: train/val/test (the synthetic generator's layout)
    kaggle = "kaggle"  # Criteo Kaggle train.txt: 7 days in order, days 0-5 train, day 6 halved val/test
    days = "days"  # one file per day in order (Criteo 1TB day_0..day_23): all but the last train, last halved val/test
    random = "random"  # any single file: seeded random split with the given fractions


class BadRowPolicy(str, enum.Enum):
    """What preprocessing does with a malformed raw row."""

    error = "error"  # stop, naming the file, line and field
    skip = "skip"  # drop it, count it by kind in the manifest and the log


class DenseTransform(str, enum.Enum):
    """How the 13 integer features become float32 inputs."""

    log1p = "log1p"  # the DLRM reference: log(1 + max(x, 0)), missing -> 0
    torchrec = "torchrec"  # TorchRec's BinaryCriteoUtils.tsv_to_npys: log(x - min(file) + 2), missing -> 0


class LoggerBackend(str, enum.Enum):
    """Where rank 0's metric events go (pipeline/metrics/loggers.py)."""

    jsonl = "jsonl"  # metrics.jsonl in the run folder: required (the report, sweeps and resume read it)
    tensorboard = "tensorboard"  # TensorBoard event files beside it (tensorboardX)
    mlflow = "mlflow"  # an MLflow tracking server or store (pipeline/metrics/tracking.py; mlflow-skinny)


class TensorBoardStep(str, enum.Enum):
    """What TensorBoard's x axis (its "step") counts."""

    step = "step"  # training steps
    samples = "samples"  # samples seen: compares runs of different global batch sizes


class BestMetric(str, enum.Enum):
    """The validation metric the best checkpoint (and early stopping on patience) is judged by."""

    logloss = "logloss"  # lower is better; rewards calibrated probabilities as well as ranking
    auc = "auc"  # higher is better; ranking only


class Backend(str, enum.Enum):
    auto = "auto"  # nccl when CUDA is available, else gloo
    gloo = "gloo"
    nccl = "nccl"


class Device(str, enum.Enum):
    auto = "auto"  # cuda:<local_rank> when CUDA is available, else cpu
    cpu = "cpu"
    cuda = "cuda"


@dataclass
class ModelConfig:
    """DLRM (Naumov et al. 2019) and its family; defaults are the paper's Criteo Kaggle configuration."""

    name: ModelName = ModelName.dlrm  # dlrm | mf (matrix factorisation: user and item tables, dot product)
    embedding_dim: int = 128  # D: width of every embedding table and of the bottom MLP output
    dense_arch_layer_sizes: list[int] = field(default_factory=lambda: [512, 256, 128])  # bottom MLP
    over_arch_layer_sizes: list[int] = field(default_factory=lambda: [512, 256, 1])  # top MLP
    interaction: Interaction = Interaction.dot  # dot | dcn (DCNv2 low-rank cross net) | projection
    self_interaction: bool = False  # dot: add the diagonal <x_i, x_i>: 378 instead of 351 dot products
    sparse_arch_layer_sizes: list[int] = field(default_factory=list)  # per-table MLP on the pooled embedding; [] none
    dcn_num_layers: int = 3  # dcn: cross layers
    dcn_low_rank_dim: int = 512  # dcn: rank of each cross layer's weight (W = U V^T)
    projection_branch1_layer_sizes: list[int] = field(default_factory=lambda: [512, 1024])  # projection: F1 = last / D
    projection_branch2_layer_sizes: list[int] = field(default_factory=lambda: [512, 1024])  # projection: F2 = last / D
    pooling: Pooling = Pooling.sum  # every table's bag pooling: sum | mean (weighted where the data has weights)
    table_pooling: dict[str, Pooling] = field(default_factory=dict)  # per feature name, overrides pooling
    user_feature: str = "user_id"  # mf: the sparse feature of the user table
    item_feature: str = "item_id"  # mf: the sparse feature of the item table

    def __post_init__(self) -> None:
        check_model(self)


@dataclass
class SyntheticConfig:
    """Synthetic Criteo-format click log with a known ground-truth click probability."""

    num_train_rows: int = 3_000_000  # rows of train.tsv
    num_val_rows: int = 100_000  # rows of val.tsv
    num_test_rows: int = 100_000  # rows of test.tsv
    max_cardinality: int = 1_000  # Criteo Kaggle cardinalities, each capped at this
    zipf_alpha: float = 1.2  # id popularity exponent (P(rank k) ~ k^-alpha)
    target_ctr: float = 0.25  # mean click probability the bias is solved for
    seed: int = 0  # everything the generator draws comes from this seed
    # Multi-hot (list) columns after C26 (pipeline/conf/data/synthetic_multihot.yaml); with none (the defaults)
    # the layout is Criteo's and the output the bytes it always was.
    num_list_columns: int = 0  # list columns L1..Ln: bags of ids whose effects add up (0 = none)
    weighted_column: bool = False  # one more list column W1 written id:weight, the weight scaling each id's effect
    max_bag_size: int = 10  # most ids in an L1..Ln or W1 bag (sizes uniform in 0..max_bag_size, empty included)
    sequence_length: int = 0  # > 0: one more list column S1, up to this many ids oldest first (0 = none)
    sequence_window: int = 10  # S1: only the newest this many ids move the click (declare it as S1's cap)
    sequence_decay: float = 1.0  # S1: an id k places before the newest counts decay^k (1 = all of the window alike)
    list_cardinality: int = 500  # distinct ids per list column (Zipf with zipf_alpha)
    one_hot_scale: float = 1.0  # multiplies the one-hot part's logit terms (< 1: fewer rows learn it, lists weigh more)
    # Days of a drifting log (daily retraining): day d > 0 draws other rows from the same click model, and with
    # new_id_share > 0 that share of each column's popularity ranks (drawn at random) goes to new ids each day, in
    # place of the ids that held them (pool ids recur after 1 / new_id_share days). 0 and 0.0: the one log it was.
    day: int = 0
    new_id_share: float = 0.0

    def __post_init__(self) -> None:
        for key in ("num_list_columns", "sequence_length"):
            if getattr(self, key) < 0:
                raise ConfigError(f"data.synthetic.{key}={getattr(self, key)} must be >= 0 (0 = none)")
        for key in ("max_bag_size", "sequence_window", "list_cardinality"):
            if getattr(self, key) < 1:
                raise ConfigError(f"data.synthetic.{key}={getattr(self, key)} must be >= 1")
        if not 0 < self.sequence_decay <= 1:
            raise ConfigError(f"data.synthetic.sequence_decay={self.sequence_decay} must be in (0, 1]")
        if self.one_hot_scale < 0:
            raise ConfigError(f"data.synthetic.one_hot_scale={self.one_hot_scale} must be >= 0")
        if self.day < 0:
            raise ConfigError(f"data.synthetic.day={self.day} must be >= 0")
        if not 0 <= self.new_id_share <= 1:
            raise ConfigError(f"data.synthetic.new_id_share={self.new_id_share} must be in [0, 1]")


@dataclass
class MovieLensConfig:
    """Synthetic MovieLens-style user-item interactions with a known latent-factor ground truth."""

    num_users: int = 6_000  # distinct user ids (activity is Zipf-distributed)
    num_items: int = 4_000  # distinct item ids (popularity is Zipf-distributed)
    num_genres: int = 18  # one genre per item
    num_age_buckets: int = 7  # one age bucket per user
    latent_dim: int = 8  # rank of the true user x item affinity <u, v>
    latent_scale: float = 1.0  # std of <u, v> (logit scale): how much the user-item match matters
    num_train_rows: int = 1_000_000  # interactions in train.tsv
    num_val_rows: int = 50_000  # interactions in val.tsv
    num_test_rows: int = 50_000  # interactions in test.tsv
    zipf_alpha: float = 1.0  # item popularity and user activity exponent (P(rank k) ~ k^-alpha)
    target_ctr: float = 0.4  # mean like probability the global bias is solved for
    seed: int = 0  # everything the generator draws comes from this seed
    num_recent_items: int = 0  # > 0: a column recent_items, the user's last this many items, oldest first (0 = none)
    recent_items_scale: float = 1.0  # std of the recent-items affinity (logit scale) at a full history

    def __post_init__(self) -> None:
        if self.num_recent_items < 0:
            raise ConfigError(f"data.movielens.num_recent_items={self.num_recent_items} must be >= 0 (0 = none)")


@dataclass
class MaterializeConfig:
    """MLPerf DLRM-DCNv2's multi-hot materialisation of one-hot data: each id becomes a bag of ``sizes[j]`` ids
    (the id itself, then ``sizes[j] - 1`` ids drawn uniformly over the table by a seeded hash of the id)."""

    source_dir: str = MISSING  # the one-hot preprocessed folder (made from the raw files first if missing)
    sizes: list[int] = field(default_factory=list)  # ids per bag, one per categorical column (MLPerf's 26)
    distribution: MultiHotDistribution = MultiHotDistribution.uniform
    seed: int = 0  # same input and seed -> same ids


@dataclass
class DataConfig:
    """Where the click log lives, how it is preprocessed, and how batches are cut."""

    name: str = MISSING  # dataset name, for logs and the summary
    raw_dir: str = (
        MISSING  # folder of raw TSV files: label, dense_columns, sparse_columns (relative to the launch folder)
    )
    processed_dir: str = MISSING  # folder for the binary splits and manifest.json, or s3://bucket/prefix
    cache_dir: str | None = (
        None  # local copy of an s3:// processed_dir; null = <PIPELINE_CACHE_DIR>/s3/<bucket>/<prefix>
    )
    split: SplitMode = SplitMode.files  # how raw rows are divided into train/val/test
    train_files: list[str] = field(
        default_factory=list
    )  # split=files: training files or globs (.gz ok); [] = <raw_dir>/train.tsv
    val_files: list[str] = field(default_factory=list)  # split=files: validation files or globs; [] = <raw_dir>/val.tsv
    test_files: list[str] = field(
        default_factory=list
    )  # split=files: test files or globs; [] = <raw_dir>/test.tsv if present, else none
    raw_files: list[str] = field(
        default_factory=list
    )  # split=kaggle/random/days: input files or glob patterns (.gz ok)
    val_fraction: float = 0.05  # split=random: fraction of rows for val
    test_fraction: float = 0.05  # split=random: fraction of rows for test
    split_seed: int = 0  # split=random: seed of the row assignment
    id_mode: IdMode = IdMode.hash  # categorical ids: hash modulo a per-column cap, or contiguous vocabulary
    max_ids_per_feature: int | None = (
        None  # cap on rows per table; null = from the data (vocab: all values; hash: 2x distinct)
    )
    num_embeddings_per_feature: list[int] = field(
        default_factory=list
    )  # per sparse column caps; [] = max_ids_per_feature
    min_id_frequency: int = (
        2  # id_mode=vocab: values seen fewer times in train share the rare-or-unseen row (applied when read)
    )
    # id_mode=vocab: grow the vocabulary of this earlier processed folder (yesterday's data): its values keep their
    # ids and rows, values new in this data's training rows get the next ids (for trainer.init_from); null = a new one
    vocab_from: str | None = None
    dense_transform: DenseTransform = DenseTransform.log1p  # integer features -> float32
    bad_rows: BadRowPolicy = BadRowPolicy.error  # malformed raw rows: stop, or drop and count
    block_size_mb: int = 8  # raw bytes parsed per block while preprocessing (memory is a few times this)
    global_batch_size: int | None = (
        None  # training samples per step over all ranks; null = chosen from the training rows
    )
    eval_global_batch_size: int = 8192  # evaluation samples per step over all ranks
    shuffle: bool = True  # reshuffle training rows every epoch (seeded by trainer.seed and epoch)
    synthetic: SyntheticConfig | None = None  # set: generate raw_dir with this spec when missing
    movielens: MovieLensConfig | None = None  # set: generate MovieLens-style raw_dir with this spec when missing
    # The raw layout: tab-separated, no header: label (0/1), then these dense, then these sparse columns.
    dense_columns: list[str] = field(  # integer columns (empty = missing), in file order; may be []
        default_factory=lambda: [f"I{i + 1}" for i in range(NUM_DENSE_FEATURES)]
    )
    sparse_columns: list[str] = field(  # categorical columns (empty = missing), in file order
        default_factory=lambda: [f"C{i + 1}" for i in range(NUM_SPARSE_FEATURES)]
    )
    feature_names: list[str] = field(  # KJT keys, tables t_<name>, one per sparse column; [] = the column names
        default_factory=lambda: list(SPARSE_FEATURE_NAMES)
    )
    categorical_format: CategoricalFormat = CategoricalFormat.hex  # hex (8 hex digits) | int (decimal ids >= 0)
    # Multi-hot (list) columns: categorical columns whose field holds several ids, e.g. "a1,b2,c3".
    multi_hot_columns: dict[str, int] = field(
        default_factory=dict
    )  # column -> most ids kept per row (the last ones: sequences are oldest first); 0 = all
    list_separator: str = ","  # between the ids of a multi-hot field
    weighted_columns: list[str] = field(default_factory=list)  # multi-hot columns written id:weight (float weight)
    materialize: MaterializeConfig | None = None  # set: processed_dir = MLPerf's multi-hot bags of source_dir

    def __post_init__(self) -> None:
        check_data(self)


@dataclass
class ShardingConfig:
    """EmbeddingShardingPlanner settings."""

    name: str = "auto"  # preset name, for logs
    sharding_types: list[str] = field(default_factory=list)  # allowed for every table; [] = planner's choice
    compute_kernels: list[str] = field(default_factory=lambda: ["fused"])  # allowed for every table
    table_sharding_types: dict[str, list[str]] = field(default_factory=dict)  # per table name, overrides sharding_types
    table_compute_kernels: dict[str, list[str]] = field(
        default_factory=dict
    )  # per table name, overrides compute_kernels
    storage_reservation: float = 0.15  # fraction of each device's memory the planner keeps free
    hbm_cap_gb: float | None = None  # per-GPU memory the planner may plan for; null = detected
    embedding_dtype: EmbeddingDtype = EmbeddingDtype.fp32  # stored table precision: fp32 | fp16 | bf16 (CUDA only)
    cache_load_factor: float | None = (
        None  # fused_uvm_caching: share of a table's rows cached in HBM; null = TorchRec's 0.2
    )
    print_plan: bool = True  # log the plan on rank 0 at start

    def __post_init__(self) -> None:
        check_sharding(self)


@dataclass
class OptimizerConfig:
    """A fused sparse optimizer for the tables and a separate one for the MLPs."""

    name: str = "row_wise_adagrad"  # preset name, for logs
    embedding: EmbeddingOptimizer = EmbeddingOptimizer.row_wise_adagrad  # fused into backward by FBGEMM
    dense: DenseOptimizer = DenseOptimizer.adagrad  # applied to MLP parameters after backward
    lr: float = 0.005  # learning rate of both, unless embedding_lr is set
    embedding_lr: float | None = None  # learning rate of the tables; null = lr
    eps: float = 1e-8  # Adagrad/Adam epsilon
    weight_decay: float = 0.0  # dense optimizer only
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # Adam only
    warmup_fraction: float = 0.0  # linear warm-up from 0 over this fraction of the run's steps (tables and MLPs alike)
    warmup_steps: int | None = None  # warm-up in steps instead (wins over warmup_fraction); clipped to the run
    decay: LrDecay = LrDecay.none  # schedule after warm-up
    decay_start: float = 0.5  # decay=linear: fraction of the run's steps after which decay begins
    decay_start_step: int | None = None  # decay=linear: the step decay begins instead (wins over decay_start)
    final_lr_fraction: float = 0.0  # decay=linear: lr at the last step, as a fraction of lr

    def __post_init__(self) -> None:
        check_optimizer(self)


@dataclass
class TrainerConfig:
    """The training loop."""

    num_epochs: int | None = (
        None  # passes over the training split; null = chosen from the training rows (1 from 1M rows)
    )
    reset_tables_each_epoch: bool = (
        True  # epochs after the first start from re-initialised tables (and their optimizer state)
    )
    max_steps: int | None = None  # stop after this many steps; null = num_epochs
    eval_every_fraction: float = (
        0.0  # evaluate on val after every this fraction of the run's steps; 0 = only at the end
    )
    eval_every_steps: int | None = (
        None  # evaluate every N steps instead (wins over eval_every_fraction); 0 = only at the end
    )
    eval_max_batches: int | None = (
        None  # cap on eval batches mid-training; null = whole split (final eval is always whole)
    )
    seed: int = 0  # model init, shuffling
    device: Device = Device.auto  # where the model runs
    precision: Precision = (
        Precision.fp32
    )  # bf16: MLPs and interaction under torch.autocast (tables: sharding.embedding_dtype)
    num_threads: int | None = None  # intra-op threads per rank; null = cores / local ranks
    keep_freed_memory: bool = True  # glibc: reuse freed pages instead of page-faulting fresh ones each step
    # SIGTERM / SIGUSR1: every rank finishes its step, a checkpoint is saved and the job exits 143. The seconds
    # the launcher waits before it kills (torchrun 30, docker stop 10, Slurm --signal=USR1@<s>): a slower save warns.
    preempt_grace_s: float = 30.0
    profile_steps: int = 0  # torch.profiler over this many training steps -> <run dir>/profile/; 0 = off
    profile_wait_steps: int = 10  # steps (after the first, which warms up) before profiling starts
    run_doctor: bool = True  # check the torch/fbgemm/torchrec pairing before training
    resume: str = "auto"  # auto = latest checkpoint in the run's checkpoint folder if any; none; or a path
    # Warm start: a new run (step 0, this data) from a trained model's weights: a run folder (its best checkpoint, else
    # its latest), a checkpoints folder or one step_<N> folder. Tables may have grown (data.vocab_from): old rows keep
    # their trained values, new rows start as initialised. Ignored when the run resumes its own checkpoint.
    init_from: str | None = None
    init_optimizer: bool = False  # with init_from, also start from its optimizer state (the tables' rows and the MLPs')
    restore_best: bool = True  # keep the checkpoint with the best val metric; final metrics (and export) come from it
    best_metric: BestMetric = BestMetric.logloss  # what "best" means: logloss (rewards calibration too) | auc
    early_stop_auc: float | None = None  # stop once a mid-training val AUC reaches this; null = off
    early_stop_patience: int = 0  # stop after this many mid-training evals without a gain in best_metric; 0 = off
    early_stop_min_delta: float = 0.0  # a gain smaller than this does not count as improvement
    save_predictions: bool = False  # final eval writes predictions_<split>.npy (one probability per row, row order)
    stop_on_nonfinite_loss: bool = (
        True  # stop with the step when the training loss is NaN/Inf (checked each log step and before saves)
    )

    def __post_init__(self) -> None:
        check_trainer(self)


@dataclass
class CheckpointConfig:
    """torch.distributed.checkpoint saves of the whole training state."""

    # null = <run dir>/checkpoints; on several nodes a shared filesystem or an object store (s3://bucket/prefix:
    # endpoint and credentials from the AWS environment variables, never from here)
    dir: str | None = None
    every_steps: int = 0  # save every N steps; 0 = off
    every_minutes: float = 0.0  # save when this many minutes passed since the last save; 0 = off
    keep_last: int = 2  # complete checkpoints kept (older ones are deleted after a successful save)
    save_at_end: bool = True  # save after the last training step
    load_optimizer: bool = True  # on resume, also restore optimizer state (false: weights only, e.g. fine-tuning)
    async_save: bool = False  # copy the state in memory and write it in a background thread (local checkpoint.dir only)

    def __post_init__(self) -> None:
        check_checkpoint(self)


@dataclass
class LauncherConfig:
    """How ranks find each other."""

    name: str = "torchrun"  # preset name, for logs
    backend: Backend = Backend.auto  # process-group backend
    timeout_s: int = 1800  # collective timeout; rank 0 may prepare data while others wait


@dataclass
class LoggerConfig:
    """What a run prints and writes."""

    name: str = "default"  # preset name, for logs
    log_every_steps: int = 100  # training loss/throughput event cadence, in steps
    progress_bar: bool = True  # tqdm bar on rank 0 (samples/s, time left)
    level: str = "INFO"  # python logging level
    backends: list[LoggerBackend] = field(  # metric destinations on rank 0; jsonl is required
        default_factory=lambda: [LoggerBackend.jsonl, LoggerBackend.tensorboard]
    )
    tensorboard_step: TensorBoardStep = TensorBoardStep.step  # TensorBoard's x axis: steps or samples seen
    report: bool = True  # rank 0 writes report.png + report.md (pipeline/tools/report.py) after summary.json
    # MLflow (logger.backends=[jsonl,tensorboard,mlflow]): server or store URI (http://host:5000,
    # sqlite:///mlflow.db); null = MLFLOW_TRACKING_URI, else MLflow's default. Credentials: MLFLOW_TRACKING_USERNAME
    # / MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN (never written to the run folder or logs).
    mlflow_tracking_uri: str | None = None
    mlflow_experiment: str | None = None  # MLflow experiment name; null = the data's name (data.name)

    def __post_init__(self) -> None:
        check_logger(self)


@dataclass
class TrainConfig:
    """The whole job: one field per config group."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)

    def __post_init__(self) -> None:
        check_train(self)


GROUP_SCHEMAS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "sharding": ShardingConfig,
    "optimizer": OptimizerConfig,
    "trainer": TrainerConfig,
    "checkpoint": CheckpointConfig,
    "launcher": LauncherConfig,
    "logger": LoggerConfig,
}


def register_configs() -> None:
    """Register the primary schema and each group's schema in Hydra's ConfigStore."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    for group, schema in GROUP_SCHEMAS.items():
        cs.store(group=group, name="schema", node=schema)


SHARDING_TYPES = {
    "table_wise",
    "row_wise",
    "column_wise",
    "data_parallel",
    "table_row_wise",
    "table_column_wise",
    "grid_shard",
}
COMPUTE_KERNELS = {"dense", "fused", "fused_uvm", "fused_uvm_caching", "key_value"}


def validate(cfg: TrainConfig, world_size: int, device_type: str = "cpu") -> None:
    """Every rule: each group's (as building it runs them), those across groups, and those that depend on the
    world size and the device.

    Raises:
        ConfigError: naming the key(s) and the fix.
    """
    for check, group in (
        (check_model, cfg.model),
        (check_data, cfg.data),
        (check_sharding, cfg.sharding),
        (check_optimizer, cfg.optimizer),
        (check_trainer, cfg.trainer),
        (check_checkpoint, cfg.checkpoint),
        (check_logger, cfg.logger),
    ):
        check(group)
    check_train(cfg)
    validate_batch_sizes(cfg.data, world_size)
    if device_type == "cpu":
        _check_cpu(cfg)


def check_data(d: DataConfig) -> None:
    """``data``'s rules (run when the group is built)."""
    for key, size in (("global_batch_size", d.global_batch_size), ("eval_global_batch_size", d.eval_global_batch_size)):
        if size is not None and size <= 0:
            raise ConfigError(f"data.{key}={size} must be positive")
    if d.split == SplitMode.random:
        if not (0 < d.val_fraction < 1 and 0 < d.test_fraction < 1 and d.val_fraction + d.test_fraction < 1):
            raise ConfigError(
                f"data.val_fraction={d.val_fraction} and data.test_fraction={d.test_fraction} must each be in "
                "(0, 1) and sum to less than 1"
            )
    if d.split in (SplitMode.random, SplitMode.kaggle) and len(d.raw_files) != 1:
        raise ConfigError(f"data.split={d.split.value} needs exactly one file in data.raw_files, got {d.raw_files}")
    if d.split == SplitMode.days and not d.raw_files:
        raise ConfigError("data.split=days needs the day files in data.raw_files (in order, or a glob like data/day_*)")
    if d.materialize is not None and (is_remote(d.processed_dir) or is_remote(d.materialize.source_dir)):
        raise ConfigError(
            "data.materialize writes and reads local folders: data.processed_dir and data.materialize.source_dir "
            "must not be object-store URLs"
        )
    if d.max_ids_per_feature is not None and d.max_ids_per_feature < 2:
        raise ConfigError(f"data.max_ids_per_feature={d.max_ids_per_feature} must be at least 2")
    if d.vocab_from and d.id_mode != IdMode.vocab:
        raise ConfigError(
            f"data.vocab_from={d.vocab_from} grows a vocabulary, which data.id_mode={d.id_mode.value} does not have: "
            "set data.id_mode=vocab, or drop data.vocab_from (hashed ids keep their rows from day to day)"
        )
    _validate_columns(d)
    if d.num_embeddings_per_feature and (
        len(d.num_embeddings_per_feature) != len(d.sparse_columns) or min(d.num_embeddings_per_feature) < 2
    ):
        raise ConfigError(
            f"data.num_embeddings_per_feature has {len(d.num_embeddings_per_feature)} entries (min "
            f"{min(d.num_embeddings_per_feature)}): give one cap >= 2 per categorical column "
            f"({len(d.sparse_columns)} in data.sparse_columns), or [] to use data.max_ids_per_feature for all"
        )
    if d.min_id_frequency < 1:
        raise ConfigError(
            f"data.min_id_frequency={d.min_id_frequency} must be at least 1 (1 = every training value gets its own row)"
        )
    if d.block_size_mb < 1:
        raise ConfigError(f"data.block_size_mb={d.block_size_mb} must be at least 1")


def check_trainer(t: TrainerConfig) -> None:
    """``trainer``'s rules (run when the group is built)."""
    if t.num_epochs is not None and t.num_epochs < 1 and t.max_steps is None:
        raise ConfigError(f"trainer.num_epochs={t.num_epochs} must be >= 1 (or set trainer.max_steps)")
    if t.max_steps is not None and t.max_steps < 1:
        raise ConfigError(f"trainer.max_steps={t.max_steps} must be >= 1 or null")
    if t.preempt_grace_s <= 0:
        raise ConfigError(f"trainer.preempt_grace_s={t.preempt_grace_s} must be positive (seconds)")
    mid_evals = t.eval_every_steps if t.eval_every_steps is not None else t.eval_every_fraction
    if (t.early_stop_auc is not None or t.early_stop_patience) and not mid_evals:
        raise ConfigError(
            "trainer.early_stop_auc / trainer.early_stop_patience act on mid-training evaluations: "
            "set trainer.eval_every_fraction (e.g. 0.1) or trainer.eval_every_steps > 0"
        )
    if t.eval_every_steps is not None and t.eval_every_steps < 0:
        raise ConfigError(f"trainer.eval_every_steps={t.eval_every_steps} must be >= 0 (0 = only at the end) or null")
    if not 0 <= t.eval_every_fraction <= 1:
        raise ConfigError(
            f"trainer.eval_every_fraction={t.eval_every_fraction} must be in [0, 1] (0 = only at the end)"
        )


def check_checkpoint(c: CheckpointConfig) -> None:
    """``checkpoint``'s rules (run when the group is built)."""
    if c.every_steps < 0 or c.every_minutes < 0 or c.keep_last < 1:
        raise ConfigError(
            f"checkpoint.every_steps={c.every_steps} and checkpoint.every_minutes={c.every_minutes} "
            f"must be >= 0 and checkpoint.keep_last={c.keep_last} >= 1"
        )
    if c.async_save and c.dir and is_remote(c.dir):
        raise ConfigError(
            f"checkpoint.async_save=true writes to a local folder only, and checkpoint.dir={redact_text(c.dir)} is an "
            "object store: set checkpoint.async_save=false"
        )


def check_optimizer(o: OptimizerConfig) -> None:
    """``optimizer``'s rules (run when the group is built)."""
    if o.lr <= 0:
        raise ConfigError(f"optimizer.lr={o.lr} must be positive")
    if o.embedding_lr is not None and o.embedding_lr <= 0:
        raise ConfigError(f"optimizer.embedding_lr={o.embedding_lr} must be positive, or null for optimizer.lr")
    if not 0 <= o.decay_start <= 1 or not 0 <= o.final_lr_fraction <= 1:
        raise ConfigError(
            f"optimizer.decay_start={o.decay_start} and optimizer.final_lr_fraction={o.final_lr_fraction} "
            "must be in [0, 1]"
        )
    if not 0 <= o.warmup_fraction < 1:
        raise ConfigError(
            f"optimizer.warmup_fraction={o.warmup_fraction} must be in [0, 1): a share of the run's steps "
            "(for a number of steps use optimizer.warmup_steps)"
        )
    for key in ("warmup_steps", "decay_start_step"):
        if getattr(o, key) is not None and getattr(o, key) < 0:
            raise ConfigError(f"optimizer.{key}={getattr(o, key)} must be >= 0, or null to use the fraction")
    if len(o.betas) != 2:
        raise ConfigError(f"optimizer.betas={o.betas} must have two values")


def check_sharding(s: ShardingConfig) -> None:
    """``sharding``'s rules (run when the group is built; the CPU-only ones in :func:`validate`)."""
    if not 0 <= s.storage_reservation < 1:
        raise ConfigError(f"sharding.storage_reservation={s.storage_reservation} must be in [0, 1)")
    checks = [
        ("sharding.sharding_types", s.sharding_types, SHARDING_TYPES),
        ("sharding.compute_kernels", s.compute_kernels, COMPUTE_KERNELS),
    ]
    for table, values in s.table_sharding_types.items():
        checks.append((f"sharding.table_sharding_types.{table}", values, SHARDING_TYPES))
    for table, values in s.table_compute_kernels.items():
        checks.append((f"sharding.table_compute_kernels.{table}", values, COMPUTE_KERNELS))
    for key, values, allowed in checks:
        unknown = sorted(set(values) - allowed)
        if unknown:
            raise ConfigError(f"{key} has unknown value(s) {unknown}; allowed: {sorted(allowed)}")
    if s.cache_load_factor is not None and not 0 < s.cache_load_factor <= 1:
        raise ConfigError(
            f"sharding.cache_load_factor={s.cache_load_factor} must be in (0, 1]: the share "
            "of each fused_uvm_caching table's rows cached in HBM"
        )


def check_logger(g: LoggerConfig) -> None:
    """``logger``'s rules (run when the group is built)."""
    if LoggerBackend.jsonl not in g.backends:
        raise ConfigError(
            f"logger.backends={[b.value for b in g.backends]} must include jsonl: metrics.jsonl is the "
            "run's record (the report, sweep results and resume read it). Without TensorBoard: logger.backends=[jsonl]"
        )
    if LoggerBackend.mlflow in g.backends and importlib.util.find_spec("mlflow") is None:
        raise ConfigError(
            "logger.backends includes mlflow but mlflow is not installed: run ./launch.sh setup (or pip install "
            "-r requirements/cpu.txt, which pins mlflow-skinny), or leave it out: logger.backends=[jsonl,tensorboard]"
        )


def check_train(cfg: TrainConfig) -> None:
    """Rules across groups (run when the whole config is built)."""
    if cfg.trainer.device == Device.cpu and cfg.launcher.backend == Backend.nccl:
        raise ConfigError("launcher.backend=nccl needs CUDA but trainer.device=cpu: use launcher.backend=gloo")
    if cfg.trainer.device == Device.cpu:
        _check_cpu(cfg)
    features = list(cfg.data.feature_names or cfg.data.sparse_columns)
    unknown = sorted(set(cfg.model.table_pooling) - set(features))
    if unknown:
        raise ConfigError(f"model.table_pooling names {unknown}, which are not features of the data: one of {features}")


def _check_cpu(cfg: TrainConfig) -> None:
    """What TorchRec / FBGEMM 1.8 cannot do on a CPU, each with the CPU's alternative."""
    cuda_only = {"row_wise", "table_row_wise", "grid_shard"}
    asked = [("sharding.sharding_types", cfg.sharding.sharding_types)]
    asked += [(f"sharding.table_sharding_types.{n}", v) for n, v in cfg.sharding.table_sharding_types.items()]
    for key, values in asked:
        if values and set(values) <= cuda_only:
            raise ConfigError(
                f"{key}={values}: TorchRec shards tables row-wise only on CUDA. On CPU use table_wise, "
                "column_wise, table_column_wise or data_parallel (e.g. sharding=column_wise)"
            )
    kernels = [("sharding.compute_kernels", cfg.sharding.compute_kernels)]
    kernels += [(f"sharding.table_compute_kernels.{n}", v) for n, v in cfg.sharding.table_compute_kernels.items()]
    for key, values in kernels:
        uvm = sorted(set(values) & {"fused_uvm", "fused_uvm_caching"})
        if uvm:
            raise ConfigError(
                f"{key}={values}: {uvm} keep tables in CUDA unified memory (host memory the GPU "
                "reads), so they need CUDA. On CPU use fused (tables in host memory already)"
            )
    if cfg.sharding.embedding_dtype == EmbeddingDtype.bf16:
        raise ConfigError(
            "sharding.embedding_dtype=bf16: FBGEMM's CPU embedding kernel has no bf16 (its CUDA "
            "kernel does). On CPU use sharding.embedding_dtype=fp16 or fp32"
        )
    fused_only = not (set(cfg.sharding.sharding_types) == {"data_parallel"})
    if cfg.optimizer.embedding == EmbeddingOptimizer.adam and fused_only:
        raise ConfigError(
            "optimizer.embedding=adam: FBGEMM's fused CPU kernel has no Adam (its CUDA kernel does). On CPU use "
            "sharding=data_parallel (tables replicated, small tables only) or optimizer.embedding=row_wise_adagrad"
        )


def validate_batch_sizes(d: DataConfig, world_size: int) -> None:
    """Batch sizes are positive and split evenly over the ranks (null: still to be chosen from the data).

    Raises:
        ConfigError: naming the key and the nearest sizes that work.
    """
    for key, size in (("global_batch_size", d.global_batch_size), ("eval_global_batch_size", d.eval_global_batch_size)):
        if size is None:
            continue
        if size <= 0:
            raise ConfigError(f"data.{key}={size} must be positive")
        if size % world_size:
            lower = max(world_size, size // world_size * world_size)
            raise ConfigError(
                f"data.{key}={size} must be divisible by world_size={world_size} (the batch size is global): "
                f"use data.{key}={lower} or {lower + world_size}"
            )


def _validate_columns(d: DataConfig) -> None:
    """The declared raw layout: named, distinct columns, one feature name per sparse column."""
    if not d.sparse_columns:
        raise ConfigError("data.sparse_columns is empty: declare the categorical columns (at least one), in file order")
    if d.feature_names and len(d.feature_names) != len(d.sparse_columns):
        raise ConfigError(
            f"data.feature_names has {len(d.feature_names)} names but data.sparse_columns has "
            f"{len(d.sparse_columns)} columns: give one name per column, or data.feature_names=[] to name the "
            "features after the columns"
        )
    for key, names in (
        ("data.dense_columns + data.sparse_columns", ["label", *d.dense_columns, *d.sparse_columns]),
        ("data.feature_names", list(d.feature_names)),
    ):
        bad = sorted({n for n in names if not n or not n.isprintable() or any(c.isspace() for c in n)})
        if bad:
            raise ConfigError(f"{key}: names {bad} must be non-empty and without whitespace")
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(
                f"{key}: {dupes} appear more than once (the label column is called 'label')"
                if "label" in dupes
                else f"{key}: {dupes} appear more than once"
            )
    unknown = sorted(set(d.multi_hot_columns) - set(d.sparse_columns))
    if unknown:
        raise ConfigError(
            f"data.multi_hot_columns names {unknown}, which are not in data.sparse_columns {list(d.sparse_columns)}"
        )
    negative = {k: v for k, v in d.multi_hot_columns.items() if v < 0}
    if negative:
        raise ConfigError(f"data.multi_hot_columns: caps {negative} must be >= 0 (0 = keep every id)")
    stray = sorted(set(d.weighted_columns) - set(d.multi_hot_columns))
    if stray:
        raise ConfigError(
            f"data.weighted_columns {stray} are not multi-hot: add them to data.multi_hot_columns (column: cap)"
        )
    if len(d.list_separator) != 1 or d.list_separator in "\t\n\r:" or d.list_separator.isalnum():
        raise ConfigError(
            f"data.list_separator={d.list_separator!r} must be one character other than a tab, newline, ':', "
            "letter or digit"
        )
    if d.materialize is not None:
        m = d.materialize
        if len(m.sizes) != len(d.sparse_columns) or min(m.sizes, default=1) < 1:
            raise ConfigError(
                f"data.materialize.sizes has {len(m.sizes)} entries (min {min(m.sizes, default=0)}): give one bag "
                f"size >= 1 per categorical column ({len(d.sparse_columns)} in data.sparse_columns)"
            )
        if d.multi_hot_columns:
            raise ConfigError(
                "data.materialize makes every column multi-hot from one-hot data: data.multi_hot_columns must be {}"
            )
    if d.synthetic is not None and d.movielens is not None:
        raise ConfigError(
            "data.synthetic and data.movielens are both set: a data folder has one generator; set one of them to null"
        )


def check_model(m: ModelConfig) -> None:
    """``model``'s shape rules (run when the group is built), each naming its key and a fix."""
    if m.name == ModelName.mf:
        if m.user_feature == m.item_feature:
            raise ConfigError(
                f"model.user_feature and model.item_feature are both {m.user_feature!r}: "
                "matrix factorisation needs two different sparse features"
            )
        return
    if m.dense_arch_layer_sizes[-1:] != [m.embedding_dim]:
        raise ConfigError(
            f"model.dense_arch_layer_sizes={m.dense_arch_layer_sizes} must end with model.embedding_dim="
            f"{m.embedding_dim}: the bottom MLP output joins the embeddings in the interaction. "
            f"Set model.dense_arch_layer_sizes=[...,{m.embedding_dim}]"
        )
    if len(m.over_arch_layer_sizes) < 2 or m.over_arch_layer_sizes[-1] != 1:
        raise ConfigError(
            f"model.over_arch_layer_sizes={m.over_arch_layer_sizes} must have at least two layers and end "
            "with 1 (one click logit), e.g. [512,256,1]"
        )
    if m.sparse_arch_layer_sizes and m.sparse_arch_layer_sizes[-1] != m.embedding_dim:
        raise ConfigError(
            f"model.sparse_arch_layer_sizes={m.sparse_arch_layer_sizes} must end with model.embedding_dim="
            f"{m.embedding_dim}: the transformed embeddings meet the bottom MLP output in the interaction. "
            f"Set model.sparse_arch_layer_sizes=[...,{m.embedding_dim}] or [] for none"
        )
    if m.self_interaction and m.interaction != Interaction.dot:
        raise ConfigError(
            f"model.self_interaction=true applies to model.interaction=dot only, not "
            f"{m.interaction.value}: set model.self_interaction=false"
        )
    if m.interaction == Interaction.dcn and (m.dcn_num_layers < 1 or m.dcn_low_rank_dim < 1):
        raise ConfigError(
            f"model.dcn_num_layers={m.dcn_num_layers} and model.dcn_low_rank_dim={m.dcn_low_rank_dim} "
            "must both be at least 1"
        )
    if m.interaction == Interaction.projection:
        for key in ("projection_branch1_layer_sizes", "projection_branch2_layer_sizes"):
            sizes = getattr(m, key)
            if not sizes or sizes[-1] % m.embedding_dim:
                raise ConfigError(
                    f"model.{key}={sizes} must end with a multiple of model.embedding_dim="
                    f"{m.embedding_dim} (the branch output is read as last/D vectors of width D)"
                )
