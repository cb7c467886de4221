"""The OTG variants of issue 20 (docs/ddtas_ablation.md), each checked in its mathematics on
tiny float64 models: the first-order meta gradient against the closed form and the literal
double backward, per-pair loss weights, the online threshold, the memory meta loss, the
virtual-step scope, and held-out meta batches through the trainer."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dmlkit.ddtas import DDTAS, OTGSettings
from dmlkit.ddtas.method import ClassMemory, OnlineThreshold
from dmlkit.ddtas.otg import (
    closed_form_scores,
    double_backward_gradient,
    first_order_gradient,
    meta_gradient,
    similarities_with_tangent,
    trainable_parameters,
)
from dmlkit.functional.masks import PairIndices, label_masks
from dmlkit.functional.thresholds import pair_loss, pair_loss_slopes
from dmlkit.models import EmbeddingModel, build_model
from dmlkit.training import ConfigError, Trainer, load_checkpoint, load_config
from otg_fixtures import DDTAS_RUN, F64, mined_pairs, tiny_batches, tiny_mlp
from run_helpers import StopTrainingError, stop_at


def _gradients(
    reading: str, start: Tensor, eta: float, model: nn.Module | None = None
) -> tuple[Tensor, Tensor]:
    """(first-order, double-backward) meta gradients of one reading's variables."""
    model = tiny_mlp() if model is None else model
    x, y, xm, ym = tiny_batches()
    method = DDTAS(otg=OTGSettings(method="double_backward", reading=reading, virtual_lr=eta))
    pairs = mined_pairs(model, x, y)
    meta_loss = method.meta_loss(ym)
    training_loss = method.training_loss(pairs, len(x))
    v, _ = meta_gradient(model, xm, meta_loss)
    _, sim, tangent = similarities_with_tangent(model, x, v)
    first = first_order_gradient(training_loss, pairs.take(sim), start, pairs.take(tangent), eta)
    exact, _ = double_backward_gradient(model, x, pairs, start, training_loss, xm, meta_loss, eta)
    return first, exact


# --------------------------------------------------------------------------- first order


def test_first_order_gradient_is_the_closed_form_at_lambda_zero() -> None:
    """At the multiplier reading's λ = 0 the virtual step is a no-op: both forms are exact."""
    model = tiny_mlp()
    x, y, xm, ym = tiny_batches()
    method = DDTAS(otg=OTGSettings())
    pairs = mined_pairs(model, x, y)
    v, _ = meta_gradient(model, xm, method.meta_loss(ym))
    _, sim, tangent = similarities_with_tangent(model, x, v)
    slopes = pair_loss_slopes(pairs.anchors, pairs.is_pos, len(x), dtype=F64)
    closed = closed_form_scores(slopes, tangent, pairs, 1e-3)
    zeros = torch.zeros(len(pairs), dtype=F64)
    first = first_order_gradient(
        method.training_loss(pairs, len(x)), pairs.take(sim), zeros, pairs.take(tangent), 1e-3
    )
    torch.testing.assert_close(-first, closed, rtol=1e-12, atol=1e-18)


@pytest.mark.parametrize(
    "reading, start",
    [
        ("loss_weights", None),
        ("online_threshold", torch.tensor([0.7], dtype=F64)),
        ("online_threshold", torch.tensor([0.6, 0.8], dtype=F64)),
        ("additive", None),
    ],
)
def test_first_order_gradient_approaches_the_double_backward_as_eta_shrinks(
    reading: str, start: Tensor | None
) -> None:
    """Away from a no-op virtual step the first-order form is an approximation: its relative
    error against the literal double backward falls in proportion to η."""
    model = tiny_mlp()
    x, y, _, _ = tiny_batches()
    k = len(mined_pairs(model, x, y))
    if start is None:
        start = torch.full((k,), 1.0 if reading == "loss_weights" else 0.7, dtype=F64)
    errors = []
    for eta in (1e-2, 1e-3, 1e-4):
        first, exact = _gradients(reading, start, eta, model)
        assert exact.abs().max() > 0
        errors.append(float((first - exact).norm() / exact.norm()))
    assert errors[2] < 5e-3, errors
    # About ten times smaller for each η ten times smaller: the error is first order in η.
    assert errors[1] < errors[0] / 5 and errors[2] < errors[1] / 5, errors


# --------------------------------------------------------------------------- loss weights


def test_term_weights_of_one_leave_the_loss_and_zero_removes_a_term() -> None:
    g = torch.Generator().manual_seed(0)
    values = torch.rand(10, generator=g, dtype=F64)
    anchors = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
    is_pos = torch.tensor([1, 0, 0, 1, 1, 0, 1, 0, 0, 0], dtype=torch.bool)
    for form in ("soft_contrastive", "multi_similarity"):
        plain = pair_loss(values, anchors, is_pos, 3, form)
        ones = pair_loss(values, anchors, is_pos, 3, form, term_weights=torch.ones(10, dtype=F64))
        assert torch.equal(plain, ones)
    # Anchor 2's second negative weighted 0: its softplus term leaves the sum (not the count).
    w = torch.ones(10, dtype=F64)
    w[7] = 0
    got = pair_loss(values, anchors, is_pos, 3, "soft_contrastive", term_weights=w)
    terms = F.softplus(torch.where(is_pos, -2.0, 40.0) * (values - 0.7)) * w
    by_side = torch.zeros(3, 2, dtype=F64).index_put_(
        (anchors, (~is_pos).long()), terms, accumulate=True
    )
    counts = torch.zeros(3, 2, dtype=F64).index_put_(
        (anchors, (~is_pos).long()), torch.ones(10, dtype=F64), accumulate=True
    )
    expected = ((by_side / counts) * torch.tensor([1.0, 0.05], dtype=F64)).sum() / 3
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)


def test_loss_weights_reading_moves_each_weight_from_one() -> None:
    """w = relu(1 − step·g/mean|g|) with g the meta gradient; the loss weights the terms."""
    model = tiny_mlp()
    x, y, xm, ym = tiny_batches()
    settings = OTGSettings(method="double_backward", reading="loss_weights", weight_step=0.5)
    method = DDTAS(otg=settings)
    out = method(model, x, y, (xm, ym))
    pairs = mined_pairs(model, x, y)
    start = torch.ones(len(pairs), dtype=F64)
    grad, _ = double_backward_gradient(
        model, x, pairs, start, method.training_loss(pairs, 12), xm, method.meta_loss(ym), 1e-5
    )
    weights = (1 - 0.5 * grad / grad.abs().mean()).clamp(0, 2)
    assert bool((weights < 1).any()) and bool((weights > 1).any())
    assert float(weights.min()) >= 0 and float(weights.max()) <= 2
    sim = F.normalize(model(x), dim=1) @ F.normalize(model(x), dim=1).T
    expected = pair_loss(pairs.take(sim), pairs.anchors, pairs.is_pos, 12, term_weights=weights)
    torch.testing.assert_close(out.loss, expected, rtol=1e-10, atol=0)
    assert not out.skipped
    assert out.stats.otg_pos_mean == pytest.approx(float(weights[pairs.is_pos].mean()))


@pytest.mark.parametrize("reading", ["loss_weights", "online_threshold", "additive"])
def test_closed_form_readings_use_the_first_order_gradient(reading: str) -> None:
    """Through DDTAS.__call__ with method="closed_form": the loss built from
    first_order_gradient's values, computed here step by step."""
    model = tiny_mlp()
    x, y, xm, ym = tiny_batches()
    method = DDTAS(otg=OTGSettings(reading=reading, virtual_lr=1e-3))  # type: ignore[arg-type]
    start_state = (
        None if method.online_threshold is None else method.online_threshold.values.clone()
    )
    out = method(model, x, y, (xm, ym))
    pairs = mined_pairs(model, x, y)
    reference = DDTAS(otg=OTGSettings(reading=reading, virtual_lr=1e-3))  # type: ignore[arg-type]
    v, meta = meta_gradient(model, xm, reference.meta_loss(ym))
    _, sim, tangent = similarities_with_tangent(model, x, v)
    k = len(pairs)
    start = {
        "loss_weights": torch.ones(k, dtype=F64),
        "additive": torch.full((k,), 0.7, dtype=F64),
        "online_threshold": start_state,
    }[reading]
    assert start is not None
    g = first_order_gradient(
        reference.training_loss(pairs, 12), pairs.take(sim), start, pairs.take(tangent), 1e-3
    )
    values = pairs.take(sim)
    if reading == "loss_weights":
        w = (1 - g / g.abs().mean()).clamp(0, 2)
        expected = pair_loss(values, pairs.anchors, pairs.is_pos, 12, term_weights=w)
    elif reading == "additive":
        expected = pair_loss(values, pairs.anchors, pairs.is_pos, 12, thresholds=start - g)
    else:
        moved = (start - 0.01 * math.sqrt(10) * g.sign()).clamp(0, 1)
        expected = pair_loss(values, pairs.anchors, pairs.is_pos, 12, thresholds=float(moved[0]))
    torch.testing.assert_close(out.loss, expected, rtol=1e-10, atol=0)
    assert out.stats.meta_loss == pytest.approx(float(meta), rel=1e-12)


def test_multi_similarity_form_with_zero_weights_has_finite_gradients() -> None:
    """A side whose every term is weighted 0 contributes 0, with a finite gradient."""
    values = torch.tensor([0.9, 0.2, 0.3, 0.8, 0.1], dtype=F64, requires_grad=True)
    anchors = torch.tensor([0, 0, 0, 1, 1])
    is_pos = torch.tensor([True, False, False, True, False])
    w = torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0], dtype=F64)
    loss = pair_loss(values, anchors, is_pos, 2, "multi_similarity", term_weights=w)
    loss.backward()
    assert values.grad is not None and bool(torch.isfinite(values.grad).all())
    assert float(values.grad[0]) == 0.0
    # Anchor 0's positive side is log(1 + 0) = 0: only its negatives count.
    neg = torch.logsumexp(40.0 * (values[1:3].detach() - 0.7), 0)
    anchor1 = 2 / 2.0 * F.softplus(-2.0 * (values[3].detach() - 0.7)) + 2 / 40.0 * F.softplus(
        40.0 * (values[4].detach() - 0.7)
    )
    expected = (2 / 40.0 * F.softplus(neg) + anchor1) / 2
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-12, atol=0)


# --------------------------------------------------------------------------- online threshold


def test_online_threshold_step_by_hand() -> None:
    state = OnlineThreshold(0.7, per_side=True, lr=0.1, bounds=(0.5, 0.9))
    state.step(torch.tensor([2.0, -1.0]))
    # E[g²] = 0.1·g², so g/√E[g²] = sign(g)·√10.
    expected = torch.tensor([0.7 - 0.1 * math.sqrt(10), 0.7 + 0.1 * math.sqrt(10)])
    expected = expected.clamp(0.5, 0.9).double()
    torch.testing.assert_close(state.values, expected)
    assert state.values.tolist() == pytest.approx([0.5, 0.9])  # both at their bounds
    is_pos = torch.tensor([True, False, True])
    assert state.per_pair(is_pos).tolist() == pytest.approx([0.5, 0.9, 0.5])
    single = OnlineThreshold(0.7, per_side=False, lr=0.01, bounds=(0.0, 1.0))
    single.step(torch.tensor([3.0]))
    single.step(torch.tensor([3.0]))
    # Second step: E[g²] = 0.19·9, g/√E = 3/√1.71.
    assert float(single.values) == pytest.approx(
        0.7 - 0.01 * math.sqrt(10) - 0.01 * 3 / math.sqrt(1.71)
    )


@pytest.mark.parametrize("per_side", [False, True])
def test_online_threshold_descends_the_meta_gradient_and_persists(per_side: bool) -> None:
    model = tiny_mlp()
    x, y, xm, ym = tiny_batches()
    settings = OTGSettings(
        method="double_backward", reading="online_threshold", per_side=per_side, virtual_lr=1e-4
    )
    method = DDTAS(otg=settings)
    assert method.online_threshold is not None
    before = method.online_threshold.values.clone()
    pairs = mined_pairs(model, x, y)
    grad, _ = double_backward_gradient(
        model, x, pairs, before.clone(), method.training_loss(pairs, 12), xm,
        method.meta_loss(ym), 1e-4,
    )  # fmt: skip
    out = method(model, x, y, (xm, ym))
    after = method.online_threshold.values.clone()
    # One RMSprop step from zero state moves each threshold by lr·√10 against its gradient.
    torch.testing.assert_close(after, before - 0.01 * math.sqrt(10) * grad.sign())
    expected = pair_loss(
        pairs.take(F.normalize(model(x), dim=1) @ F.normalize(model(x), dim=1).T),
        pairs.anchors, pairs.is_pos, 12, thresholds=torch.where(pairs.is_pos, after[0], after[-1]),
    )  # fmt: skip
    torch.testing.assert_close(out.loss, expected, rtol=1e-10, atol=0)
    assert out.stats.online_threshold_pos == pytest.approx(float(after[0]))
    assert out.stats.online_threshold_neg == pytest.approx(float(after[-1]))
    method(model, x, y, (xm, ym))
    assert not torch.equal(method.online_threshold.values, after)  # kept and moved again


# --------------------------------------------------------------------------- memory


def test_class_memory_is_a_ring_per_class() -> None:
    memory = ClassMemory(num_classes=3, size=2, dim=2)
    e = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0], [0.0, -1.0]])
    memory.push(e, torch.tensor([0, 0, 0, 2]))
    stored, labels = memory.entries()
    # Class 0 kept its last two (the third replaced the first); unit length.
    assert labels.tolist() == [0, 0, 2]
    torch.testing.assert_close(stored, torch.tensor([[0.6, 0.8], [0.0, 1.0], [0.0, -1.0]]))
    assert memory.filled.tolist() == [2, 0, 1]
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        memory.push(e[:1], torch.tensor([3]))
    with pytest.raises(ValueError, match=r"\(B, 2\)"):
        memory.push(torch.zeros(1, 3), torch.tensor([0]))


def test_memory_meta_loss_compares_the_meta_batch_with_earlier_batches() -> None:
    model = tiny_mlp()
    x, y, xm, ym = tiny_batches()
    settings = OTGSettings(method="double_backward", memory_size=4)
    method = DDTAS(otg=settings, num_classes=4, embedding_dim=4)
    assert method.memory is not None
    meta_loss = method.meta_loss(ym)
    emb_meta = model(xm)
    # Empty memory: the released meta loss over the meta batch's own pairs.
    sim = F.normalize(emb_meta, dim=1) @ F.normalize(emb_meta, dim=1).T
    own = PairIndices.from_masks(*label_masks(ym))
    torch.testing.assert_close(
        meta_loss(emb_meta),
        pair_loss(own.take(sim), own.anchors, own.is_pos, 6),
        rtol=1e-12,
        atol=0,
    )
    first = method(model, x, y, (xm, ym))  # the batch goes into the memory after the step
    assert method.memory.filled.tolist() == [3, 3, 3, 3]
    # The first step's meta loss saw an empty memory, not its own training batch.
    with torch.no_grad():
        empty = DDTAS(otg=OTGSettings(), num_classes=4, embedding_dim=4).meta_loss(ym)(emb_meta)
    assert first.stats.meta_loss == pytest.approx(float(empty), rel=1e-12)
    stored, stored_labels = method.memory.entries()
    unit = F.normalize(emb_meta, dim=1)
    references = torch.cat([unit, stored])
    all_labels = torch.cat([ym, stored_labels])
    anchors, others, positive = [], [], []
    for i in range(6):
        for j in range(len(references)):
            if j != i:
                anchors.append(i)
                others.append(j)
                positive.append(bool(ym[i] == all_labels[j]))
    order = sorted(range(len(anchors)), key=lambda k: not positive[k])  # positives first
    values = torch.stack([unit[anchors[k]] @ references[others[k]] for k in order])
    expected = pair_loss(
        values,
        torch.tensor([anchors[k] for k in order]),
        torch.tensor([positive[k] for k in order]),
        6,
    )
    torch.testing.assert_close(meta_loss(emb_meta), expected, rtol=1e-12, atol=0)
    assert method(model, x, y, (xm, ym)).stats.memory_items == 16  # 4 classes × 4


def test_class_memory_push_equals_one_item_at_a_time() -> None:
    g = torch.Generator().manual_seed(0)
    batched, single = ClassMemory(5, 3, 4), ClassMemory(5, 3, 4)
    for _ in range(4):
        e = torch.randn(11, 4, generator=g)
        y = torch.randint(0, 5, (11,), generator=g)
        batched.push(e, y)
        for i in range(11):
            single.push(e[i : i + 1], y[i : i + 1])
    for name in ("bank", "filled", "position"):
        assert torch.equal(getattr(batched, name), getattr(single, name)), name


def test_memory_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="num_classes and embedding_dim"):
        DDTAS(otg=OTGSettings(memory_size=4))
    with pytest.raises(ValueError, match="memory_size"):
        OTGSettings(memory_size=-1)
    with pytest.raises(ValueError, match="meta_mining with a memory"):
        OTGSettings(memory_size=2, meta_mining=True)
    with pytest.raises(ValueError, match="per_side applies to reading='online_threshold'"):
        OTGSettings(per_side=True)
    with pytest.raises(ValueError, match="weight_step applies"):
        OTGSettings(reading="online_threshold", weight_step=2.0)
    with pytest.raises(ValueError, match="normalization applies"):
        OTGSettings(reading="loss_weights", normalization="separate")
    with pytest.raises(ValueError, match="low < high"):
        OTGSettings(reading="online_threshold", threshold_bounds=(0.9, 0.1))
    with pytest.raises(ValueError, match="outside threshold_bounds"):
        DDTAS(otg=OTGSettings(reading="online_threshold", threshold_bounds=(0.0, 0.5)))


# --------------------------------------------------------------------------- scope


def test_scopes_select_the_head_and_the_last_block() -> None:
    model = EmbeddingModel(build_model("convnet", 32, in_channels=1).backbone, 8)
    names = set(dict(model.named_parameters()))
    head = set(trainable_parameters(model, "head"))
    assert head and head == {n for n in names if n.startswith("head.")}
    last = set(trainable_parameters(model, "head_and_last_block")) - head
    assert last == {n for n in names if n.startswith("backbone.blocks.3.")}
    assert set(trainable_parameters(model, "all")) == names
    # MobileNetV2 with its (unused) classifier: the last block is features.18.
    mobilenet = EmbeddingModel(build_model("mobilenet_v2", 8, num_classes=10).backbone, 8)
    last = set(trainable_parameters(mobilenet, "head_and_last_block"))
    last -= set(trainable_parameters(mobilenet, "head"))
    assert last and all(n.startswith("backbone.features.18.") for n in last)
    # A model without a head (the head alone, on cached features) is all head.
    linear = nn.Linear(2, 2)
    assert set(trainable_parameters(linear, "head")) == {"weight", "bias"}
    with pytest.raises(ValueError, match="scope must be"):
        trainable_parameters(linear, "neck")  # type: ignore[arg-type]


def test_head_scope_equals_the_otg_with_a_frozen_backbone() -> None:
    """Differentiating the head only is the same as the full OTG on a model whose backbone
    takes no gradient."""
    torch.manual_seed(0)
    model = EmbeddingModel(build_model("convnet", 32, in_channels=1).backbone, 8).double().eval()
    x = torch.randn(12, 1, 12, 12, dtype=F64)
    y = torch.arange(12) // 3
    xm = torch.randn(6, 1, 12, 12, dtype=F64)
    ym = torch.arange(6) // 2
    scoped = DDTAS(otg=OTGSettings(scope="head"))(model, x, y, (xm, ym))
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    frozen = DDTAS(otg=OTGSettings())(model, x, y, (xm, ym))
    torch.testing.assert_close(scoped.loss, frozen.loss, rtol=1e-12, atol=0)
    assert scoped.stats.otg_pos_mean == pytest.approx(frozen.stats.otg_pos_mean, rel=1e-10)


# --------------------------------------------------------------------------- through the trainer

FAST = DDTAS_RUN


def test_held_out_meta_batches_come_from_the_validation_classes_only(tmp_path: Path) -> None:
    config = load_config(
        None,
        [
            *FAST,
            "data.val_classes=0.4",
            "sampler.classes_per_batch=3",
            "objective.options={meta_source: held_out, meta_classes: 2}",
        ],
    )
    trainer = Trainer(config, tmp_path)
    assert trainer.data.val is not None
    val_items = {
        tuple(trainer.data.val[i][0].flatten().tolist()) for i in range(len(trainer.data.val))
    }
    train_items = {
        tuple(trainer.data.train[i][0].flatten().tolist()) for i in range(len(trainer.data.train))
    }
    stream = trainer._batch_stream(2, 2, 1, held_out=True).from_step(0)
    for _ in range(3):
        inputs, _labels = next(stream)
        for row in inputs:
            key = tuple(row.flatten().tolist())
            assert key in val_items and key not in train_items
    trainer.fit()
    no_val = load_config(None, [*FAST, "objective.options.meta_source=held_out"])
    with pytest.raises((ConfigError, ValueError), match="val_classes"):
        Trainer(no_val, tmp_path / "no-val")
    both = load_config(
        None,
        [
            *FAST,
            "data.val_classes=0.4",
            "sampler.classes_per_batch=3",
            "objective.options={meta_source: held_out, memory_size: 2, meta_classes: 2}",
        ],
    )
    with pytest.raises((ConfigError, ValueError), match="memory"):
        Trainer(both, tmp_path / "both")


@pytest.mark.parametrize(
    "options",
    [
        ["objective.options={memory_size: 3}"],
        ["objective.options={reading: online_threshold, per_side: true}"],
        ["objective.options={reading: loss_weights}"],
        ["objective.options={scope: head}"],
        [
            "data.val_classes=0.4",
            "sampler.classes_per_batch=3",
            "objective.options={meta_source: held_out, meta_classes: 2}",
        ],
    ],
    ids=["memory", "online_threshold", "loss_weights", "scope", "held_out"],
)
def test_variants_resume_exactly(tmp_path: Path, options: list[str]) -> None:
    """The memory and the online threshold are checkpointed: a resumed run equals a whole one."""
    overrides = [*FAST, *options, "model.backbone=convnet"]
    whole = Trainer(load_config(None, overrides), tmp_path / "whole").fit()
    cut = load_config(None, [*overrides, "train.checkpoint_every=1"])
    run = tmp_path / "cut"
    with pytest.raises(StopTrainingError):
        Trainer(cut, run, callbacks=[stop_at(3)]).fit()
    resumed = Trainer(cut, run).fit(resume=True)
    assert resumed.after == whole.after
    left, right = load_checkpoint(tmp_path / "whole" / "last.pt"), load_checkpoint(run / "last.pt")
    for name, tensor in left["model"].items():
        assert torch.equal(tensor, right["model"][name]), name
    for name, tensor in left["objective"].items():
        assert torch.equal(tensor, right["objective"][name]), name
    stateful = any("memory" in o or "online_threshold" in o for o in options)
    assert bool(left["objective"]) == stateful
