"""Label relations: multi-hot labels, rule-based relations and precomputed pair relations, in
the losses, the miners and the evaluation.

Integer labels given as a relation must give exactly the integer-label result; multi-hot and
hierarchical relations are checked against brute-force loops over pairs and triplets.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import dmlkit.losses as dl
import dmlkit.miners as dm
from components import ALL_LOSSES, ALL_MINERS, make
from dmlkit.evaluation import evaluate
from dmlkit.relations import LabelRelation, PairRelation, same_label, shared_class

D = 8


def _batch(n: int = 24, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 6
    centres = torch.randn(6, D, generator=g, dtype=torch.float64)
    emb = 0.7 * centres[labels] + torch.randn(n, D, generator=g, dtype=torch.float64)
    return emb, labels


def _value_and_grad(module, emb, labels, **kwargs):
    x = emb.clone().requires_grad_(True)
    value = module(x, labels, **kwargs)
    value.backward()
    return value.detach(), x.grad


def _same_result(build, emb, labels, relation, **kwargs) -> None:
    torch.manual_seed(0)
    expected = _value_and_grad(build(), emb, labels, **kwargs)
    torch.manual_seed(0)
    got = _value_and_grad(build(), emb, relation, **kwargs)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-12, atol=1e-12)


def _integer_only(loss) -> bool:
    """The losses that say they need one class per item, and MarginLoss with a β per class."""
    per_class_beta = isinstance(loss, dl.MarginLoss) and loss.num_classes is not None
    return loss.needs_class_labels or per_class_beta


@pytest.mark.parametrize("loss_cls", ALL_LOSSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("form", ["rule", "pairs", "one_hot"])
def test_integer_labels_as_a_relation_give_the_integer_result(loss_cls, form: str) -> None:
    emb, labels = _batch()
    relation = {
        "rule": LabelRelation(labels, same_label),
        "pairs": PairRelation(*same_label(labels, labels)),
        "one_hot": F.one_hot(labels),
    }[form]
    if _integer_only(make(loss_cls, embedding_size=D)):
        with pytest.raises(ValueError, match="needs integer class labels"):
            make(loss_cls, embedding_size=D).double()(emb, relation)
        return
    _same_result(lambda: make(loss_cls, embedding_size=D).double(), emb, labels, relation)


@pytest.mark.parametrize("loss_cls", ALL_LOSSES, ids=lambda c: c.__name__)
def test_relation_with_a_reference_set_gives_the_integer_result(loss_cls) -> None:
    emb, labels = _batch(18)
    ref, ref_labels = _batch(30, seed=1)
    loss = make(loss_cls, embedding_size=D).double()
    if not loss_cls.supports_ref or _integer_only(loss):
        pytest.skip(f"{loss_cls.__name__} takes no reference set or needs integer labels")
    torch.manual_seed(0)
    expected = loss(emb, labels, ref_emb=ref, ref_labels=ref_labels)
    torch.manual_seed(0)
    got = loss(
        emb,
        LabelRelation(labels, same_label),
        ref_emb=ref,
        ref_labels=LabelRelation(ref_labels, same_label),
    )
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    pairs = PairRelation(*same_label(labels, ref_labels))
    torch.manual_seed(0)
    torch.testing.assert_close(loss(emb, pairs, ref_emb=ref), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("miner_cls", ALL_MINERS, ids=lambda c: c.__name__)
def test_miners_mine_the_same_tuples_from_a_relation(miner_cls) -> None:
    emb, labels = _batch()
    torch.manual_seed(0)
    expected = make(miner_cls)(emb, labels)
    for relation in (LabelRelation(labels, same_label), F.one_hot(labels)):
        torch.manual_seed(0)
        got = make(miner_cls)(emb, relation)
        for a, b in zip(got, expected, strict=True):
            assert torch.equal(a, b)


def _multi_hot(n: int, classes: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    hot = torch.rand(n, classes, generator=g) < 0.3
    hot[torch.arange(n), torch.randint(classes, (n,), generator=g)] = True
    return hot


def _contrastive_oracle(emb, pos, neg, pos_margin=0.0, neg_margin=1.0) -> torch.Tensor:
    """ContrastiveLoss (AvgNonZero on each side) by a loop over pairs."""
    d = torch.cdist(F.normalize(emb), F.normalize(emb))
    pos_terms, neg_terms = [], []
    for i, j in itertools.product(range(len(emb)), repeat=2):
        if i == j:
            continue
        if pos[i, j]:
            pos_terms.append(torch.relu(d[i, j] - pos_margin))
        elif neg[i, j]:
            neg_terms.append(torch.relu(neg_margin - d[i, j]))

    def avg_nonzero(terms):
        values = torch.stack(terms) if terms else torch.zeros(0, dtype=emb.dtype)
        nonzero = values[values > 0]
        return nonzero.mean() if len(nonzero) else values.sum() * 0

    return avg_nonzero(pos_terms) + avg_nonzero(neg_terms)


def _triplet_oracle(emb, pos, neg, margin=0.05) -> torch.Tensor:
    """TripletMarginLoss over all triplets (AvgNonZero) by a loop."""
    d = torch.cdist(F.normalize(emb), F.normalize(emb))
    terms = [
        torch.relu(d[a, p] - d[a, n] + margin)
        for a, p, n in itertools.product(range(len(emb)), repeat=3)
        if a != p and a != n and pos[a, p] and neg[a, n]
    ]
    values = torch.stack(terms)
    return values[values > 0].mean()


def test_multi_hot_labels_against_brute_force_loops() -> None:
    emb, _ = _batch(14)
    hot = _multi_hot(14, 5, seed=3)
    pos, neg = shared_class(hot, hot)
    assert bool((pos & ~torch.eye(14, dtype=torch.bool)).any()) and bool(neg.any())
    torch.testing.assert_close(
        dl.ContrastiveLoss()(emb, hot), _contrastive_oracle(emb, pos, neg), rtol=1e-10, atol=0
    )
    torch.testing.assert_close(
        dl.TripletMarginLoss()(emb, hot), _triplet_oracle(emb, pos, neg), rtol=1e-10, atol=0
    )
    a, p, n = dm.TripletMarginMiner(margin=0.2, type_of_triplets="all")(emb, hot)
    mined = set(zip(a.tolist(), p.tolist(), n.tolist(), strict=True))
    d = torch.cdist(F.normalize(emb), F.normalize(emb))
    expected = {
        (i, j, k)
        for i, j, k in itertools.product(range(14), repeat=3)
        if i != j and i != k and pos[i, j] and neg[i, k] and d[i, k] - d[i, j] <= 0.2
    }
    assert mined == expected


def _alphabet_rule(query: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alphabet, character) labels: positives share the character, negatives are other
    characters of the same alphabet; pairs across alphabets are left out."""
    same_alphabet = query[:, None, 0] == ref[None, :, 0]
    same_character = same_alphabet & (query[:, None, 1] == ref[None, :, 1])
    return same_character, same_alphabet & ~same_character


def test_a_hierarchical_rule_ignores_the_pairs_it_leaves_out() -> None:
    emb, _ = _batch(16)
    labels = torch.stack([torch.arange(16) // 8, torch.arange(16) % 4], dim=1)
    pos, neg = _alphabet_rule(labels, labels)
    relation = LabelRelation(labels, _alphabet_rule)
    torch.testing.assert_close(
        dl.ContrastiveLoss()(emb, relation), _contrastive_oracle(emb, pos, neg), rtol=1e-10, atol=0
    )
    torch.testing.assert_close(
        dl.TripletMarginLoss()(emb, relation), _triplet_oracle(emb, pos, neg), rtol=1e-10, atol=0
    )
    a1, p, a2, n = dm.PairMarginMiner(pos_margin=0.0, neg_margin=10.0)(emb, relation)
    assert bool(neg[a2, n].all()) and bool(pos[a1, p].all())
    assert len(n) == int(neg.sum())  # every negative within an alphabet, none across


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda x: dl.ContrastiveLoss()(x, torch.full((6, 3), 2)), "must hold only 0 and 1"),
        (
            lambda x: dl.ContrastiveLoss()(x, F.one_hot(torch.arange(5) % 2)),
            "labels has 5 rows but there are 6 embeddings",
        ),
        (
            lambda x: dl.ContrastiveLoss()(
                x, PairRelation(torch.eye(6, dtype=torch.bool), torch.eye(6, dtype=torch.bool))
            ),
            "both positive and negative",
        ),
        (
            lambda x: dl.ContrastiveLoss()(
                x, PairRelation(torch.eye(6, dtype=torch.bool), torch.zeros(6, 5, dtype=torch.bool))
            ),
            r"negative mask has shape \(6, 5\), expected \(6, 6\)",
        ),
        (
            lambda x: dl.ContrastiveLoss()(
                x, LabelRelation(torch.arange(6), lambda q, r: (q[:, None] == r, q[:, None] - r))
            ),
            "the rule's masks: the negative mask must be a boolean tensor",
        ),
        (
            lambda x: dl.ContrastiveLoss()(
                x, F.one_hot(torch.arange(6) % 2), ref_emb=x, ref_labels=torch.arange(6)
            ),
            "ref_labels must be given in the same form as labels",
        ),
        (
            lambda x: dl.ContrastiveLoss()(
                x, F.one_hot(torch.arange(6) % 2), ref_emb=x, ref_labels=F.one_hot(torch.arange(6))
            ),
            r"ref_labels rows have shape \(6,\) but labels rows have \(2,\)",
        ),
        (
            lambda x: dl.ArcFaceLoss(4, 4)(x, F.one_hot(torch.arange(6) % 4)),
            "ArcFaceLoss needs integer class labels",
        ),
    ],
)
def test_bad_relations_are_value_errors_naming_the_problem(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call(torch.randn(6, 4))


def _integer_rule_result(emb, labels, ref=None, ref_labels=None, **kwargs):
    return evaluate(emb, labels, ref, ref_labels, **kwargs).metrics


@pytest.mark.parametrize("with_reference", [False, True])
def test_evaluate_with_the_integer_rule_matches_integer_labels(with_reference: bool) -> None:
    emb, labels = _batch(60)
    ref, ref_labels = _batch(80, seed=4) if with_reference else (None, None)
    options = {"metrics": ("precision_at_1", "recall_at_k", "r_precision",
                           "mean_average_precision_at_r", "mean_reciprocal_rank",
                           "mean_average_precision"), "recall_at": (1, 2, 4, 8, 40)}  # fmt: skip
    expected = evaluate(emb, labels, ref, ref_labels, **options).metrics
    got = evaluate(emb, labels, ref, ref_labels, label_relation=same_label, **options).metrics
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name] == pytest.approx(expected[name], abs=1e-12), name


def test_evaluate_multi_hot_against_a_brute_force_ranking() -> None:
    emb, _ = _batch(40)
    hot = _multi_hot(40, 6, seed=7)
    metrics = ("precision_at_1", "r_precision", "mean_average_precision_at_r")
    result = evaluate(emb, hot, label_relation=shared_class, metrics=metrics)
    pos, _ = shared_class(hot, hot)
    d = torch.cdist(emb.float(), emb.float()).double()
    p1, rp, mapr = [], [], []
    for i in range(40):
        others = [j for j in range(40) if j != i]
        ranked = sorted(others, key=lambda j: (d[i, j].item(), j))
        relevant = [bool(pos[i, j]) for j in ranked]
        r = sum(relevant)
        if r == 0:
            continue
        p1.append(float(relevant[0]))
        rp.append(sum(relevant[:r]) / r)
        hits, precisions = 0, []
        for rank, rel in enumerate(relevant[:r], start=1):
            if rel:
                hits += 1
                precisions.append(hits / rank)
        mapr.append(sum(precisions) / r)
    assert result.metrics["precision_at_1"] == pytest.approx(sum(p1) / len(p1), abs=1e-9)
    assert result.metrics["r_precision"] == pytest.approx(sum(rp) / len(rp), abs=1e-9)
    assert result.metrics["mean_average_precision_at_r"] == pytest.approx(
        sum(mapr) / len(mapr), abs=1e-9
    )


def test_evaluate_leaves_out_the_pairs_a_rule_ignores() -> None:
    """Under the alphabet rule a query is ranked among its own alphabet only: P@1 is that of
    evaluating each alphabet separately."""
    emb, _ = _batch(32)
    labels = torch.stack([torch.arange(32) // 16, torch.arange(32) % 4], dim=1)
    got = evaluate(emb, labels, label_relation=_alphabet_rule, metrics=("precision_at_1",))
    per_alphabet = [
        evaluate(emb[labels[:, 0] == a], labels[labels[:, 0] == a, 1], metrics=("precision_at_1",))
        for a in (0, 1)
    ]
    expected = sum(r.metrics["precision_at_1"] for r in per_alphabet) / 2
    assert got.metrics["precision_at_1"] == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"average": "class"}, "no classes to average over"),
        ({"metrics": ("NMI",)}, "NMI need integer labels"),
        ({"label_relation": "same"}, "must be a callable rule"),
    ],
)
def test_evaluate_refuses_what_a_relation_cannot_give(options, message: str) -> None:
    emb, labels = _batch(20)
    kwargs = {"label_relation": same_label, **options}
    with pytest.raises(ValueError, match=message):
        evaluate(emb, labels, **kwargs)
