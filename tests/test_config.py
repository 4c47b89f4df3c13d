"""Every shipped config composes into the typed schema; bad values fail before any work."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from recsys.config import Config, ConfigError, register_configs, register_resolvers

CONF = Path(__file__).resolve().parents[1] / "conf"
register_configs()
register_resolvers()


def make(overrides=()):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=False)


def group_options():
    for group_dir in sorted(p for p in CONF.iterdir() if p.is_dir()):
        for f in sorted(group_dir.glob("*.yaml")):
            if group_dir.name == "experiment":
                yield f"+experiment={f.stem}"
            else:
                yield f"{group_dir.name}={f.stem}"


@pytest.mark.parametrize("override", list(group_options()))
def test_every_shipped_config_composes(override):
    cfg = OmegaConf.to_object(make([override, "data.path=/tmp/x"]))  # every reader needs a path
    assert isinstance(cfg, Config)


def test_demo_config_is_the_contract():
    cfg = OmegaConf.to_object(make())
    assert cfg.data.name == "synthetic" and cfg.eval.ks == [10, 20, 50]
    cfg = OmegaConf.to_object(make(["data.num_users=10", "data.num_items=5", "data.num_interactions=100",
                                    "model.embedding_dim=8", "train.epochs=1", "train.max_steps=3",
                                    "train.batch_size=64", "eval.ks=[5]", "seed=1"]))
    assert (cfg.data.num_users, cfg.model.embedding_dim, cfg.train.max_steps, cfg.eval.ks, cfg.seed) == (10, 8, 3, [5], 1)


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
def test_bad_values_are_refused(override, message):
    with pytest.raises(Exception) as err:
        OmegaConf.to_object(make([override]))
    cause = err.value.__cause__ or err.value
    assert isinstance(cause, ConfigError) and message in str(cause)


def test_unknown_key_is_refused():
    with pytest.raises(Exception, match="embeding_dim"):
        make(["model.embeding_dim=8"])


def test_run_hash_of_older_configs_is_unchanged():
    """Options added later are hashed only away from their defaults, so run directories written
    before they existed keep their hash and resume (values pinned from the version before them)."""
    import dataclasses

    from recsys.checkpoint import run_hash
    from recsys.config import Config, DataConfig, ModelConfig

    assert run_hash(Config()) == "e850015e371b68ba"
    lightgcn = DataConfig(name="lightgcn", path="/work/shared/data/gowalla", split="given", valid_fraction=0.1)
    old = Config(data=lightgcn, model=ModelConfig(name="two_tower"))
    assert run_hash(old) == "de22316c4c560a41"
    # unused table sizes of a vocabulary-mapped file source (its YAML now says 0) change nothing
    assert run_hash(dataclasses.replace(old, data=dataclasses.replace(lightgcn, num_users=0, num_items=0))) == run_hash(old)
    # a new option away from its default does change the hash
    assert run_hash(dataclasses.replace(old, model=ModelConfig(name="two_tower", table_dtype="fp16"))) != run_hash(old)


def test_renamed_and_stacked_experiments_keep_their_run_hashes():
    """`+experiment=gowalla` became `gowalla_spectral` when the stacked model took the name: the same
    config, so a run directory of the old name still resumes under the new one (hash pinned from
    such a run); the hashes of gowalla_mf and gowalla_two_tower (pinned from the version before
    stacking existed) do not see the stacking options at their default."""
    from recsys.checkpoint import run_hash

    def h(name):
        return run_hash(OmegaConf.to_object(make([f"+experiment={name}", "data.path=/work/shared/data/gowalla"])))

    assert h("gowalla_spectral") == "2af3eff8058efec2"
    assert h("gowalla") not in (h("gowalla_mf"), h("gowalla_spectral"))
    assert (h("gowalla_mf"), h("gowalla_two_tower")) == ("1bf2e42ea7a8e7d6", "d5062fefb17e3e82")
