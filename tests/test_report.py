"""What a person looks at: dataset report, plots, summary.md, TensorBoard scalars, recsys.prepare."""

from __future__ import annotations

import json
import re
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from recsys.data.dataset import Dataset
from recsys.data.prepare import prepared_dir
from recsys.errors import DataError
from recsys.prepare import prepare_report
from recsys.report import (count_quantiles, dataset_report, format_dataset_report, plot_loss, plot_metrics, plot_norms,
                           plot_popularity, top_share, write_summary)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; fails on anything that is not a PNG."""
    data = Path(path).read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def assert_png(path: Path, min_bytes: int = 10_000) -> None:
    width, height = png_size(path)
    assert width >= 300 and height >= 200 and Path(path).stat().st_size > min_bytes
    assert not list(Path(path).parent.glob(".*tmp*")), "a temporary file was left behind"


def links(markdown: str) -> list[str]:
    return re.findall(r"\]\(([^)]+)\)", markdown)


def test_count_quantiles_against_numpy_and_by_hand():
    assert count_quantiles(np.array([1, 2, 3, 4, 100])) == {
        "min": 1.0, "25%": 2.0, "50%": 3.0, "75%": 4.0, "90%": pytest.approx(61.6), "99%": pytest.approx(96.16),
        "max": 100.0}
    counts = np.random.default_rng(0).zipf(1.7, 999)
    q = count_quantiles(counts)
    expected = np.percentile(counts, [0, 25, 50, 75, 90, 99, 100])
    np.testing.assert_allclose([q[k] for k in ("min", "25%", "50%", "75%", "90%", "99%", "max")], expected)
    assert q["min"] == counts.min() and q["max"] == counts.max()


def test_top_share():
    assert top_share(np.array([50, 30, 10, 10] + [0] * 96), 0.01) == 0.5   # 1 of 100 rows
    assert top_share(np.array([1, 1, 1, 1]), 0.5) == 0.5
    assert top_share(np.zeros(3), 0.1) == 0.0


def hand_dataset(tmp_path) -> Dataset:
    # 4 users, 5 items; user 3's interactions include two validation holdouts
    train = [(0, 0), (0, 1), (0, 2), (1, 0), (2, 0), (2, 3), (3, 0), (3, 1), (3, 4)]
    valid = [False, False, False, False, False, False, False, True, True]
    test = [(0, 3), (1, 1), (1, 2), (3, 2)]
    manifest = {"source": "hand", "split": "random", "counts": {"raw_interactions": 15},
                "dropped": {"null_ids": 0, "duplicates": 2, "test_unseen_item": 0}}
    return Dataset(path=tmp_path, num_users=4, num_items=5,
                   train_users=np.array([u for u, _ in train]), train_items=np.array([i for _, i in train]),
                   valid=np.array(valid), test_users=np.array([u for u, _ in test]),
                   test_items=np.array([i for _, i in test]), manifest=manifest)


def test_dataset_report_counts_density_quantiles(tmp_path):
    ds = hand_dataset(tmp_path)
    r = dataset_report(ds)
    assert r["interactions"] == {"train": 7, "valid": 2, "test": 4, "total": 13}
    assert r["density"] == pytest.approx(13 / 20)
    assert r["test_users"] == 3
    per_user = Counter(ds.train_users.tolist())  # train + valid: 3, 1, 2, 3
    per_item = Counter(ds.train_items.tolist())  # 4, 2, 1, 1, 1
    assert r["per_user"] == count_quantiles(np.array([per_user[u] for u in range(4)]))
    assert (r["per_user"]["min"], r["per_user"]["50%"], r["per_user"]["max"]) == (1.0, 2.5, 3.0)
    assert (r["per_item"]["min"], r["per_item"]["50%"], r["per_item"]["max"]) == (1.0, 1.0, 4.0)
    assert r["per_item_mean"] == pytest.approx(sum(per_item.values()) / 5)
    assert r["dropped"] == {"null_ids": 0, "duplicates": 2, "test_unseen_item": 0}
    text = format_dataset_report(r)
    assert "users: 4; items: 5" in text and "7 train, 2 valid, 4 test" in text and "density: 0.65" in text
    assert "- duplicates: 2 (repeated (user, item) pair)" in text and "null_ids" not in text
    assert "| per item | 1.8 | 1 | 1 | 1 | 2 | 3.2 | 3.9 | 4 |" in text


def test_plots_are_pngs(tmp_path):
    rng = np.random.default_rng(0)
    counts = rng.zipf(1.5, 300)
    assert_png(plot_popularity(counts, tmp_path / "popularity.png", user_counts=rng.integers(1, 50, 80)))
    assert_png(plot_loss([5, 10, 15, 20], [7.0, 6.5, 6.0, 5.8], [10, 20], [6.8, 5.9], tmp_path / "loss.png"))
    history = [{"steps": s, "loss": 1.0, "valid": {"recall@10": 0.1 * e, "ndcg@10": 0.05 * e},
                "test": {"recall@10": 0.09 * e, "ndcg@10": 0.04 * e}} for e, s in enumerate((10, 20, 30))]
    assert_png(plot_metrics(history, {"recall@10": 0.17, "ndcg@10": 0.08}, [10], tmp_path / "metrics.png",
                            {"recall@10": 0.05, "ndcg@10": 0.02}, selected_epoch=1))
    assert_png(plot_norms(rng.random(80) + 1, rng.random(300) + 1, tmp_path / "norms.png", True,
                          np.arange(300), counts))
    # rewriting a plot replaces it in place
    before = (tmp_path / "loss.png").read_bytes()
    plot_loss([5], [1.0], [], [], tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes() != before


def test_summary_gathers_metrics_and_links_existing_files(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "export" / "items").mkdir(parents=True)
    (run_dir / "export" / "items" / "part-00000.parquet").write_bytes(b"x")
    (run_dir / "metrics.json").write_text("{}")
    metrics = {
        "test": {"recall@10": 0.1234, "ndcg@10": 0.0567, "recall@20": 0.2345, "ndcg@20": 0.0789, "users": 321},
        "popularity": {"recall@10": 0.0111, "ndcg@10": 0.0222, "recall@20": 0.0333, "ndcg@20": 0.0444, "users": 321},
        "valid": {"recall@10": 0.3111, "ndcg@10": 0.3222, "recall@20": 0.3333, "ndcg@20": 0.3444, "users": 300},
        "selected_epoch": 2,
        "train": {"steps": 1200, "epochs": 4, "wall_s": 12.5, "interactions_per_s": 98304.0, "world_size": 2,
                  "device": "cpu", "history": []},
        "eval": {"wall_s": 1.5, "per_epoch_wall_s": 3.0},
        "data": {"path": "/data/x", "num_users": 100, "num_items": 50, "train_interactions": 900,
                 "valid_interactions": 100, "test_interactions": 250, "test_users": 99,
                 "dropped": {"duplicates": 7, "null_ids": 0}},
        "export": {"dir": str(run_dir / "export"), "ann": {"recall@10": 0.987}},
    }
    fig = plot_loss([1, 2], [2.0, 1.0], [2], [1.5], run_dir / "loss.png")
    path = write_summary(run_dir, metrics, [10, 20], {"Training loss": fig, "Missing": run_dir / "none.png"})
    text = path.read_text()
    assert path == run_dir / "summary.md"
    assert "| model | 0.1234 | 0.0567 | 0.2345 | 0.0789 |" in text
    assert "| popularity baseline | 0.0111 | 0.0222 | 0.0333 | 0.0444 |" in text
    assert "| model, validation (epoch 2) | 0.3111 | 0.3222 | 0.3333 | 0.3444 |" in text
    assert "1,200 steps, 4 epoch(s) on 2 rank(s)" in text and "98,304 interactions/s" in text and "12.5 s" in text
    assert "selected epoch: 2" in text and "duplicates 7" in text and "null_ids" not in text
    assert "800 train, 100 valid, 250 test" in text and f"density {1150 / 5000:.3g}" in text
    assert "export ann.recall@10: 0.987" in text and "none.png" not in text
    found = links(text)
    assert {"loss.png", "metrics.json", "export/items"} <= set(found)
    for link in found:
        assert not Path(link).is_absolute() and (run_dir / link).exists(), link


def write_lightgcn(directory: Path) -> tuple[dict, dict]:
    rng = np.random.default_rng(1)
    directory.mkdir()
    train, test = {}, {}
    for u in range(60):
        items = rng.choice(40, int(rng.integers(3, 15)), replace=False).tolist()
        train[u], test[u] = items[:-2], items[-2:]
    (directory / "train.txt").write_text("".join(f"{u} {' '.join(map(str, i))}\n" for u, i in train.items()))
    (directory / "test.txt").write_text("".join(f"{u} {' '.join(map(str, i))}\n" for u, i in test.items()))
    return train, test


def test_prepare_report_matches_the_files(tmp_path, make):
    train, test = write_lightgcn(tmp_path / "lg")
    overrides = ["data=lightgcn", f"data.path={tmp_path / 'lg'}", f"data.root={tmp_path / 'data'}"]
    path, _, text = prepare_report(OmegaConf.to_object(make(overrides)))
    (prepared,) = (tmp_path / "data").iterdir()
    assert path == prepared
    report = json.loads((prepared / "report.json").read_text())
    # independent count from the text files (every test item/user here also occurs in training)
    train_items = Counter(i for items in train.values() for i in items)
    test_pairs = [(u, i) for u, items in test.items() for i in items if i in train_items]
    n_train = sum(len(v) for v in train.values())
    assert report["num_users"] == 60 and report["num_items"] == len(train_items)
    assert report["interactions"] == {"train": n_train, "valid": 0, "test": len(test_pairs),
                                      "total": n_train + len(test_pairs)}
    assert report["density"] == pytest.approx((n_train + len(test_pairs)) / (60 * len(train_items)))
    expected = np.percentile([len(v) for v in train.values()], [0, 25, 50, 75, 90, 99, 100])
    np.testing.assert_allclose(list(report["per_user"].values()), expected)
    expected = np.percentile(list(train_items.values()), [0, 25, 50, 75, 90, 99, 100])
    np.testing.assert_allclose(list(report["per_item"].values()), expected)
    assert report["dropped"]["test_unseen_item"] == sum(len(v) for v in test.values()) - len(test_pairs)
    assert f"users: 60; items: {len(train_items)}" in text
    assert f"{n_train:,} train, 0 valid, {len(test_pairs):,} test" in text
    assert report["popularity_plot"] == str(prepared / "popularity.png")
    assert_png(prepared / "popularity.png")
    assert (prepared / "report.md").read_text().startswith(f"# Dataset {prepared.name}")
    # recsys.train composes the same overrides into the same data config: it reuses this preparation
    cfg = OmegaConf.to_object(make(overrides))
    assert prepared_dir(cfg.data) == prepared


def test_prepare_bad_input_names_the_path(tmp_path, make):
    with pytest.raises(DataError, match=str(tmp_path / "missing")):
        prepare_report(OmegaConf.to_object(make(["data=lightgcn", f"data.path={tmp_path / 'missing'}",
                                                 f"data.root={tmp_path / 'data'}"])))
    assert not (tmp_path / "data").exists()


def test_tiny_run_leaves_plots_summary_and_tensorboard(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tiny_run  # 2 epochs, log.tensorboard=true, train.log_every_steps=5, eval.test_every_epoch=true
    metrics = json.loads((run_dir / "metrics.json").read_text())
    steps = metrics["train"]["steps"]
    curve = metrics["train"]["loss_curve"]
    assert curve["step"] == list(range(5, steps + 1, 5)) and all(np.isfinite(curve["loss"]))
    for name in ("loss", "metrics", "popularity", "norms"):
        assert_png(run_dir / f"{name}.png")
    # normalised model: the plotted norms are the raw ones (not all 1), the exported ones are 1
    assert metrics["vectors"]["normalized"] is True and metrics["vectors"]["item_norm"]["max"] > 1.01
    text = (run_dir / "summary.md").read_text()
    for k in (10, 20, 50):
        assert f"{metrics['test'][f'recall@{k}']:.4f}" in text and f"{metrics['popularity'][f'ndcg@{k}']:.4f}" in text
    for link in links(text):
        assert (run_dir / link).exists(), link
    assert {"loss.png", "metrics.png", "popularity.png", "norms.png", "export/items"} <= set(links(text))

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/interactions_per_s", "train/epoch_loss", "test/recall@20",
            "test/ndcg@50", "final/test_recall@20", "final/popularity_recall@20"} <= tags
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == curve["step"]
    np.testing.assert_allclose([e.value for e in loss], curve["loss"], rtol=1e-5)
    assert acc.Scalars("train/lr")[0].value == pytest.approx(0.3)  # conf/optim/rowwise_adagrad.yaml
    hist = metrics["train"]["history"]
    test_curve = acc.Scalars("test/recall@20")
    assert [e.step for e in test_curve] == [h["steps"] for h in hist]
    np.testing.assert_allclose([e.value for e in test_curve], [h["test"]["recall@20"] for h in hist], rtol=1e-6)
    assert acc.Scalars("final/test_recall@20")[-1].value == pytest.approx(metrics["test"]["recall@20"], rel=1e-6)
    assert all(e.value > 0 for e in acc.Scalars("train/interactions_per_s"))
