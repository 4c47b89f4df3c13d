"""The CUDA path, checked where a CPU can check it: batches carry their sizes on the host, are built
ahead in a thread and pinned on CUDA; the device is chosen loudly; NCCL jobs keep torch's gloo;
the sharder offers only kernels whose in-place writes land; fp16 rounding is a choice; the
best-epoch snapshot lives in host memory. What needs a GPU is in benchmarks/gpu/ (the kit)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
import torch.distributed.distributed_c10d as c10d
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys import parallelize
from recsys.data.batches import BatchOptions, TrainBatches, built_ahead
from recsys.data.dataset import CSR
from recsys.data.features import HISTORY_FEATURE, ITEM_FEATURE, ITEM_HISTORY_FEATURE, Batch, Features
from recsys.errors import DeviceError

# ---- KJTs: the stride and each key's number of values computed on the host


def plain_kjt(kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
    """The same KJT as TorchRec builds it from keys, values and lengths alone (as this project did)."""
    return KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values(), lengths=kjt.lengths())


def test_kjts_carry_stride_and_lengths_per_key_equal_to_torchrecs():
    history = CSR(np.array([0, 3, 3, 7, 9]), np.array([5, 6, 7, 1, 2, 3, 4, 0, 8]))
    item_history = CSR.from_pairs(np.array([1, 1, 4, 9, 11]), np.array([0, 2, 3, 1, 0]), 12)
    users, items = np.array([2, 0, 1, 3]), np.array([3, 9, 8, 1, 11, 4])
    for shared in (True, False):
        batch = Features(history, shared=shared, item_history=item_history).batch(users, items)
        for kjt, keys in ((batch.users, 1 if shared else 2), (batch.items, 3 if shared else 2)):
            assert len(kjt.keys()) == keys
            assert kjt._length_per_key is not None and kjt._stride is not None  # no device-to-host copy
            assert kjt._offset_per_key is not None
            reference = plain_kjt(kjt)
            assert kjt.stride() == reference.stride()
            assert kjt.length_per_key() == reference.length_per_key()
            assert kjt.offset_per_key() == reference.offset_per_key()
            for key in kjt.keys():
                assert torch.equal(kjt[key].values(), reference[key].values())
                assert torch.equal(kjt[key].lengths(), reference[key].lengths())
            moved = kjt.to(torch.device("cpu"))
            assert moved._length_per_key == kjt._length_per_key and moved._stride == kjt._stride
    b = Features(history, shared=True, item_history=item_history).batch(users, items)
    assert set(b.items.keys()) == {ITEM_FEATURE, HISTORY_FEATURE, ITEM_HISTORY_FEATURE}
    # dropout and target exclusion shorten bags: the host-side sizes follow
    b = Features(history, shared=False, dropout=0.5, exclude_target=True).batch(users, items, np.random.default_rng(3))
    assert b.users.length_per_key() == plain_kjt(b.users).length_per_key()
    assert b.users.length_per_key()[1] == int(b.history_counts.sum())


# ---- batches built ahead, pinned on CUDA


def epoch_batches(pin: bool = False, n: int = 40_000):
    rng = np.random.default_rng(0)
    users, items = rng.integers(0, 500, n), rng.integers(0, 300, n)
    return TrainBatches(users, items, 300, BatchOptions(512, 64, seed=1, pin_memory=pin), epoch=2)


def same_batch(a: Batch, b: Batch) -> bool:
    return (torch.equal(a.user_ids, b.user_ids) and torch.equal(a.item_ids, b.item_ids)
            and torch.equal(a.items.values(), b.items.values()) and torch.equal(a.users.lengths(), b.users.lengths()))


@pytest.mark.parametrize("depth", [0, 1, 4])
def test_batches_built_ahead_are_the_same_batches_in_order(depth):
    direct = list(epoch_batches())
    ahead = list(built_ahead(epoch_batches(), depth))
    assert len(direct) == len(ahead) == 78
    assert all(same_batch(a, b) for a, b in zip(direct, ahead))


def test_an_error_while_building_ahead_is_raised_in_the_training_thread():
    def failing():
        yield from list(epoch_batches())[:3]
        raise ValueError("row group 7 is corrupt")

    seen = []
    with pytest.raises(ValueError, match="row group 7"):
        for batch in built_ahead(failing(), 2):
            seen.append(batch)
    assert len(seen) == 3


def test_stopping_early_stops_the_builder_thread():
    before = threading.active_count()
    it = built_ahead(epoch_batches(), 2)
    next(it)
    assert any(t.name == "recsys-batches" for t in threading.enumerate())
    it.close()  # the loop's `closing` does this when it leaves an epoch early
    deadline = time.monotonic() + 5
    while any(t.name == "recsys-batches" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(t.name == "recsys-batches" for t in threading.enumerate())
    assert threading.active_count() <= before


def test_batches_are_pinned_on_cuda_in_the_builder_thread(monkeypatch):
    # A CPU machine cannot pin memory: record what would be pinned, and on which thread and device.
    pinned, devices = [], []
    monkeypatch.setattr(Batch, "pin_memory", lambda self: pinned.append(threading.current_thread().name) or self)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: devices.append(str(device)))
    batches = list(built_ahead(epoch_batches(pin=True), 2, torch.device("cuda", 1)))
    assert len(pinned) == len(batches) == 78 and set(pinned) == {"recsys-batches"}
    assert devices == ["cuda:1"]  # pinned memory is allocated in the rank's own device context
    pinned.clear()
    list(epoch_batches(pin=False))
    assert not pinned


# ---- the device: chosen loudly


def test_cpu_is_cpu_and_cuda_without_cuda_is_a_one_line_error():
    assert parallelize.select_device("cpu", 0) == torch.device("cpu")
    if torch.cuda.is_available():
        pytest.skip("a usable GPU")  # the suite hides GPUs (conftest); only a patched torch gets here
    with pytest.raises(DeviceError, match=r"^train\.device=cuda: ") as e:
        parallelize.select_device("cuda", 0)
    assert "\n" not in str(e.value)


def test_auto_without_usable_cuda_warns_when_the_machine_has_gpus(monkeypatch, caplog):
    def unusable():
        import warnings
        warnings.warn("CUDA initialization: The NVIDIA driver on your system is too old (found version 12040).")
        return False

    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", unusable)
    reason = parallelize.cuda_unavailable_reason()
    assert "built for CUDA 13.0" in reason and "driver on your system is too old" in reason
    with pytest.raises(DeviceError, match="driver on your system is too old"):
        parallelize.select_device("cuda", 0)
    monkeypatch.setattr(parallelize, "gpu_present", lambda: True)
    with caplog.at_level("WARNING", logger="recsys.parallelize"):
        assert parallelize.select_device("auto", 0) == torch.device("cpu")
    assert "runs on the CPU" in caplog.text and "too old" in caplog.text
    caplog.clear()
    monkeypatch.setattr(parallelize, "gpu_present", lambda: False)
    with caplog.at_level("WARNING", logger="recsys.parallelize"):
        assert parallelize.select_device("auto", 0) == torch.device("cpu")
    assert not caplog.text  # a CPU machine: auto is the CPU, nothing to say


def test_more_local_ranks_than_gpus_is_refused(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert parallelize.select_device("cuda", 0) == torch.device("cuda", 0)
    with pytest.raises(DeviceError, match="local rank 1 but 1 GPU"):
        parallelize.select_device("auto", 1)


def test_train_with_device_cuda_and_no_cuda_exits_2_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "recsys.train", "+experiment=tiny", "train.device=cuda",
                           f"data.root={tmp_path / 'data'}", f"hydra.run.dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: train.device=cuda: ")
    assert "Traceback" not in proc.stderr and not (tmp_path / "run" / "metrics.json").exists()


def test_an_nccl_job_keeps_torchs_gloo_class(monkeypatch):
    # init_distributed on a GPU, with the process group calls stubbed: the SerialGloo patch (a fix
    # for gloo's worker threads) is not installed for an NCCL job.
    original = c10d.ProcessGroupGloo
    monkeypatch.setattr(c10d, "ProcessGroupGloo", original)
    monkeypatch.setattr(parallelize, "select_device", lambda device, local_rank: torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(parallelize.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(parallelize.dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(parallelize.dist, "get_world_size", lambda group=None: 1)
    monkeypatch.setattr(parallelize.dist, "get_backend", lambda group=None: "nccl")
    info = parallelize.init_distributed("cuda")
    assert info.backend == "nccl" and info.device == torch.device("cuda", 0)
    assert c10d.ProcessGroupGloo is original
    monkeypatch.setattr(parallelize, "select_device", lambda device, local_rank: torch.device("cpu"))
    monkeypatch.setattr(parallelize.dist, "get_backend", lambda group=None: "gloo")
    parallelize.init_distributed("cpu")
    assert c10d.ProcessGroupGloo is parallelize.SerialGloo


# ---- the sharder and the planner on CUDA


def test_cuda_kernels_are_hbm_or_plain_uvm_only():
    sharder = parallelize.EmbeddingBagSharder()
    for sharding_type in sharder.sharding_types("cuda"):
        assert set(sharder.compute_kernels(sharding_type, "cuda")) == {"fused", "fused_uvm"}
    assert "grid_shard" not in sharder.sharding_types("cuda") and "data_parallel" not in sharder.sharding_types("cuda")
    assert sharder.compute_kernels("table_wise", "cpu") == ["fused"]
    assert parallelize.EmbeddingBagSharder(stochastic_rounding=False).fused_params == {"stochastic_rounding": False}


def snapshot_rank(out_dir: str):
    """On each rank: fp16 tables with stochastic rounding off (the kernels' flag), and the best-epoch
    snapshot as checkpoint state when it lives on another device than the tables (as on a GPU)."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    from recsys.model import RetrievalTask, TwoTower
    from recsys.training.checkpoint import _state_like

    info = parallelize.init_distributed("cpu")
    out = {}
    for rounding in (True, False):
        task = RetrievalTask(TwoTower(40, 30, 8, normalize=True, table_dtype="fp16"))
        dmp, _, _ = parallelize.shard_model(task, info.device, "rowwise_adagrad", 0.1, 1e-8, 1e-3, ["row_wise"],
                                            stochastic_rounding=rounding)
        model = dmp.module.model  # FBGEMM's table-batched kernels behind each sharded collection's lookups
        kernels = [e._emb_module for ebc in (model.user_ebc, model.item_ebc) for lookup in ebc._lookups
                   for e in lookup._emb_modules]
        out[f"rounding_{rounding}"] = sorted({bool(m.stochastic_rounding) for m in kernels})
    snapshot = parallelize.snapshot_weights(dmp)
    out["snapshot_devices"] = sorted({str(t.device) for t in snapshot})
    state = _state_like(dmp.state_dict(), [t.to("meta") for t in snapshot])  # "another device"
    sharded = [v for v in state.values() if isinstance(v, ShardedTensor)]
    out["sharded"] = len(sharded)
    out["placed"] = sorted({str(s.tensor.device) for v in sharded for s in v.local_shards()}
                           | {str(m.placement.device()) for v in sharded for m in v.metadata().shards_metadata})
    parallelize.destroy_distributed()
    return out


def test_fp16_rounding_flag_reaches_the_kernels_and_a_host_snapshot_checkpoints(ranks, tmp_path):
    for out in ranks(2, snapshot_rank, str(tmp_path)):
        assert out["rounding_True"] == [True] and out["rounding_False"] == [False]
        assert out["snapshot_devices"] == ["cpu"]
        assert out["sharded"] == 2 and out["placed"] == ["meta"]


def test_an_evaluation_reserve_that_leaves_too_little_for_the_tables_is_a_one_line_error(monkeypatch):
    from types import SimpleNamespace

    from recsys.errors import PlanError
    from recsys.model import RetrievalTask, TwoTower

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=8 * 2**30))
    task = RetrievalTask(TwoTower(100, 50, 8, normalize=True))
    with pytest.raises(PlanError, match=r"need 6\.000 GiB of each GPU's 8\.000 GiB"):
        parallelize.shard_model(task, torch.device("cuda", 0), "rowwise_adagrad", 0.1, 1e-8, 1e-3, [],
                                reserved_device_bytes=6 * 2**30)


# ---- the install: the CUDA set the Makefile installs is the README's, and it pairs


def test_the_cuda_set_is_one_pinned_pairing_in_makefile_and_readme():
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    make = (root / "Makefile").read_text()
    pins = dict(re.findall(r"([a-z-]+)==([\d.]+)", " ".join(
        re.search(rf"^{name} := (.*)$", make, re.M).group(1) for name in ("CUDA_TORCH", "CUDA_REC"))))
    assert set(pins) == {"torch", "fbgemm-gpu", "torchrec", "tensordict"}
    readme_line = next(line for line in (root / "README.md").read_text().splitlines()
                       if line.startswith("pip install torch=="))
    assert dict(re.findall(r"([a-z-]+)==([\d.]+)", readme_line)) == pins  # one pip command, the same four
    torch_minor = int(pins["torch"].split(".")[1])
    fbgemm_minor = int(pins["fbgemm-gpu"].split(".")[1])
    assert torch_minor == fbgemm_minor + 5  # fbgemm-gpu 1.X pairs with torch 2.(X+5)
    assert pins["torchrec"].split(".")[:2] == pins["fbgemm-gpu"].split(".")[:2]
    cpu = dict(re.findall(r"^(TORCH|FBGEMM|TORCHREC) := [a-z-]+==([\d.]+)$", make, re.M))
    assert int(cpu["TORCH"].split(".")[1]) == int(cpu["FBGEMM"].split(".")[1]) + 5
