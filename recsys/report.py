"""Reports a person reads: dataset statistics, PNG plots and a run's ``summary.md``.

Shared by ``recsys.prepare`` (the dataset report and its popularity plot), ``recsys.train``
(plots, ``summary.md`` in the run directory, the console table) and ``recsys.evaluate`` (the
table). Everything here takes plain typed arguments (arrays, dicts, paths) and writes files
atomically; plots use matplotlib's Agg canvas through ``matplotlib.figure.Figure`` (no pyplot
state, no display needed).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

from recsys.atomic import write_atomic, write_text_atomic
from recsys.data.dataset import Dataset

logger = logging.getLogger(__name__)

QUANTILES = {"min": 0.0, "25%": 0.25, "50%": 0.5, "75%": 0.75, "90%": 0.9, "99%": 0.99, "max": 1.0}

DROP_REASONS = {
    "null_ids": "a user or item id is missing",
    "test_null_ids": "test file: a user or item id is missing",
    "below_min_rating": "rating below data.min_rating",
    "duplicates": "repeated (user, item) pair",
    "train_duplicates": "train file: repeated (user, item) pair",
    "test_duplicates": "test file: repeated (user, item) pair",
    "test_unseen_user": "test user absent from the training split (no vector)",
    "test_unseen_item": "test item absent from the training split (no vector)",
}


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def save_figure(fig, path: Path) -> Path:
    """Save a matplotlib Figure as PNG atomically (temporary name with the .png suffix, then rename)."""
    return write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight"))


def _figure(ncols: int = 1, width: float = 6.4, height: float = 4.2):
    from matplotlib.figure import Figure  # Agg canvas when saved; imported lazily (startup time)

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


# ---------------------------------------------------------------------------------------------
# Dataset statistics
# ---------------------------------------------------------------------------------------------


def count_quantiles(counts: np.ndarray) -> Dict[str, float]:
    """min, 25%, 50%, 75%, 90%, 99%, max of `counts` (numpy's default linear interpolation)."""
    counts = np.asarray(counts, dtype=np.float64)
    if len(counts) == 0:
        return {name: 0.0 for name in QUANTILES}
    values = np.quantile(counts, list(QUANTILES.values()))
    return {name: float(v) for name, v in zip(QUANTILES, values)}


def dataset_report(dataset: Dataset) -> Dict:
    """Counts, density, per-user and per-item interaction quantiles and dropped rows of a prepared dataset.

    Per-user / per-item counts are over the training split (validation holdout included): the
    interactions the embedding rows are learnt from. Density is every kept interaction (train,
    validation and test) over users x items."""
    n_valid = int(dataset.valid.sum())
    return counts_report(dataset.path, dataset.manifest, np.bincount(dataset.train_users, minlength=dataset.num_users),
                         np.bincount(dataset.train_items, minlength=dataset.num_items),
                         len(dataset.train_users) - n_valid, n_valid, len(dataset.test_users),
                         int(len(np.unique(dataset.test_users))))


def stream_report(path: Path) -> Dict:
    """:func:`dataset_report` of a streamed prepared directory, from its counts (no pass over the data)."""
    manifest = json.loads((Path(path) / "manifest.json").read_text())
    counts = manifest["counts"]
    n_valid = counts.get("valid_interactions", 0)
    return counts_report(Path(path), manifest, np.load(Path(path) / "user_counts.npy"),
                         np.load(Path(path) / "item_counts_all.npy"), counts["train_interactions"] - n_valid, n_valid,
                         counts["test_interactions"], counts["test_users"])


def counts_report(path: Path, manifest: Mapping, per_user: np.ndarray, per_item: np.ndarray, n_train: int,
                  n_valid: int, n_test: int, test_users: int) -> Dict:
    num_users, num_items = len(per_user), len(per_item)
    cells = num_users * num_items
    dropped = {k: int(v) for k, v in manifest.get("dropped", {}).items()}
    return {
        "path": str(path),
        "source": manifest.get("source"),
        "split": manifest.get("split"),
        "num_users": num_users,
        "num_items": num_items,
        "interactions": {"train": n_train, "valid": n_valid, "test": n_test, "total": n_train + n_valid + n_test},
        "test_users": test_users,
        "density": (n_train + n_valid + n_test) / cells if cells else 0.0,
        "per_user": count_quantiles(per_user),
        "per_item": count_quantiles(per_item),
        "per_user_mean": float(per_user.mean()) if len(per_user) else 0.0,
        "per_item_mean": float(per_item.mean()) if len(per_item) else 0.0,
        "top_1pct_items_share": top_share(per_item, 0.01),
        "raw_interactions": manifest.get("counts", {}).get("raw_interactions"),
        "dropped": dropped,
    }


def top_share(counts: np.ndarray, fraction: float) -> float:
    """Share of all interactions held by the most popular `fraction` of the rows (at least one row)."""
    counts = np.sort(np.asarray(counts, dtype=np.float64))[::-1]
    total = counts.sum()
    if total == 0:
        return 0.0
    n = max(1, int(round(fraction * len(counts))))
    return float(counts[:n].sum() / total)


def _num(x: float) -> str:
    return f"{int(x):,}" if float(x).is_integer() else f"{x:,.1f}"


def format_dataset_report(report: Mapping) -> str:
    """The dataset report as Markdown (it reads as plain text in a terminal too)."""
    n = report["interactions"]
    lines = [
        f"# Dataset {Path(report['path']).name}",
        "",
        f"- prepared: `{report['path']}` (source `{report['source']}`, split `{report['split']}`)",
        f"- users: {report['num_users']:,}; items: {report['num_items']:,}",
        f"- interactions: {n['train']:,} train, {n['valid']:,} valid, {n['test']:,} test "
        f"({n['total']:,} in all; {report['test_users']:,} users with test items)",
        f"- density: {report['density']:.3g} (interactions / (users x items))",
        f"- the 1% most popular items hold {100 * report['top_1pct_items_share']:.1f}% of the training interactions",
        "",
        "Training interactions (train + valid) per user and per item:",
        "",
        "|          | mean | " + " | ".join(QUANTILES) + " |",
        "|---" * (len(QUANTILES) + 2) + "|",
    ]
    for who in ("user", "item"):
        q = report[f"per_{who}"]
        cells = [f"{report[f'per_{who}_mean']:,.1f}"] + [_num(q[k]) for k in QUANTILES]
        lines.append(f"| per {who} | " + " | ".join(cells) + " |")
    lines += ["", "Dropped rows:" + ("" if any(report["dropped"].values()) else " none"), ""]
    for reason, count in report["dropped"].items():
        if count:
            lines.append(f"- {reason}: {count:,} ({DROP_REASONS.get(reason, reason.replace('_', ' '))})")
    if report.get("raw_interactions") is not None:
        what = "rows of the training file" if report.get("split") == "given" else "interactions"
        lines.append(f"- raw {what} read: {report['raw_interactions']:,}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------


def _rank_curve(ax, counts: np.ndarray, label: str) -> int:
    counts = np.sort(np.asarray(counts))[::-1]
    nonzero = counts[counts > 0]
    ax.loglog(np.arange(1, len(nonzero) + 1), nonzero, label=f"{label} ({len(counts):,})")
    return len(counts) - len(nonzero)


def plot_popularity(item_counts: np.ndarray, path: Path, user_counts: Optional[np.ndarray] = None,
                    title: str = "Popularity in the training data") -> Path:
    """Rank-frequency plot (log-log) of items' (and users') training interaction counts."""
    fig, (ax,) = _figure()
    zero = _rank_curve(ax, item_counts, "items")
    if user_counts is not None:
        _rank_curve(ax, user_counts, "users")
    ax.set_xlabel("rank (most interactions first, log scale)")
    ax.set_ylabel("training interactions (log scale)")
    share = top_share(item_counts, 0.01)
    ax.set_title(f"{title}\nthe top 1% of items hold {100 * share:.1f}% of the interactions"
                 + (f"; {zero:,} items have none" if zero else ""), fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def plot_loss(steps: Sequence[int], losses: Sequence[float], epoch_steps: Sequence[int],
              epoch_losses: Sequence[float], path: Path) -> Path:
    """Training loss over steps: the logged batches' loss and each epoch's mean."""
    fig, (ax,) = _figure()
    if len(steps):
        ax.plot(steps, losses, lw=1, alpha=0.8, label="batch loss (rank 0, every log_every_steps)")
    if len(epoch_steps):
        ax.plot(epoch_steps, epoch_losses, "o-", label="epoch mean (all ranks)")
    for s in epoch_steps:
        ax.axvline(s, color="grey", lw=0.5, ls=":")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("Training loss (dotted: end of an epoch)" if len(steps) or len(epoch_steps)
                 else "No training steps (train.epochs=0)", fontsize=10)
    ax.grid(True, alpha=0.3)
    if len(steps) or len(epoch_steps):
        ax.legend()
    return save_figure(fig, path)


def plot_metrics(history: Sequence[Mapping], test: Mapping[str, float], ks: Sequence[int], path: Path,
                 popularity: Optional[Mapping[str, float]] = None, selected_epoch: Optional[int] = None) -> Path:
    """Recall@K and NDCG@K over steps: per-epoch validation (solid) and test (dashed) when recorded,
    the final test (crosses, at the step of the tested weights) and the popularity baseline (dotted)."""
    fig, axes = _figure(2)
    last_step = history[-1]["steps"] if history else 0
    final_step = history[selected_epoch]["steps"] if selected_epoch is not None else last_step
    colors = [f"C{i}" for i in range(10)]
    for ax, metric in zip(axes, ("recall", "ndcg")):
        for i, k in enumerate(ks):
            key, color = f"{metric}@{k}", colors[i % len(colors)]
            for split, style in (("valid", "-"), ("test", "--")):
                points = [(h["steps"], h[split][key]) for h in history if split in h and key in h[split]]
                if points:
                    xs, ys = zip(*points)
                    ax.plot(xs, ys, style, marker=".", color=color, label=f"{split} {key}")
            if key in test:
                ax.plot([final_step], [test[key]], "x", ms=10, mew=2, color=color, label=f"final test {key}")
            if popularity and key in popularity:
                ax.axhline(popularity[key], ls=":", color=color, label=f"popularity {key}")
        if selected_epoch is not None:
            ax.axvline(final_step, color="grey", lw=0.8, label=f"selected epoch {selected_epoch}")
        ax.set_xlabel("step")
        ax.set_ylabel(f"{metric}@K")
        ax.set_xlim(0, max(last_step, 1) * 1.05)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    curves = any("valid" in h or "test" in h for h in history)
    fig.suptitle("Ranking metrics (full corpus, training items masked)" + (
        "" if curves else "\nno per-epoch evaluation: data.valid_fraction > 0 or eval.test_every_epoch=true "
                          "draws curves"), fontsize=10)
    return save_figure(fig, path)


def plot_norms(user_norms: np.ndarray, item_norms: np.ndarray, path: Path, normalized: bool,
               item_rows: Optional[np.ndarray] = None, item_counts: Optional[np.ndarray] = None) -> Path:
    """Histograms of user and item vector norms and, with training counts, item norm against popularity.

    With ``normalized`` the norms are those of the towers' raw outputs (the exported vectors are
    their L2-normalised versions, all of norm 1)."""
    scatter = item_rows is not None and item_counts is not None
    fig, axes = _figure(3 if scatter else 2, width=4.6)
    which = "raw tower outputs, before L2 normalisation" if normalized else "exported vectors"
    for ax, name, norms in zip(axes, ("user", "item"), (user_norms, item_norms)):
        norms = np.asarray(norms, dtype=np.float64)
        ax.hist(norms, bins=50, color="C0" if name == "user" else "C1")
        if len(norms):
            ax.axvline(np.median(norms), color="k", lw=1, ls="--", label=f"median {np.median(norms):.3g}")
            ax.legend(fontsize=8)
        ax.set_xlabel(f"{name} vector L2 norm")
        ax.set_ylabel(f"{name}s ({len(norms):,})")
        ax.grid(True, alpha=0.3)
    if scatter:
        ax = axes[2]
        counts = np.asarray(item_counts)[np.asarray(item_rows)]
        ax.scatter(np.maximum(counts, 0.8), item_norms, s=3, alpha=0.4, color="C1")
        ax.set_xscale("log")
        ax.set_xlabel("item training interactions (log scale)")
        ax.set_ylabel("item vector L2 norm")
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"Vector norms ({which})" + ("; exported vectors have norm 1" if normalized else ""), fontsize=10)
    return save_figure(fig, path)


# ---------------------------------------------------------------------------------------------
# summary.md of a run
# ---------------------------------------------------------------------------------------------


def result_rows(metrics: Mapping) -> List[tuple]:
    """The console table's rows of a run's (or an evaluation's) metrics: the model, the
    popularity baseline, the model over all test interactions, the cold items."""
    rows = [("model", metrics["test"])] + ([("popularity", metrics["popularity"])] if "popularity" in metrics else [])
    if "test_all" in metrics:  # over every test interaction: those without a vector are misses
        rows.append(("model, all test", metrics["test_all"]["model"]))
    for name, m in metrics.get("cold_items", {}).items():
        rows.append((f"cold items: {name.replace('_', ' ')}", m))
    return rows


def metrics_table(rows: Sequence[tuple], ks: Sequence[int]) -> str:
    """The console table of ``recsys.train`` and ``recsys.evaluate``: one line per (name, metrics),
    recall@K and ndcg@K for each K."""
    width = max([12] + [len(name) + 2 for name, _ in rows])
    header = "".join(f"{f'{m}@{k}':>12}" for k in ks for m in ("recall", "ndcg"))
    lines = [f"{'':<{width}}{header}"]
    for name, m in rows:
        lines.append(f"{name:<{width}}" + "".join(f"{m[f'{k_m}@{k}']:>12.4f}" for k in ks for k_m in ("recall", "ndcg")))
    return "\n".join(lines)


def _metric_row(name: str, m: Mapping[str, float], ks: Sequence[int]) -> str:
    return f"| {name} | " + " | ".join(f"{m[f'{x}@{k}']:.4f}" if f"{x}@{k}" in m else "" for k in ks
                                       for x in ("recall", "ndcg")) + " |"


def _link(target: Path, run_dir: Path) -> str:
    rel = os.path.relpath(Path(target).resolve(), Path(run_dir).resolve())
    return f"[{rel}]({Path(rel).as_posix()})"


def write_summary(run_dir: Path, metrics: Mapping, ks: Sequence[int], figures: Mapping[str, Path],
                  tensorboard_dir: Optional[Path] = None) -> Path:
    """``<run_dir>/summary.md``: data, metrics against the popularity baseline, training time and
    throughput, the selected epoch, files written, and the plots (relative links)."""
    run_dir = Path(run_dir)
    d, t = metrics.get("data", {}), metrics.get("train", {})
    lines = [f"# Run {run_dir.name}", ""]
    if d:
        users, items = d.get("num_users", 0), d.get("num_items", 0)
        n_valid = d.get("valid_interactions", 0)
        n_train = d.get("train_interactions", 0) - n_valid
        n_test = d.get("test_interactions", 0)
        density = (n_train + n_valid + n_test) / (users * items) if users and items else 0.0
        dropped = {k: v for k, v in d.get("dropped", {}).items() if v}
        lines += [
            "## Data", "",
            f"- prepared dataset: `{d.get('path')}`",
            f"- {users:,} users, {items:,} items; density {density:.3g}",
            f"- interactions: {n_train:,} train, {n_valid:,} valid, {n_test:,} test "
            f"({d.get('test_users', 0):,} test users)",
            "- dropped rows: " + (", ".join(f"{k} {v:,} ({DROP_REASONS.get(k, k.replace('_', ' '))})"
                                            for k, v in dropped.items()) or "none"),
            "",
        ]
    header = " | ".join(f"{x}@{k}" for k in ks for x in ("recall", "ndcg"))
    lines += ["## Metrics", "", f"Test split, {metrics['test'].get('users', 0):,} users; full-corpus ranking "
              "with each user's training items masked.", "",
              f"| | {header} |", "|---" * (2 * len(ks) + 1) + "|", _metric_row("model", metrics["test"], ks)]
    if "popularity" in metrics:
        lines.append(_metric_row("popularity baseline", metrics["popularity"], ks))
    for name, m in metrics.get("test_all", {}).items():
        lines.append(_metric_row(f"{'model' if name == 'model' else 'popularity baseline'}, all {m.get('users', 0):,} "
                                 "test users (interactions without a vector: misses)", m, ks))
    for name, m in metrics.get("cold_items", {}).items():
        lines.append(_metric_row(f"cold items ({m.get('users', 0):,} users): {name.replace('_', ' ')}", m, ks))
    stack = metrics.get("stack")
    if "valid" in metrics:
        what = "stacked model" if stack and stack.get("chosen_weight") else "model"
        lines.append(_metric_row(f"{what}, validation (epoch {metrics.get('selected_epoch')})", metrics["valid"], ks))
    lines.append("")
    if stack:
        grid = ", ".join(f"{w} {m.get('recall@20', float('nan')):.4f}" for w, m in stack.get("valid", {}).items())
        lines += [f"Stacked with the spectral closed form (dim {stack['dim']}, recsys/stack.py): weight "
                  f"w = {stack['chosen_weight']}" + (f", chosen on validation recall@20 ({grid}; 0.0: the trained "
                                                       "towers alone)" if grid else " (given)")
                  + f"; {stack['seconds']:.1f} s.", ""]
    if t:
        lines += [
            "## Training", "",
            f"- {t.get('steps', 0):,} steps, {t.get('epochs', 0)} epoch(s) on {t.get('world_size', 1)} rank(s), "
            f"device {t.get('device')}",
            f"- training time {t.get('wall_s', 0):.1f} s, {t.get('interactions_per_s', 0):,.0f} interactions/s "
            "(in-loop evaluation excluded)",
        ]
        if "selected_epoch" in metrics:
            lines.append(f"- selected epoch: {metrics['selected_epoch']} (best validation); its weights are "
                         "the ones tested and exported")
        else:
            lines.append("- selected epoch: the last (no validation split)")
        if "eval" in metrics:
            lines.append(f"- evaluation time {metrics['eval'].get('wall_s', 0):.1f} s at the end, "
                         f"{metrics['eval'].get('per_epoch_wall_s', 0):.1f} s per-epoch")
        lines.append("")
    files = [("metrics", run_dir / "metrics.json"), ("config", run_dir / ".hydra" / "config.yaml")]
    export = metrics.get("export") or {}
    if export.get("dir"):
        export_dir = Path(export["dir"])
        export_dir = export_dir if export_dir.is_absolute() else run_dir / export_dir
        if export_dir.is_dir():
            files += [("export", f) for f in sorted(export_dir.iterdir()) if not f.name.startswith(".")]  # parts: dirs
    lines += ["## Files", ""]
    lines += [f"- {name}: {_link(f, run_dir)}" for name, f in files if Path(f).exists()]
    for key, value in export.items():
        if key != "dir" and isinstance(value, (int, float, str)):
            lines.append(f"- export {key}: {value}")
        elif isinstance(value, Mapping):
            lines += [f"- export {key}.{k}: {v}" for k, v in value.items() if isinstance(v, (int, float, str))]
    if tensorboard_dir is not None and Path(tensorboard_dir).exists():
        lines.append(f"- TensorBoard: `tensorboard --logdir {tensorboard_dir}`")
    lines.append("")
    present = {name: p for name, p in figures.items() if Path(p).exists()}
    if present:
        lines += ["## Plots", ""]
        for name, p in present.items():
            rel = Path(os.path.relpath(Path(p).resolve(), run_dir.resolve())).as_posix()
            lines += [f"### {name}", "", f"![{name}]({rel})", ""]
    return write_text_atomic("\n".join(lines), run_dir / "summary.md")


def run_plots(run_dir: Path, metrics: Dict, ks, item_counts: np.ndarray, user_counts: np.ndarray,
              norms: Optional[Dict[str, tuple]], normalized: bool) -> Dict[str, Path]:
    """The run's PNG plots (rank 0); a failing plot is logged, not fatal (the results are written)."""
    figures = {}
    hist = metrics["train"]["history"]
    curve = metrics["train"]["loss_curve"]
    try:
        figures["Training loss"] = plot_loss(curve["step"], curve["loss"], [h["steps"] for h in hist],
                                             [h["loss"] for h in hist], run_dir / "loss.png")
        figures["Ranking metrics"] = plot_metrics(hist, metrics["test"], ks, run_dir / "metrics.png",
                                                  metrics.get("popularity"), metrics.get("selected_epoch"))
        figures["Popularity of the training data"] = plot_popularity(item_counts, run_dir / "popularity.png",
                                                                     user_counts)
        if norms:
            figures["Vector norms"] = plot_norms(norms["user"][1], norms["item"][1], run_dir / "norms.png",
                                                 normalized, norms["item"][0], item_counts)
    except Exception as e:  # noqa: BLE001
        logger.warning("plots: %s: %s", type(e).__name__, e)
    return figures
