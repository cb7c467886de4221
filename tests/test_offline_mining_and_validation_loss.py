"""Issue 21: the validation loss (as in training and over every pair, beside the training loss)
and offline mining (hard classes by centroid, whole-set hard and semi-hard triplets), each
checked against a brute-force computation; exact resume; bad settings refused before training."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dmlkit.functional.offline import mine_offline_triplets, nearest_classes
from dmlkit.losses import TripletMarginLoss
from dmlkit.miners import TripletMarginMiner
from dmlkit.samplers import HardClassSampler, PKSampler, TripletBatchSampler
from dmlkit.training import ConfigError, Trainer, load_checkpoint, load_config
from dmlkit.viz import plot_training_log
from run_helpers import DIGITS_RUN, StopTrainingError, stop_at

FAST = [
    *DIGITS_RUN,
    "train.epochs=3",
    "sampler.classes_per_batch=3",
    "sampler.samples_per_class=6",
    "logging.progress=false",
    "logging.log_every=1",
    "validation.before_training=false",
]


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


# --------------------------------------------------------------------------- validation loss


VALIDATED = {
    "triplet, semi-hard": [
        "loss.name=TripletMarginLoss",
        "miner.name=TripletMarginMiner",
        "miner.options={margin: 0.2, type_of_triplets: semihard}",
    ],
    "contrastive, no miner": ["loss.name=ContrastiveLoss", "miner.name=null"],
    "DDTAS": [
        "loss.name=SoftContrastiveLoss",
        "miner.name=ATASMSMiner",
        "objective.name=DDTASObjective",
        "objective.options={meta_classes: 2}",
    ],
}


def _by_hand(name: str) -> tuple[Any, Any]:
    from dmlkit.losses import ContrastiveLoss, SoftContrastiveLoss
    from dmlkit.miners import ATASMSMiner

    if name.startswith("triplet"):
        return TripletMarginLoss(), TripletMarginMiner(margin=0.2, type_of_triplets="semihard")
    if name.startswith("contrastive"):
        return ContrastiveLoss(), None
    return SoftContrastiveLoss(), ATASMSMiner(epsilon=0.1)


@pytest.mark.parametrize("name", list(VALIDATED))
def test_validation_loss_as_in_training_and_over_every_pair(tmp_path: Path, name: str) -> None:
    """One validation, after step 1: the logged values equal the loss recomputed by hand on
    the same seeded P×K batches of the validation classes."""
    config = load_config(
        None,
        [
            *FAST,
            "data.val_classes=0.4",
            "train.max_steps=1",
            "validation.every=1",
            "validation.unit=step",
            "validation.loss_batches=3",
            *VALIDATED[name],
        ],
    )
    trainer = Trainer(config, tmp_path)
    trainer.fit(test=False)
    (row,) = _rows(tmp_path / "validation.csv")
    val = trainer.data.val
    assert val is not None
    classes = np.unique(val.labels)
    index = {int(c): i for i, c in enumerate(classes)}
    sampler = PKSampler(
        val.labels, min(3, len(classes)), 6, seed=config.train.seed + 2, groups_per_class="all"
    )
    model = trainer.trained_part.eval()
    loss, miner = _by_hand(name)
    mined, every, counts = [], [], []
    with torch.no_grad():
        for batch in list(sampler)[:3]:
            x = torch.stack([val[i][0] for i in batch])
            y = torch.tensor([index[int(val[i][1])] for i in batch])
            emb = model(x)
            tuples = None if miner is None else miner(emb, y)
            mined.append(float(loss(emb, y, tuples)))
            every.append(float(loss(emb, y)))
            if tuples is not None:
                counts.append(len(tuples[0]) + (len(tuples[2]) if len(tuples) == 4 else 0))
    assert float(row["val_loss"]) == pytest.approx(np.mean(mined), rel=1e-5)
    assert float(row["val_loss_all_pairs"]) == pytest.approx(np.mean(every), rel=1e-5)
    if miner is None:
        assert row["val_mined"] == ""
    else:
        assert float(row["val_mined"]) == pytest.approx(np.mean(counts), rel=1e-5)
    if name.startswith("triplet"):  # the mined and the every-triplet losses differ
        assert float(row["val_loss"]) != pytest.approx(float(row["val_loss_all_pairs"]))


def test_validation_loss_leaves_training_unchanged_and_is_absent_for_proxies(
    tmp_path: Path,
) -> None:
    """A loss with state (DynamicSoftMarginLoss's histogram) trains the same whether or not the
    validation loss is computed; losses with per-class parameters have none."""
    base = [*FAST, "data.val_classes=0.4", "train.max_steps=4", "validation.unit=step"]
    stateful = [*base, "loss.name=DynamicSoftMarginLoss", "miner.name=null"]
    Trainer(load_config(None, stateful), tmp_path / "on").fit(test=False)
    off = [*stateful, "validation.loss_batches=0"]
    Trainer(load_config(None, off), tmp_path / "off").fit(test=False)
    assert "val_loss" in _rows(tmp_path / "on" / "validation.csv")[0]
    left = load_checkpoint(tmp_path / "on" / "last.pt")
    right = load_checkpoint(tmp_path / "off" / "last.pt")
    for name, tensor in left["model"].items():
        assert torch.equal(tensor, right["model"][name]), name
    for name, tensor in left["objective"].items():
        assert torch.equal(tensor, right["objective"][name]), name
    proxies = [*base, "loss.name=ProxyAnchorLoss", "miner.name=null"]
    Trainer(load_config(None, proxies), tmp_path / "b").fit(test=False)
    assert "val_loss" not in _rows(tmp_path / "b" / "validation.csv")[0]


def test_a_log_from_before_the_validation_loss_keeps_its_columns(tmp_path: Path) -> None:
    """A run written before validation.loss_batches existed resumes: its validation.csv has
    no loss columns, and keeps none."""
    import yaml

    from dmlkit.training.checkpoint import save_atomic

    overrides = [
        *FAST,
        "data.val_classes=0.4",
        "train.max_steps=4",
        "validation.unit=step",
        "train.checkpoint_every=1",
        "validation.loss_batches=0",
    ]
    run = tmp_path / "run"
    with pytest.raises(StopTrainingError):
        Trainer(load_config(None, overrides), run, callbacks=[stop_at(2)]).fit(test=False)
    # What an older version wrote: no loss_batches anywhere.
    payload = load_checkpoint(run / "last.pt")
    del payload["config"]["validation"]["loss_batches"]
    save_atomic(payload, run / "last.pt")
    written = yaml.safe_load((run / "config.yaml").read_text())
    del written["validation"]["loss_batches"]
    (run / "config.yaml").write_text(yaml.safe_dump(written))
    Trainer(load_config(run / "config.yaml"), run).fit(resume=True, test=False)
    rows = _rows(run / "validation.csv")
    assert len(rows) == 4 and "val_loss" not in rows[0]


def test_the_plot_draws_the_validation_loss_beside_the_training_loss(
    tmp_path: Path, closed_figures: list[Any]
) -> None:
    config = [
        *FAST,
        "data.val_classes=0.4",
        "train.max_steps=6",
        "validation.every=2",
        "validation.unit=step",
    ]
    Trainer(load_config(None, config), tmp_path).fit(test=False)
    plot_training_log(tmp_path)
    (figure,) = closed_figures
    titles = {axis.get_title(): axis for axis in figure.axes if axis.get_visible()}
    labels = [line.get_label() for line in titles["training loss"].get_lines()]
    assert "validation loss (as in training)" in labels
    assert "validation loss (every pair/triplet)" in labels
    logged = [float(r["val_loss_all_pairs"]) for r in _rows(tmp_path / "validation.csv")]
    raw = [
        line
        for line in titles["training loss"].get_lines()
        if line.get_marker() == "o" and len(line.get_ydata()) == len(logged)
    ]
    assert any(np.allclose(line.get_ydata(), logged) for line in raw)
    assert "val_loss" not in [t.get_text() for t in titles["validation"].get_legend().get_texts()]
    from dmlkit.viz.report import ReportOptions, write_report

    page = write_report(tmp_path, options=ReportOptions(embeddings=False)).read_text()
    assert "validation loss (dashed)" in page


# --------------------------------------------------------------------------- offline mining


def _clustered(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(60) // 6
    centres = torch.randn(10, 5, generator=g)
    return centres[labels] + 0.6 * torch.randn(60, 5, generator=g), labels


def test_nearest_classes_against_a_brute_force_centroid_ranking() -> None:
    emb, labels = _clustered()
    classes, order = nearest_classes(emb, labels)
    unit = F.normalize(emb, dim=1)
    for c in range(10):
        centre = F.normalize(unit[labels == c].mean(0), dim=0)
        others = [d for d in range(10) if d != c]
        sims = {d: float(centre @ F.normalize(unit[labels == d].mean(0), dim=0)) for d in others}
        expected = sorted(others, key=lambda d: (-sims[d], d))
        assert order[c].tolist() == expected
    assert classes.tolist() == list(range(10))


def test_hard_class_batches_hold_the_seed_class_and_its_nearest() -> None:
    emb, labels = _clustered()
    _, order = nearest_classes(emb, labels)
    sampler = HardClassSampler(labels.numpy(), 5, 3, random_share=0.25, num_batches=20, seed=1)
    sampler.set_neighbours(order.numpy())
    assert sampler.near_per_batch == 3
    for batch in sampler:
        classes = [int(labels[i]) for i in batch]
        assert len(batch) == 15 and all(classes.count(c) == 3 for c in set(classes))
        groups = list(dict.fromkeys(classes))
        assert len(groups) == 5
        seed_class = groups[0]
        assert groups[1:4] == order[seed_class, :3].tolist()
    sampler.set_epoch(1, start_batch=7)
    resumed = list(sampler)
    sampler.set_epoch(1)
    assert resumed == list(sampler)[7:]


@pytest.mark.parametrize("kind", ["hard", "semihard"])
def test_offline_triplets_satisfy_their_definition_against_brute_force(kind: str) -> None:
    emb, labels = _clustered(2)
    found = mine_offline_triplets(emb, labels, kind, 0.3, per_anchor=2, seed=3, block_size=7)
    unit = F.normalize(emb, dim=1)
    distance = torch.cdist(unit, unit)
    assert len(found.triplets) > 0
    for (a, p, n), margin in zip(found.triplets.tolist(), found.margins.tolist(), strict=True):
        assert labels[a] == labels[p] and a != p and labels[a] != labels[n]
        t = float(distance[a, n] - distance[a, p])
        assert t == pytest.approx(margin, abs=1e-5)
        assert (t <= 1e-6) if kind == "hard" else (0 < t <= 0.3 + 1e-6)
    # Every anchor with a qualifying negative (for its drawn positive) has per_anchor triplets.
    per_anchor = torch.bincount(found.triplets[:, 0], minlength=60)
    assert set(per_anchor.tolist()) <= {0, 1, 2}  # two draws, each may find none
    assert int((per_anchor == 0).sum()) == found.anchors_without
    again = mine_offline_triplets(emb, labels, kind, 0.3, per_anchor=2, seed=3, block_size=7)
    assert torch.equal(again.triplets, found.triplets)  # seeded


def test_triplet_batches_are_packed_triplets() -> None:
    sampler = TripletBatchSampler(4, num_batches=5, seed=0)
    triplets = np.arange(30).reshape(10, 3)
    sampler.set_triplets(triplets)
    batches = list(sampler)
    assert len(batches) == 5 and all(len(b) == 12 for b in batches)
    rows = {tuple(r) for r in triplets.tolist()}
    for batch in batches:
        assert all(tuple(batch[i : i + 3]) in rows for i in range(0, 12, 3))
    with pytest.raises(ValueError, match=r"\(T, 3\)"):
        sampler.set_triplets(np.zeros((4, 2)))


OFFLINE = [*FAST, "train.max_steps=8", "validation.every=0"]


@pytest.mark.parametrize(
    "checkpoints", [["train.checkpoint_every=1"], ["train.checkpoint_every=4"]]
)
@pytest.mark.parametrize(
    "mode",
    [
        ["sampler.mode=hard_classes", "sampler.refresh=3", "sampler.refresh_unit=step"],
        [
            "sampler.mode=offline_triplets",
            "miner.name=null",
            "loss.name=TripletMarginLoss",
            "sampler.refresh=2",
            "sampler.refresh_unit=step",
        ],
    ],
    ids=["hard_classes", "offline_triplets"],
)
def test_offline_runs_log_their_refreshes_and_resume_exactly(
    tmp_path: Path, mode: list[str], checkpoints: list[str]
) -> None:
    """Killed after a refresh that the last checkpoint does not hold (checkpoints every 4 steps,
    stopped at 7): the resumed run refreshes again, once, and ends as the whole run."""
    overrides = [*OFFLINE, *mode, *checkpoints]
    Trainer(load_config(None, overrides), tmp_path / "whole").fit()
    mining = _rows(tmp_path / "whole" / "mining.csv")
    assert [int(r["step"]) for r in mining] == ([0, 3, 6] if "hard" in mode[0] else [0, 2, 4, 6])
    assert all(float(r["seconds"]) > 0 for r in mining)
    if "offline_triplets" in mode[0]:
        assert all(int(r["triplets"]) > 0 for r in mining)
    run = tmp_path / "cut"
    with pytest.raises(StopTrainingError):
        Trainer(load_config(None, overrides), run, callbacks=[stop_at(7)]).fit()
    Trainer(load_config(None, overrides), run).fit(resume=True)
    left, right = load_checkpoint(tmp_path / "whole" / "last.pt"), load_checkpoint(run / "last.pt")
    for name, tensor in left["model"].items():
        assert torch.equal(tensor, right["model"][name]), name
    drop = ("seconds",)
    refreshes = [{k: v for k, v in r.items() if k not in drop} for r in _rows(run / "mining.csv")]
    expected = [{k: v for k, v in r.items() if k not in drop} for r in mining]
    assert refreshes == expected
    whole_train = [
        {k: v for k, v in r.items() if k != "images_per_second"}
        for r in _rows(tmp_path / "whole" / "train.csv")
    ]
    cut_train = [
        {k: v for k, v in r.items() if k != "images_per_second"} for r in _rows(run / "train.csv")
    ]
    assert whole_train == cut_train


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["sampler.mode=hard_classes", "sampler.refresh=0"], "sampler.refresh must be at least 1"),
        (
            ["sampler.mode=hard_classes", "sampler.classes_per_batch=9"],
            "classes_per_batch=9 needs at least that many classes",
        ),
        (["sampler.mode=hard_classes", "sampler.random_share=1.5"], "random_share must be in"),
        (["sampler.mode=offline_triplets", "miner.name=TripletMarginMiner"], "set miner.name"),
        (
            ["sampler.mode=offline_triplets", "miner.name=null", "objective.name=DDTASObjective"],
            "needs objective.name MetricLossObjective",
        ),
    ],
)
def test_bad_offline_settings_fail_before_training(
    tmp_path: Path, overrides: list[str], message: str
) -> None:
    with pytest.raises((ConfigError, ValueError), match=message):
        Trainer(load_config(None, [*OFFLINE, *overrides]), tmp_path)


def test_a_refresh_finds_the_current_models_nearest_classes(tmp_path: Path) -> None:
    from dmlkit.training.logs import CSVLog

    trainer = Trainer(load_config(None, [*OFFLINE, "sampler.mode=hard_classes"]), tmp_path)
    trainer._refresh_mining(CSVLog(tmp_path / "mining.csv"), None)
    embeddings, labels = trainer.embed(trainer.data.train_eval)
    _, order = nearest_classes(embeddings, torch.as_tensor(labels))
    assert trainer.mining is not None
    neighbours = trainer.mining.sampler.neighbours  # type: ignore[union-attr]
    np.testing.assert_array_equal(neighbours, order.numpy())


def test_hard_classes_need_two_classes() -> None:
    with pytest.raises(ValueError, match="at least 2 classes"):
        HardClassSampler(np.zeros(10, dtype=int), 1, 2, num_batches=3)
    with pytest.raises(ValueError, match="at least 2 classes"):
        nearest_classes(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))
    assert math.isfinite(
        float(mine_offline_triplets(torch.randn(6, 3), torch.arange(6) // 3).margins.sum())
    )


def test_validation_batches_are_the_same_every_round(tmp_path: Path) -> None:
    config = load_config(None, [*FAST, "data.val_classes=0.4", "validation.loss_batches=3"])
    first = Trainer(config, tmp_path / "a")._validation_batches()
    again = Trainer(config, tmp_path / "b")._validation_batches()
    assert first == again and len(first) == 3
    trainer = Trainer(config, tmp_path / "c")
    losses = trainer._validation_losses()
    assert trainer._validation_losses() == losses  # the same batches and model: the same values
