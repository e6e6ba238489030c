"""Run report: training and validation curves (PNG) and a Markdown summary of one run or a sweep.

    ./launch.sh report outputs/<run_id>                    # -> outputs/<run_id>/report.png, report.md
    ./launch.sh report multirun/<id>/0 multirun/<id>/1     # one plot comparing the runs
    ./launch.sh report multirun/<id> --out reports/lr      # a sweep folder: all its runs

The plot follows the DLRM paper's Figure 2 (training and validation accuracy against iterations), with
samples seen on the x axis (steps on the top axis when all runs share the batch size):

- left, AUC: validation AUC at each evaluation (line), the final test AUC (square), and the data's
  Bayes-optimal validation AUC (dashed) when summary.json knows it (synthetic data);
- right, logloss: training loss of each log window (thin line), validation logloss at each evaluation,
  the final test logloss, and the optimal validation logloss (dashed).

Several runs share one plot, one colour per run, labelled by run name and the overrides that differ
between them (``.hydra/overrides.yaml``; else the differing keys of ``config.yaml``). report.md holds
the final val/test metrics with the optimum and gap, and per run: data and rows, model, optimizer,
batch, world size, throughput, wall time, memory and overrides. Everything comes from the files in the
run folder (metrics.jsonl, summary.json, config.yaml, .hydra/overrides.yaml): a run still going, or
killed before its first evaluation, still renders. Rank 0 writes the report of each training run into
its folder after summary.json (``logger.report=false`` turns it off).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pipeline.metrics import keys

PNG_NAME = "report.png"
MD_NAME = "report.md"
FIG_SIZE = (13.0, 5.0)  # inches
DPI = 100  # -> 1300 x 500 pixels
SPLITS = ("val", "test")
_IGNORED_OVERRIDE_PREFIXES = ("hydra.", "hydra/")


@dataclass
class Run:
    """What one run folder holds."""

    run_dir: Path
    train: list[dict] = field(default_factory=list)  # "train" events, one per log window, by step
    evals: list[dict] = field(default_factory=list)  # "eval" events, by step
    summary: dict | None = None  # summary.json (absent while running / after a crash)
    config: dict | None = None  # config.yaml
    overrides: list[str] | None = None  # .hydra/overrides.yaml
    label: str = ""

    @property
    def name(self) -> str:
        return self.run_dir.name

    def eval_points(self, split: str) -> list[dict]:
        return [e for e in self.evals if split in keys.splits_in(e)]

    def final(self) -> dict[str, dict]:
        """Final metrics per split (``{split: {name: value}}``): summary.json's, else the last evaluation in
        metrics.jsonl."""
        if self.summary and self.summary.get("final"):
            return {s: keys.of_split(self.summary["final"], s) for s in keys.splits_in(self.summary["final"])}
        out = {}
        for split in SPLITS:
            points = self.eval_points(split)
            if points:
                out[split] = keys.of_split(points[-1], split)
        return out

    @property
    def optimum(self) -> dict | None:
        return (self.summary or {}).get("optimum") or None

    @property
    def global_batch_size(self) -> int | None:
        gbs = (self.summary or {}).get("global_batch_size") or _get(self.config, "data.global_batch_size")
        if gbs:
            return int(gbs)
        for e in self.train:
            if e.get("step") and e.get("samples"):
                return int(e["samples"] // e["step"])
        return None


def _get(tree: dict | None, dotted: str, default=None):
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def load_events(path: Path) -> list[dict]:
    """metrics.jsonl's events, as the surviving history of the run.

    A ``resume`` event at step S drops the train/eval events after S logged before it (a killed run's
    work past its last checkpoint, redone after the resume); a repeated (kind, split, step) keeps the
    last. Unreadable lines (a line cut by a kill) are skipped.
    """
    events: list[dict] = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(event, dict):
            continue
        if event.get("event") == "resume":
            step = event.get("step", 0)
            events = [e for e in events if e.get("event") not in ("train", "eval") or e.get("step", 0) <= step]
        events.append(event)
    latest: dict[tuple, dict] = {}
    for e in events:
        if e.get("event") in ("train", "eval"):
            latest[(e["event"], tuple(keys.splits_in(e)), e.get("step"))] = e
    return sorted(latest.values(), key=lambda e: (e.get("step", 0), e["event"] == "eval"))


def find_run_dirs(path: Path) -> list[Path]:
    """``path`` itself if it is a run folder (holds metrics.jsonl), else its run subfolders (a sweep)."""
    if (path / "metrics.jsonl").is_file():
        return [path]
    if path.is_dir():
        subs = [p for p in path.iterdir() if (p / "metrics.jsonl").is_file()]
        return sorted(subs, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name))
    return []


def load_run(run_dir: str | Path) -> Run:
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl (not a run folder)")
    events = load_events(metrics)
    run = Run(
        run_dir, train=[e for e in events if e["event"] == "train"], evals=[e for e in events if e["event"] == "eval"]
    )
    if (run_dir / "summary.json").is_file():
        try:
            run.summary = json.loads((run_dir / "summary.json").read_text())
        except json.JSONDecodeError:
            run.summary = None
    for attr, rel in (("config", "config.yaml"), ("overrides", ".hydra/overrides.yaml")):
        if (run_dir / rel).is_file():
            try:
                setattr(run, attr, yaml.safe_load((run_dir / rel).read_text()))
            except yaml.YAMLError:
                pass
    return run


# -- labels ---------------------------------------------------------------------------------------
def _flatten(tree, prefix: str = "") -> dict[str, str]:
    if isinstance(tree, dict):
        out: dict[str, str] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: json.dumps(tree) if isinstance(tree, list | dict) else str(tree)}


def _override_items(overrides: list[str]) -> dict[str, str]:
    items = {}
    for o in overrides or []:
        key, _, value = str(o).partition("=")
        key = key.lstrip("+~")
        if not key.startswith(_IGNORED_OVERRIDE_PREFIXES):
            items[key] = value
    return items


def differing(runs: list[Run]) -> list[dict[str, str]]:
    """For each run, the settings that differ between the runs: overrides, else config.yaml keys."""
    if len(runs) < 2:
        return [{} for _ in runs]
    if all(r.overrides is not None for r in runs):
        per_run = [_override_items(r.overrides) for r in runs]
    else:
        per_run = [_flatten(r.config or {}) for r in runs]
    keys = sorted(set().union(*per_run))
    varying = [k for k in keys if len({p.get(k) for p in per_run}) > 1]
    return [{k: p[k] for k in varying if k in p} for p in per_run]


def label_runs(runs: list[Run]) -> None:
    names = [r.name for r in runs]
    if len(set(names)) < len(names):  # e.g. two sweeps' "0": use parent/name
        names = [f"{r.run_dir.parent.name}/{r.name}" for r in runs]
    for run, name, diff in zip(runs, names, differing(runs), strict=True):
        run.label = name + (": " + " ".join(f"{k}={v}" for k, v in diff.items()) if diff else "")


# -- plot -----------------------------------------------------------------------------------------
def plot(runs: list[Run], path: Path) -> Path:
    """Render the AUC and logloss curves of ``runs`` against samples seen into ``path`` (PNG, Agg)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import EngFormatter

    fig = Figure(figsize=FIG_SIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax_auc, ax_loss = fig.subplots(1, 2, sharex=True)  # the same samples range side by side
    single = len(runs) == 1
    title = f"run {runs[0].name}" if single else f"{len(runs)} runs"
    data = {_get(r.config, "data.name") or (r.summary or {}).get("data") for r in runs} - {None}
    if len(data) == 1:
        title += f" on {data.pop()}"
    fig.suptitle(title)

    optima = {json.dumps(r.optimum.get("val"), sort_keys=True) for r in runs if r.optimum and r.optimum.get("val")}
    shared_optimum = len(optima) == 1 and all(r.optimum and r.optimum.get("val") for r in runs)
    has_eval = has_train = False
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        if run.train:
            has_train = True
            ax_loss.plot(
                [e["samples"] for e in run.train],
                [e.get("train/loss", math.nan) for e in run.train],
                color=color,
                lw=1.0,
                alpha=0.55 if not single else 0.9,
                label="train loss (per log window)" if single else None,
            )
        val, test = run.eval_points("val"), run.eval_points("test")
        has_eval = has_eval or bool(val or test)
        for ax, metric in ((ax_auc, "auc"), (ax_loss, "logloss")):
            if val:
                ys = [e.get(f"eval/val/{metric}", math.nan) for e in val]
                ax.plot(
                    [e["samples"] for e in val],
                    ys,
                    color=color,
                    lw=1.8,
                    marker="o",
                    ms=4,
                    label="val" if single else None,
                )
            if test:
                last = test[-1]
                ax.plot(
                    [last["samples"]],
                    [last.get(f"eval/test/{metric}", math.nan)],
                    color=color,
                    marker="s",
                    ms=7,
                    ls="none",
                    mfc="white",
                    mew=1.8,
                    label="test (final)" if single else None,
                )
    for i, run in enumerate(runs):  # after the curves, so the legend lists the runs first
        opt = (run.optimum or {}).get("val")
        color = f"C{i % 10}"
        if opt and (not shared_optimum or i == 0):
            ocolor = "0.35" if shared_optimum else color
            olabel = "val optimum (Bayes)" if shared_optimum else None
            ax_auc.axhline(opt["auc"], color=ocolor, ls="--", lw=1.2, label=olabel)
            ax_loss.axhline(opt["logloss"], color=ocolor, ls="--", lw=1.2, label=olabel)

    for ax, name in ((ax_auc, "AUC"), (ax_loss, "logloss")):
        ax.set_xlabel("samples seen")
        ax.set_ylabel(name)
        ax.set_title(f"{name} against samples seen")
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))
        ax.grid(True, alpha=0.3)
    if not has_eval:
        ax_auc.text(0.5, 0.5, "no evaluation yet", ha="center", va="center", transform=ax_auc.transAxes, color="0.4")
    if not (has_eval or has_train):
        ax_loss.text(
            0.5, 0.5, "no training events yet", ha="center", va="center", transform=ax_loss.transAxes, color="0.4"
        )
    gbs = {r.global_batch_size for r in runs}
    if len(gbs) == 1 and (g := gbs.pop()) and (has_eval or has_train):
        for ax in (ax_auc, ax_loss):
            top = ax.secondary_xaxis("top", functions=(lambda s, g=g: s / g, lambda st, g=g: st * g))
            top.set_xlabel("step", fontsize="small")
            top.tick_params(labelsize="small")
    if single:
        for ax in (ax_auc, ax_loss):
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize="small", loc="best")
    else:
        # One colour per run (left), one line style per series (right).
        ax_auc.legend(
            handles=[Line2D([], [], color=f"C{i % 10}", lw=1.8, label=r.label) for i, r in enumerate(runs)],
            fontsize="x-small",
            loc="best",
        )
        styles = [
            Line2D([], [], color="0.2", lw=1.0, alpha=0.6, label="train loss (per log window)"),
            Line2D([], [], color="0.2", lw=1.8, marker="o", ms=4, label="val"),
            Line2D([], [], color="0.2", marker="s", ms=7, ls="none", mfc="white", mew=1.8, label="test (final)"),
        ]
        if optima:
            styles.append(Line2D([], [], color="0.35", ls="--", lw=1.2, label="val optimum (Bayes)"))
        ax_loss.legend(handles=styles, fontsize="x-small", loc="best")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


# -- markdown -------------------------------------------------------------------------------------
def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def _num(value, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}" if isinstance(value, float) else f"{value:,}"


def _rows(run: Run) -> dict[str, int | None]:
    rows = dict((run.summary or {}).get("data_rows") or {})
    if not rows:
        processed = _get(run.config, "data.processed_dir")
        candidates = [Path(processed), Path(__file__).resolve().parent.parent / processed] if processed else []
        for c in candidates:
            manifest = c / "manifest.json"
            if manifest.is_file():
                try:
                    splits = json.loads(manifest.read_text()).get("splits", {})
                    rows = {s: v.get("num_rows") for s, v in splits.items()}
                except (json.JSONDecodeError, AttributeError):
                    pass
                break
    for split, metrics in run.final().items():
        rows.setdefault(split, metrics.get("num_samples"))
    return rows


def _highlights(run: Run) -> list[str]:
    c, s = run.config or {}, run.summary or {}
    rows = _rows(run)
    lines = []
    data_name = _get(c, "data.name") or s.get("data")
    if data_name:
        row_text = ", ".join(f"{_num(rows[k])} {k}" for k in ("train", "val", "test") if rows.get(k) is not None)
        lines.append(
            f"**data**: {data_name}"
            + (f" ({row_text} rows)" if row_text else "")
            + (f", id_mode {_get(c, 'data.id_mode')}" if _get(c, "data.id_mode") else "")
        )
    if _get(c, "model"):
        m = c["model"]
        lines.append(
            f"**model**: {m.get('name', 'dlrm')}, embedding_dim {m.get('embedding_dim')}, bottom MLP "
            f"{m.get('dense_arch_layer_sizes')}, top MLP {m.get('over_arch_layer_sizes')}"
            + (", self_interaction" if m.get("self_interaction") else "")
        )
    if _get(c, "optimizer"):
        o = c["optimizer"]
        emb_lr = o.get("embedding_lr")
        lines.append(
            f"**optimizer**: {o.get('name')} (tables {o.get('embedding')}, MLPs {o.get('dense')}), lr "
            f"{o.get('lr')}"
            + (f", embedding_lr {emb_lr}" if emb_lr is not None else "")
            + (
                f"; {s['schedule']}"
                if s.get("schedule")
                else f", warmup {o.get('warmup_fraction') if o.get('warmup_steps') is None else o.get('warmup_steps')}"
                f", decay {o.get('decay')}"
            )
        )
    gbs = run.global_batch_size
    ws = s.get("world_size")
    parts = []
    if gbs:
        parts.append(f"global batch {_num(gbs)}" + (f" ({_num(gbs // ws)} per rank)" if ws else ""))
    if ws:
        parts.append(f"world size {ws}" + (f" ({s.get('backend')}, {s.get('device')})" if s.get("backend") else ""))
    if _get(c, "sharding.name"):
        parts.append(f"sharding {_get(c, 'sharding.name')}")
    if parts:
        lines.append("**launch**: " + ", ".join(parts))
    if s:
        lines.append(
            f"**training**: {_num(s.get('steps'))} steps ({_fmt(s.get('epochs'), 2)} epochs), "
            f"{_num(s.get('samples'))} samples, {_num(s.get('train_samples_per_s'))} samples/s, "
            f"training {_fmt(s.get('train_seconds'), 1)} s, wall {_fmt(s.get('wall_seconds'), 1)} s"
        )
    elif run.train:
        last = run.train[-1]
        lines.append(
            f"**training**: not finished (no summary.json): last log at step {_num(last.get('step'))}, "
            f"{_num(last.get('samples'))} samples, {_num(last.get('train/samples_per_s'))} samples/s"
        )
    if run.train and "memory/peak_rss_mib" in run.train[-1]:
        last = run.train[-1]
        mem = f"**memory** (largest rank): peak RSS {_num(last['memory/peak_rss_mib'])} MiB"
        if "memory/cuda_max_allocated_mib" in last:
            mem += f", CUDA max allocated {_num(last['memory/cuda_max_allocated_mib'])} MiB"
        lines.append(mem)
    if run.overrides:
        lines.append("**overrides**: " + " ".join(f"`{o}`" for o in run.overrides))
    if s.get("stopped_early"):
        lines.append(f"**stopped early**: {s['stopped_early']}")
    return lines


def markdown(runs: list[Run], png_name: str = PNG_NAME) -> str:
    single = len(runs) == 1
    title = f"Run report: {runs[0].name}" if single else f"Sweep report: {len(runs)} runs"
    out = [f"# {title}", "", f"![AUC and logloss against samples seen]({png_name})", "", "## Final metrics", ""]
    head = ([] if single else ["run"]) + [
        "split",
        "auc",
        "logloss",
        "ne",
        "accuracy",
        "calibration",
        "optimum auc",
        "optimum logloss",
        "auc gap",
        "logloss gap",
    ]
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    any_row = False
    for run in runs:
        final = run.final()
        optimum = run.optimum or {}
        for split in SPLITS:
            m = final.get(split)
            if m is None:
                continue
            any_row = True
            o = optimum.get(split) or {}
            auc, logloss = m.get("auc"), m.get("logloss")
            gap_auc = o["auc"] - auc if o.get("auc") is not None and auc is not None else None
            gap_ll = logloss - o["logloss"] if o.get("logloss") is not None and logloss is not None else None
            cells = ([] if single else [run.label]) + [
                split,
                _fmt(auc),
                _fmt(logloss),
                _fmt(m.get("normalized_entropy")),
                _fmt(m.get("accuracy")),
                _fmt(m.get("calibration"), 3),
                _fmt(o.get("auc")),
                _fmt(o.get("logloss")),
                _fmt(gap_auc),
                _fmt(gap_ll),
            ]
            out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    if not any_row:
        out.append("| " + " | ".join(["-"] * len(head)) + " |")
        out += ["", "No evaluation in metrics.jsonl yet."]
    if any(not r.summary for r in runs):
        out += [
            "",
            "Runs without summary.json (still running, or stopped) show their last evaluation, "
            "which may be partial (`trainer.eval_max_batches`).",
        ]
    for run in runs:
        out += ["", f"## {run.label or run.name}" if not single else "## Run", "", f"folder: `{run.run_dir}`", ""]
        out += [f"- {line}" for line in _highlights(run)]
    return "\n".join(out) + "\n"


# -- entry points ---------------------------------------------------------------------------------
def write_report(run_dirs: list[str | Path], out_dir: str | Path | None = None) -> tuple[Path, Path]:
    """Write report.png and report.md for the runs in ``run_dirs`` into ``out_dir``; return both paths.

    A folder without metrics.jsonl is taken as a sweep folder and stands for its run subfolders. The
    default ``out_dir`` is the folder given when there is one (a run or a sweep folder), else the runs'
    common parent folder.
    """
    dirs: list[Path] = []
    for d in run_dirs:
        found = find_run_dirs(Path(d))
        if not found:
            raise FileNotFoundError(f"{d}: no metrics.jsonl in it or in its subfolders (not a run or sweep folder)")
        dirs += [p for p in found if p not in dirs]
    runs = [load_run(d) for d in dirs]
    label_runs(runs)
    if out_dir is None:  # the one folder given (a run or a sweep), else the runs' common parent
        out_dir = Path(run_dirs[0]) if len(run_dirs) == 1 else Path(os.path.commonpath([d.resolve() for d in dirs]))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png = plot(runs, out / PNG_NAME)
    md = out / MD_NAME
    md.write_text(markdown(runs, PNG_NAME))
    return png, md


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="./launch.sh report",
        description="Plot AUC/logloss against samples seen (report.png) and summarise (report.md) one run, "
        "or compare several (a sweep folder stands for its runs).",
    )
    parser.add_argument("run_dirs", nargs="+", help="run folders (outputs/<run_id>) or sweep folders (multirun/<id>)")
    parser.add_argument(
        "--out", default=None, help="output folder (default: the run folder, or the runs' common parent folder)"
    )
    args = parser.parse_args(argv)
    try:
        png, md = write_report(args.run_dirs, args.out)
    except FileNotFoundError as e:
        print(f"report: {e}", file=sys.stderr)
        return 2
    print(f"wrote {png}\nwrote {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
