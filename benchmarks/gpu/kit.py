"""The GPU verification kit: install the carried CUDA stack, then check the CUDA path stage by stage.

On a CUDA machine that has torch but no torchrec / fbgemm-gpu and no network (the pieces come
from ``benchmarks/gpu/prepare_kit.py``, which prints these calls):

    python3 benchmarks/gpu/kit.py receive                 # each call but the last: keep its piece
    python3 benchmarks/gpu/kit.py receive && python3 benchmarks/gpu/kit.py run --stages env,parity,resume,demo,throughput,gowalla --out $OUT
    python3 benchmarks/gpu/kit.py run --stages tests --out $OUT          # the next call: the test suite
    python benchmarks/gpu/kit.py run --dry-run --out /tmp/kit            # here: the wiring, on the CPU

``run`` installs the pieces once (joined, SHA-256 checked, zstd stream read by pyarrow, the tar
unpacked into ``$RECSYS_KIT_HOME``, default /tmp/recsys_kit: ``site/`` on PYTHONPATH, ``payload/``),
then runs each stage as its own process under its own timeout:

| stage | what | compared with |
| --- | --- | --- |
| env | versions, the GPU, FBGEMM's CUDA operators load | |
| tests | the test suite on the CUDA stack (its CPU tests: the suite hides GPUs) | all pass |
| parity | ``parity.py``: fused RowWiseAdagrad steps, fp16 rounding, evaluator, DCP round trip | the CPU in the same process |
| resume | the CPU stack's checkpoint (torch 2.13 / torchrec 1.8) evaluated and resumed on CUDA | the CPU's figures |
| demo | ``python -m recsys.train train.device=cuda`` (NCCL) | the CPU demo's Recall/NDCG@20 |
| throughput | ``benchmarks/throughput.py --device cuda``: MF dim 128, GPU batches, HBM roofline | plain PyTorch, the bound |
| gowalla | three epochs of ``gowalla_mf`` (batch 512) and ``gowalla_mf_gpu`` (8,192) on CUDA, their times | the CPU's first three epochs |

A call has ``--budget-s`` seconds (default 540; a device call ends at 600): each stage's timeout
is cut to what is left and a stage with no time left is skipped. Each stage's output goes to one
log (``kit.log``); after every stage the figures go to ``kit.json`` (merged over calls, also kept
in the kit's home) and the table to ``summary.md``, so a call cut short still returns what it did;
``throughput.json`` / ``.md`` beside them. ``--dry-run`` runs the same stages on the CPU at toy sizes, with this environment's
packages, to check their wiring (each stage then says ``dry``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from recsys.atomic import file_sha256  # noqa: E402

HOME = Path(os.environ.get("RECSYS_KIT_HOME", "/tmp/recsys_kit"))
CARRIED = ROOT / ".gpu_kit"
# The CPU figures the GPU runs are read against (this 2-core machine): the demo (README), the first
# three epochs of +experiment=gowalla_mf (benchmarks/results/quality_gowalla.json, test Recall/NDCG@20
# after epoch 3 and seconds per epoch).
CPU_DEMO = {"recall@20": 0.3687, "ndcg@20": 0.2752}
CPU_GOWALLA_MF_3 = {"recall@20": 0.1604, "ndcg@20": 0.1309, "epoch_s": 52.9}
# +experiment=gowalla_mf_gpu (batch 8192) after three epochs on the same CPU (its lr choice, see its yaml)
CPU_GOWALLA_MF_GPU_3 = {"recall@20": 0.1536, "ndcg@20": 0.1225}
STAGES = ["env", "parity", "resume", "demo", "throughput", "gowalla", "tests"]


# ---------------------------------------------------------------------------------------------
# Pieces: receive, verify, install
# ---------------------------------------------------------------------------------------------


def manifest_of(directory: Path) -> Dict:
    path = directory / "manifest.json"
    if not path.is_file():
        raise SystemExit(f"error: no {path}: run benchmarks/gpu/prepare_kit.py here, carry .gpu_kit/manifest.json")
    return json.loads(path.read_text())


def receive() -> None:
    """Keep the carried pieces (checked) in the kit's home, which outlives the call on a warm machine."""
    manifest = manifest_of(CARRIED)
    pieces = HOME / "pieces"
    pieces.mkdir(parents=True, exist_ok=True)
    shutil.copy2(CARRIED / "manifest.json", pieces / "manifest.json")
    for piece in manifest["pieces"]:
        src = CARRIED / piece["name"]
        if src.is_file():
            if file_sha256(src) != piece["sha256"]:
                raise SystemExit(f"error: {src}: SHA-256 differs from the manifest (carried incompletely?)")
            shutil.copy2(src, pieces / piece["name"])
    have = [p["name"] for p in manifest["pieces"] if (pieces / p["name"]).is_file()]
    missing = [p["name"] for p in manifest["pieces"] if p["name"] not in have]
    print(f"kit pieces in {pieces}: {len(have)} of {len(manifest['pieces'])}"
          + (f"; still to carry: {', '.join(missing)}" if missing else "; complete"), flush=True)


class Joined:
    """The pieces read back to back as one file (what pyarrow's zstd stream reads)."""

    def __init__(self, paths: List[Path]) -> None:
        self.paths, self.index, self.file = paths, 0, open(paths[0], "rb")
        self.digest = hashlib.sha256()
        self.closed = False

    def read(self, n: int = -1) -> bytes:
        out = b""
        while (n < 0 or len(out) < n) and self.file is not None:
            block = self.file.read(-1 if n < 0 else n - len(out))
            if block:
                out += block
                continue
            self.file.close()
            self.index += 1
            self.file = open(self.paths[self.index], "rb") if self.index < len(self.paths) else None
        self.digest.update(out)
        return out

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        self.closed = True


def open_archive(directory: Path):
    """(the tar stream of the joined pieces in `directory`, the Joined file whose digest it feeds)."""
    import pyarrow as pa

    manifest = manifest_of(directory)
    paths = [directory / p["name"] for p in manifest["pieces"]]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise SystemExit(f"error: kit pieces missing in {directory}: {', '.join(missing)} (kit.py receive each)")
    joined = Joined(paths)
    stream = pa.CompressedInputStream(pa.PythonFile(joined, mode="r"), "zstd")
    return tarfile.open(fileobj=stream, mode="r|"), joined, manifest


def verify(directory: Path) -> None:
    """Read the whole archive as ``install`` would, without writing: members and the SHA-256."""
    archive, joined, manifest = open_archive(directory)
    members = sum(1 for _ in archive)
    archive.close()
    if joined.digest.hexdigest() != manifest["archive_sha256"]:
        raise SystemExit("error: the joined pieces' SHA-256 differs from the manifest")
    print(f"kit archive ok: {len(manifest['pieces'])} pieces, {manifest['archive_bytes']:,} bytes, {members} files")


def install() -> Dict:
    """Unpack the pieces into HOME once (site/, payload/); the environment the stages run in."""
    done = HOME / "installed.json"
    if not done.is_file():
        t0 = time.perf_counter()
        for name in ("site", "payload"):
            shutil.rmtree(HOME / name, ignore_errors=True)
        archive, joined, manifest = open_archive(HOME / "pieces")
        archive.extractall(HOME, filter="data")
        archive.close()
        if joined.digest.hexdigest() != manifest["archive_sha256"]:
            raise SystemExit("error: the joined pieces' SHA-256 differs from the manifest")
        done.write_text(json.dumps({"seconds": round(time.perf_counter() - t0, 1), "wheels": manifest["wheels"]}))
    return {"PYTHONPATH": f"{HOME / 'site'}:{ROOT}"}


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------


class Kit:
    def __init__(self, out: Path, dry: bool, env: Dict[str, str]) -> None:
        self.out, self.dry = out, dry
        self.env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        self.device = "cpu" if dry else "cuda"
        self.work = (out if dry else HOME) / "work"
        self.work.mkdir(parents=True, exist_ok=True)
        self.payload = (CARRIED if dry else HOME) / "payload"
        self.log = open(out / "kit.log", "a")

    def sh(self, name: str, cmd: List[str], timeout: float, env: Optional[Dict] = None) -> subprocess.CompletedProcess:
        """`cmd` under `timeout`, its output appended to kit.log; raises StageFailed on a non-zero exit."""
        self.log.write(f"\n===== {name}: {' '.join(cmd)}\n")
        self.log.flush()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env={**self.env, **(env or {})}, capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired as e:
            self.log.write(_text(e.stdout) + _text(e.stderr) + f"\n===== {name}: TIMEOUT after {timeout:.0f} s\n")
            raise StageFailed(f"timeout after {timeout:.0f} s") from None
        self.log.write(proc.stdout + proc.stderr + f"\n===== {name}: exit {proc.returncode}\n")
        self.log.flush()
        if proc.returncode != 0:
            tail = [line for line in (proc.stderr or proc.stdout).strip().splitlines() if line.strip()][-1:]
            raise StageFailed(f"exit {proc.returncode}: {tail[0][:200] if tail else ''}")
        return proc

    def python(self, name: str, args: List[str], timeout: float, **kw) -> subprocess.CompletedProcess:
        return self.sh(name, [sys.executable, *args], timeout, **kw)

    # ---- the stages: each returns its figures (a dict) or raises StageFailed

    def env_stage(self, timeout: float) -> Dict:
        code = ("import json, torch, subprocess\n"
                "out = {'torch': torch.__version__, 'cuda': torch.version.cuda, 'gpu': torch.cuda.is_available()}\n"
                "import fbgemm_gpu, torchrec\n"
                "out.update(fbgemm_gpu=fbgemm_gpu.__version__, torchrec=torchrec.__version__)\n"
                "out['fbgemm_ops'] = hasattr(torch.ops.fbgemm, 'asynchronous_complete_cumsum')\n"
                "if torch.cuda.is_available():\n"
                "    p = torch.cuda.get_device_properties(0)\n"
                "    out.update(device=p.name, memory_gib=round(p.total_memory / 2**30, 1), sm=f'{p.major}.{p.minor}')\n"
                "    x = torch.ops.fbgemm.asynchronous_complete_cumsum(torch.tensor([1, 2, 3], device='cuda'))\n"
                "    out['fbgemm_cuda_op'] = x.tolist() == [0, 1, 3, 6]\n"
                "    out['driver'] = subprocess.run(['nvidia-smi', '--query-gpu=driver_version', '--format=csv,noheader'],"
                " capture_output=True, text=True).stdout.strip()\n"
                "print('KIT ' + json.dumps(out))\n")
        figures = _marked(self.python("env", ["-c", code], timeout).stdout)
        if not self.dry and not (figures.get("gpu") and figures.get("fbgemm_cuda_op")):
            raise StageFailed(f"CUDA or FBGEMM's CUDA operators unusable: {figures}")
        return figures

    def tests_stage(self, timeout: float) -> Dict:
        selection = ["tests/test_gpu_path.py"] if self.dry else ["tests", "-m", "not slow"]
        # shellcheck, Spark and the submitit launcher are not carried (none touches the CUDA stack)
        proc = self.python("tests", ["-m", "pytest", "-q", "-p", "no:cacheprovider", *selection,
                                     "-k", "not shellcheck and not spark and not sweep_launcher"], timeout)
        summary = [line for line in proc.stdout.splitlines() if " passed" in line][-1:]
        return {"summary": summary[0].strip("= ") if summary else "?"}

    def parity_stage(self, timeout: float) -> Dict:
        path = self.work / "parity.json"
        try:
            self.python("parity", ["benchmarks/gpu/parity.py", "--device", self.device, "--out", str(path)], timeout)
        finally:
            result = json.loads(path.read_text()) if path.is_file() else {}
        failed = [r["check"] for r in result.get("checks", []) if not r["ok"]]
        if failed:
            raise StageFailed(f"failed: {failed}")
        figures = {r["key"]: r["figure"] for r in result.get("checks", [])}
        return {"checks passed": len(figures), **{k: f"{v:.3g}" for k, v in figures.items()}}

    def resume_stage(self, timeout: float) -> Dict:
        figures_path = self.payload / "cpu_figures.json"
        if not figures_path.is_file():
            raise StageSkipped(f"no {figures_path} (prepare_kit.py makes it)")
        cpu = json.loads(figures_path.read_text())
        run = self.work / "resume_run"
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(self.payload / "cpu_run", run)
        self.python("resume: evaluate", ["-m", "recsys.evaluate", f"eval.run_dir={run}/checkpoints/step_000000030",
                                         f"train.device={self.device}"], timeout / 2)
        evaluated = json.loads((run / "eval.json").read_text())["test"]
        self.python("resume: train", ["-m", "recsys.train", *cpu["overrides"], f"train.device={self.device}",
                                      f"hydra.run.dir={run}"], timeout / 2)
        metrics = json.loads((run / "metrics.json").read_text())
        out = {"written by": f"torch {cpu['torch']} / torchrec {cpu['torchrec']}",
               "step 30 recall@20 (here / cpu)": f"{evaluated['recall@20']:.4f} / {cpu['step30_eval_test']['recall@20']:.4f}",
               "resumed to step": metrics["train"]["steps"],
               "step 60 recall@20 (here / cpu)": f"{metrics['test']['recall@20']:.4f} / {cpu['step60_test']['recall@20']:.4f}"}
        # the same weights, ranked on another device: a few near-ties at most (500 users x top 20)
        if abs(evaluated["recall@20"] - cpu["step30_eval_test"]["recall@20"]) > 0.01:
            raise StageFailed(f"the CPU checkpoint evaluates differently here: {out}")
        return out

    def demo_stage(self, timeout: float) -> Dict:
        run = self.work / "demo"
        shutil.rmtree(run, ignore_errors=True)
        extra = ["+experiment=tiny"] if self.dry else []
        self.python("demo", ["-m", "recsys.train", *extra, f"train.device={self.device}", f"hydra.run.dir={run}",
                             "train.progress=false", f"data.root={self.work / 'data'}"], timeout)
        m = json.loads((run / "metrics.json").read_text())
        return {"recall@20": f"{m['test']['recall@20']:.4f} (cpu {CPU_DEMO['recall@20']})",
                "ndcg@20": f"{m['test']['ndcg@20']:.4f} (cpu {CPU_DEMO['ndcg@20']})",
                "device": m["train"]["device"], "train_s": m["train"]["wall_s"],
                "interactions/s": f"{m['train']['interactions_per_s']:,.0f}"}

    def throughput_stage(self, timeout: float) -> Dict:
        runs = ([["--batch-size", "1024", "--num-negatives", "256", "--rounds", "1", "--steps", "5", "--warmup", "2"]]
                if self.dry else
                [["--batch-size", "16384", "--num-negatives", "16384", "--loss", "bpr"],
                 ["--batch-size", "16384", "--num-negatives", "4096"]])
        size = (["--num-users", "20000", "--num-items", "5000", "--num-interactions", "500000"] if self.dry else
                ["--num-users", "500000", "--num-items", "100000", "--num-interactions", "3000000"])
        out = {}
        for args in runs:
            self.python("throughput", ["benchmarks/throughput.py", "--device", self.device, "--dim", "128", *size,
                                       *args, "--data-root", str(self.work / "data"), "--out", str(self.out)],
                        timeout / len(runs))
        results = json.loads((self.out / "throughput.json").read_text())["runs"]
        for label, e in sorted(results.items()):
            if e["device"] != self.device:
                continue
            out[label] = (f"ours {e['interactions_per_s']['ours']:,.0f}/s, plain {e['interactions_per_s']['plain']:,.0f}/s, "
                          f"copy {e['copy_bandwidth_gb_s']:.0f} GB/s, {e['bytes_per_interaction']['ours']['total']:,.0f} "
                          f"B/interaction, {100 * e['share_of_bound']['ours']:.1f}% of the bound, "
                          f"{100 * e.get('share_of_lookup_bound', {}).get('ours', 0):.1f}% of the lookup bound")
        return out

    def gowalla_stage(self, timeout: float) -> Dict:
        """Three epochs of the CPU recipe (batch 512) and of the GPU one (batch 8,192) on CUDA."""
        data = self.payload / "gowalla"
        if not (data / "train.txt").is_file():
            raise StageSkipped(f"no Gowalla split in {data}")
        limit = ["train.max_steps=30", "eval.max_users=2000"] if self.dry else []
        out = {}
        for experiment, cpu in (("gowalla_mf", CPU_GOWALLA_MF_3), ("gowalla_mf_gpu", CPU_GOWALLA_MF_GPU_3)):
            run = self.work / experiment
            shutil.rmtree(run, ignore_errors=True)
            self.python(experiment, ["-m", "recsys.train", f"+experiment={experiment}", f"data.path={data}",
                                     "train.epochs=3", "train.patience=0", f"train.device={self.device}",
                                     f"hydra.run.dir={run}", "train.progress=false", "export.enabled=false",
                                     f"data.root={self.work / 'data'}", *limit], timeout / 2)
            m = json.loads((run / "metrics.json").read_text())
            walls = [h["wall_s"] for h in m["train"]["history"]]
            epoch_s = [round(b - a, 1) for a, b in zip([0.0] + walls, walls)]
            out[experiment] = (f"{len(walls)} epochs of {epoch_s} s (with evaluation), "
                               f"{m['train']['interactions_per_s']:,.0f} interactions/s, "
                               f"recall@20 {m['test']['recall@20']:.4f} (cpu {cpu['recall@20']}), "
                               f"ndcg@20 {m['test']['ndcg@20']:.4f} (cpu {cpu['ndcg@20']})")
        return out


class StageFailed(Exception):
    pass


class StageSkipped(Exception):
    pass


def _text(x) -> str:
    return x.decode(errors="replace") if isinstance(x, bytes) else (x or "")


def _marked(stdout: str) -> Dict:
    lines = [line[4:] for line in stdout.splitlines() if line.startswith("KIT ")]
    return json.loads(lines[-1]) if lines else {}


def summary_table(results: Dict) -> str:
    lines = ["| stage | status | seconds | figures |", "| --- | --- | ---: | --- |"]
    for name in STAGES:
        if name not in results:
            continue
        r = results[name]
        figures = "; ".join(f"{k}: {v}" for k, v in r.get("figures", {}).items()) or r.get("reason", "")
        lines.append(f"| {name} | {r['status']} | {r['seconds']} | {figures.replace('|', '/')} |")
    return "\n".join(lines)


def write_summary(out: Path, results: Dict, dry: bool) -> str:
    table = summary_table(results)
    header = (f"# GPU kit {'dry run (CPU, toy sizes)' if dry else 'run'}, {time.strftime('%Y-%m-%d %H:%M')}\n\n"
              f"Stages run by `benchmarks/gpu/kit.py run{' --dry-run' if dry else ''}`; per-stage output in kit.log.\n\n")
    (out / "summary.md").write_text(header + table + "\n")
    (out / "kit.json").write_text(json.dumps(results, indent=1))
    return table


def run(out: Path, stages: List[str], dry: bool, timeouts: Dict[str, float], budget_s: float) -> int:
    out.mkdir(parents=True, exist_ok=True)
    env = {} if dry else install()
    kit = Kit(out, dry, env)
    state_path = (out if dry else HOME) / "kit.json"
    results = json.loads(state_path.read_text()) if state_path.is_file() else {}
    steps: Dict[str, Callable[[float], Dict]] = {
        "env": kit.env_stage, "tests": kit.tests_stage, "parity": kit.parity_stage, "resume": kit.resume_stage,
        "demo": kit.demo_stage, "throughput": kit.throughput_stage, "gowalla": kit.gowalla_stage}
    failed, table = 0, summary_table(results)
    deadline = time.perf_counter() + budget_s
    for name in stages:
        t0 = time.perf_counter()
        left = deadline - t0 - 15  # room to write the results before the call's limit
        print(f"kit: {name} ...", flush=True)
        try:
            if left < 20:
                raise StageSkipped(f"no time left in this call's budget ({budget_s:.0f} s): run it in another call")
            figures = steps[name](min(timeouts[name], left))
            status, reason = ("dry" if dry else "ok"), ""
        except StageSkipped as e:
            figures, status, reason = {}, "skipped", str(e)
        except StageFailed as e:
            figures, status, reason = {}, "FAILED", str(e)
            failed += 1
        results[name] = {"status": status, "seconds": round(time.perf_counter() - t0, 1), "figures": figures,
                         "reason": reason}
        print(f"kit: {name} {status} in {results[name]['seconds']} s {reason}", flush=True)
        state_path.write_text(json.dumps(results, indent=1))
        table = write_summary(out, results, dry)  # after every stage: a call cut short still returns them
    print("\n" + table, flush=True)
    kit.log.close()
    return failed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("receive", help="keep the carried pieces in the kit's home")
    v = sub.add_parser("verify", help="read the pieces' archive through (prepare_kit.py does)")
    v.add_argument("--kit", default=str(CARRIED))
    r = sub.add_parser("run", help="install once, then run the stages")
    r.add_argument("--out", required=True)
    r.add_argument("--stages", default=",".join(STAGES))
    r.add_argument("--dry-run", action="store_true", help="on the CPU at toy sizes, this environment's packages")
    r.add_argument("--timeouts", default="env=120,parity=240,resume=240,demo=240,throughput=300,gowalla=300,tests=420",
                   help="seconds per stage at most")
    r.add_argument("--budget-s", type=float, default=540,
                   help="seconds this call may take in all (a device call ends at 600): each stage's timeout is cut "
                        "to what is left, and stages with no time left are skipped (run them in the next call)")
    args = p.parse_args()
    if args.command == "receive":
        receive()
    elif args.command == "verify":
        verify(Path(args.kit))
    else:
        stages = [s for s in args.stages.split(",") if s]
        unknown = sorted(set(stages) - set(STAGES))
        if unknown:
            raise SystemExit(f"error: unknown stage(s) {unknown}; stages: {','.join(STAGES)}")
        timeouts = {k: float(v) for k, v in (kv.split("=") for kv in args.timeouts.split(","))}
        sys.exit(1 if run(Path(args.out), stages, args.dry_run, timeouts, args.budget_s) else 0)


if __name__ == "__main__":
    main()
