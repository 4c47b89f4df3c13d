"""Quality benchmark on a LightGCN-format dataset (the LightGCN protocol: given train/test files,
full ranking over all items, training items masked, Recall@20 / NDCG@20 over test users).

    python benchmarks/quality.py --data ../shared/data/gowalla [--runs gowalla,gowalla_spectral] [--nproc 1]

Each run is ``python -m recsys.train +experiment=<run> data.path=<data>`` (the experiment files
under conf/experiment/, unchanged but for the path): epochs are chosen on a validation holdout
carved from train.txt, the reported figures are on test.txt. Writes, under --out
(benchmarks/results/ by default):

    quality_<dataset>.md / .json    one row per run, the popularity baseline and the published anchors
    quality_<dataset>.png           Recall@20 by epoch (validation, and test for the curve only)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from recsys.atomic import write_atomic, write_json_atomic, write_text_atomic  # noqa: E402

# Published Recall@20 / NDCG@20 on the LightGCN splits (same protocol): LightGCN (He et al. 2020),
# SimpleX (Mao et al. 2021), UltraGCN (Mao et al. 2021), MF-CCL (SimpleX paper), tuned MF-BPR
# (LightGCN/UltraGCN papers).
ANCHORS = {
    "gowalla": [
        ("MF-BPR (tuned), published", 0.1627, 0.1378),
        ("LightGCN, published", 0.1830, 0.1554),
        ("MF + CCL, published", 0.1837, 0.1493),
        ("UltraGCN, published", 0.1862, 0.1580),
        ("SimpleX, published", 0.1872, 0.1557),
        ("ALS (implicit, 64 factors), measured here", 0.140, 0.122),
    ],
    "yelp2018": [
        ("LightGCN, published", 0.0649, 0.0530),
        ("UltraGCN, published", 0.0683, 0.0561),
        ("SimpleX, published", 0.0701, 0.0575),
    ],
    "amazon-book": [
        ("LightGCN, published", 0.0411, 0.0315),
        ("SimpleX, published", 0.0583, 0.0468),
        ("UltraGCN, published", 0.0681, 0.0556),
    ],
}

DESCRIPTIONS = {
    "gowalla": "gowalla_mf stacked with gowalla_spectral: user [u_mf, w c unit(u_spec)], item [i_mf, i_spec], dim 256 + 1024, w chosen on validation (recsys/stack.py)",
    "gowalla_spectral": "spectral two-tower, dim 1024: item d^1/2 V, user = sum of its items' d^-1/2 V (top singular vectors of the normalised interactions), closed form, no epochs",
    "gowalla_two_tower": "two-tower, dim 256: 0.2 id + 0.8 mean history bag (own table); cosine softmax T=0.1 over in-batch + 2048 uniform negatives, logQ",
    "gowalla_mf": "MF, dim 256 (id embeddings only); same loss, optimiser and selection",
}


def _log_span_s(log: Path) -> float:
    """Seconds between the first and the last timestamped line of a run's log."""
    from datetime import datetime

    stamps = [datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f") for line in log.read_text().splitlines()
              if line.startswith("[20")]
    return (stamps[-1] - stamps[0]).total_seconds()


def experiment_hash(overrides: list[str]) -> str:
    """The run hash (``recsys.training.checkpoint.run_hash``) of ``recsys.train`` with these overrides."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from recsys.config import register_configs, register_resolvers
    from recsys.training.checkpoint import run_hash

    register_configs()
    register_resolvers()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return run_hash(OmegaConf.to_object(compose("config", overrides=overrides)))


def run(name: str, data: str, out_dir: Path, nproc: int, extra: list[str], reuse: bool = False) -> dict:
    run_dir = out_dir / name
    metrics = None
    if reuse and (run_dir / "metrics.json").exists():
        metrics = json.loads((run_dir / "metrics.json").read_text())
        want = experiment_hash([f"+experiment={name}", f"data.path={data}", *extra])
        if metrics.get("run_hash", want) != want:  # (runs older than the hash in metrics.json are taken as they are)
            print(f"not reusing {run_dir}: its run hash {metrics['run_hash']} is not +experiment={name}'s {want}",
                  flush=True)
            metrics = None
    if metrics is not None:
        wall_file = run_dir / "command_wall_s.json"
        metrics["command_wall_s"] = (json.loads(wall_file.read_text())["command_wall_s"] if wall_file.exists()
                                     else round(_log_span_s(run_dir / "train.log"), 1))
        print(f"reusing {run_dir}", flush=True)
        return metrics
    overrides = [f"+experiment={name}", f"data.path={data}", f"hydra.run.dir={run_dir}", "train.progress=false",
                 *extra]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "recsys.train", *overrides]
    else:
        cmd = [sys.executable, "-m", "recsys.train", *overrides]
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    wall = time.perf_counter() - t0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["command_wall_s"] = round(wall, 1)
    write_text_atomic(json.dumps({"command_wall_s": metrics["command_wall_s"]}) + "\n", run_dir / "command_wall_s.json")
    return metrics


def table(dataset: str, results: dict) -> str:
    lines = [f"# Quality on {dataset} (LightGCN protocol: full ranking, training items masked)", "",
             "| model / loss | Recall@20 | NDCG@20 | valid Recall@20 | epochs (selected) | wall time |",
             "|---|---|---|---|---|---|"]
    pop = None
    stacks = []
    for name, m in results.items():
        t = m["test"]
        v = m.get("valid", {}).get("recall@20")
        sel = m.get("selected_epoch")
        epochs = f"{m['train']['epochs']} ({sel + 1})" if sel is not None else str(m["train"]["epochs"])
        lines.append(f"| **{name}**: {DESCRIPTIONS.get(name, name)} | **{t['recall@20']:.4f}** | **{t['ndcg@20']:.4f}** "
                     f"| {'' if v is None else f'{v:.4f}'} | {epochs} | {m['command_wall_s'] / 60:.1f} min |")
        if "stack" in m:
            stacks.append((name, m["stack"]))
        pop = pop or m.get("popularity")
    if pop:
        lines.append(f"| popularity (same evaluator) | {pop['recall@20']:.4f} | {pop['ndcg@20']:.4f} | | | |")
    for label, r, n in ANCHORS.get(dataset, []):
        lines.append(f"| {label} | {r:.4f} | {n:.4f} | | | |")
    for name, st in stacks:
        grid = st.get("valid", {})
        cells = ", ".join(f"{k} {v['recall@20']:.4f}" for k, v in grid.items())
        lines += ["", f"{name}: spectral weight w = {st['chosen_weight']} chosen on validation Recall@20 "
                  f"(w: {cells}; 0.0 = the trained model alone); stacking took {st['seconds'] / 60:.1f} min of the wall time."]
    any_m = next(iter(results.values()))
    lines += ["", f"Machine: {os.cpu_count()} CPU cores, world size {any_m['train']['world_size']}, "
              f"device {any_m['train']['device']}. Wall time is the whole command (data preparation, training, "
              "per-epoch validation, test evaluation, export). Epochs: run (selected by validation Recall@20)."]
    return "\n".join(lines) + "\n"


def plot(dataset: str, results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, m in results.items():
        hist = m["train"]["history"]
        if not hist:  # a closed-form model (train.epochs=0): its result as a level
            ax.axhline(m["test"]["recall@20"], color="black", lw=1.5, ls="--", label=f"{name} (closed form, test)")
            if m.get("valid"):
                ax.axhline(m["valid"]["recall@20"], color="black", lw=1, label=f"{name} (closed form, valid)")
            continue
        epochs = [h["epoch"] + 1 for h in hist]
        part = " trained towers" if "stack" in m else ""  # the per-epoch curve is of the towers before stacking
        if all("valid" in h for h in hist):
            line, = ax.plot(epochs, [h["valid"]["recall@20"] for h in hist], marker="o", ms=3,
                            label=f"{name}{part} (valid)")
            color = line.get_color()
        else:
            color = None
        if all("test" in h for h in hist):
            ax.plot(epochs, [h["test"]["recall@20"] for h in hist], ls="--", color=color, label=f"{name}{part} (test)")
        if m.get("selected_epoch") is not None:
            ax.axvline(m["selected_epoch"] + 1, color=color, lw=0.8, alpha=0.5)
            if "stack" in m:  # the tested model: the selected epoch's towers stacked with the spectral closed form
                x = m["selected_epoch"] + 1
                ax.plot([x], [m["test"]["recall@20"]], marker="*", ms=12, ls="", color=color,
                        label=f"{name}: stacked (test)")
                ax.plot([x], [m["valid"]["recall@20"]], marker="P", ms=9, ls="", color=color,
                        label=f"{name}: stacked (valid)")
    for label, r, _ in ANCHORS.get(dataset, []):
        if "SimpleX" in label or "LightGCN" in label:
            ax.axhline(r, color="grey", lw=0.8, ls=":")
            ax.text(1, r, label, fontsize=7, va="bottom", color="grey")
    ax.set_xlabel("epoch")
    ax.set_ylabel("Recall@20")
    ax.set_title(f"{dataset}: Recall@20 by epoch (valid: selection; test: curve only)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a LightGCN-format directory (train.txt, test.txt)")
    p.add_argument("--runs", default="gowalla,gowalla_spectral,gowalla_two_tower,gowalla_mf", help="experiment names (conf/experiment/*.yaml)")
    p.add_argument("--nproc", type=int, default=1, help="ranks per run (torchrun) ")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--runs-dir", default=str(ROOT / "outputs" / "bench-quality"))
    p.add_argument("--reuse", action="store_true", help="take runs whose metrics.json exists instead of rerunning")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = p.parse_args()
    dataset = Path(args.data).resolve().name
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs_dir = Path(args.runs_dir) / dataset
    results = {}
    for name in args.runs.split(","):
        results[name] = run(name, str(Path(args.data).resolve()), runs_dir, args.nproc, args.overrides, args.reuse)
    md = table(dataset, results)
    summary = {name: {"test": m["test"], "valid": m.get("valid"), "selected_epoch": m.get("selected_epoch"),
                      "stack": m.get("stack"),
                      "popularity": m.get("popularity"), "train": m["train"], "command_wall_s": m["command_wall_s"]}
               for name, m in results.items()}
    write_text_atomic(md, out / f"quality_{dataset}.md")
    write_json_atomic(summary, out / f"quality_{dataset}.json")
    plot(dataset, results, out / f"quality_{dataset}.png")
    print(md)
    print(f"written: {out}/quality_{dataset}.md, .json, .png")


if __name__ == "__main__":
    main()
