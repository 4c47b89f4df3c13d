"""Prepare the GPU verification kit's pieces on a machine with network access (this one, not the GPU's).

    python benchmarks/gpu/prepare_kit.py [--gowalla ../shared/data/gowalla] [--out .gpu_kit]

The GPU machine has CUDA torch 2.11 (Python 3.12) but no torchrec, no fbgemm-gpu and no network;
each call to it carries at most 64 MiB with the working tree. This script:

1. downloads the CUDA stack that pairs with torch 2.11 (``fbgemm-gpu==1.6.0 torchrec==1.6.1
   tensordict==0.15.3``, README "Install") and the project's run-time packages the image lacks, as
   wheels for CPython 3.12 (``pip download``; the two pure-Python packages published only as
   source, ``antlr4-python3-runtime`` and ``iopath``, are built into wheels with ``pip wheel``);
2. unpacks them into one ``site/`` tree (a wheel is a zip of what goes into site-packages), adds
   the payload (the Gowalla split, when given, and a run trained here by the CPU stack whose
   checkpoint the kit resumes on the CUDA stack), packs it all as one tar compressed with zstd at
   level 19 (the fbgemm-gpu wheel: 465 MB as a zip, ~170 MiB this way);
3. cuts it into pieces that each fit in one call beside the working tree, writes
   ``manifest.json`` (sizes and SHA-256 of the pieces and of the whole), and checks the round
   trip the way the kit reads it (pyarrow's zstd stream, which the GPU image has).

Then it prints the device calls: one per piece but the last (``kit.py receive``), and the last
with the run (``kit.py receive && kit.py run``). ``.gpu_kit/`` is git-ignored: nothing here is
committed.
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
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from recsys.atomic import file_sha256  # noqa: E402

# What the GPU image lacks, pinned to the versions this project runs with (KINDS.md lists the image).
BINARY = ["fbgemm-gpu==1.6.0", "duckdb==2.0.1", "faiss-cpu==1.15.1"]
PURE = ["torchrec==1.6.1", "tensordict==0.15.3", "pyvers==0.2.3", "torchmetrics==1.0.3", "hydra-core==1.3.2",
        "omegaconf==2.3.0"]
SOURCE_ONLY = ["antlr4-python3-runtime==4.9.3", "iopath==0.1.10"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
CALL_LIMIT = 64 * 2**20  # what one device call carries: the working tree and the carried paths
# The tiny CPU run whose checkpoint the kit resumes on the CUDA stack (kit.py's "resume" stage):
# a checkpoint at step 30 of 60; the CPU's figures at step 60 are kept beside it.
CPU_RUN = ["+experiment=tiny", "train.epochs=4", "train.max_steps=60", "train.checkpoint_every_steps=30", "train.keep_checkpoints=3",
           "train.progress=false", "eval.popularity=false", "export.enabled=false", "data.root=data"]


def sh(*cmd, **kw) -> None:
    print("+", " ".join(map(str, cmd)), flush=True)
    subprocess.run(list(map(str, cmd)), check=True, **kw)


def download(wheels: Path) -> list:
    wheels.mkdir(parents=True, exist_ok=True)
    platform = [arg for p in PLATFORMS for arg in ("--platform", p)]
    sh(sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version",
       "3.12", "--implementation", "cp", *platform, "-d", wheels, *BINARY, *PURE)
    sh(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", wheels, *SOURCE_ONLY)
    names = sorted(p.name for p in wheels.glob("*.whl"))
    wanted = {spec.split("==")[0].replace("-", "_").lower() for spec in BINARY + PURE + SOURCE_ONLY}
    found = {n.split("-")[0].lower() for n in names}
    if found != wanted:
        raise SystemExit(f"error: wheels {sorted(found)} but asked for {sorted(wanted)} (remove {wheels} and rerun)")
    return names


def cpu_run(payload: Path) -> None:
    """The CPU stack's run: its checkpoint at step 30 travels; its step-60 metrics beside it."""
    run_dir = payload / "cpu_run"
    with tempfile.TemporaryDirectory() as tmp:
        sh(sys.executable, "-m", "recsys.train", *CPU_RUN, "train.device=cpu", f"hydra.run.dir={tmp}/run",
           cwd=ROOT, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
        metrics = json.loads(Path(tmp, "run", "metrics.json").read_text())
        sh(sys.executable, "-m", "recsys.evaluate", f"eval.run_dir={tmp}/run/checkpoints/step_000000030",
           "train.device=cpu", cwd=ROOT, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
        evaluated = json.loads(Path(tmp, "run", "eval.json").read_text())
        for later in Path(tmp, "run", "checkpoints").glob("step_*"):
            if int(later.name.split("_")[1]) > 30:
                shutil.rmtree(later)
        for name in ("metrics.json", "eval.json"):
            Path(tmp, "run", name).unlink()
        shutil.copytree(Path(tmp, "run"), run_dir)
    (payload / "cpu_figures.json").write_text(json.dumps({
        "overrides": CPU_RUN, "step60_test": metrics["test"], "step30_eval_test": evaluated["test"],
        "torch": __import__("torch").__version__, "torchrec": __import__("torchrec").__version__}, indent=1))


def pack(site_wheels: Path, names: list, payload: Path, archive: Path) -> None:
    """One tar of site/ (every wheel unpacked) and payload/, compressed by zstd -19."""
    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp, "site")
        for name in names:
            with zipfile.ZipFile(site_wheels / name) as z:
                z.extractall(site)
        tar = Path(tmp, "kit.tar")
        with tarfile.open(tar, "w") as t:
            t.add(site, "site")
            t.add(payload, "payload")
        sh("zstd", "-19", "-T0", "-q", "-f", tar, "-o", archive)


def tree_bytes() -> int:
    """What the working tree sends with each call: tracked and untracked-not-ignored files."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.split(b"\0")
    return sum((ROOT / f.decode()).stat().st_size for f in files if f and (ROOT / f.decode()).is_file())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / ".gpu_kit"))
    p.add_argument("--gowalla", default=str(ROOT.parent / "shared" / "data" / "gowalla"),
                   help="the LightGCN Gowalla split (train.txt, test.txt); skipped when missing")
    p.add_argument("--margin-mib", type=float, default=2.0, help="room left in each call beside tree + piece")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    names = download(out / "wheels")
    payload = out / "payload"
    shutil.rmtree(payload, ignore_errors=True)
    payload.mkdir()
    gowalla = Path(args.gowalla)
    if (gowalla / "train.txt").is_file() and (gowalla / "test.txt").is_file():
        shutil.copytree(gowalla, payload / "gowalla", ignore=shutil.ignore_patterns(".*"))
    else:
        print(f"no Gowalla split at {gowalla}: the kit's gowalla stage will be skipped", flush=True)
    cpu_run(payload)
    archive = out / "kit.tar.zst"
    pack(out / "wheels", names, payload, archive)

    for old in out.glob("piece-*"):
        old.unlink()
    manifest_room = 64 * 1024
    piece_bytes = int(CALL_LIMIT - tree_bytes() - manifest_room - args.margin_mib * 2**20)
    pieces = []
    with open(archive, "rb") as f:
        for index in range(1, 100):
            data = f.read(piece_bytes)
            if not data:
                break
            path = out / f"piece-{index:02d}"
            path.write_bytes(data)
            pieces.append({"name": path.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    manifest = {"archive_bytes": archive.stat().st_size, "archive_sha256": file_sha256(archive), "pieces": pieces,
                "wheels": names, "payload": sorted(str(p.relative_to(payload)) for p in payload.rglob("*") if p.is_file()),
                "piece_limit_bytes": piece_bytes, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))

    # the round trip as the kit reads it: pieces joined, pyarrow's zstd stream, tar
    check = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu" / "kit.py"), "verify", "--kit", str(out)],
                           check=True, capture_output=True, text=True)
    print(check.stdout.strip())
    archive.unlink()
    tree = tree_bytes()
    print(f"\nkit: {len(pieces)} pieces, {manifest['archive_bytes'] / 2**20:.1f} MiB in all "
          f"(tree {tree / 2**20:.1f} MiB + piece <= {piece_bytes / 2**20:.1f} MiB per call), {time.perf_counter() - t0:.0f} s")
    print("device calls, back to back on one warm machine (the run tool; carry these paths):")
    run = "PYTHONUNBUFFERED=1 python3 benchmarks/gpu/kit.py run --out $OUT"
    for i, piece in enumerate(pieces):
        carry = [".gpu_kit/manifest.json", f".gpu_kit/{piece['name']}"]
        command = "python3 benchmarks/gpu/kit.py receive"
        if i == len(pieces) - 1:
            command += f" && {run} --stages env,parity,resume,demo,throughput,gowalla --budget-s 540"
        print(f"  carry={json.dumps(carry)} command={command!r} timeout_s=590")
    print(f"  then, if device time is left: command={run + ' --stages tests --budget-s 480'!r} timeout_s=590")
    print("(each reply's `warm` must stay true between these calls: a fresh machine has lost the pieces)")


if __name__ == "__main__":
    main()
