"""Checkpoints: SIGKILL and resume gives the uninterrupted run's figures, 2 -> 1 resharding, torn
checkpoints skipped, another run's directory and incompatible checkpoints refused, evaluate and
export from a checkpoint. The real CLI on tiny configs (two gloo ranks under torchrun)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from recsys.config import ExportConfig
from recsys.errors import CheckpointError
from recsys.evaluate import evaluate_run
from recsys.export import export_checkpoint
from recsys.exporter import read_vectors
from recsys.training.checkpoint import MARKER, latest_checkpoint, list_checkpoints, read_meta

KILL_STEP = 150  # the test kills the job once this step's checkpoint is complete


def args(root: Path, *extra: str) -> list:
    """A two-tower model with every kind of state: dense Adam (projection), per-rank RNG draws
    (history dropout), a validation split with best-epoch selection; ~63 steps per epoch."""
    return ["+experiment=tiny", f"data.root={root / 'data'}", "data.valid_fraction=0.1", "model=two_tower",
            "model.embedding_dim=16", "model.projection=true", "model.history_dropout=0.1", "train.batch_size=64",
            "loss.num_negatives=16", "train.epochs=3", "train.patience=5", "train.checkpoint_every_steps=10",
            "train.progress=false", "log.plots=false", *extra]


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory, two_ranks, train_here):
    """The uninterrupted 2-rank run, keeping every checkpoint."""
    root = tmp_path_factory.mktemp("ckpt")
    run_dir = root / "reference"
    two_ranks(train_here, args(root, "train.keep_checkpoints=100"), str(run_dir))
    return root, run_dir


def test_sigkill_and_resume_gives_the_same_figures(reference, two_ranks, train_here, start_ranks):
    root, ref = reference
    run_dir = root / "killed"
    overrides = args(root, "train.keep_checkpoints=3")
    job = start_ranks(train_here, 2, overrides, str(run_dir))  # processes of their own, to be killed
    marker = run_dir / "checkpoints" / f"step_{KILL_STEP:09d}" / MARKER
    deadline = time.time() + 300
    while not marker.exists() and job.alive() and time.time() < deadline:
        time.sleep(0.01)
    pids = [p.pid for p in job.procs]
    job.kill()  # SIGKILL to both ranks, wherever they are, as a scheduler's pre-emption does
    assert not any(Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1][:3]
                   for pid in pids), "a rank survived SIGKILL"
    assert marker.exists(), "the job ended before the test could kill it"
    assert not (run_dir / "metrics.json").exists()
    killed_at = read_meta(latest_checkpoint(run_dir))["step"]
    assert KILL_STEP <= killed_at < metrics(ref)["train"]["steps"]

    # Torn checkpoints newer than the last good one: one without its marker, one with a truncated file.
    newest = latest_checkpoint(run_dir)
    torn = run_dir / "checkpoints" / f"step_{killed_at + 10:09d}"
    shutil.copytree(newest, torn)
    (torn / MARKER).unlink()
    truncated = run_dir / "checkpoints" / f"step_{killed_at + 20:09d}"
    shutil.copytree(newest, truncated)
    shard = truncated / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    assert latest_checkpoint(run_dir) == newest

    two_ranks(train_here, overrides, str(run_dir))  # train.resume=auto
    got, want = metrics(run_dir), metrics(ref)
    assert got["checkpoint"]["resumed"]["step"] == killed_at and got["checkpoint"]["resumed"]["from"] == str(newest)
    # Same world size on CPU: bitwise the same figures, losses and validation curve.
    assert got["test"] == want["test"]
    assert got["valid"] == want["valid"] and got["selected_epoch"] == want["selected_epoch"]
    assert [h["loss"] for h in got["train"]["history"]] == [h["loss"] for h in want["train"]["history"]]
    assert got["train"]["loss_curve"] == want["train"]["loss_curve"]
    assert got["train"]["steps"] == want["train"]["steps"]
    for name in ("items", "users"):
        assert np.array_equal(read_vectors(run_dir / "export", name)[1],
                              read_vectors(ref / "export", name)[1])
    kept = list_checkpoints(run_dir)
    assert len(kept) == 3 and kept[0].name == f"step_{want['train']['steps']:09d}"
    # the torn directories were replaced by the resumed run's checkpoints of those steps, then pruned
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == sorted(p.name for p in kept)
    assert not any(p.name.startswith(".tmp-") for p in (run_dir / "checkpoints").iterdir())


def test_two_ranks_checkpoint_resumes_on_one_rank(reference, two_ranks, train_here):
    root, ref = reference
    run_dir = root / "resharded"
    src = ref / "checkpoints" / "step_000000140"
    assert read_meta(src)["world_size"] == 2
    shutil.copytree(src, run_dir / "checkpoints" / src.name)
    train_here(args(root), run_dir)
    got, want = metrics(run_dir), metrics(ref)
    assert got["checkpoint"]["resumed"] == {**got["checkpoint"]["resumed"], "step": 140, "world_size": 2}
    assert got["train"]["world_size"] == 1 and got["train"]["steps"] == want["train"]["steps"]
    # Same global batches and weights at step 140; afterwards float summation order and the
    # history dropout draws (seeded per rank) differ: the 1-rank continuation ends close.
    for key in ("recall@10", "recall@20", "recall@50", "ndcg@20"):
        assert got["test"][key] == pytest.approx(want["test"][key], abs=0.02)
    hist_got, hist_want = got["train"]["history"], want["train"]["history"]
    assert hist_got[0] == hist_want[0]  # epoch 0 ended before the checkpoint: carried over as is
    np.testing.assert_allclose([h["loss"] for h in hist_got], [h["loss"] for h in hist_want], rtol=0.02)

    # and back: the 1-rank run's checkpoint of step 180 (the older of the two it keeps) resumes on 2 ranks
    again = root / "resharded_back"
    src = run_dir / "checkpoints" / "step_000000180"
    assert read_meta(src)["world_size"] == 1
    shutil.copytree(src, again / "checkpoints" / src.name)
    two_ranks(train_here, args(root), str(again))
    back = metrics(again)
    assert back["checkpoint"]["resumed"]["world_size"] == 1 and back["train"]["world_size"] == 2
    assert back["train"]["history"][:2] == got["train"]["history"][:2]
    for key in ("recall@10", "recall@20", "recall@50", "ndcg@20"):
        assert back["test"][key] == pytest.approx(got["test"][key], abs=0.01)


def test_other_runs_and_incompatible_checkpoints_are_refused(reference, train_here):
    root, ref = reference
    # a different config pointed at the reference run's directory: refused before any work
    with pytest.raises(CheckpointError, match="already holds a different run") as refused:
        train_here(args(root, "model.embedding_dim=8"), ref)
    assert "\n" not in str(refused.value)
    # resuming from a checkpoint whose tables do not match
    new_dir = root / "incompatible"
    with pytest.raises(CheckpointError, match="do not match"):
        train_here(args(root, "model.embedding_dim=8", f"train.resume={ref}"), new_dir)
    # a different model name with the same tables
    with pytest.raises(CheckpointError, match="model.name=two_tower there"):
        train_here(args(root, "model=mf", "model.embedding_dim=16", f"train.resume={ref}"), new_dir)
    # train.overwrite=true replaces the other run
    over = root / "overwritten"
    shutil.copytree(ref / "checkpoints" / "step_000000010", over / "checkpoints" / "step_000000010")
    train_here(args(root, "model.embedding_dim=8", "train.max_steps=3", "train.overwrite=true",
                    "train.checkpoint_every_minutes=0.000001", "train.log_every_steps=1", "train.keep_checkpoints=2"),
               over)
    assert metrics(over)["train"]["steps"] == 3 and metrics(over)["checkpoint"]["resumed"] is None
    # the wall-clock trigger (looked at every train.log_every_steps) fired after every step; the newest two are kept
    assert metrics(over)["checkpoint"]["written"] == 4  # steps 1, 2, 3 and the end of training (step 3 again)
    assert [p.name for p in list_checkpoints(over)] == ["step_000000003", "step_000000002"]


def test_evaluate_and_export_from_the_checkpoint(reference, in_process):
    root, ref = reference
    ev = in_process(evaluate_run, ref)
    assert ev == {**json.loads((ref / "eval.json").read_text()), "path": str(ref / "eval.json")}
    want = metrics(ref)
    # one process evaluates what two ranks did: the same metrics up to float summation order
    assert ev["step"] == want["train"]["steps"] and ev["test"]["users"] == want["test"]["users"]
    for part in ("test", "valid", "popularity"):
        for key, value in want[part].items():
            assert ev[part][key] == pytest.approx(value, abs=1e-9), (part, key)
    exported = root / "exported"
    shutil.copytree(ref / "checkpoints" / f"step_{want['train']['steps']:09d}",
                    exported / "checkpoints" / f"step_{want['train']['steps']:09d}")
    in_process(export_checkpoint, exported, ExportConfig(npy=True))
    for name in ("items", "users"):
        ids, vecs = read_vectors(exported / "export", name)
        ref_ids, ref_vecs = read_vectors(ref / "export", name)
        assert ids == ref_ids
        np.testing.assert_allclose(vecs, ref_vecs, atol=1e-6)
        assert np.array_equal(np.load(exported / "export" / f"{name}.npy"), vecs)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        in_process(evaluate_run, root / "nothing")


def test_latest_checkpoint_skips_torn_directories(tmp_path):
    root = tmp_path / "checkpoints"

    def fake(step: int, complete: bool = True, size_ok: bool = True) -> Path:
        d = root / f"step_{step:09d}"
        d.mkdir(parents=True)
        (d / "meta.json").write_text('{"format": 1}')
        (d / "__0_0.distcp").write_bytes(b"x" * 64)
        if complete:
            sizes = {"meta.json": 13, "__0_0.distcp": 64 if size_ok else 65}
            (d / MARKER).write_text(json.dumps({"files": sizes}))
        return d

    assert latest_checkpoint(tmp_path) is None
    good = fake(10)
    fake(20, complete=False)
    fake(30, size_ok=False)
    (root / ".tmp-step_000000040").mkdir()
    assert latest_checkpoint(tmp_path) == good and list_checkpoints(tmp_path) == [good]


def test_checkpoint_index_may_not_unpickle_other_objects(tmp_path):
    from recsys.training.checkpoint import SafeFileSystemReader

    (tmp_path / ".metadata").write_bytes(pickle.dumps(os.system))
    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        SafeFileSystemReader(str(tmp_path)).read_metadata()


def test_a_checkpoint_replaced_halfway_is_kept(tmp_path):
    """Killed between the two renames that replace a step's checkpoint (the end-of-training one of a
    step that already has one): only `.old-step_N` is left, and it is restored, not removed."""
    from recsys.training.checkpoint import checkpoint_root, remove_stale_temporaries

    root = checkpoint_root(tmp_path)
    (root / ".old-step_000000005").mkdir(parents=True)
    (root / ".old-step_000000005" / MARKER).write_text("{}")
    (root / ".tmp-step_000000006").mkdir()
    (root / "step_000000004").mkdir()
    (root / ".old-step_000000004").mkdir()  # its replacement was committed: the old copy goes
    remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["step_000000004", "step_000000005"]
    assert (root / "step_000000005" / MARKER).exists()



# ---- one-process runs: evaluation of a memory or streamed run, table storage type, run hash --------


def small_args(tmp_root: Path, loader: str, *extra: str) -> list:
    """A few steps with a validation split and sampled evaluation users (eval.max_users): a streamed
    mf run (tiny row groups), or a two-tower run with history bags read in memory."""
    model = ["model=mf"] if loader == "stream" else ["model=two_tower", "model.projection=true"]
    return ["+experiment=tiny", f"data.root={tmp_root / 'data'}", f"data.loader={loader}",
            "data.row_group_size=500", "data.valid_fraction=0.1", *model, "model.embedding_dim=8",
            "train.max_steps=12", "train.epochs=1", "eval.max_users=150", "train.progress=false", "log.plots=false",
            "export.enabled=false", *extra]


@pytest.fixture(scope="module")
def small_runs(tmp_path_factory, train_here):
    root = tmp_path_factory.mktemp("small")
    for loader in ("memory", "stream"):
        train_here(small_args(root, loader), root / loader)
    return root


@pytest.mark.parametrize("loader", ["memory", "stream"])
def test_evaluate_a_memory_or_streamed_run(small_runs, loader, in_process):
    run_dir = small_runs / loader
    want = metrics(run_dir)
    assert want["data"]["loader"] == loader and want["test"]["users"] == 150 and want["valid"]["users"] <= 150
    ev = in_process(evaluate_run, run_dir)
    assert ev["test"]["users"] == ev["eval_users"] == 150
    assert ev["step"] == want["train"]["steps"] == 12
    for part in ("test", "valid", "popularity"):
        assert ev[part].keys() == want[part].keys()
        for key, value in want[part].items():
            assert ev[part][key] == pytest.approx(value, abs=1e-9), (part, key)


def test_resume_with_another_table_dtype_is_refused(small_runs, train_here):
    src = small_runs / "stream"
    assert read_meta(latest_checkpoint(src))["model"]["tables"]["user"][2] == "fp32"
    with pytest.raises(CheckpointError, match="model.table_dtype=fp32, this config's as model.table_dtype=fp16"):
        train_here(small_args(small_runs, "stream", "model.table_dtype=fp16", f"train.resume={src}"),
                   small_runs / "fp16")


def test_tables_of_older_checkpoints_are_fp32():
    from recsys.training.checkpoint import CheckpointError, check_compatible

    old = {"model": {"name": "mf", "tables": {"item": [200, 16], "user": [500, 16]}}}  # no storage type recorded
    check_compatible(old, "mf", {"item": [200, 16, "fp32"], "user": [500, 16, "fp32"]}, Path("old"))
    with pytest.raises(CheckpointError, match="table_dtype=fp32, this config's as model.table_dtype=fp16"):
        check_compatible(old, "mf", {"item": [200, 16, "fp16"], "user": [500, 16, "fp16"]}, Path("old"))
    with pytest.raises(CheckpointError, match="do not match"):
        check_compatible(old, "mf", {"item": [200, 8, "fp32"], "user": [500, 8, "fp32"]}, Path("old"))


def test_run_hash_ignores_streaming_options_of_memory_runs():
    import dataclasses

    from recsys.config import Config, DataConfig, ModelConfig
    from recsys.training.checkpoint import run_hash

    def h(model: str = "mf", **data) -> str:
        return run_hash(Config(data=DataConfig(**data), model=ModelConfig(name=model)))

    streaming = {"num_workers": 4, "shuffle_buffer": 1000, "row_group_size": 500}
    # 500k synthetic interactions, auto: read in memory; the streaming loader's options change nothing
    assert h() == h(**streaming) == h(loader="memory", **streaming) == h(stream_min_rows=10_000_000)
    big = {"num_interactions": 10_000_000}  # auto would stream it, but history bags are read in memory
    assert h(model="two_tower", **big) == h(model="two_tower", **big, num_workers=2, shuffle_buffer=10)
    assert h() != h(num_interactions=400_000)  # what is read still counts
    assert h() != h(stream_min_rows=1000)  # now streamed
    # streamed: they change the batches
    for key, value in streaming.items():
        assert h(loader="stream") != h(loader="stream", **{key: value}), key
    assert h(loader="stream") != h(num_interactions=10_000_000, num_workers=2) != h(num_interactions=10_000_000)
    assert dataclasses.asdict(Config())["data"]["num_workers"] == 1  # run_hash does not change the config
