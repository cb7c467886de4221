"""Typed configs: YAML loading, ``key=value`` overrides, suggestions for unknown keys, and the
builders of losses, miners, optimisers and schedules."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from dmlkit.losses import ContrastiveLoss, MultiSimilarityLoss
from dmlkit.miners import MultiSimilarityMiner
from dmlkit.training import Config, ConfigError, load_config
from dmlkit.training.builders import build_loss, build_miner
from dmlkit.training.config import LossConfig, MinerConfig, OptimizerConfig, SchedulerConfig
from dmlkit.training.config_loading import config_from_dict
from dmlkit.training.optimization import build_optimizer, lr_factor, parameter_groups
from dmlkit.typed_values import expanded_path

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_and_yaml_round_trip(tmp_path: Path) -> None:
    config = load_config()
    assert config == Config()
    path = tmp_path / "c.yaml"
    path.write_text(config.to_yaml())
    assert load_config(path) == config


def test_yaml_values_override_defaults(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("optimizer:\n  lr: 1e-5\n  name: rmsprop\nsampler: {samples_per_class: 5}\n")
    config = load_config(path)
    # YAML 1.1 reads 1e-5 as a string; the float field accepts it as the number.
    assert config.optimizer.lr == 1e-5
    assert config.optimizer.name == "rmsprop"
    assert config.sampler.samples_per_class == 5
    assert config.sampler.classes_per_batch == Config().sampler.classes_per_batch


def test_overrides_set_nested_fields_and_free_options() -> None:
    config = load_config(
        None,
        [
            "optimizer.lr=1e-5",
            "data.transform.train_scale=[0.5, 1.0]",
            "loss.name=ContrastiveLoss",
            "loss.options.neg_margin=0.5",
            "miner.name=null",
            "validation.patience=3",
        ],
    )
    assert config.optimizer.lr == 1e-5
    assert config.data.transform.train_scale == (0.5, 1.0)
    assert config.loss.options == {"neg_margin": 0.5}
    assert config.miner.name is None
    assert config.validation.patience == 3


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("optimizer.lrr=1", "unknown key 'optimizer.lrr'; did you mean 'lr'?"),
        ("optimzer.lr=1", "unknown key 'optimzer'; did you mean 'optimizer'?"),
        ("data.transform.flp=false", "unknown key 'data.transform.flp'; did you mean 'flip'?"),
    ],
)
def test_unknown_override_key_names_it_and_suggests(override: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected.replace("?", r"\?").replace(".", r"\.")):
        load_config(None, [override])


def test_unknown_yaml_key_names_it_and_suggests(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'train\.epoch'; did you mean 'epochs'\?"):
        load_config(path)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"train": {"epochs": "ten"}}, r"train\.epochs: expected an integer"),
        ({"optimizer": {"name": "adagrad"}}, r"optimizer\.name: unknown optimizer 'adagrad'"),
        ({"optimizer": {"lr": "fast"}}, r"optimizer\.lr: expected a number"),
        ({"logging": {"progress": "yes"}}, r"logging\.progress: expected true or false"),
        ({"data": {"transform": {"train_scale": [0.1]}}}, r"expected 2 values, got 1"),
        ({"model": 3}, r"model: expected a mapping"),
        (
            {"optimizer": {"loss_weight_decay": -0.5}},
            r"optimizer\.loss_weight_decay must be a finite number ≥ 0, got -0\.5",
        ),
    ],
)
def test_bad_values_name_the_field(values: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict(values)


def test_override_syntax_errors() -> None:
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(None, ["optimizer.lr"])
    with pytest.raises(FileNotFoundError, match=r"missing\.yaml"):
        load_config("missing.yaml")


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load_and_build_their_loss_and_miner(path: Path) -> None:
    config = load_config(path)
    loss = build_loss(config.loss)
    assert type(loss).__name__ == config.loss.name
    miner = build_miner(config.miner)
    assert (miner is None) == (config.miner.name is None)
    assert miner is None or type(miner).__name__ == config.miner.name
    for key, value in config.loss.options.items():
        assert getattr(loss, key, value) == pytest.approx(value)


def test_default_config_file_is_the_builtin_default() -> None:
    assert load_config(CONFIGS / "default.yaml") == Config()


def test_loss_and_miner_by_name_with_checked_options() -> None:
    loss = build_loss(LossConfig("ContrastiveLoss", {"neg_margin": 0.5}))
    assert isinstance(loss, ContrastiveLoss) and loss.neg_margin == 0.5
    assert isinstance(build_loss(LossConfig()), MultiSimilarityLoss)
    miner = build_miner(MinerConfig("MultiSimilarityMiner", {"epsilon": 0.2}))
    assert isinstance(miner, MultiSimilarityMiner)
    assert build_miner(MinerConfig(None)) is None
    cosine = build_loss(LossConfig("ContrastiveLoss", {"distance": "CosineSimilarity"}))
    assert type(cosine.distance).__name__ == "CosineSimilarity"
    with pytest.raises(ConfigError, match=r"unknown loss 'ContrastivLoss'; did you mean"):
        build_loss(LossConfig("ContrastivLoss"))
    with pytest.raises(ConfigError, match=r"has no option 'neg_marign'; did you mean 'neg_margin'"):
        build_loss(LossConfig("ContrastiveLoss", {"neg_marign": 0.5}))
    with pytest.raises(ConfigError, match=r"miner\.options given but miner\.name is null"):
        build_miner(MinerConfig(None, {"epsilon": 0.1}))


def test_parameter_groups_and_optimizers() -> None:
    backbone, head = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    config = OptimizerConfig(
        name="rmsprop", lr=1e-3, backbone_lr=0.0, head_lr=1e-2, options={"momentum": 0.9}
    )
    groups = parameter_groups(
        config, [("backbone", backbone.parameters()), ("head", head.parameters())]
    )
    assert [(g["name"], g["lr"]) for g in groups] == [("head", 1e-2)]
    # Leaving a group out is all the builder does: freezing is the caller's decision.
    assert all(p.requires_grad for p in backbone.parameters())
    optimizer = build_optimizer(config, groups)
    assert isinstance(optimizer, torch.optim.RMSprop)
    assert optimizer.param_groups[0]["momentum"] == 0.9
    for name, cls in [
        ("adam", torch.optim.Adam),
        ("adamw", torch.optim.AdamW),
        ("sgd", torch.optim.SGD),
    ]:
        config = OptimizerConfig(name=name)
        groups = parameter_groups(config, [("head", head.parameters())])
        assert isinstance(build_optimizer(config, groups), cls)
    with pytest.raises(ConfigError, match="no parameter to train"):
        parameter_groups(OptimizerConfig(lr=1e-3, head_lr=0.0), [("head", head.parameters())])
    loss_params = torch.nn.Linear(2, 2)
    decayed = OptimizerConfig(weight_decay=1e-4, loss_weight_decay=0.0)
    groups = parameter_groups(
        decayed, [("head", head.parameters()), ("loss", loss_params.parameters())]
    )
    optimizer = build_optimizer(decayed, groups)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [1e-4, 0.0]
    with pytest.raises(ConfigError, match=r"optimizer\.options\.momentum: adam has no option"):
        build_optimizer(OptimizerConfig(options={"momentum": 0.9}), groups)
    own = OptimizerConfig(name="torch.optim:Adagrad", options={"lr_decay": 0.1})
    assert isinstance(build_optimizer(own, groups), torch.optim.Adagrad)
    with pytest.raises(ConfigError, match=r"optimizer\.options\.lr: the run gives adam its 'lr'"):
        build_optimizer(OptimizerConfig(options={"lr": 0.5}), groups)
    with pytest.raises(ConfigError, match=r"optimizer\.weight_decay: .*takes no weight_decay"):
        build_optimizer(OptimizerConfig(name="torch.optim:LBFGS", weight_decay=0.1), groups)


def test_learning_rate_schedules() -> None:
    step = SchedulerConfig(name="step", options={"step_size": 10, "gamma": 0.5}, warmup_steps=4)
    warm = lr_factor(step, 1.0, 100)
    assert [warm(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert warm(4) == 1.0 and warm(14) == 0.5 and warm(24) == 0.25
    milestones = {"milestones": [5, 8], "gamma": 0.1}
    multi = lr_factor(SchedulerConfig(name="multistep", options=milestones), 1.0, 10)
    assert [multi(s) for s in (4, 5, 7, 8)] == pytest.approx([1, 0.1, 0.1, 0.01])
    # Milestones are absolute steps, warm-up included.
    warm_multi = SchedulerConfig(name="multistep", options=milestones, warmup_steps=3)
    assert [lr_factor(warm_multi, 1.0, 10)(s) for s in (2, 4, 5, 8)] == pytest.approx(
        [1, 1, 0.1, 0.01]
    )
    cosine = lr_factor(SchedulerConfig(name="cosine", options={"min_lr": 0.1}), 1.0, 100)
    assert (
        cosine(0) == 1.0 and cosine(50) == pytest.approx(0.55) and cosine(100) == pytest.approx(0.1)
    )
    exponential = SchedulerConfig(name="exponential", options={"gamma": 0.9})
    assert lr_factor(exponential, 1.0, 10)(2) == pytest.approx(0.81)
    assert lr_factor(SchedulerConfig(), 1.0, 10)(7) == 1.0
    assert math.isfinite(cosine(1000))
    with pytest.raises(ConfigError, match=r"scheduler step: step_size must be positive"):
        lr_factor(SchedulerConfig(name="step", options={"step_size": 0}), 1.0, 10)
    with pytest.raises(ConfigError, match=r"scheduler\.options\.gama: .*did you mean 'gamma'"):
        load_config(None, ["scheduler.name=exponential", "scheduler.options.gama=0.5"])


def test_loss_options_take_numbers_written_as_yaml_strings_and_classes_by_name() -> None:
    config = load_config(
        None,
        [
            "loss.name=ContrastiveLoss",
            "loss.options.pos_margin=1e-5",
            "loss.options.reducer=MeanReducer",
        ],
    )
    loss = build_loss(config.loss)
    assert loss.pos_margin == 1e-5
    assert type(loss.reducer).__name__ == "MeanReducer"


def test_null_sections_and_options_read_as_empty(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("optimizer:\nloss:\n  options:\n")
    config = load_config(path, ["optimizer.lr=0.5"])
    assert config.optimizer.lr == 0.5
    assert config.loss.options == {}


def test_config_paths_expand_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DMLKIT_DATA", "/data/here")
    assert expanded_path("$DMLKIT_DATA/weights.pth") == "/data/here/weights.pth"
    assert expanded_path(None) is None
    monkeypatch.delenv("DMLKIT_DATA")
    with pytest.raises(ConfigError, match=r"names the environment variable \$DMLKIT_DATA, which"):
        expanded_path("$DMLKIT_DATA/w.pth")
