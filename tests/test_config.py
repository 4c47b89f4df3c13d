"""Every shipped config composes into the typed schema; bad values fail before any work."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from recsys.config import Config, DataConfig, LossConfig, ModelConfig, ignored_options
from recsys.errors import ConfigError
from recsys.training.checkpoint import run_hash

CONF = Path(__file__).resolve().parents[1] / "conf"


def group_options():
    for group_dir in sorted(p for p in CONF.iterdir() if p.is_dir()):
        for f in sorted(group_dir.glob("*.yaml")):
            if group_dir.name == "experiment":
                yield f"+experiment={f.stem}"
            else:
                yield f"{group_dir.name}={f.stem}"


@pytest.mark.parametrize("override", list(group_options()))
def test_every_shipped_config_composes(make, override):
    cfg = OmegaConf.to_object(make([override, "data.path=/tmp/x"]))  # every reader needs a path
    assert isinstance(cfg, Config)


# The run hash of every shipped configuration: what it trains. A change here changes the figures the
# README reports for it (the demo's recall@20 0.3910, the Gowalla experiments' table); the hashes
# were computed by the version that produced those figures.
SHIPPED = {"": "e850015e371b68ba", "tiny": "05ec4409bfab106a", "gowalla": "71e354e4f30c9f54",
           "gowalla_mf": "1bf2e42ea7a8e7d6", "gowalla_spectral": "2af3eff8058efec2",
           "gowalla_two_tower": "d5062fefb17e3e82", "big_tables": "b45e9449673b95aa", "row_wise": "14ffe4abee9fb939",
           "sweep_local": "369e59bd06f68ce6", "gowalla_mf_gpu": "73625b73b1181016"}


@pytest.mark.parametrize("experiment", list(SHIPPED))
def test_shipped_configs_train_what_their_figures_were_measured_with(make, experiment):
    overrides = [f"+experiment={experiment}", "data.path=/work/shared/data/gowalla"] if experiment else []
    assert run_hash(OmegaConf.to_object(make(overrides))) == SHIPPED[experiment]
    if not experiment:  # the demo: what `make demo` trains
        demo = OmegaConf.to_object(make())
        assert (demo.data.name, demo.data.num_users, demo.data.num_items, demo.model.name, demo.train.epochs) == \
            ("synthetic", 20_000, 5_000, "mf", 8)


@pytest.mark.parametrize("override,message", [
    ("model.embedding_dim=0", "embedding_dim must be positive"),
    ("eval.ks=[0]", "eval.ks"),
    ("train.batch_size=-1", "batch_size"),
    ("loss.temperature=0", "temperature"),
    ("data.split=sideways", "data.split"),
    ("train.sharding_types=[diagonal]", "unknown sharding type"),
    ("eval.select_metric=precision@20", "select_metric"),
    ("data.valid_fraction=1.0", "valid_fraction"),
    ("model.history_weight=1.5", "history_weight"),
    ("loss.name=hinge", "loss.name"),
])
def test_bad_values_are_refused(make, override, message):
    with pytest.raises(Exception) as err:
        OmegaConf.to_object(make([override]))
    cause = err.value.__cause__ or err.value
    assert isinstance(cause, ConfigError) and message in str(cause)


def test_unknown_key_is_refused(make):
    with pytest.raises(Exception, match="embeding_dim"):
        make(["model.embeding_dim=8"])


def test_run_hash_of_older_configs_is_unchanged():
    """Options added later are hashed only away from their defaults, so run directories written
    before they existed keep their hash and resume (values pinned from the version before them)."""
    assert run_hash(Config()) == "e850015e371b68ba"
    lightgcn = DataConfig(name="lightgcn", path="/work/shared/data/gowalla", split="given", valid_fraction=0.1)
    old = Config(data=lightgcn, model=ModelConfig(name="two_tower"))
    assert run_hash(old) == "de22316c4c560a41"
    # unused table sizes of a vocabulary-mapped file source (its YAML now says 0) change nothing
    assert run_hash(dataclasses.replace(old, data=dataclasses.replace(lightgcn, num_users=0, num_items=0))) == run_hash(old)
    # a new option away from its default does change the hash
    assert run_hash(dataclasses.replace(old, model=ModelConfig(name="two_tower", table_dtype="fp16"))) != run_hash(old)


def test_renamed_and_stacked_experiments_keep_their_run_hashes(make):
    """`+experiment=gowalla` became `gowalla_spectral` when the stacked model took the name: the same
    config, so a run directory of the old name still resumes under the new one (hash pinned from
    such a run); the hashes of gowalla_mf and gowalla_two_tower (pinned from the version before
    stacking existed) do not see the stacking options at their default."""
    def h(name):
        return run_hash(OmegaConf.to_object(make([f"+experiment={name}", "data.path=/work/shared/data/gowalla"])))

    assert h("gowalla_spectral") == "2af3eff8058efec2"
    assert h("gowalla") not in (h("gowalla_mf"), h("gowalla_spectral"))
    assert (h("gowalla_mf"), h("gowalla_two_tower")) == ("1bf2e42ea7a8e7d6", "d5062fefb17e3e82")


@pytest.mark.parametrize("cfg,loader,named", [
    # model=mf has no history bag: the two-tower options do nothing
    (Config(model=ModelConfig(name="mf", history_weight=0.8, projection=True)), "memory",
     ["model.history_weight=0.8", "model.projection=true"]),
    # BPR scores each positive against one negative: the softmax's corrections do nothing
    (Config(loss=LossConfig(name="bpr")), "memory",
     ["loss.logq_correction=true", "loss.mask_accidental_hits=true"]),
    (Config(loss=LossConfig(name="bpr", logq_correction=False, mask_accidental_hits=False, margin=0.1)), "memory",
     ["loss.margin=0.1"]),
    # the streaming loader's options with the memory loader
    (Config(data=DataConfig(num_workers=4, shuffle_buffer=10)), "memory", ["data.num_workers=4", "data.shuffle_buffer=10"]),
    (Config(data=DataConfig(num_workers=4, shuffle_buffer=10)), "stream", []),
    # nothing unused in the demo, the sampled softmax or a two-tower with its bag
    (Config(), "memory", []),
    (Config(model=ModelConfig(name="two_tower", history_weight=0.8, projection=True)), "memory", []),
])
def test_options_that_do_nothing_are_named(cfg, loader, named):
    lines = ignored_options(cfg, loader)
    assert [line.split(" does nothing")[0] for line in lines] == named
    assert all(" does nothing" in line and len(line.splitlines()) == 1 for line in lines)


def test_shipped_experiments_use_what_they_set(make):
    """The shipped recipes set no option that does nothing (gowalla_mf inherits the two-tower's
    history options: those are named, the rest of the recipe is used)."""
    for name in ("tiny", "gowalla_two_tower", "gowalla_spectral", "big_tables", "row_wise"):
        cfg = OmegaConf.to_object(make([f"+experiment={name}", "data.path=/tmp/x"]))
        assert ignored_options(cfg, "memory") == [], name
    mf = OmegaConf.to_object(make(["+experiment=gowalla_mf", "data.path=/tmp/x"]))
    assert [line.split(" does nothing")[0] for line in ignored_options(mf, "memory")] == [
        "model.history_weight=0.8", "model.share_item_table=false"]
