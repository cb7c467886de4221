"""Reducers: PML's call ``reducer(loss_dict, embeddings, labels)`` agrees with PML 2.9's reducers
in value and gradient for every reducer and reduction type; dmlkit's own call; PML-style custom
reducers reached from both calls and from dmlkit's losses; constructor defaults; errors; config.

PML is a test-only dependency: the library never imports it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor

import dmlkit.losses as dl
import dmlkit.reducers as dr
from dmlkit.functional.reduction import ElementwiseTerm, reduce_elementwise_terms
from dmlkit.typed_values import ConfigError

pml_reducers = pytest.importorskip("pytorch_metric_learning.reducers")
pml_losses = pytest.importorskip("pytorch_metric_learning.losses")

from conftest import assert_close  # noqa: E402

N = 8
NUM_CLASSES = 3
CLASS_WEIGHTS = [0.5, 2.0, 1.25]


def pml_style_mean_of_squares(module: Any) -> Any:
    """The same PML-style custom reducer, subclassing ``module.BaseReducer`` (PML's or dmlkit's):
    the mean of the squared losses, by overriding the four reduction methods."""

    class MeanOfSquares(module.BaseReducer):  # type: ignore[misc, name-defined]
        def element_reduction(self, losses: Tensor, *_: Any) -> Tensor:
            return losses.square().mean()

        def pos_pair_reduction(self, losses: Tensor, *args: Any) -> Tensor:
            return self.element_reduction(losses, *args)

        def neg_pair_reduction(self, losses: Tensor, *args: Any) -> Tensor:
            return self.element_reduction(losses, *args)

        def triplet_reduction(self, losses: Tensor, *args: Any) -> Tensor:
            return self.element_reduction(losses, *args)

    return MeanOfSquares()


def max_per_row(x: Tensor, num_per_row: Tensor) -> Tensor:
    """A custom ``aggregation_func``: each row's largest loss (tables hold 0 in empty cells)."""
    return x.max(dim=1).values * (num_per_row > 0)


# name -> factory of the reducer from a module holding PML's reducer names (PML's or dmlkit's).
REDUCER_FACTORIES: dict[str, Callable[[Any], Any]] = {
    "mean": lambda m: m.MeanReducer(),
    "sum": lambda m: m.SumReducer(),
    "avg_non_zero": lambda m: m.AvgNonZeroReducer(),
    "threshold_low": lambda m: m.ThresholdReducer(low=0.4),
    "threshold_high": lambda m: m.ThresholdReducer(high=0.6),
    "threshold_both_positional": lambda m: m.ThresholdReducer(0.2, 0.7),
    "threshold_nothing_passes": lambda m: m.ThresholdReducer(low=5.0),
    "divisor": lambda m: m.DivisorReducer(),
    "class_weighted": lambda m: m.ClassWeightedReducer(torch.tensor(CLASS_WEIGHTS)),
    "per_anchor": lambda m: m.PerAnchorReducer(),
    "per_anchor_sum": lambda m: m.PerAnchorReducer(reducer=m.SumReducer()),
    "per_anchor_avg_non_zero": lambda m: m.PerAnchorReducer(m.AvgNonZeroReducer()),
    "per_anchor_class_weighted": lambda m: m.PerAnchorReducer(
        m.ClassWeightedReducer(torch.tensor(CLASS_WEIGHTS))
    ),
    "per_anchor_max": lambda m: m.PerAnchorReducer(aggregation_func=max_per_row),
    "multiple": lambda m: m.MultipleReducers({"loss": m.SumReducer()}),
    "multiple_default": lambda m: m.MultipleReducers(
        {"other": m.SumReducer()}, default_reducer=m.ThresholdReducer(high=0.5)
    ),
    "custom": pml_style_mean_of_squares,
}

# PML's PerAnchorReducer refuses triplets, and so does dmlkit's (tested below).
REDUCTION_TYPES = ["element", "pos_pair", "neg_pair", "triplet", "already_reduced"]


def make_inputs(
    reduction_type: str, num_losses: int = 14, seed: int = 0
) -> tuple[Tensor, Any, Tensor, Tensor]:
    """Losses (some zero), their indices for the reduction type (pairs repeat and anchors miss
    some rows), embeddings and labels, in float64."""
    g = torch.Generator().manual_seed(seed)
    losses = torch.rand(num_losses, generator=g, dtype=torch.float64)
    losses[::4] = 0.0
    embeddings = torch.randn(N, 4, generator=g, dtype=torch.float64)
    labels = torch.randint(0, NUM_CLASSES, (N,), generator=g)
    anchors = torch.randint(0, N - 2, (num_losses,), generator=g)
    others = torch.randint(0, N, (num_losses,), generator=g)
    others[1] = others[0]
    anchors[1] = anchors[0]  # a pair listed twice
    if reduction_type == "already_reduced":
        return losses.sum(), None, embeddings, labels
    if reduction_type == "element":
        return losses, anchors, embeddings, labels
    if reduction_type == "triplet":
        negatives = torch.randint(0, N, (num_losses,), generator=g)
        return losses, (anchors, others, negatives), embeddings, labels
    return losses, (anchors, others), embeddings, labels


def value_and_grads(
    reducer: Any,
    loss_dict: dict[str, dict[str, Any]],
    embeddings: Tensor,
    labels: Tensor,
    inputs: list[Tensor],
) -> tuple[Tensor, list[Tensor]]:
    """PML's call's value and its gradient with respect to each input (zero where unused)."""
    value = reducer(loss_dict, embeddings, labels)
    grads = torch.autograd.grad(value, inputs, allow_unused=True)
    return value.detach(), [
        torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads, strict=True)
    ]


def loss_dict_for(
    losses: Tensor, indices: Any, reduction_type: str, divisor: Any = 5
) -> dict[str, dict[str, Any]]:
    entry = {"losses": losses, "indices": indices, "reduction_type": reduction_type}
    if reduction_type != "already_reduced":
        entry["divisor"] = divisor
    return {"loss": entry}


def compare(
    factory: Callable[[Any], Any],
    make_dict: Callable[[Tensor], dict[str, dict[str, Any]]],
    losses: Tensor,
    embeddings: Tensor,
    labels: Tensor,
) -> None:
    """dmlkit's reducer and PML's, each given a fresh copy of the same inputs, agree in value
    and in the gradients with respect to the losses and the embeddings."""
    results = []
    for module in (dr, pml_reducers):
        x = losses.detach().clone().requires_grad_(True)
        e = embeddings.detach().clone().requires_grad_(True)
        results.append(value_and_grads(factory(module), make_dict(x), e, labels, [x, e]))
    (value, grads), (expected, expected_grads) = results
    assert value.shape == expected.shape
    assert_close(value, expected)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        assert_close(grad, expected_grad)


@pytest.mark.parametrize("reduction_type", REDUCTION_TYPES)
@pytest.mark.parametrize("name", list(REDUCER_FACTORIES))
def test_pml_call_matches_pml(name: str, reduction_type: str) -> None:
    if reduction_type == "triplet" and name.startswith("per_anchor"):
        pytest.skip("PML's PerAnchorReducer refuses triplets (tested below)")
    losses, indices, embeddings, labels = make_inputs(reduction_type)
    compare(
        REDUCER_FACTORIES[name],
        lambda x: loss_dict_for(x, indices, reduction_type),
        losses,
        embeddings,
        labels,
    )


@pytest.mark.parametrize("divisor", [0, 3, torch.tensor(7)])
@pytest.mark.parametrize("reduction_type", ["element", "pos_pair", "triplet"])
def test_divisor_reducer_reads_each_sub_losss_divisor(reduction_type: str, divisor: Any) -> None:
    losses, indices, embeddings, labels = make_inputs(reduction_type)
    compare(
        REDUCER_FACTORIES["divisor"],
        lambda x: loss_dict_for(x, indices, reduction_type, divisor),
        losses,
        embeddings,
        labels,
    )


@pytest.mark.parametrize("reduction_type", REDUCTION_TYPES)
@pytest.mark.parametrize("name", ["mean", "divisor", "per_anchor", "class_weighted", "custom"])
def test_zero_given_as_a_number_is_a_zero_attached_to_the_embeddings(
    name: str, reduction_type: str
) -> None:
    _, indices, embeddings, labels = make_inputs(reduction_type)
    e = embeddings.clone().requires_grad_(True)
    for module in (dr, pml_reducers):
        value = REDUCER_FACTORIES[name](module)(
            {
                "loss": {
                    "losses": 0,
                    "indices": indices,
                    "reduction_type": reduction_type,
                    "divisor": 2,
                }
            },
            e,
            labels,
        )
        assert float(value.detach()) == 0.0
        assert value.requires_grad


def test_several_sub_losses_are_reduced_as_a_pml_loss_reduces_them() -> None:
    """A plain reducer sums the sub-losses it reduces one by one, as a PML loss does by wrapping
    it in MultipleReducers (PML's bare reducer refuses several); MultipleReducers picks each
    one's reducer by name."""
    pos, pos_idx, embeddings, labels = make_inputs("pos_pair", seed=1)
    neg, neg_idx, _, _ = make_inputs("neg_pair", 20, seed=2)
    reg = torch.tensor(0.25, dtype=torch.float64)

    def make_dict(x: Tensor) -> dict[str, dict[str, Any]]:
        return {
            "pos_loss": {"losses": x[:14], "indices": pos_idx, "reduction_type": "pos_pair"},
            "neg_loss": {"losses": x[14:], "indices": neg_idx, "reduction_type": "neg_pair"},
            "zero_loss": {"losses": 0, "indices": None, "reduction_type": "already_reduced"},
            "reg_loss": {"losses": reg, "indices": None, "reduction_type": "already_reduced"},
        }

    losses = torch.cat([pos, neg])
    compare(
        lambda m: m.MultipleReducers(
            {"pos_loss": m.ThresholdReducer(high=0.7), "neg_loss": m.PerAnchorReducer()},
            default_reducer=m.SumReducer(),
        ),
        make_dict,
        losses,
        embeddings,
        labels,
    )
    for name in ("avg_non_zero", "per_anchor", "custom"):
        results = []
        for reducer in (
            REDUCER_FACTORIES[name](dr),
            pml_reducers.MultipleReducers({}, REDUCER_FACTORIES[name](pml_reducers)),
        ):
            x = losses.clone().requires_grad_(True)
            results.append(value_and_grads(reducer, make_dict(x), embeddings, labels, [x]))
        assert_close(results[0][0], results[1][0])
        assert_close(results[0][1][0], results[1][1][0])


def test_do_nothing_reducer_returns_the_loss_dict_or_the_selected_losses() -> None:
    losses, indices, embeddings, labels = make_inputs("pos_pair")
    loss_dict = {"loss": {"losses": losses, "indices": indices, "reduction_type": "pos_pair"}}
    assert dr.DoNothingReducer()(loss_dict, embeddings, labels) is loss_dict
    assert pml_reducers.DoNothingReducer()(loss_dict, embeddings, labels) is loss_dict
    matrix = torch.arange(6.0).reshape(2, 3)
    counts = torch.tensor([[0, 2, 1], [1, 0, 0]])
    assert torch.equal(dr.DoNothingReducer()(matrix, counts), torch.tensor([1.0, 1.0, 2.0, 3.0]))
    assert torch.equal(dr.DoNothingReducer()(matrix), torch.arange(6.0))


# ---- dmlkit's call ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["mean", "sum", "avg_non_zero", "threshold_both_positional", "custom"]
)
def test_dmlkit_call_with_counts_is_pml_call_with_each_element_repeated(name: str) -> None:
    g = torch.Generator().manual_seed(3)
    matrix = torch.rand(5, 6, generator=g, dtype=torch.float64)
    counts = torch.randint(0, 3, (5, 6), generator=g)
    rows, cols = counts.nonzero(as_tuple=True)
    reps = counts[rows, cols]
    x = matrix.clone().requires_grad_(True)
    value = REDUCER_FACTORIES[name](dr)(x, counts)
    (grad,) = torch.autograd.grad(value, x)
    y = matrix.clone().requires_grad_(True)
    repeated = y[rows, cols].repeat_interleave(reps)
    expected = REDUCER_FACTORIES[name](pml_reducers)(
        {
            "loss": {
                "losses": repeated,
                "indices": rows.repeat_interleave(reps),
                "reduction_type": "element",
            }
        },
        torch.zeros(5, 2),
        None,
    )
    (expected_grad,) = torch.autograd.grad(expected, y)
    assert_close(value, expected)
    assert_close(grad, expected_grad)


def test_dmlkit_call_gives_a_zero_attached_to_the_losses_for_an_empty_selection() -> None:
    x = torch.rand(3, 4, requires_grad=True)
    nothing = torch.zeros(3, 4, dtype=torch.bool)
    for name in ("mean", "avg_non_zero", "custom", "per_anchor"):
        value = REDUCER_FACTORIES[name](dr)(x, nothing)
        assert float(value.detach()) == 0.0 and value.requires_grad


def test_dmlkit_call_reaches_a_custom_reducers_element_reduction_with_rows() -> None:
    seen: dict[str, Any] = {}

    class Recorder(dr.BaseReducer):
        def element_reduction(
            self, losses: Tensor, loss_indices: Any, embeddings: Any, labels: Any
        ) -> Tensor:
            seen.update(losses=losses, indices=loss_indices, rest=(embeddings, labels))
            return losses.sum()

    matrix = torch.arange(6.0).reshape(2, 3)
    weights = torch.tensor([[True, False, True], [False, True, False]])
    assert float(Recorder()(matrix, weights)) == 0 + 2 + 4
    assert seen["losses"].tolist() == [0.0, 2.0, 4.0]
    assert seen["indices"].tolist() == [0, 0, 1]
    assert seen["rest"] == (None, None)
    # PML's call reaches the same method; the unimplemented ones raise, as in PML.
    entry = {"losses": torch.ones(3), "indices": torch.arange(3), "reduction_type": "element"}
    assert float(Recorder()({"loss": entry}, torch.zeros(3, 2), None)) == 3.0
    entry = {**entry, "indices": (torch.arange(3), torch.arange(3)), "reduction_type": "pos_pair"}
    with pytest.raises(NotImplementedError, match="pos_pair"):
        Recorder()({"loss": entry}, torch.zeros(3, 2), None)


def test_a_mean_reducer_subclass_overriding_element_reduction_is_reached_everywhere() -> None:
    class Doubled(dr.MeanReducer):
        def element_reduction(self, losses: Tensor, *_: Any, **__: Any) -> Tensor:
            return 2 * losses.mean()

    reducer = Doubled()
    assert not reducer.fusable and dr.MeanReducer().fusable
    x = torch.tensor([1.0, 2.0, 3.0])
    assert float(reducer(x)) == 4.0
    pairs = (torch.arange(3), torch.arange(3))
    entry = {"losses": x, "indices": pairs, "reduction_type": "neg_pair"}
    assert float(reducer({"loss": entry}, torch.zeros(3, 2), None)) == 4.0
    # The fused elementwise kernel hands such a reducer the values themselves.
    square: Callable[[Tensor], tuple[Tensor, Tensor]] = lambda t: (t * t, 2 * t)  # noqa: E731
    y = x.clone().requires_grad_(True)
    value = reduce_elementwise_terms(y, [ElementwiseTerm(square, None, reducer)])
    value.backward()
    assert float(value) == pytest.approx(2 * 14 / 3)
    assert_close(y.grad, 2 * 2 * x / 3)


@pytest.mark.parametrize(
    "loss_name",
    [
        "ContrastiveLoss",
        "MultiSimilarityLoss",
        "NPairsLoss",
        "CircleLoss",
        "GeneralizedLiftedStructureLoss",
        "SignalToNoiseRatioContrastiveLoss",
        "NTXentLoss",
        "SupConLoss",
    ],
)
@pytest.mark.parametrize(
    "name", ["custom", "per_anchor", "per_anchor_avg_non_zero", "class_weighted"]
)
def test_dmlkit_losses_reach_pml_style_reducers_as_pml_losses_do(loss_name: str, name: str) -> None:
    """A dmlkit loss given a custom, per-anchor or class-weighted reducer equals PML's loss
    given PML's.

    Except where PML is wrong: its multi-similarity, circle and generalised lifted structure
    losses hand their reducer (N, 1) losses, which ClassWeightedReducer broadcasts against the
    (N,) class weights into an (N, N) mean; the oracle is the mean of each anchor's loss times
    its class's weight."""
    g = torch.Generator().manual_seed(5)
    embeddings = torch.randn(12, 5, generator=g)
    labels = torch.randint(0, 3, (12,), generator=g)
    column_losses = {"MultiSimilarityLoss", "CircleLoss", "GeneralizedLiftedStructureLoss"}
    results = []
    for losses_module, module in ((dl, dr), (pml_losses, pml_reducers)):
        e = embeddings.clone().requires_grad_(True)
        if module is pml_reducers and name == "class_weighted" and loss_name in column_losses:
            each = getattr(pml_losses, loss_name)(reducer=pml_reducers.DoNothingReducer())(
                e, labels
            )["loss"]["losses"].squeeze(1)
            value = (each * torch.tensor(CLASS_WEIGHTS)[labels]).mean()
        else:
            value = getattr(losses_module, loss_name)(reducer=REDUCER_FACTORIES[name](module))(
                e, labels
            )
        (grad,) = torch.autograd.grad(value, e)
        results.append((value.detach(), grad))
    assert_close(results[0][0], results[1][0], rtol=1e-4)
    assert_close(results[0][1], results[1][1], rtol=1e-4)


def test_per_anchor_dmlkit_call_averages_each_rows_weighted_cells() -> None:
    matrix = torch.tensor([[1.0, 3.0, 5.0], [2.0, 4.0, 6.0], [7.0, 8.0, 9.0]])
    counts = torch.tensor([[1, 2, 0], [0, 0, 1], [0, 0, 0]])
    # Rows: mean(1, 3) = 2 (a cell counts once, as PML's table holds it once), 6, none -> 0.
    assert float(dr.PerAnchorReducer()(matrix, counts)) == pytest.approx((2 + 6 + 0) / 3)
    assert float(dr.PerAnchorReducer(dr.AvgNonZeroReducer())(matrix, counts)) == 4.0
    assert float(dr.PerAnchorReducer()(torch.tensor([1.0, 2.0]))) == 1.5


def test_multiple_reducers_dmlkit_call_uses_the_default_or_refuses_names() -> None:
    x = torch.tensor([1.0, 2.0, 0.0])
    assert float(dr.MultipleReducers({}, dr.AvgNonZeroReducer())(x)) == 1.5
    assert float(dr.MultipleReducers({})(x)) == 1.0
    with pytest.raises(ValueError, match="name no sub-losses"):
        dr.MultipleReducers({"pos_loss": dr.SumReducer()})(x)
    with pytest.raises(ValueError, match="name no sub-losses"):
        dl.ContrastiveLoss(reducer=dr.MultipleReducers({"pos_loss": dr.SumReducer()}))(
            torch.randn(6, 3), torch.tensor([0, 0, 1, 1, 2, 2])
        )


def test_class_weighted_reducer_needs_integer_labels() -> None:
    with pytest.raises(ValueError, match="needs the batch's"):
        dr.ClassWeightedReducer(CLASS_WEIGHTS)(torch.rand(4))
    multi_hot = torch.nn.functional.one_hot(torch.tensor([0, 0, 1, 1, 2, 2]))
    with pytest.raises(ValueError, match="needs the batch's"):
        dl.ContrastiveLoss(reducer=dr.ClassWeightedReducer(CLASS_WEIGHTS))(
            torch.randn(6, 3), multi_hot
        )


def test_do_nothing_reducer_in_a_loss() -> None:
    embeddings = torch.randn(6, 3)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    assert dl.MultiSimilarityLoss(reducer=dr.DoNothingReducer())(embeddings, labels).shape == (6,)
    with pytest.raises(ValueError, match="left them unreduced"):
        dl.ContrastiveLoss(reducer=dr.DoNothingReducer())(embeddings, labels)


# ---- constructors, errors, registry ------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "MeanReducer",
        "SumReducer",
        "DivisorReducer",
        "ThresholdReducer",
        "AvgNonZeroReducer",
        "DoNothingReducer",
        "ClassWeightedReducer",
        "PerAnchorReducer",
        "MultipleReducers",
        "BaseReducer",
    ],
)
def test_constructor_parameters_match_pml(name: str) -> None:
    """PML's named parameters, in PML's positions, with PML's defaults (dmlkit's own ``average``
    is keyword-only; PML's ``**kwargs`` only feed its statistics recording)."""

    def positional(cls: type) -> list[tuple[str, Any]]:
        return [
            (p.name, p.default)
            for p in inspect.signature(cls).parameters.values()
            if p.kind is p.POSITIONAL_OR_KEYWORD
        ]

    ours, theirs = positional(getattr(dr, name)), positional(getattr(pml_reducers, name))
    if name == "AvgNonZeroReducer":
        # PML's fixes low=0 and passes high on through **kwargs; dmlkit names both.
        theirs = [("low", 0.0), ("high", None)]
    assert [n for n, _ in ours] == [n for n, _ in theirs]
    for (n, default), (_, pml_default) in zip(ours, theirs, strict=True):
        if n != "aggregation_func":
            assert default == pml_default, n
    assert dr.PerAnchorReducer().reducer == dr.MeanReducer()
    assert dr.MultipleReducers({}).default_reducer == dr.MeanReducer()
    assert dr.ThresholdReducer(0.1, 0.5) == dr.ThresholdReducer(low=0.1, high=0.5)


def test_pml_default_aggregation_matches() -> None:
    g = torch.Generator().manual_seed(0)
    table = torch.rand(4, 5, generator=g)
    counts = torch.tensor([2, 0, 5, 1])
    table[1] = 0
    expected = pml_reducers.per_anchor_reducer.aggregation_func(table.clone(), counts)
    assert_close(dr.mean_per_row(table, counts), expected)


def entry(**changes: Any) -> dict[str, dict[str, Any]]:
    base = {"losses": torch.rand(3), "indices": torch.arange(3), "reduction_type": "element"}
    return {"loss": {**base, **changes}}


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: dr.ThresholdReducer(), "needs low, high or both"),
        (lambda: dr.ClassWeightedReducer([]), "non-empty 1-D"),
        (lambda: dr.ClassWeightedReducer([[1.0]]), "non-empty 1-D"),
        (lambda: dr.PerAnchorReducer(aggregation_func="mean"), "must be callable"),
        (lambda: dr.MultipleReducers({"a": "MeanReducer"}), r"reducers\['a'\] must be a reducer"),
    ],
)
def test_bad_constructor_arguments(make: Callable[[], Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize(
    ("loss_dict", "message"),
    [
        (entry(reduction_type="pair"), "reduction_type'] must be one of element, pos_pair"),
        ({"loss": {"losses": torch.rand(3)}}, "lacks 'indices', 'reduction_type'"),
        ({"loss": [1, 2]}, r"loss_dict\['loss'\] must be a mapping"),
        (entry(indices=torch.arange(4)), r"one entry per loss \(3\), got \[4\]"),
        (entry(indices=[0, 1, 2]), "'element' indices must be a 1-D tensor"),
        (entry(losses=torch.tensor(1.0)), "must be a vector, got a scalar"),
        (entry(reduction_type="pos_pair"), "'pos_pair' indices must be a tuple of 2 tensors"),
        (
            entry(reduction_type="triplet", indices=(torch.arange(3),) * 2),
            "'triplet' indices must be a tuple of 3 tensors",
        ),
        (
            entry(reduction_type="neg_pair", indices=(torch.arange(3), torch.arange(2))),
            r"one entry per loss \(3\), got \[3, 2\]",
        ),
        (entry(losses=1.5), "must be a tensor or the number 0"),
        (
            entry(losses=torch.rand(2), reduction_type="already_reduced"),
            "must be a scalar or hold one value",
        ),
    ],
)
def test_bad_loss_dicts(loss_dict: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dr.MeanReducer()(loss_dict, torch.zeros(3, 2), None)


def test_reducer_specific_errors() -> None:
    embeddings = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="has none"):
        dr.DivisorReducer()(entry(), embeddings, None)
    with pytest.raises(ValueError, match=r"labels span \[0, 4\]"):
        dr.ClassWeightedReducer(CLASS_WEIGHTS)(entry(), embeddings, torch.tensor([0, 4, 1]))
    triplet = entry(reduction_type="triplet", indices=(torch.arange(3),) * 3)
    with pytest.raises(ValueError, match="not triplet losses"):
        dr.PerAnchorReducer()(triplet, embeddings, None)
    pairs = entry(reduction_type="pos_pair", indices=(torch.tensor([0, 1, 3]), torch.arange(3)))
    with pytest.raises(ValueError, match="anchors must index the 3 embeddings"):
        dr.PerAnchorReducer()(pairs, embeddings, None)
    with pytest.raises(ValueError, match=r"needs an \(N, M\) pair matrix"):
        dr.PerAnchorReducer()(torch.rand(2, 3, 4))
    with pytest.raises(ValueError, match="fractional or negative weights"):
        pml_style_mean_of_squares(dr)(torch.rand(3), torch.tensor([0.5, 1.0, 1.0]))
    with pytest.raises(ValueError, match="weights must be shaped like losses"):
        pml_style_mean_of_squares(dr)(torch.rand(3), torch.tensor([1, 1]))


def test_registry_builds_the_new_reducers_from_specs() -> None:
    reducer = dr.REDUCERS.build(
        {
            "name": "MultipleReducers",
            "options": {
                "reducers": {
                    "pos_loss": {"name": "ThresholdReducer", "options": {"high": 0.3}},
                    "neg_loss": "SumReducer",
                },
                "default_reducer": {
                    "name": "PerAnchorReducer",
                    "options": {"reducer": "SumReducer"},
                },
            },
        }
    )
    assert reducer == dr.MultipleReducers(
        {"pos_loss": dr.ThresholdReducer(high=0.3), "neg_loss": dr.SumReducer()},
        dr.PerAnchorReducer(dr.SumReducer()),
    )
    weighted = dr.REDUCERS.build({"name": "ClassWeightedReducer", "options": {"weights": [1, 2]}})
    assert weighted == dr.ClassWeightedReducer((1.0, 2.0))
    loss = dl.LOSSES.build(
        {"name": "ContrastiveLoss", "options": {"reducer": {"name": "PerAnchorReducer"}}}
    )
    assert loss.reducer == dr.PerAnchorReducer()
    with pytest.raises(ConfigError, match=r"reducers\.pos_loss\.name: unknown reducer"):
        dr.REDUCERS.build(
            {"name": "MultipleReducers", "options": {"reducers": {"pos_loss": "MeanReduce"}}}
        )
    assert {"DoNothingReducer", "MultipleReducers", "PerAnchorReducer"} <= set(dr.REDUCERS.names())


@pytest.mark.parametrize("name", ["custom", "class_weighted"])
def test_all_triplets_are_listed_for_a_reducer_that_reduces_them(name: str) -> None:
    """Over every triplet the fused kernel keeps only a total; a reducer with its own rule gets
    the triplet losses listed, as PML's loss gives them (values and gradients equal PML's)."""
    g = torch.Generator().manual_seed(9)
    embeddings = torch.randn(12, 5, generator=g)
    labels = torch.randint(0, 3, (12,), generator=g)
    results = []
    for losses_module, module in ((dl, dr), (pml_losses, pml_reducers)):
        e = embeddings.clone().requires_grad_(True)
        value = losses_module.TripletMarginLoss(reducer=REDUCER_FACTORIES[name](module))(e, labels)
        (grad,) = torch.autograd.grad(value, e)
        results.append((value.detach(), grad))
    assert_close(results[0][0], results[1][0], rtol=1e-4)
    assert_close(results[0][1], results[1][1], rtol=1e-4)


def test_dynamic_soft_margin_lists_its_triplets_for_a_reducer_that_reduces_them() -> None:
    """PML's DynamicSoftMarginLoss ignores its reducer; dmlkit's applies it, the triplets listed
    for one with its own rule: the custom rule of the listed per-triplet losses."""
    g = torch.Generator().manual_seed(9)
    embeddings = torch.randn(12, 5, generator=g)
    labels = torch.randint(0, 3, (12,), generator=g)
    listed = dl.DynamicSoftMarginLoss(reducer=dr.DoNothingReducer())(embeddings, labels)
    custom = dl.DynamicSoftMarginLoss(reducer=REDUCER_FACTORIES["custom"](dr))(embeddings, labels)
    expected = REDUCER_FACTORIES["custom"](dr).element_reduction(listed, None, None, None)
    assert_close(custom, expected, rtol=1e-6)
