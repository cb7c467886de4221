"""Optimisers and learning-rate schedules by name (:data:`OPTIMIZERS`,
:data:`SCHEDULES`), and the parameter groups a run trains.

A schedule is a function ``(options…, base_lr, total_steps) → (step → multiplier)``; the run
wraps it in a linear warm-up and steps it once per training step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..registry import Registry, Spec
from ..typed_values import ConfigError
from .config import OptimizerConfig, SchedulerConfig

LRFactor = Callable[[int], float]

OPTIMIZERS = Registry("optimizer", torch.optim.Optimizer)
SCHEDULES = Registry("schedule")
# What the run gives an optimiser and a schedule, by parameter name.
OPTIMIZER_RUN_VALUES = ("params", "lr", "weight_decay")
SCHEDULE_RUN_VALUES = ("base_lr", "total_steps", "warmup_steps")

OPTIMIZERS.add(torch.optim.Adam, "adam")
OPTIMIZERS.add(torch.optim.AdamW, "adamw")
OPTIMIZERS.add(torch.optim.RMSprop, "rmsprop")
OPTIMIZERS.add(torch.optim.SGD, "sgd")


@SCHEDULES.register("constant")
def constant() -> LRFactor:
    """The base learning rate throughout."""
    return lambda step: 1.0


@SCHEDULES.register("step")
def step_decay(step_size: int = 1000, gamma: float = 0.1) -> LRFactor:
    """Multiply by ``gamma`` every ``step_size`` steps."""
    if step_size <= 0:
        raise ValueError(f"step_size must be positive, got {step_size}")
    return lambda step: float(gamma ** (step // step_size))


@SCHEDULES.register("multistep")
def multistep(
    milestones: tuple[int, ...] = (), gamma: float = 0.1, warmup_steps: int = 0
) -> LRFactor:
    """Multiply by ``gamma`` at each milestone, an absolute step of the run (warm-up included)."""
    return lambda step: float(gamma ** sum(step + warmup_steps >= m for m in milestones))


@SCHEDULES.register("exponential")
def exponential(gamma: float = 0.99) -> LRFactor:
    """Multiply by ``gamma`` every step."""
    return lambda step: float(gamma**step)


@SCHEDULES.register("cosine")
def cosine(base_lr: float, total_steps: int, min_lr: float = 0.0) -> LRFactor:
    """Cosine decay from the base rate to ``min_lr`` over the run (after the warm-up)."""
    floor = min_lr / base_lr

    def factor(step: int) -> float:
        t = min(step / max(total_steps, 1), 1.0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))

    return factor


def lr_factor(config: SchedulerConfig, base_lr: float, total_steps: int) -> LRFactor:
    """The learning-rate multiplier at each step: linear warm-up, then the named schedule, which
    counts its steps from the end of the warm-up (``multistep`` alone takes absolute steps).

    Args:
        config: The schedule and its options.
        base_lr: The optimiser's base learning rate (given to schedules that take ``base_lr``).
        total_steps: Steps of the whole run; the schedule sees those after the warm-up.

    Returns:
        A function from the step index (0-based) to the multiplier.

    Raises:
        ConfigError: Unknown schedule or option, or a bad value.
    """
    warmup = config.warmup_steps
    schedule: LRFactor = SCHEDULES.build(
        Spec(config.name, config.options),
        "scheduler",
        base_lr=base_lr,
        total_steps=max(total_steps - warmup, 1),
        warmup_steps=warmup,
    )

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return schedule(step - warmup)

    return factor


def parameter_groups(
    config: OptimizerConfig, groups: Iterable[tuple[str, Iterable[nn.Parameter]]]
) -> list[dict[str, Any]]:
    """Optimiser parameter groups with each group's learning rate.

    Args:
        config: Gives ``lr`` and the per-group ``backbone_lr``, ``head_lr``, ``loss_lr``.
        groups: (``"backbone"`` | ``"head"`` | ``"loss"``, parameters) pairs.

    Returns:
        Groups with a ``name`` and ``lr``; parameters that do not require grad, groups whose
        learning rate is 0 and empty groups are left out (freezing them is the caller's
        decision: see :class:`~dmlkit.training.Trainer`).

    Raises:
        ConfigError: Nothing is left to train.
    """
    rates = {"backbone": config.backbone_lr, "head": config.head_lr, "loss": config.loss_lr}
    result = []
    for name, parameters in groups:
        params = [p for p in parameters if p.requires_grad]
        lr = config.lr if rates[name] is None else rates[name]
        if lr and params:
            group = {"name": name, "params": params, "lr": lr}
            if name == "loss" and config.loss_weight_decay is not None:
                group["weight_decay"] = config.loss_weight_decay
            result.append(group)
    if not result:
        raise ConfigError("the optimiser has no parameter to train (every learning rate is 0?)")
    return result


def build_optimizer(config: OptimizerConfig, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """The named optimiser over the given parameter groups.

    Raises:
        ConfigError: Unknown optimiser or option, or a bad value.
    """
    if config.lr <= 0:
        raise ConfigError(f"optimizer.lr must be positive, got {config.lr}")
    if config.weight_decay and "weight_decay" not in OPTIMIZERS.parameters(config.name):
        raise ConfigError(
            f"optimizer.weight_decay: {config.name} takes no weight_decay; set it to 0"
        )
    optimizer = OPTIMIZERS.build(
        Spec(config.name, config.options),
        "optimizer",
        params=groups,
        lr=config.lr,
        weight_decay=config.weight_decay,
    )
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(f"optimizer.name: {config.name!r} is not a torch.optim.Optimizer")
    return optimizer
