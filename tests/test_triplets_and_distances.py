"""Distances, the chunked all-triplets path, random triplet sampling and the soft-weighted
batch triplet loss (checked against an explicit per-anchor oracle of fast-reid's formula)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import dmlkit.distances as dd
import dmlkit.functional as F
import dmlkit.losses as dl
import dmlkit.miners as dm
from conftest import assert_close


def test_pairwise_matrices_match_direct_definitions() -> None:
    x, y = torch.randn(7, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    direct = (x[:, None] - y[None]).norm(dim=2)
    assert_close(F.euclidean_distance_matrix(x, y), direct)
    assert_close(F.squared_euclidean_distance_matrix(x, y), direct**2)
    assert_close(F.dot_product_matrix(x, y), x @ y.T)
    assert_close(
        F.cosine_similarity_matrix(x, y),
        torch.nn.functional.cosine_similarity(x[:, None], y[None], dim=2),
    )
    assert_close(F.lp_distance_matrix(x, y, p=1), (x[:, None] - y[None]).abs().sum(2))
    self_dist = F.euclidean_distance_matrix(x)
    assert torch.all(self_dist.diagonal() <= torch.finfo(x.dtype).tiny ** 0.5)


def test_zero_distances_have_finite_gradients() -> None:
    x = torch.randn(3, 4)
    x = torch.cat([x, x[:1]]).requires_grad_(True)  # item 3 duplicates item 0
    F.euclidean_distance_matrix(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_self_pairs_excluded_by_index_not_value() -> None:
    labels = torch.tensor([0, 0, 1])
    pos, neg = F.label_masks(labels)
    assert pos.tolist() == [[False, True, False], [True, False, False], [False, False, False]]
    assert neg.tolist() == [[False, False, True], [False, False, True], [True, True, False]]
    # A duplicate of an item in a separate reference set is a genuine positive.
    pos_ref, _ = F.label_masks(labels, labels.clone())
    assert pos_ref[0, 0] and pos_ref[2, 2]


def test_distance_objects() -> None:
    x = torch.randn(6, 3, dtype=torch.float64)
    xn = torch.nn.functional.normalize(x, dim=1)
    assert_close(dd.LpDistance()(x), torch.cdist(xn, xn))
    assert_close(dd.LpDistance(power=2)(x), torch.cdist(xn, xn) ** 2)
    assert_close(dd.LpDistance(normalize_embeddings=False, p=1)(x), torch.cdist(x, x, p=1))
    assert_close(dd.DotProductSimilarity(normalize_embeddings=False)(x), x @ x.T)
    assert_close(dd.CosineSimilarity()(x), xn @ xn.T)
    assert dd.CosineSimilarity().is_inverted and not dd.LpDistance().is_inverted
    assert_close(dd.LpDistance().pairwise_distance(x, x.flip(0)), (xn - xn.flip(0)).norm(dim=1))


@pytest.mark.parametrize("smooth", [False, True])
@pytest.mark.parametrize("swap", [False, True])
def test_chunked_all_triplets_equal_unchunked(smooth: bool, swap: bool) -> None:
    labels = torch.arange(40) % 7
    emb = torch.randn(40, 8, dtype=torch.float64)
    values, grads = [], []
    for chunk in (1, 37, 10**9):
        leaf = emb.clone().requires_grad_(True)
        loss = dl.TripletMarginLoss(margin=0.4, smooth_loss=smooth, swap=swap, chunk_elements=chunk)
        value = loss(leaf, labels)
        value.backward()
        values.append(value.detach())
        grads.append(leaf.grad)
    for v, g in zip(values[1:], grads[1:], strict=True):
        assert_close(v, values[0], 1e-12)
        assert_close(g, grads[0], 1e-12)


def test_all_triplets_agree_with_explicit_triplet_list() -> None:
    labels = torch.arange(30) % 5
    emb = torch.randn(30, 6, dtype=torch.float64)
    a, p, n = torch.where(
        (labels[:, None, None] == labels[None, :, None])
        & ~torch.eye(30, dtype=torch.bool)[:, :, None]
        & (labels[:, None, None] != labels[None, None, :])
    )
    loss = dl.TripletMarginLoss(margin=0.3)
    assert_close(loss(emb, labels), loss(emb, labels, (a, p, n)), 1e-12)


def test_all_triplets_at_batch_4096_run_in_bounded_memory() -> None:
    """Forward + backward over all ≈50M triplets of a 4096 batch (1024 classes × 4) in a fresh
    process; its peak resident memory must stay far below what per-triplet index tensors
    (3 × 50M int64 = 1.2 GB) or an N³ mask (69 GB) would need."""
    script = textwrap.dedent(
        """
        import json, resource, torch
        import dmlkit.losses as dl
        torch.manual_seed(0)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        emb = torch.randn(4096, 128, requires_grad=True)
        labels = torch.arange(4096) // 4
        loss = dl.TripletMarginLoss(margin=0.2)(emb, labels)
        loss.backward()
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({"loss": loss.item(), "grew_mib": (after - before) / 1024,
                          "finite": bool(torch.isfinite(emb.grad).all())}))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["finite"] and result["loss"] > 0
    assert result["grew_mib"] < 700, result


def test_random_triplets_per_anchor() -> None:
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 3])  # anchors 5 and 6 have no positive
    emb = torch.randn(7, 4)
    loss = dl.TripletMarginLoss(margin=10.0, triplets_per_anchor=3)
    a, p, n = F.sample_triplets(*F.label_weights(labels), 3)
    assert a.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    assert torch.all(labels[a] == labels[p]) and torch.all(a != p)
    assert torch.all(labels[a] != labels[n])
    value = loss(emb, labels)
    assert torch.isfinite(value) and value > 0
    with pytest.raises(ValueError, match="triplets_per_anchor"):
        dl.TripletMarginLoss(triplets_per_anchor=0)


def _soft_weighted_oracle(emb: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    dist = torch.cdist(emb, emb)
    losses = []
    for i in range(len(labels)):
        pos = [j for j in range(len(labels)) if j != i and labels[j] == labels[i]]
        neg = [j for j in range(len(labels)) if labels[j] != labels[i]]
        if not pos or not neg:
            continue
        d_p, d_n = dist[i, pos], dist[i, neg]
        d_ap = (torch.softmax(d_p, 0) * d_p).sum()
        d_an = (torch.softmax(-d_n, 0) * d_n).sum()
        if margin > 0:
            losses.append(torch.relu(d_ap - d_an + margin))
        else:
            losses.append(torch.nn.functional.softplus(d_ap - d_an))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("margin", [0.3, 0.0])
def test_soft_weighted_triplet_matches_oracle(margin: float) -> None:
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3])  # class 3 is a singleton: skipped
    emb = torch.randn(9, 5, dtype=torch.float64)
    ours_leaf = emb.clone().requires_grad_(True)
    ours = dl.SoftWeightedTripletLoss(margin=margin)(ours_leaf, labels)
    theirs_leaf = emb.clone().requires_grad_(True)
    theirs = _soft_weighted_oracle(theirs_leaf, labels, margin)
    assert_close(ours, theirs)
    ours.backward()
    theirs.backward()
    assert_close(ours_leaf.grad, theirs_leaf.grad)


def test_first_two_per_label_matches_first_positive_pair_per_label() -> None:
    from dmlkit.functional.masks import first_pair_per_label, first_two_per_label

    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        labels = torch.randint(0, 7, (int(torch.randint(1, 30, (1,), generator=g)),), generator=g)
        a, p = F.label_masks(labels)[0].nonzero(as_tuple=True)
        expected = first_pair_per_label(a, p, labels)
        got = first_two_per_label(labels)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_cosine_matrix_supports_forward_mode_and_double_backward() -> None:
    # DDTAS's OTG carries a forward-mode tangent through it and differentiates it twice.
    x = torch.randn(5, 3, dtype=torch.float64)
    tangent = torch.randn(5, 3, dtype=torch.float64)
    _, jvp = torch.func.jvp(F.cosine_similarity_matrix, (x,), (tangent,))
    eps = 1e-6
    finite = (F.cosine_similarity_matrix(x + eps * tangent) - F.cosine_similarity_matrix(x)) / eps
    assert_close(jvp, finite, rtol=1e-4)
    x.requires_grad_(True)
    assert torch.autograd.gradgradcheck(lambda t: F.cosine_similarity_matrix(t).pow(3).sum(), (x,))


def test_pair_indices_from_triplets_pairs_and_masks() -> None:
    a, p, n = torch.tensor([0, 2]), torch.tensor([1, 3]), torch.tensor([4, 5])
    pairs = F.PairIndices.from_tuple((a, p, n))
    assert (pairs.a1.tolist(), pairs.p.tolist()) == ([0, 2], [1, 3])
    assert (pairs.a2.tolist(), pairs.n.tolist()) == ([0, 2], [4, 5])
    assert pairs.is_pos.tolist() == [True, True, False, False] and len(pairs) == 4
    quad = F.PairIndices.from_tuple((a, p, torch.tensor([1]), torch.tensor([0])))
    assert (quad.anchors.tolist(), quad.references.tolist(), quad.num_pos) == (
        [0, 2, 1],
        [1, 3, 0],
        2,
    )
    pos, neg = F.label_weights(torch.tensor([0, 0, 1]))
    masked = F.PairIndices.from_masks(pos, neg)
    assert list(zip(masked.anchors.tolist(), masked.references.tolist(), strict=True)) == [
        (0, 1),
        (1, 0),
        (0, 2),
        (1, 2),
        (2, 0),
        (2, 1),
    ]
    assert masked.num_pos == 2


def test_pair_indices_take_gathers_and_differentiates_twice() -> None:
    mat = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    pairs = F.PairIndices.from_lists(
        torch.tensor([0, 2, 2]), torch.tensor([5, 1, 1]), torch.tensor([1]), torch.tensor([4])
    )
    values = pairs.take(mat)
    assert values.tolist() == [
        mat[0, 5].item(),
        mat[2, 1].item(),
        mat[2, 1].item(),
        mat[1, 4].item(),
    ]
    (grad,) = torch.autograd.grad(values.pow(2).sum(), mat, create_graph=True)
    expected = torch.zeros_like(mat)
    expected[0, 5], expected[2, 1], expected[1, 4] = 2 * mat[0, 5], 4 * mat[2, 1], 2 * mat[1, 4]
    assert_close(grad, expected)
    (second,) = torch.autograd.grad(grad.sum(), mat)
    assert second[2, 1].item() == 4.0 and second[0, 0].item() == 0.0


@pytest.mark.parametrize("swap", [False, True])
def test_mined_triplet_loss_backward_twice_with_retained_graph(swap: bool) -> None:
    # The listed triplets' backward must leave its saved tensors as they were.
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.randn(24, 8, generator=generator, dtype=torch.float64)
    embeddings.requires_grad_()
    labels = torch.arange(6).repeat_interleave(4)
    mined = dm.TripletMarginMiner(margin=0.5)(embeddings, labels)
    assert mined[0].numel() > 0
    loss = dl.TripletMarginLoss(margin=0.5, swap=swap)(embeddings, labels, mined)
    loss.backward(retain_graph=True)
    assert embeddings.grad is not None
    once = embeddings.grad.clone()
    assert once.abs().sum() > 0
    loss.backward()
    assert_close(embeddings.grad, 2 * once, 1e-12)


@pytest.mark.parametrize("chunk", [1, 37, 10**9])
def test_blockwise_mined_triplets_equal_pml_for_any_block_size(chunk: int) -> None:
    pml_miners = pytest.importorskip("pytorch_metric_learning.miners")
    generator = torch.Generator().manual_seed(1)
    embeddings = torch.randn(60, 8, generator=generator)
    labels = torch.randint(0, 6, (60,), generator=generator)
    pairs = [
        (dm.AngularMiner(angle=20, chunk_elements=chunk), pml_miners.AngularMiner(angle=20)),
    ] + [
        (
            dm.TripletMarginMiner(margin=0.2, type_of_triplets=kind, chunk_elements=chunk),
            pml_miners.TripletMarginMiner(margin=0.2, type_of_triplets=kind),
        )
        for kind in ("all", "hard", "semihard", "easy")
    ]
    for ours, theirs in pairs:
        mined, expected = ours(embeddings, labels), theirs(embeddings, labels)
        assert mined[0].numel() > 0
        for got, want in zip(mined, expected, strict=True):
            assert torch.equal(got, want)
