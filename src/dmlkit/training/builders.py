"""Objects of a run built from its config: loss, miner, optimiser and learning-rate schedule."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Any

import torch
from torch import nn

from .. import distances, losses, miners, reducers
from ..ddtas import DDTAS, OTGSettings
from ..losses import BaseMetricLossFunction
from ..miners import BaseMiner
from .config import (
    ConfigError,
    DDTASConfig,
    LossConfig,
    MinerConfig,
    OptimizerConfig,
    SchedulerConfig,
)
from .config import _suggest as suggest


def _classes(module: ModuleType, base: type) -> dict[str, type]:
    return {
        name: value
        for name, value in vars(module).items()
        if inspect.isclass(value) and issubclass(value, base) and not name.startswith("Base")
    }


def _instantiate(
    kind: str, module: ModuleType, base: type, name: str, options: dict[str, Any]
) -> Any:
    known = _classes(module, base)
    if name not in known:
        raise ConfigError(f"{kind}.name: unknown {kind} {name!r}{suggest(name, sorted(known))}")
    cls = known[name]
    parameters = inspect.signature(cls).parameters
    accepted = [p for p in parameters if p not in ("self", "args", "kwargs")]
    resolved = {}
    for key, value in options.items():
        if key not in accepted:
            raise ConfigError(
                f"{kind}.options.{key}: {name} has no option {key!r}{suggest(key, accepted)}"
            )
        resolved[key] = _option(value, str(parameters[key].annotation), f"{kind}.options.{key}")
    try:
        return cls(**resolved)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{kind} {name}: {error}") from error


def _option(value: Any, annotation: str, where: str) -> Any:
    """A loss or miner option from a config: distances and reducers are given by class name,
    and numbers that YAML 1.1 reads as strings (``1e-5``) become floats."""
    if "BaseDistance" in annotation:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: give the distance as a class name, got {value!r}")
        return _instantiate("distance", distances, distances.BaseDistance, value, {})
    if "Reducer" in annotation:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: give the reducer as a class name, got {value!r}")
        return _instantiate("reducer", reducers, reducers.Reducer, value, {})
    if isinstance(value, str) and "float" in annotation and "str" not in annotation:
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    return value


def build_loss(config: LossConfig) -> BaseMetricLossFunction:
    """The loss class of :mod:`dmlkit.losses` named in the config, with its options.

    Raises:
        ConfigError: Unknown loss or option (closest name suggested), or an invalid value.
    """
    loss = _instantiate("loss", losses, BaseMetricLossFunction, config.name, config.options)
    assert isinstance(loss, BaseMetricLossFunction)
    return loss


def build_miner(config: MinerConfig) -> BaseMiner | None:
    """The miner of :mod:`dmlkit.miners` named in the config, or None when no miner is named."""
    if config.name is None:
        if config.options:
            raise ConfigError("miner.options given but miner.name is null")
        return None
    miner = _instantiate("miner", miners, BaseMiner, config.name, config.options)
    assert isinstance(miner, BaseMiner)
    return miner


def build_ddtas(config: DDTASConfig, loss: nn.Module, miner: BaseMiner | None, lr: float) -> DDTAS:
    """The DDTAS method of a ``method: ddtas`` run: its miner, the Soft Contrastive loss's
    scales and threshold, and the OTG settings (the virtual step defaults to ``lr``).

    Raises:
        ConfigError: The loss is not ``SoftContrastiveLoss``, there is no pair miner on
            cosine similarity, or an OTG setting is invalid.
    """
    if not isinstance(loss, losses.SoftContrastiveLoss):
        raise ConfigError(
            f"method ddtas trains the Soft Contrastive loss: set loss.name to "
            f"SoftContrastiveLoss (got {type(loss).__name__})"
        )
    pair_miners = (miners.MultiSimilarityMiner, miners.ASMSMiner)
    if not isinstance(miner, pair_miners):
        raise ConfigError(
            "method ddtas needs miner.name ATASMSMiner, ASMSMiner or MultiSimilarityMiner, got "
            f"{None if miner is None else type(miner).__name__}"
        )
    otg = None
    if config.otg:
        try:
            otg = OTGSettings(
                method=config.otg_method,
                normalization=config.normalization,
                reading=config.reading,
                virtual_lr=lr if config.virtual_lr is None else config.virtual_lr,
                threshold_lr=config.threshold_lr,
                meta_mining=config.meta_mining,
                on_degenerate=config.on_degenerate,
            )
        except ValueError as error:
            raise ConfigError(f"ddtas: {error}") from None
    try:
        return DDTAS(miner, loss.pos_scale, loss.neg_scale, loss.threshold, config.form, otg=otg)
    except ValueError as error:
        raise ConfigError(f"ddtas: {error}") from None


def parameter_groups(
    config: OptimizerConfig, groups: Iterable[tuple[str, Iterable[nn.Parameter]]]
) -> list[dict[str, Any]]:
    """Optimiser parameter groups with each group's learning rate.

    Args:
        config: Gives ``lr`` and the per-group ``backbone_lr``, ``head_lr``, ``loss_lr``.
        groups: (``"backbone"`` | ``"head"`` | ``"loss"``, parameters) pairs.

    Returns:
        Groups with a ``name`` and ``lr``; a group whose learning rate is 0 is left out and its
        parameters frozen (``requires_grad=False``), and empty groups are dropped.
    """
    rates = {"backbone": config.backbone_lr, "head": config.head_lr, "loss": config.loss_lr}
    result = []
    for name, parameters in groups:
        params = [p for p in parameters if p.requires_grad]
        lr = config.lr if rates[name] is None else rates[name]
        if lr == 0:
            for p in params:
                p.requires_grad_(False)
            continue
        if params:
            result.append({"name": name, "params": params, "lr": lr})
    if not result:
        raise ConfigError("the optimiser has no parameter to train (every learning rate is 0?)")
    return result


def build_optimizer(config: OptimizerConfig, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """Adam, AdamW, RMSprop or SGD over the given parameter groups."""
    if config.lr <= 0:
        raise ConfigError(f"optimizer.lr must be positive, got {config.lr}")
    decay = config.weight_decay
    if config.name == "adam":
        return torch.optim.Adam(groups, lr=config.lr, weight_decay=decay)
    if config.name == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, weight_decay=decay)
    if config.name == "rmsprop":
        return torch.optim.RMSprop(
            groups, lr=config.lr, weight_decay=decay, momentum=config.momentum
        )
    return torch.optim.SGD(groups, lr=config.lr, weight_decay=decay, momentum=config.momentum)


def lr_factor(config: SchedulerConfig, base_lr: float, total_steps: int) -> Callable[[int], float]:
    """The learning-rate multiplier at each step: linear warm-up, then the named schedule.

    Args:
        config: The schedule.
        base_lr: The optimiser's base learning rate (for ``cosine``'s ``min_lr``).
        total_steps: Steps of the whole run (for ``cosine``).

    Returns:
        A function from the step index (0-based) to the multiplier.
    """
    warmup = config.warmup_steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = step - warmup
        if config.name == "step":
            return float(config.gamma ** (t // config.step_size))
        if config.name == "multistep":
            return float(config.gamma ** sum(t >= m - warmup for m in config.milestones))
        if config.name == "exponential":
            return float(config.gamma**t)
        if config.name == "cosine":
            span = max(total_steps - warmup, 1)
            floor = config.min_lr / base_lr
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(t / span, 1.0)))
        return 1.0

    if config.name == "step" and config.step_size <= 0:
        raise ConfigError(f"scheduler.step_size must be positive, got {config.step_size}")
    return factor
