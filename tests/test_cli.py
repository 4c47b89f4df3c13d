"""The five commands as a user runs them: recsys.train (a sweep, --cfg job), recsys.evaluate,
recsys.export, recsys.prepare, recsys.plan. Real processes where the process matters (a sweep,
commands that must leave the current directory untouched); the others run each command's main()
with its argv in this process. What the commands compute is tested with their functions elsewhere."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from recsys.exporter import read_vectors, write_export


def test_train_sweep_writes_a_run_per_point(tmp_path, cli, data_root):
    sweep = tmp_path / "sweep"
    proc = cli(["python", "-m", "recsys.train", "-m", "+experiment=tiny", f"data.root={data_root}",
                "train.progress=false", "train.max_steps=5", "export.enabled=false", "log.plots=false",
                "model.embedding_dim=8,16", f"hydra.sweep.dir={sweep}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    dims = []
    for sub in ("0", "1"):
        metrics = json.loads((sweep / sub / "metrics.json").read_text())
        assert metrics["train"]["steps"] == 5
        dims.append((sweep / sub / ".hydra" / "overrides.yaml").read_text())
    assert "model.embedding_dim=8" in dims[0] and "model.embedding_dim=16" in dims[1]


def test_train_prints_its_config(command):
    code, out, _ = command("train", "--cfg", "job", "model.embedding_dim=32")
    assert code == 0 and "embedding_dim: 32" in out and "batch_size:" in out


def test_evaluate_a_run_from_another_directory(tmp_path, cli, tiny_run):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    proc = cli(["python", "-m", "recsys.evaluate", f"eval.run_dir={tiny_run}"], cwd=cwd,
               env={"PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert proc.returncode == 0, proc.stderr[-3000:]
    ev, want = json.loads((tiny_run / "eval.json").read_text()), json.loads((tiny_run / "metrics.json").read_text())
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if "recall@10" in line)
    assert lines[header].split() == ["recall@10", "ndcg@10", "recall@20", "ndcg@20", "recall@50", "ndcg@50"]
    assert lines[header + 1].split()[0] == "model" and float(lines[header + 1].split()[3]) == pytest.approx(
        want["test"]["recall@20"], abs=5e-5)
    assert f"{want['test']['users']} test users" in proc.stdout and ev["step"] == want["train"]["steps"]
    assert list(cwd.iterdir()) == []  # no Hydra output directory or log file of its own


def test_evaluate_and_export_errors_are_one_line(tmp_path, command):
    code, out, err = command("evaluate", f"eval.run_dir={tmp_path / 'nothing'}", "model.embedding_dim=8")
    assert code == 2 and err.strip().splitlines() == [
        f"error: {tmp_path / 'nothing'}: no complete checkpoint (looked in {tmp_path / 'nothing' / 'checkpoints'})"]
    # an override the command does not read is named (evaluate takes the checkpoint's config)
    assert "model.embedding_dim=8 does nothing: recsys.evaluate takes the config" in out
    code, _, err = command("evaluate")
    assert code == 2 and "eval.run_dir is required" in err and len(err.strip().splitlines()) == 1
    code, _, err = command("export", f"export.run_dir={tmp_path / 'nope'}", "export.faiss=flat")
    assert code == 2 and err.strip().splitlines() == [f"error: export.run_dir={tmp_path / 'nope'}: no such directory"]
    assert not (tmp_path / "nope").exists()


def test_export_adds_an_index_to_a_run_from_another_directory(tmp_path, cli):
    rng = np.random.default_rng(0)
    users, items = rng.normal(size=(300, 16)).astype(np.float32), rng.normal(size=(2000, 16)).astype(np.float32)
    users /= np.linalg.norm(users, axis=1, keepdims=True)
    items /= np.linalg.norm(items, axis=1, keepdims=True)
    run_dir = tmp_path / "run"
    write_export(run_dir / "export", pa.array([f"user-{u}" for u in range(300)]), users,
                 pa.array(np.arange(2000) * 7), items, True, "test")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    proc = cli(["python", "-m", "recsys.export", f"export.run_dir={run_dir}", "export.faiss=hnsw", "export.npy=true",
                "export.ann_k=20", "export.ann_sample_users=100"], cwd=cwd,
               env={"PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "recall@20" in proc.stdout and "queries/s" in proc.stdout and "from the vectors" in proc.stdout
    assert list(cwd.iterdir()) == []  # no Hydra output directory or log file of its own
    manifest = json.loads((run_dir / "export" / "manifest.json").read_text())
    assert manifest["faiss"]["type"] == "hnsw" and manifest["faiss"]["recall"]["value"] > 0.9
    assert np.array_equal(np.load(run_dir / "export" / "items.npy"), read_vectors(run_dir / "export", "items")[1])


def test_prepare_prints_the_report_and_refuses_bad_input_in_one_line(tmp_path, command):
    code, out, err = command("prepare", "+experiment=tiny", f"data.root={tmp_path / 'data'}")
    assert code == 0, err
    (prepared,) = (tmp_path / "data").iterdir()
    assert f"report: {prepared / 'report.md'}" in out and "users: 500; items: 200" in out
    assert (prepared / "report.json").exists() and (prepared / "popularity.png").exists()
    code, _, err = command("prepare", "data=lightgcn", f"data.path={tmp_path / 'missing'}",
                           f"data.root={tmp_path / 'other'}")
    assert code == 2 and err.startswith("error: ") and str(tmp_path / "missing") in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "other").exists()
    code, _, err = command("prepare", "data.num_users=-1")
    assert code == 2 and "data.num_users" in err and len(err.strip().splitlines()) == 1


def test_plan_prints_the_plan_and_refuses_what_does_not_fit(tmp_path, command):
    code, out, err = command("plan", f"hydra.run.dir={tmp_path / 'run'}", "plan.world_size=4", "plan.num_users=100000",
                             "plan.num_items=5000")
    assert code == 0, err
    assert "fits: yes" in out and f"plan: {tmp_path / 'run' / 'plan.json'}" in out
    assert json.loads((tmp_path / "run" / "plan.json").read_text())["world_size"] == 4
    code, _, err = command("plan", f"hydra.run.dir={tmp_path / 'bad'}", "plan.world_size=8", "plan.num_users=1000000",
                           "plan.num_items=200000", "plan.hbm_gib=0.01", "plan.ddr_gib=0.01")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "insufficient storage" in err
    assert not (tmp_path / "bad" / "plan.json").exists()
