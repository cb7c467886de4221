"""The open architecture: one registry for every part (import paths, nested specs, run-time
values, checked options), user objectives, contiguous training labels, and a trainer that owns
its random stream."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dmlkit.distances import LpDistance
from dmlkit.losses import LOSSES, ContrastiveLoss
from dmlkit.miners import MINERS
from dmlkit.reducers import ThresholdReducer
from dmlkit.registry import Registry, Spec
from dmlkit.training import ConfigError, Trainer, load_checkpoint, load_config
from run_helpers import DIGITS_RUN
from user_parts import CentroidLoss, HardestPairMiner, SeenLabels

FAST = [
    *DIGITS_RUN,
    "train.epochs=1",
    "train.max_steps=4",
    "sampler.classes_per_batch=5",
    "sampler.samples_per_class=4",
    "logging.progress=false",
    "logging.log_every=1",
    "validation.before_training=false",
]


def _yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_user_loss_and_miner_named_by_import_path_in_yaml_train(tmp_path: Path) -> None:
    path = _yaml(
        tmp_path,
        "loss:\n  name: user_parts:CentroidLoss\n  options: {scale: 4.0}\n"
        "miner:\n  name: user_parts:HardestPairMiner\n",
    )
    trainer = Trainer(load_config(path, FAST), tmp_path / "run")
    loss = trainer.objective.loss
    # num_classes and embedding_size came from the data and the model, not from the config.
    assert isinstance(loss, CentroidLoss) and loss.scale == 4.0
    assert loss.centres.shape == (5, trainer.config.model.embedding_dim)
    assert isinstance(trainer.objective.miner, HardestPairMiner)
    before = loss.centres.detach().clone()
    result = trainer.fit()
    assert result.steps == 4
    assert not torch.equal(before, loss.centres.detach())  # the loss's parameters are trained
    rows = (tmp_path / "run" / "train.csv").read_text().splitlines()
    assert rows[0].split(",")[:4] == ["step", "epoch", "loss", "mined"]
    assert all(int(row.split(",")[3]) > 0 for row in rows[1:])
    saved = load_checkpoint(tmp_path / "run" / "last.pt")["objective"]
    assert torch.equal(saved["loss.centres"], loss.centres.detach().cpu())


def test_nested_distance_and_reducer_specs_train(tmp_path: Path) -> None:
    path = _yaml(
        tmp_path,
        "loss:\n  name: ContrastiveLoss\n  options:\n    pos_margin: 0.05\n"
        "    distance: {name: LpDistance, options: {power: 2}}\n"
        "    reducer: {name: ThresholdReducer, options: {low: 0.01}}\n",
    )
    trainer = Trainer(load_config(path, FAST), tmp_path / "run")
    loss = trainer.objective.loss
    assert isinstance(loss, ContrastiveLoss) and loss.pos_margin == 0.05
    assert isinstance(loss.distance, LpDistance) and loss.distance.power == 2
    assert loss.reducer == ThresholdReducer(low=0.01)
    assert trainer.fit().steps == 4


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            "{name: ContrastiveLoss, options: {distance: {name: LpDistance, options: {pwer: 2}}}}",
            r"loss\.options\.distance\.options\.pwer: LpDistance has no option 'pwer'; "
            r"did you mean 'power'\?",
        ),
        (
            "{name: ContrastiveLoss, options: {reducer: {name: ThresholdReducer, "
            "options: {low: fast}}}}",
            r"loss\.options\.reducer\.options\.low: expected a number, got 'fast'",
        ),
        (
            "{name: ContrastiveLoss, options: {distance: {name: CosineSimilarty}}}",
            r"loss\.options\.distance\.name: unknown distance 'CosineSimilarty'; "
            r"did you mean 'CosineSimilarity'\?",
        ),
        (
            "{name: ContrastiveLoss, options: {distance: {name: LpDistance, option: {}}}}",
            r"loss\.options\.distance: a part is given as \{name, options\}, not 'option'",
        ),
        (
            "{name: user_parts:CentroidLoss, options: {scael: 2}}",
            r"loss\.options\.scael: user_parts:CentroidLoss has no option 'scael'; "
            r"did you mean 'scale'\?",
        ),
        (
            "{name: user_parts:CentroidLoss, options: {scale: [1]}}",
            r"loss\.options\.scale: expected a number",
        ),
        ("{name: user_parts:NoSuchLoss}", r"loss\.name: 'user_parts' has no attribute"),
        ("{name: no_such_module:Loss}", r"loss\.name: cannot import 'no_such_module'"),
    ],
)
def test_wrong_nested_or_user_options_are_refused_naming_the_key(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, [f"loss={spec}"])


def test_run_values_can_be_given_and_required_options_are_named() -> None:
    built = LOSSES.build(
        Spec("user_parts:CentroidLoss", {"num_classes": 3}), "loss", num_classes=7, embedding_size=2
    )
    assert built.centres.shape == (3, 2)  # an option given in the config wins
    with pytest.raises(ConfigError, match=r"loss\.options: .*needs 'num_classes', 'embedding"):
        LOSSES.build(Spec("user_parts:CentroidLoss"), "loss")


def test_registry_names_and_registration_rules() -> None:
    assert "ContrastiveLoss" in LOSSES.names() and "ATASMSMiner" in MINERS.names()
    registry = Registry("widget")

    @registry.register("pair")
    def pair(first: int, second: float = 0.5) -> tuple[int, float]:
        return first, second

    with pytest.raises(ValueError, match="already registered"):
        registry.add(list, "pair")
    with pytest.raises(ValueError, match="must not contain ':'"):
        registry.add(list, "a:b")
    assert registry.build({"name": "pair", "options": {"first": 1, "second": 2}}) == (1, 2.0)
    with pytest.raises(ConfigError, match=r"widget\.options\.first: expected an integer"):
        registry.build({"name": "pair", "options": {"first": "x"}})
    registry.check({"name": "pair"}, "widget", "first")  # the run will give `first`
    with pytest.raises(ConfigError, match=r"widget\.options: pair needs 'first'"):
        registry.check({"name": "pair"}, "widget")


def test_objective_from_python_sees_contiguous_labels(tmp_path: Path) -> None:
    config = load_config(None, [*FAST, "data.name=user_parts:shifted_digits", "miner.name=null"])
    objective = SeenLabels(ContrastiveLoss(), num_classes=5)
    trainer = Trainer(config, tmp_path, objective=objective)
    assert trainer.objective is objective
    trainer.fit()
    # digits 0-4 shifted to 100-104: the objective sees class indices 0..4, evaluation the labels.
    assert objective.seen == {0, 1, 2, 3, 4}
    assert load_checkpoint(tmp_path / "last.pt")["classes"] == [100, 101, 102, 103, 104]
    summary = json.loads((tmp_path / "results.json").read_text())
    assert summary["training_classes"] == [100, 101, 102, 103, 104]
    assert summary["objective"] == "user_parts:SeenLabels"
    header = (tmp_path / "train.csv").read_text().splitlines()[0].split(",")
    assert "custom" in header


def test_objective_and_backbone_by_import_path_in_a_config(tmp_path: Path) -> None:
    config = load_config(
        None,
        [
            *FAST,
            "objective.name=user_parts:SeenLabels",
            "model.backbone=user_parts:TinyNet",
            "model.backbone_options={channels: 6}",
        ],
    )
    trainer = Trainer(config, tmp_path)
    assert isinstance(trainer.objective, SeenLabels) and trainer.objective.num_classes == 5
    assert trainer.model.backbone.num_features == 6
    assert trainer.fit().steps == 4
    not_an_objective = "objective.name=dmlkit.losses:ContrastiveLoss"
    with pytest.raises(ConfigError, match=r"'dmlkit\.losses:ContrastiveLoss' is not a dmlkit"):
        Trainer(load_config(None, [*FAST, not_an_objective]))


def test_constructing_and_training_leave_the_global_generators_alone(tmp_path: Path) -> None:
    torch.manual_seed(123)
    state = torch.get_rng_state()
    trainer = Trainer(load_config(None, FAST), tmp_path)
    trainer.fit()
    assert torch.equal(torch.get_rng_state(), state)
    # The run's own stream still makes it reproducible.
    again = Trainer(load_config(None, FAST), tmp_path / "again")
    again.fit()
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, again.model.state_dict()[name]), name


def test_dataset_settings_a_loader_does_not_take_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"data\.root: dataset 'digits' takes no root"):
        Trainer(load_config(None, [*FAST, "data.root=/somewhere"]))


def test_a_loader_without_transform_may_give_any_labelled_dataset(tmp_path: Path) -> None:
    config = load_config(
        None, [*FAST, "data.name=user_parts:digit_vectors", "model.backbone=user_parts:Flat"]
    )
    trainer = Trainer(config, tmp_path)
    assert trainer.data.in_channels == 64  # from the first item
    assert trainer.fit().steps == 4


def test_a_stateful_objective_resumes_exactly(tmp_path: Path) -> None:
    """The loss's own parameters (CentroidLoss's centres) and their optimiser state survive a
    kill and resume: the run ends where an uninterrupted one does."""
    from run_helpers import StopTrainingError, stop_at

    overrides = [
        *FAST,
        "train.max_steps=6",
        "train.checkpoint_every=1",
        "loss.name=user_parts:CentroidLoss",
        "miner.name=null",
    ]
    whole = Trainer(load_config(None, overrides), tmp_path / "whole")
    whole.fit()
    with pytest.raises(StopTrainingError):
        Trainer(load_config(None, overrides), tmp_path / "cut", callbacks=[stop_at(3)]).fit()
    resumed = Trainer(load_config(None, overrides), tmp_path / "cut")
    resumed.fit(resume=True)
    for name, value in whole.objective.state_dict().items():
        assert torch.equal(value, resumed.objective.state_dict()[name]), name
    for name, value in whole.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_runs_leave_every_global_generator_alone_and_amp_is_checked(tmp_path: Path) -> None:
    states = torch.cuda.get_rng_state_all()
    cpu = torch.get_rng_state()
    cuda = ["train.device=cuda", "train.amp=true"]
    result = Trainer(load_config(None, [*FAST, *cuda]), tmp_path / "amp").fit()
    assert result.steps == 4
    assert all(
        torch.equal(a, b) for a, b in zip(states, torch.cuda.get_rng_state_all(), strict=True)
    )
    assert torch.equal(cpu, torch.get_rng_state())
    ddtas = [
        "objective.name=DDTASObjective",
        "loss.name=SoftContrastiveLoss",
        "miner.name=ATASMSMiner",
    ]
    with pytest.raises(ConfigError, match=r"train\.amp is not supported by DDTASObjective"):
        Trainer(load_config(None, [*FAST, *cuda, *ddtas]))


def test_one_unresolvable_annotation_leaves_the_other_options_checked() -> None:
    built = LOSSES.build(
        {
            "name": "user_parts:PartlyAnnotated",
            "options": {"hint": [1, 2], "scale": 2, "distance": {"name": "LpDistance"}},
        }
    )
    assert built.hint == [1, 2]  # unchecked: its annotation cannot be resolved
    assert built.scale == 2.0 and isinstance(built.distance, LpDistance)
    with pytest.raises(ConfigError, match=r"loss\.options\.scale: expected a number"):
        LOSSES.build({"name": "user_parts:PartlyAnnotated", "options": {"scale": "abc"}})
