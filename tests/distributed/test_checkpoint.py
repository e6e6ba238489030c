"""Checkpoints: exact resume after SIGKILL (also while an async save is in flight), resharding across world sizes
and plans, automatic restart after a rank dies, and the guard rails (NaN loss, unwritable or full folder, wrong shapes,
no unpickling)."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import ROOT, kill_job, losses, rank_pids, run_training, start_training, wait_for_step

pytestmark = pytest.mark.distributed

STEPS = 60


def _overrides(data: list[str], *extra: str) -> list[str]:
    # Every step is logged, so each step's loss can be compared; checkpoints every 10 steps.
    return [
        *data,
        f"trainer.max_steps={STEPS}",
        "logger.log_every_steps=1",
        "trainer.eval_every_steps=0",
        "checkpoint.every_steps=10",
        "sharding=table_wise",
        *extra,
    ]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_data_overrides) -> dict[int, Path]:
    """Uninterrupted runs, 1 and 2 ranks."""
    out = {}
    for nproc in (1, 2):
        run = run_training(
            tmp_path_factory.mktemp("ref") / f"ref{nproc}",
            [*_overrides(tiny_data_overrides), "trainer.save_predictions=true"],
            nproc=nproc,
        )
        assert run.returncode == 0, run.output[-3000:]
        out[nproc] = run.run_dir
    return out


@pytest.mark.parametrize("nproc", [1, 2])
def test_sigkilled_run_resumes_bit_for_bit(tmp_path, tiny_data_overrides, reference, nproc) -> None:
    run_dir = tmp_path / "killed"
    proc = start_training(run_dir, _overrides(tiny_data_overrides), nproc=nproc)
    seen = wait_for_step(run_dir, 23, proc)
    kill_job(proc, run_dir, nproc)
    assert seen < STEPS and not (run_dir / "summary.json").exists(), "killed mid-run"
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest in {"step_00000020", "step_00000030", "step_00000040"}

    resumed = run_training(run_dir, _overrides(tiny_data_overrides), nproc=nproc)
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / latest}" in resumed.output
    ref = reference[nproc]
    assert losses(run_dir) == losses(ref), "every step's loss equals the uninterrupted run's, bit for bit"
    final = json.loads((run_dir / "summary.json").read_text())["final"]
    assert final == json.loads((ref / "summary.json").read_text())["final"]


# Loaded by every process of a job through PYTHONPATH (tests only): the DCP write of the checkpoint named by
# DLRM_TEST_SLOW_SAVE finishes its files, leaves a marker beside the run and then sleeps, so the test finds a save in
# flight: folder written, not yet agreed, renamed or pointed at.
SLOW_SAVE_HOOK = """
import os
if os.environ.get("DLRM_TEST_SLOW_SAVE"):
    import pathlib, time
    from torch.distributed.checkpoint import filesystem

    _write_data = filesystem._FileSystemWriter.write_data

    def write_data(self, plan, planner):
        future = _write_data(self, plan, planner)
        if pathlib.Path(str(self.path)).name == os.environ["DLRM_TEST_SLOW_SAVE"] + ".tmp":
            future.wait()
            pathlib.Path(os.environ["DLRM_TEST_SLOW_SAVE_MARKER"] + os.environ["RANK"]).touch()
            time.sleep(float(os.environ["DLRM_TEST_SLOW_SAVE_S"]))
        return future

    filesystem._FileSystemWriter.write_data = write_data
"""


def _slow_save(monkeypatch, tmp_path: Path, checkpoint: str, seconds: float) -> Path:
    """Make the job's write of ``checkpoint`` (e.g. step_00000020) last ``seconds`` more; returns the marker's
    prefix (``<prefix><rank>`` appears when that rank's files are written and the wait begins)."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SLOW_SAVE_HOOK)
    marker = tmp_path / "slow_save_rank"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("DLRM_TEST_SLOW_SAVE", checkpoint)
    monkeypatch.setenv("DLRM_TEST_SLOW_SAVE_MARKER", str(marker))
    monkeypatch.setenv("DLRM_TEST_SLOW_SAVE_S", str(seconds))
    return marker


def _wait_for_markers(marker: Path, nproc: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Block until every rank has written the slow save's files and begun its wait."""
    deadline = time.time() + timeout
    while not all(Path(f"{marker}{r}").exists() for r in range(nproc)):
        assert proc.poll() is None and time.time() < deadline, "the slow save never reached its wait"
        time.sleep(0.01)


def test_async_saves_write_what_synchronous_ones_do(tmp_path, tiny_data_overrides, reference) -> None:
    """checkpoint.async_save=true on 2 ranks: every step's loss, the final metrics, the bytes of a checkpoint's
    tensors written in the background and its torch RNG state equal the synchronous run's."""
    run = run_training(tmp_path / "async", [*_overrides(tiny_data_overrides), "checkpoint.async_save=true"], nproc=2)
    assert run.returncode == 0, run.output[-3000:]
    assert "step_00000050: state copied in" in (run.run_dir / "rank0.log").read_text()
    assert losses(run.run_dir) == losses(reference[2])
    final = json.loads((run.run_dir / "summary.json").read_text())["final"]
    assert final == json.loads((reference[2] / "summary.json").read_text())["final"]
    ours, theirs = run.run_dir / "checkpoints" / "step_00000050", reference[2] / "checkpoints" / "step_00000050"
    for name in ("__0_0.distcp", "__1_0.distcp"):
        assert (ours / name).read_bytes() == (theirs / name).read_bytes(), name
    for r in range(2):  # numpy's and Python's generators are never seeded: only torch's is the run's
        assert torch.equal(*(torch.load(p / f"rng_rank{r}.pt")["torch"] for p in (ours, theirs)))
    assert (run.run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000060"


def test_a_job_killed_while_an_async_save_is_in_flight_resumes_from_the_one_before_bit_for_bit(
    tmp_path, tiny_data_overrides, reference, monkeypatch
) -> None:
    """SIGKILL while step 20 is being written in the background (its files on disk, not yet published) and training
    has gone on past it: latest still names step 10, complete; the resumed job's every step equals the
    uninterrupted run's."""
    marker = _slow_save(monkeypatch, tmp_path, "step_00000020", 120)
    run_dir = tmp_path / "killed"
    overrides = _overrides(tiny_data_overrides, "checkpoint.async_save=true")
    proc = start_training(run_dir, overrides, nproc=2)
    _wait_for_markers(marker, 2, proc)  # step 20 is being written...
    wait_for_step(run_dir, 23, proc)  # ...and training goes on
    ck = run_dir / "checkpoints"
    kill_job(proc, run_dir, 2)
    assert (ck / "latest").read_text().strip() == "step_00000010"
    assert (ck / "step_00000020.tmp").is_dir() and not (ck / "step_00000020").exists()

    monkeypatch.delenv("DLRM_TEST_SLOW_SAVE")
    resumed = run_training(run_dir, overrides, nproc=2)
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert f"resumed from {ck / 'step_00000010'}" in resumed.output
    assert losses(run_dir) == losses(reference[2]), "every step's loss equals the uninterrupted run's, bit for bit"
    final = json.loads((run_dir / "summary.json").read_text())["final"]
    assert final == json.loads((reference[2] / "summary.json").read_text())["final"]
    assert not list(ck.glob("*.tmp")), "the half-written folder was cleared by a later save"


def test_a_stop_signal_during_an_async_save_finishes_it_then_saves_the_step_reached(
    tmp_path, tiny_data_overrides, reference, monkeypatch
) -> None:
    """SIGTERM while step 20 is written in the background: the job waits for that write, saves the step it
    stopped at synchronously (latest names it) and the resumed job's every step equals the uninterrupted run's."""
    marker = _slow_save(monkeypatch, tmp_path, "step_00000020", 5)
    run_dir = tmp_path / "stopped"
    overrides = _overrides(tiny_data_overrides, "checkpoint.async_save=true")
    proc = start_training(run_dir, overrides, nproc=2)
    _wait_for_markers(marker, 2, proc)
    assert not (run_dir / "checkpoints" / "step_00000020").exists(), "still in flight"
    os.kill(proc.pid, signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0, out[-3000:]
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    (stop,) = [e for e in events if e["event"] == "preempted"]
    ck = run_dir / "checkpoints"
    assert 20 <= stop["step"] < STEPS and stop["checkpoint"] == str(ck / f"step_{stop['step']:08d}")
    assert (ck / "latest").read_text().strip() == f"step_{stop['step']:08d}"
    assert f"checkpoint {ck / 'step_00000020'} saved in" in (run_dir / "rank0.log").read_text(), "finished first"

    monkeypatch.delenv("DLRM_TEST_SLOW_SAVE")
    resumed = run_training(run_dir, overrides, nproc=2)
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert losses(run_dir) == losses(reference[2])


def test_checkpoint_reshards_across_world_sizes_and_plans(tmp_path, tiny_data_overrides, reference) -> None:
    """2 ranks table-wise -> 1 rank column-wise, and 1 rank table-wise -> 2 ranks column-wise:
    the same predictions on every validation row."""
    for saved_by, load_into in ((2, 1), (1, 2)):
        src = reference[saved_by] / "checkpoints"  # saved at the end of the reference run, beside its predictions
        base = [
            *tiny_data_overrides,
            f"trainer.max_steps={STEPS}",
            "trainer.save_predictions=true",
            "trainer.eval_every_steps=0",
            "checkpoint.save_at_end=false",
        ]
        # No further steps (max_steps equals the checkpoint's step): only load and predict.
        other = run_training(
            tmp_path / f"other{load_into}", [*base, "sharding=column_wise", f"trainer.resume={src}"], nproc=load_into
        )
        assert other.returncode == 0, other.output[-3000:]
        assert f"saved by {saved_by} rank(s)) at step {STEPS}" in other.output
        a = np.load(reference[saved_by] / "predictions_val.npy")
        b = np.load(other.run_dir / "predictions_val.npy")
        assert a.shape == b.shape == (4000,)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_run_without_optimizer_state_resumes_on_two_ranks(tmp_path, tiny_data_overrides) -> None:
    """Plain SGD keeps no optimizer state: the checkpoint has none to give, and resuming must not ask for it."""
    sgd = ["optimizer=sgd", "optimizer.warmup_steps=0"]
    whole = run_training(tmp_path / "whole", [*_overrides(tiny_data_overrides, *sgd), "trainer.max_steps=20"], nproc=2)
    assert whole.returncode == 0, whole.output[-3000:]
    first = run_training(tmp_path / "split", [*_overrides(tiny_data_overrides, *sgd), "trainer.max_steps=10"], nproc=2)
    assert first.returncode == 0, first.output[-3000:]
    rest = run_training(tmp_path / "split", [*_overrides(tiny_data_overrides, *sgd), "trainer.max_steps=20"], nproc=2)
    assert rest.returncode == 0, rest.output[-3000:]
    assert [e["step"] for e in rest.events("resume")] == [10]
    assert losses(rest.run_dir) == losses(whole.run_dir)


def test_job_restarts_itself_after_a_rank_dies(tmp_path, tiny_data_overrides, reference) -> None:
    run_dir = tmp_path / "restart"
    proc = start_training(run_dir, _overrides(tiny_data_overrides), nproc=2, torchrun_args=("--max-restarts", "2"))
    wait_for_step(run_dir, 23, proc)
    os.kill(rank_pids(run_dir, 2)[1], signal.SIGKILL)  # one of the two ranks dies; torchrun restarts both
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-3000:]
    assert "resumed from" in (run_dir / "rank0.log").read_text()
    assert losses(run_dir) == losses(reference[2])
    final = json.loads((run_dir / "summary.json").read_text())["final"]
    assert final == json.loads((reference[2] / "summary.json").read_text())["final"]


@pytest.mark.parametrize("target", ["torchrun", "one rank"])
def test_a_stop_signal_checkpoints_the_step_reached_and_resumes_bit_for_bit(
    tmp_path, tiny_data_overrides, reference, target
) -> None:
    """SIGTERM to torchrun (which forwards it to every rank), or SIGUSR1 to one rank under torchrun's restarts:
    every rank finishes the same step, saves it and exits 143; the resumed job's every step equals the
    uninterrupted run's."""
    run_dir = tmp_path / "stopped"
    restarts = ("--max-restarts", "1") if target == "one rank" else ()
    proc = start_training(run_dir, _overrides(tiny_data_overrides), nproc=2, torchrun_args=restarts)
    wait_for_step(run_dir, 23, proc)
    if target == "torchrun":
        os.kill(proc.pid, signal.SIGTERM)
    else:
        os.kill(rank_pids(run_dir, 2)[1], signal.SIGUSR1)
    out = proc.communicate(timeout=120)[0]
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    (stop,) = [e for e in events if e["event"] == "preempted"]
    saved = run_dir / "checkpoints" / f"step_{stop['step']:08d}"
    assert 23 <= stop["step"] < STEPS and stop["checkpoint"] == str(saved)
    assert stop["signal"] == ("SIGTERM" if target == "torchrun" else "SIGUSR1")
    if target == "torchrun":
        assert proc.returncode != 0 and not (run_dir / "summary.json").exists(), out[-3000:]
        assert (saved / "meta.json").is_file() and (
            run_dir / "checkpoints" / "latest"
        ).read_text().strip() == saved.name
        assert "preempted by SIGTERM: stopped after step" in (run_dir / "rank0.log").read_text()
        resumed = run_training(run_dir, _overrides(tiny_data_overrides), nproc=2)
        assert resumed.returncode == 0, resumed.output[-3000:]
        assert f"resumed from {saved}" in resumed.output
    else:  # torchrun restarted both ranks, which resumed from the step saved
        assert proc.returncode == 0, out[-3000:]
        assert f"resumed from {saved}" in (run_dir / "rank0.log").read_text()
    assert losses(run_dir) == losses(reference[2]), "every step's loss equals the uninterrupted run's"
    final = json.loads((run_dir / "summary.json").read_text())["final"]
    assert final == json.loads((reference[2] / "summary.json").read_text())["final"]


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_the_command_says_where_a_stopped_run_is_and_how_to_resume_it(tmp_path, tiny_data_overrides, sig, code) -> None:
    """dlrm-pipeline train stopped by Ctrl-C (SIGINT to the terminal's process group) or by a scheduler's SIGTERM
    (to the command): its exit code, the checkpoint it can resume from and the command that does it."""
    run_dir = tmp_path / "cli"
    overrides = [
        *tiny_data_overrides,
        "trainer.max_steps=5000",
        "logger.log_every_steps=1",
        "checkpoint.every_steps=10",
        "trainer.eval_every_steps=0",
        f"hydra.run.dir={run_dir}",
    ]
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "dlrm-pipeline"), "train", *overrides],
        cwd=ROOT,
        env={**os.environ, "NPROC": "2", "PIPELINE_RUN_ID": "cli-stop"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    wait_for_step(run_dir, 23, proc)
    if sig == signal.SIGINT:
        os.killpg(proc.pid, sig)
    else:
        os.kill(proc.pid, sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-3000:]
    step = int((run_dir / "checkpoints" / "latest").read_text().strip().split("_")[-1])
    assert f"stopped: the latest checkpoint is step {step} " in err
    assert "this resumes it:\n  PIPELINE_RUN_ID=cli-stop ./launch.sh train model=tiny data=tiny" in err
    if sig == signal.SIGTERM:  # the step reached, not the last periodic checkpoint
        events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [e["step"] for e in events if e["event"] == "preempted"] == [step]


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, tiny_data_overrides) -> None:
    run = run_training(
        tmp_path / "nan",
        [
            *tiny_data_overrides,
            "trainer.max_steps=200",
            "logger.log_every_steps=5",
            "checkpoint.every_steps=1",
            "trainer.eval_every_steps=0",
            "optimizer=sgd",
            "optimizer.lr=1e18",
            "optimizer.warmup_steps=0",
        ],
    )
    assert run.returncode != 0
    assert "training loss (BCE) is nan at step" in run.output or "training loss (BCE) is inf at step" in run.output
    step = int(run.output.split(" at step ")[1].split(":")[0])
    latest = (run.run_dir / "checkpoints" / "latest").read_text().strip()
    assert int(latest.removeprefix("step_")) < step, "no checkpoint was written at or after the bad step"
    assert f"Last good checkpoint: {run.run_dir / 'checkpoints' / latest}" in run.output


def test_unwritable_checkpoint_folder_fails_loudly(tmp_path, tiny_data_overrides) -> None:
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the checkpoint folder should be")
    run = run_training(
        tmp_path / "ro", [*tiny_data_overrides, "trainer.max_steps=5", f"checkpoint.dir={blocker}/ck"], nproc=2
    )
    assert run.returncode != 0
    assert "checkpoint save failed to create" in run.output and "Check checkpoint.dir is writable" in run.output


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs to fill up needs root")
def test_full_disk_fails_the_save_and_keeps_the_previous_checkpoint(tmp_path, tiny_data_overrides) -> None:
    ck = tmp_path / "small"
    ck.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=900k", "tmpfs", str(ck)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        run = run_training(
            tmp_path / "full",
            [
                *tiny_data_overrides,
                "trainer.max_steps=30",
                "checkpoint.every_steps=10",
                "checkpoint.keep_last=3",
                f"checkpoint.dir={ck}",
                "trainer.eval_every_steps=0",
            ],
        )
        assert run.returncode != 0
        assert "checkpoint save failed" in run.output, run.output[-3000:]
        # ENOSPC itself, or (when DCP's writer reports a short write as a zip error) the free space.
        assert "No space left on device" in run.output or "the filesystem of checkpoint.dir is full" in run.output, (
            run.output[-3000:]
        )
        latest = (ck / "latest").read_text().strip()
        assert latest == "step_00000010", "the previous checkpoint is still the latest"
        # ...and it still loads.
        again = run_training(
            tmp_path / "from_full",
            [*tiny_data_overrides, "trainer.max_steps=10", f"trainer.resume={ck}", "checkpoint.save_at_end=false"],
        )
        assert again.returncode == 0 and "at step 10" in again.output, again.output[-3000:]
    finally:
        subprocess.run(["umount", str(ck)])


def test_checkpoint_of_another_shape_names_what_differs(tmp_path, tiny_data_overrides, reference) -> None:
    run = run_training(
        tmp_path / "shape",
        [*tiny_data_overrides, "model.embedding_dim=16", f"trainer.resume={reference[1] / 'checkpoints'}"],
    )
    assert run.returncode != 0
    assert "does not fit this model" in run.output
    assert "t_cat_0.weight: checkpoint [" in run.output and ", 8] vs model [" in run.output


def test_loading_never_unpickles_foreign_objects(tmp_path, reference) -> None:
    from pipeline.checkpoint import CheckpointError
    from pipeline.checkpoint.safe_load import MetadataUnpickler

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        MetadataUnpickler(io.BytesIO(pickle.dumps(Evil()))).load()
    assert not (tmp_path / "pwned").exists()
    # A genuine checkpoint's metadata passes the allow-list.
    ck = reference[1] / "checkpoints"
    path = ck / (ck / "latest").read_text().strip() / ".metadata"
    assert MetadataUnpickler(io.BytesIO(path.read_bytes())).load().state_dict_metadata


def test_enum_members_pickled_through_getattr_load_and_nothing_else_does() -> None:
    """Python 3.11.2 (Debian bookworm's, the image's) pickles enum members as getattr(cls, name): those load,
    any other getattr is refused."""
    from torch.distributed.checkpoint.metadata import Metadata
    from torch.distributed.checkpoint.planner import WriteItemType

    from pipeline.checkpoint import CheckpointError
    from pipeline.checkpoint.safe_load import MetadataUnpickler

    class Member:
        def __init__(self, cls, name):
            self.cls, self.name = cls, name

        def __reduce__(self):
            return (getattr, (self.cls, self.name))

    stream = pickle.dumps([Member(WriteItemType, "TENSOR")])
    assert MetadataUnpickler(io.BytesIO(stream)).load() == [WriteItemType.TENSOR]
    with pytest.raises(CheckpointError, match="not an enum member"):
        MetadataUnpickler(io.BytesIO(pickle.dumps(Member(Metadata, "__init__")))).load()


def test_resuming_from_a_checkpoint_with_a_crafted_rng_file_fails_cleanly_without_running_it(
    tmp_path, reference, tiny_data_overrides
) -> None:
    """A checkpoint folder from an untrusted place: its per-rank RNG file is a pickle that would run a command.
    The resume stops with the checkpoint error naming the file and the refused global; the command never runs."""
    ck = reference[1] / "checkpoints"
    step = tmp_path / "untrusted" / (ck / "latest").read_text().strip()
    shutil.copytree(ck / step.name, step)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"torch": Payload()}, step / "rng_rank0.pt")
    run = run_training(tmp_path / "resumed", [*_overrides(tiny_data_overrides), f"trainer.resume={step}"], nproc=1)
    assert run.returncode != 0 and not marker.exists()
    said = f"cannot resume: {step / 'rng_rank0.pt'} is not a plain tensor file; refusing to unpickle it"
    assert said + " (Trying to load unsupported GLOBAL posix.system" in run.output, run.output[-3000:]
