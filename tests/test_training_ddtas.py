"""DDTAS through the objective interface (``objective: {name: DDTASObjective}``): the same
weights as the trainer that special-cased it, the logged thresholds, the plot, exact resume with
meta batches, equivalence with the standard objective without the OTG, config errors, and the
shipped recipe configs."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest
import torch

from dmlkit.cli import main
from dmlkit.miners import ATASMSMiner
from dmlkit.objectives import DDTASObjective, MetricLossObjective
from dmlkit.training import ConfigError, Trainer, load_checkpoint, load_config
from dmlkit.viz import plot_training_log
from otg_fixtures import DDTAS_RUN, SOFT_CONTRASTIVE_RUN
from run_helpers import StopTrainingError, stop_at

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

FAST = SOFT_CONTRASTIVE_RUN
DDTAS_ON = DDTAS_RUN


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


def _without_timing(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{k: v for k, v in row.items() if k != "images_per_second"} for row in rows]


def _same_weights(a: Path, b: Path) -> None:
    left, right = load_checkpoint(a), load_checkpoint(b)
    assert left["state"] == right["state"]
    for name, tensor in left["model"].items():
        assert torch.equal(tensor, right["model"][name]), name


def test_ddtas_run_logs_thresholds_and_otg_weights(tmp_path: Path) -> None:
    result = Trainer(load_config(None, DDTAS_ON), tmp_path).fit()
    rows = _rows(tmp_path / "train.csv")
    assert len(rows) == result.steps > 0
    for column in (
        "gamma_pos",
        "gamma_neg",
        "ratio",
        "num_pos_pairs",
        "num_neg_pairs",
        "otg_pos_mean",
        "otg_neg_mean",
        "otg_skipped",
        "meta_loss",
    ):
        assert column in rows[0], column
    gammas = {float(row["gamma_pos"]) for row in rows}
    # AT-ASMS: the static 0.1 when r ≤ 1, otherwise within (0.13655, 0.15].
    assert all(g == pytest.approx(0.1) or 0.1365 < g <= 0.15 for g in gammas)
    trained = [row for row in rows if row["otg_skipped"] == "0"]
    assert trained, "every step was skipped"
    assert all(0 < float(row["otg_pos_mean"]) <= 1 for row in trained)
    skipped = sum(int(row["otg_skipped"]) for row in rows)
    summary = (tmp_path / "results.json").read_text()
    assert f'"skipped_steps": {skipped}' in summary
    assert result.after != result.before


def test_cli_writes_the_training_plot(tmp_path: Path) -> None:
    args = [a for o in DDTAS_ON for a in ("--set", o)]
    assert main(["train", *args, "--run-dir", str(tmp_path)]) == 0
    png = tmp_path / "training.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    assert png.stat().st_size > 20_000  # eight panels, not an empty canvas


def test_plot_of_a_standard_run_and_of_a_missing_log(tmp_path: Path) -> None:
    Trainer(load_config(None, FAST), tmp_path / "run").fit()
    path = plot_training_log(tmp_path / "run", tmp_path / "curves.png")
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with pytest.raises(FileNotFoundError, match=r"train\.csv"):
        plot_training_log(tmp_path / "nothing")


@pytest.mark.parametrize("step", [2, 5])
def test_resume_with_the_otg_is_exact(tmp_path: Path, step: int) -> None:
    """The meta batches continue where they stopped: a resumed run equals an uninterrupted one."""
    whole = Trainer(load_config(None, DDTAS_ON), tmp_path / "whole").fit()
    cut = load_config(None, [*DDTAS_ON, "train.checkpoint_every=1"])
    run = tmp_path / "cut"
    with pytest.raises(StopTrainingError):
        Trainer(cut, run, callbacks=[stop_at(step)]).fit()
    resumed = Trainer(cut, run).fit(resume=True)
    assert resumed.after == whole.after
    _same_weights(tmp_path / "whole" / "last.pt", run / "last.pt")
    assert _without_timing(_rows(run / "train.csv")) == _without_timing(
        _rows(tmp_path / "whole" / "train.csv")
    )


def test_without_the_otg_it_is_the_standard_miner_and_loss(tmp_path: Path) -> None:
    """Same mined pairs and losses as the miner + SoftContrastiveLoss path. Only the first steps
    are compared: the two compute the same loss in a different order, and Adam's first updates
    (about lr·sign(g)) turn float rounding in near-zero gradients into visible differences."""
    steps = [*FAST, "train.max_steps=4"]
    Trainer(load_config(None, steps), tmp_path / "standard").fit()
    off = [*steps, "objective.name=DDTASObjective", "objective.options.otg=false"]
    assert isinstance(Trainer(load_config(None, steps)).objective, MetricLossObjective)
    trainer = Trainer(load_config(None, off), tmp_path / "ddtas")
    assert isinstance(trainer.objective, DDTASObjective) and trainer.objective.method.otg is None
    trainer.fit()
    standard = _rows(tmp_path / "standard" / "train.csv")
    ddtas = _rows(tmp_path / "ddtas" / "train.csv")
    assert len(standard) == len(ddtas) == 4
    for a, b in zip(standard, ddtas, strict=True):
        assert a["mined"] == b["mined"]
        assert float(b["loss"]) == pytest.approx(float(a["loss"]), rel=1e-4)


def test_virtual_lr_defaults_to_the_optimiser_lr() -> None:
    objective = Trainer(load_config(None, [*DDTAS_ON, "optimizer.lr=3e-4"])).objective
    assert isinstance(objective, DDTASObjective) and objective.method.otg is not None
    assert objective.method.otg.virtual_lr == 3e-4
    assert isinstance(objective.method.miner, ATASMSMiner)
    own = Trainer(load_config(None, [*DDTAS_ON, "objective.options.virtual_lr=0.01"])).objective
    assert isinstance(own, DDTASObjective) and own.method.otg is not None
    assert own.method.otg.virtual_lr == 0.01


def test_bad_ddtas_settings_are_config_errors() -> None:
    cases = [
        (["loss.name=MultiSimilarityLoss"], "set loss.name to SoftContrastiveLoss"),
        (["miner.name=TripletMarginMiner"], "needs miner.name ATASMSMiner"),
        (["miner.name=null"], "needs miner.name ATASMSMiner, ASMSMiner or MultiSimilarityMiner"),
        (["objective.options.per_side=true"], "per_side applies to reading='online_threshold'"),
        (["objective.options.virtual_lr=-1"], "virtual_lr must be a positive number"),
        (["train.device=cpu", "objective.options.meta_samples=0"], "meta_samples at least 2"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=re.escape(message)):
            Trainer(load_config(None, [*DDTAS_ON, *overrides]))
    with pytest.raises(ConfigError, match=r"objective\.options\.normalization: 'both' is not one"):
        load_config(None, [*DDTAS_ON, "objective.options.normalization=both"])
    with pytest.raises(ConfigError, match=r"objective\.name: unknown objective 'DDTAS'; did you"):
        load_config(None, [*FAST, "objective.name=DDTAS"])


@pytest.mark.parametrize("name", ["cub200", "cars196", "sop"])
def test_recipe_configs_build_the_full_method(name: str) -> None:
    config = load_config(ROOT / "configs" / f"{name}_ddtas.yaml")
    assert config.objective.name == "DDTASObjective"
    assert config.objective.options["otg"]
    assert config.loss.name == "SoftContrastiveLoss"
    assert config.miner.name == "ATASMSMiner"
    # SOP too: the script's 10 × 1 meta batch has no positive pair, so every step would skip.
    options = config.objective.options
    assert (options["meta_classes"], options["meta_samples"]) == (5, 2)
    assert config.model.pooling == ("avgmax" if name == "sop" else "max")


def test_meta_batches_need_positive_pairs_and_enough_classes() -> None:
    with pytest.raises(ConfigError, match=r"meta_samples at least 2 with the OTG, got 5 and 1"):
        Trainer(load_config(None, [*DDTAS_ON, "objective.options.meta_samples=1"]))
    no_meta_batch = ["objective.options.meta_samples=1", "objective.options.otg=false"]
    Trainer(load_config(None, [*DDTAS_ON, *no_meta_batch]))
    too_many = r"DDTASObjective: meta batches \(meta_classes, meta_samples\): classes_per_batch=50"
    with pytest.raises(ConfigError, match=too_many):
        Trainer(load_config(None, [*DDTAS_ON, "objective.options.meta_classes=50"]))


def test_skipped_steps_are_logged_cumulatively_whatever_the_logging_interval(
    tmp_path: Path,
) -> None:
    """Every meta batch is made of one class only (no negative pair, so no anchor of the meta
    loss counts): every step is skipped, and the log's cumulative count says so even when only
    every other step is logged."""
    config = load_config(
        None,
        [
            *DDTAS_ON,
            "objective.options.meta_classes=1",
            "logging.log_every=2",
            "train.max_steps=4",
        ],
    )
    trainer = Trainer(config, tmp_path)
    start = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.fit()
    rows = _rows(tmp_path / "train.csv")
    assert [row["step"] for row in rows] == ["2", "4"]
    assert [row["skipped_steps"] for row in rows] == ["2", "4"]
    assert all(row["loss"] == "" for row in rows)  # no loss to report
    assert '"skipped_steps": 4' in (tmp_path / "results.json").read_text()
    for name, p in trainer.model.named_parameters():  # no update at all
        assert torch.equal(p, start[name]), name


# Weights of the trainer that special-cased DDTAS (commit 6175339, before the objective
# interface) on our CPU machines (OMP_NUM_THREADS=1): (steps, sum of every floating-point weight,
# sum of their magnitudes), in float64. The objective interface alone reproduced all of them bit
# for bit. Writing the Soft Contrastive loss once (one formula for the loss class and the OTG)
# then changed float32 rounding by about 1e-7 per step; Adam's first updates (about lr·sign(g))
# turn that into visible weight differences over a run, so the DDTAS runs are compared after 4
# steps, to the relative tolerance that rounding leaves (measured: at most 5e-6).
BEFORE_THE_OBJECTIVE_INTERFACE = {
    "standard": (58, 367.107938861015, None),
    "closed_form": (4, 418.92485007076164, 5991.942741229786),
    "double_backward_additive": (4, 416.1140377684809, 5991.789628914408),
}


@pytest.mark.parametrize("case", sorted(BEFORE_THE_OBJECTIVE_INTERFACE))
def test_same_seed_gives_the_weights_of_the_trainer_before_objectives(
    tmp_path: Path, case: str
) -> None:
    steps, total, magnitude = BEFORE_THE_OBJECTIVE_INTERFACE[case]
    runs = {
        "standard": [o for o in FAST if not o.startswith(("loss.", "miner."))],  # the defaults
        "closed_form": DDTAS_ON,
        "double_backward_additive": [
            *DDTAS_ON,
            "objective.options.otg_method=double_backward",
            "objective.options.reading=additive",
        ],
    }
    Trainer(load_config(None, [*runs[case], f"train.max_steps={steps}"]), tmp_path).fit()
    model = load_checkpoint(tmp_path / "last.pt")["model"]
    weights = [w.double() for w in model.values() if w.is_floating_point()]
    if magnitude is None:  # bit for bit
        assert sum(float(w.sum()) for w in weights) == total
        return
    assert sum(float(w.sum()) for w in weights) == pytest.approx(total, rel=1e-5)
    assert sum(float(w.abs().sum()) for w in weights) == pytest.approx(magnitude, rel=1e-5)


def test_checkpoints_from_before_the_objective_interface_resume_exactly(tmp_path: Path) -> None:
    """A checkpoint and config as dmlkit 0.1 wrote them (``method``/``ddtas`` sections, the loss's
    state under ``loss``, the global generators) resume to the same run."""
    config = load_config(None, [*DDTAS_ON, "train.max_steps=4", "train.checkpoint_every=2"])
    Trainer(config, tmp_path / "whole").fit()
    run = tmp_path / "old"
    with pytest.raises(StopTrainingError):
        Trainer(config, run, callbacks=[stop_at(2)]).fit()
    payload = load_checkpoint(run / "last.pt")
    saved = payload["config"]
    saved["method"], saved["ddtas"] = "ddtas", saved.pop("objective")["options"]
    saved["optimizer"]["momentum"] = saved["optimizer"].pop("options").get("momentum", 0.0)
    schedule = saved.pop("scheduler")
    saved["scheduler"] = {"name": "none", "step_size": 1000, "gamma": 0.1, **schedule}
    del saved["scheduler"]["options"]
    payload["loss"] = {k.removeprefix("loss."): v for k, v in payload.pop("objective").items()}
    payload["rng"] = {"python": None, "numpy": None, "torch": payload["rng"]["torch"]}
    del payload["classes"]
    torch.save(payload, run / "last.pt")
    resumed = Trainer(config, run).fit(resume=True)
    assert resumed.steps == 4
    _same_weights(tmp_path / "whole" / "last.pt", run / "last.pt")
