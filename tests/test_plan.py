"""The dry run (recsys.plan): a CUDA cluster planned in one CPU process, checked against table sizes
computed here."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest

from recsys.errors import ConfigError, PlanError
from recsys.plan import format_report, run

GIB = 1024**3


@pytest.fixture
def plan(tmp_path, config):
    """The dry run of `overrides` into tmp_path/run, as ``python -m recsys.plan`` runs it; its
    printout as ``stdout``."""

    def dry(*overrides):
        result = run(config(overrides), tmp_path / "run")
        return SimpleNamespace(stdout=format_report(result), result=result)

    return dry


def reference_bytes(tables):
    """Weights (fp32) plus RowWiseAdagrad's state (one fp32 per row) of every table."""
    return sum(rows * dim * 4 + rows * 4 for rows, dim in tables)


def printed_plan(stdout: str):
    """{table: ranks} from the printed sharding plan (describe_plan's lines)."""
    out = {}
    for line in stdout.splitlines():
        m = re.match(r"\s+(model\.\w+\.\w+): (\w+) kernel=(\w+) ranks=\[([\d, ]*)\]", line)
        if m:
            out[m.group(1)] = [int(r) for r in m.group(4).split(", ") if r]
    return out


def check_tiling(table):
    """The shards of a table cover its rows x columns exactly once."""
    covered = sorted((s["row_offset"], s["col_offset"], s["rows"], s["cols"]) for s in table["shards"])
    assert sum(r * c for _, _, r, c in covered) == table["rows"] * table["dim"]
    for r0, c0, r, c in covered:
        assert 0 <= r0 and r0 + r <= table["rows"] and 0 <= c0 and c0 + c <= table["dim"]
    for a, b in zip(covered, covered[1:]):  # no overlap between shards that share columns
        if a[1] == b[1]:
            assert a[0] + a[2] <= b[0]


@pytest.mark.parametrize("world_size,sharding", [(2, None), (8, "row_wise")])
def test_cuda_cluster_planned_on_a_cpu_machine(tmp_path, plan, world_size, sharding):
    users, items, dim = 1_000_000, 200_000, 32
    extra = [f"train.sharding_types=[{sharding}]"] if sharding else []
    proc = plan(f"plan.world_size={world_size}", "plan.device=cuda", f"plan.num_users={users}",
                    f"plan.num_items={items}", f"model.embedding_dim={dim}", *extra)
    assert not (tmp_path / "data").exists()  # sizes given: no data prepared

    printed = printed_plan(proc.stdout)
    assert set(printed) == {"model.user_ebc.user", "model.item_ebc.item"}
    for ranks in printed.values():
        assert ranks and all(0 <= r < world_size for r in ranks)

    result = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert result["world_size"] == world_size and result["device"] == "cuda"
    assert result["batch_size_per_rank"] == 1024 // world_size
    sizes = {"model.user_ebc.user": users, "model.item_ebc.item": items}
    assert {t["name"]: (t["rows"], t["dim"]) for t in result["tables"]} == {n: (r, dim) for n, r in sizes.items()}
    for table in result["tables"]:
        check_tiling(table)
        assert sorted({s["rank"] for s in table["shards"]}) == printed[table["name"]]

    # Per-rank estimates: at least the weights + optimizer state computed here, and little more
    # (lookup buffers of a 1024-row batch are small next to 1.2M rows); on CUDA in HBM.
    ranks = result["ranks"]
    assert [r["rank"] for r in ranks] == list(range(world_size))
    total = sum(r["hbm_bytes"] + r["ddr_bytes"] for r in ranks)
    ref = reference_bytes([(users, dim), (items, dim)])
    assert ref <= total <= 1.05 * ref
    assert sum(r["ddr_bytes"] for r in ranks) == 0
    assert all(r["hbm_bytes"] <= result["usable_hbm_per_rank"] for r in ranks)
    assert result["hbm_per_rank"] == 32 * GIB  # TorchRec's default, what recsys.train plans with
    total_line = next(line for line in proc.stdout.splitlines() if line.strip().startswith("total"))
    assert float(total_line.split()[2]) == pytest.approx(total / (GIB if total >= GIB else 1024**2), abs=1e-3)
    assert "fits: yes" in proc.stdout

    if sharding == "row_wise":  # every table split over all 8 ranks, memory spread evenly
        assert all(ranks == list(range(8)) for ranks in printed.values())
        per_rank = [r["hbm_bytes"] for r in ranks]
        assert max(per_rank) <= 1.01 * min(per_rank)
        assert all(t["sharding_type"] == "row_wise" for t in result["tables"])
    else:
        assert sum(1 for r in ranks if r["hbm_bytes"]) >= 1


def test_sizes_from_the_prepared_dataset(tmp_path, plan):
    proc = plan("plan.world_size=2", "plan.device=cuda", "+experiment=tiny", "model=two_tower",
                    "model.share_item_table=false", f"data.root={tmp_path / 'data'}")
    manifest = json.loads(next((tmp_path / "data").glob("*/manifest.json")).read_text())["counts"]
    result = json.loads((tmp_path / "run" / "plan.json").read_text())
    rows = {t["name"]: t["rows"] for t in result["tables"]}
    assert rows == {"model.user_ebc.user": manifest["num_users"], "model.user_ebc.history": manifest["num_items"],
                    "model.item_ebc.item": manifest["num_items"]}
    assert set(printed_plan(proc.stdout)) == set(rows)
    total = sum(r["hbm_bytes"] + r["ddr_bytes"] for r in result["ranks"])
    assert total >= reference_bytes([(n, 16) for n in rows.values()])
    # A second dry run reuses the prepared dataset.
    plan("plan.world_size=2", "+experiment=tiny", f"data.root={tmp_path / 'data'}")
    assert len(list((tmp_path / "data").glob("*/manifest.json"))) == 1


def test_tables_that_do_not_fit_are_refused_in_one_line(tmp_path, plan):
    with pytest.raises(PlanError) as refused:
        plan("plan.world_size=8", "plan.device=cuda", "plan.num_users=1000000", "plan.num_items=200000",
             "plan.hbm_gib=0.01", "plan.ddr_gib=0.01")
    line = str(refused.value)
    assert "\n" not in line and "insufficient storage" in line
    assert "on 8 cuda rank(s)" in line and "plan.world_size" in line
    assert not (tmp_path / "run" / "plan.json").exists()


@pytest.mark.parametrize("overrides,message", [
    (["plan.world_size=0"], "plan.world_size"),
    (["plan.device=tpu"], "plan.device"),
    (["plan.num_users=10"], "go together"),
    (["plan.hbm_gib=0"], "plan.hbm_gib"),
])
def test_bad_plan_config_is_refused(config, overrides, message):
    with pytest.raises(Exception) as err:
        config(overrides)
    cause = err.value.__cause__ or err.value
    assert isinstance(cause, ConfigError) and message in str(cause)


def test_train_checks_apply_and_cpu_tables_go_to_host_memory(config):
    with pytest.raises(ConfigError, match="not divisible by plan.world_size=3"):
        run(config(["plan.world_size=3", "plan.num_users=100", "plan.num_items=100"]))
    result = run(config(["plan.world_size=4", "plan.device=cpu", "plan.num_users=100000", "plan.num_items=5000",
                       "model.embedding_dim=8"]))
    assert result.hbm_per_rank == 0 and result.total_hbm == 0
    assert result.total_ddr >= reference_bytes([(100_000, 8), (5_000, 8)])
