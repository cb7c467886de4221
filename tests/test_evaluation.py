"""Retrieval evaluation: neighbour lists against brute force, metrics against PML and by hand."""

from __future__ import annotations

import math
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from pytorch_metric_learning.utils import accuracy_calculator as pml_accuracy
from pytorch_metric_learning.utils.inference import return_results

from dmlkit.evaluation import (
    AccuracyCalculator,
    FaissKNN,
    SklearnKMeans,
    TorchKNN,
    evaluate,
    faiss_available,
)
from dmlkit.evaluation import metrics as M

needs_faiss = pytest.mark.skipif(not faiss_available(), reason="faiss not installed")


# ---------------------------------------------------------------- data


def clustered(n: int, dim: int, sizes: tuple[int, int], noise: float, seed: int = 0):
    """Classes of random sizes around random centres; float32, unnormalised."""
    gen = torch.Generator().manual_seed(seed)
    labels: list[int] = []
    while len(labels) < n:
        size = int(torch.randint(sizes[0], sizes[1] + 1, (1,), generator=gen))
        labels += [len(set(labels))] * size
    lab = torch.tensor(labels[:n])
    centres = torch.randn(int(lab.max()) + 1, dim, generator=gen)
    return centres[lab] + noise * torch.randn(n, dim, generator=gen), lab


def tie_heavy(n: int, dim: int, n_classes: int, seed: int = 0):
    """Small integer coordinates: many exactly equal distances, all computed exactly in float32."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(-2, 3, (n, dim), generator=gen).float()
    return x, torch.randint(0, n_classes, (n,), generator=gen)


def on_grid(x: torch.Tensor) -> torch.Tensor:
    """Rounds to multiples of 1/32: every score is then exact in float32, so float32 searches
    (dmlkit's, faiss's) and a float64 reference rank identically."""
    return (x * 32).round() / 32


def axis_vectors(n: int, dim: int, n_classes: int, seed: int = 0):
    """± axis vectors scaled by powers of two: normalising them is exact, cosines are -1, 0, 1."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, dim)
    sign = torch.randint(0, 2, (n,), generator=gen) * 2 - 1
    scale = 2.0 ** torch.randint(-2, 3, (n,), generator=gen)
    x[torch.arange(n), torch.randint(0, dim, (n,), generator=gen)] = sign * scale
    return x, torch.randint(0, n_classes, (n,), generator=gen)


DATASETS = {
    "random": lambda: (on_grid(torch.randn(300, 16)), torch.randint(0, 12, (300,))),
    "clustered": lambda: (lambda x, y: (on_grid(x), y))(*clustered(400, 24, (2, 15), noise=0.9)),
    "tie_heavy": lambda: tie_heavy(300, 3, 10),
}


def brute_force(query, k, reference=None, exclude_self=False, metric="euclidean"):
    """Float64 scores, stable sort: nearest first, ties by lower index."""
    ref = query if reference is None else reference
    q, r = query.double(), ref.double()
    if metric == "cosine":
        q, r = torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(r, dim=1)
    scores = q @ r.T
    if metric == "euclidean":
        scores = -torch.cdist(q, r).pow(2) / 2
    if exclude_self:
        scores.diagonal().fill_(-math.inf)
    order = torch.sort(-scores, dim=1, stable=True).indices[:, :k]
    return order, scores.gather(1, order)


def pml_stable_knn(query, k, reference, ref_includes_query):
    """PML's knn_func contract, with exact float64 distances and index-ordered ties."""
    if ref_includes_query:
        k += 1
    dist = torch.cdist(query.double(), reference.double()).pow(2)
    order = torch.sort(dist, dim=1, stable=True).indices[:, :k]
    return return_results(dist.gather(1, order), order, ref_includes_query)


def pml_calculator(**kwargs):
    return pml_accuracy.AccuracyCalculator(
        device=torch.device("cpu"), kmeans_func=SklearnKMeans(seed=0), **kwargs
    )


# ---------------------------------------------------------------- neighbour lists


@pytest.mark.parametrize("metric", ["euclidean", "cosine", "dot"])
@pytest.mark.parametrize(
    ("n", "k", "block_size"),
    [(300, 5, 64), (300, 5, 4096), (200, 150, 64), (1000, 30, 96), (2400, 140, 128)],
    # The last: k above the tile size, so the lists fill over several tiles.
    ids=["symmetric-tiles", "one-tile", "dense", "symmetric-ragged", "filling-over-tiles"],
)
def test_self_retrieval_lists_equal_brute_force(metric, n, k, block_size):
    x, labels = axis_vectors(n, 4, 7) if metric == "cosine" else tie_heavy(n, 4, 7)
    blocks = list(TorchKNN(metric, block_size).search(x, k, query_labels=labels))
    indices = torch.cat([b.indices for b in blocks])
    scores = torch.cat([b.scores for b in blocks])
    expected, expected_scores = brute_force(x, k, exclude_self=True, metric=metric)
    assert torch.equal(indices, expected)
    torch.testing.assert_close(scores.double(), expected_scores, rtol=0, atol=1e-5)
    assert [b.start for b in blocks] == sorted(b.start for b in blocks)


@pytest.mark.parametrize("block_size", [8, 64, 4096])
@pytest.mark.parametrize("ref_includes_query", [False, True])
def test_separate_reference_lists_equal_brute_force(block_size, ref_includes_query):
    x, _ = tie_heavy(500, 3, 5, seed=1)
    query = x[:120]
    reference = x if ref_includes_query else x[120:]
    got = torch.cat(
        [
            b.indices
            for b in TorchKNN(block_size=block_size).search(
                query, 9, reference, ref_includes_query=ref_includes_query
            )
        ]
    )
    expected, _ = brute_force(query, 9, reference, exclude_self=ref_includes_query)
    assert torch.equal(got, expected)


def test_lists_do_not_depend_on_block_size_and_repeat_exactly():
    x, labels = clustered(3000, 16, (2, 12), noise=1.0)
    runs = [
        torch.cat([b.indices for b in TorchKNN(block_size=bs).search(x, 11, query_labels=labels)])
        for bs in (64, 512, 4096, 4096)
    ]
    for run in runs[1:]:
        assert torch.equal(run, runs[0])
    # Labels only reorder the work (classes first); the lists stay the same.
    unlabelled = torch.cat([b.indices for b in TorchKNN(block_size=512).search(x, 11)])
    assert torch.equal(unlabelled, runs[0])


def test_self_is_excluded_by_index_not_by_value():
    # Item 1 duplicates item 0: each must still find the other at distance zero.
    x = torch.tensor([[0.0, 0.0], [0.0, 0.0], [5.0, 5.0]])
    (block,) = TorchKNN().search(x, 1)
    assert block.indices[:, 0].tolist() == [1, 0, 0]


# ---------------------------------------------------------------- parity with PML


@pytest.mark.parametrize("dataset", list(DATASETS))
@pytest.mark.parametrize("k", [None, "max_bin_count", 4])
@pytest.mark.parametrize("averaging", ["plain", "avg_of_avgs", "return_per_class"])
def test_accuracy_calculator_matches_pml(dataset, k, averaging):
    x, labels = DATASETS[dataset]()
    options = {"k": k, averaging: True} if averaging != "plain" else {"k": k}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = AccuracyCalculator(kmeans_func=SklearnKMeans(seed=0), **options).get_accuracy(
            x, labels
        )
        theirs = pml_calculator(knn_func=pml_stable_knn, **options).get_accuracy(x, labels)
    assert list(ours) == list(theirs)
    for name in theirs:
        np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-6, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("dataset", ["clustered", "tie_heavy"])
@pytest.mark.parametrize("ref_includes_query", [False, True])
def test_separate_reference_matches_pml(dataset, ref_includes_query):
    x, labels = DATASETS[dataset]()
    query, q_labels = x[:100], labels[:100]
    reference, r_labels = (x, labels) if ref_includes_query else (x[100:], labels[100:])
    include = ("precision_at_1", "r_precision", "mean_average_precision_at_r",
               "mean_average_precision", "mean_reciprocal_rank")  # fmt: skip
    ours = AccuracyCalculator(include=include, k="max_bin_count").get_accuracy(
        query, q_labels, reference, r_labels, ref_includes_query
    )
    theirs = pml_calculator(
        include=include, k="max_bin_count", knn_func=pml_stable_knn
    ).get_accuracy(query, q_labels, reference, r_labels, ref_includes_query)
    for name in include:
        np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-6, err_msg=name)


@needs_faiss
@pytest.mark.parametrize("dataset", ["random", "clustered"])
def test_matches_pml_with_its_default_faiss_search(dataset):
    x, labels = DATASETS[dataset]()  # on a grid: no float32 near-ties to order differently
    ours = AccuracyCalculator(k="max_bin_count", exclude=("NMI", "AMI")).get_accuracy(x, labels)
    theirs = pml_accuracy.AccuracyCalculator(
        k="max_bin_count", exclude=("NMI", "AMI"), device=torch.device("cpu")
    ).get_accuracy(x, labels)
    for name in theirs:
        np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-6, err_msg=name)


def test_numpy_inputs_and_call_level_include():
    x, labels = DATASETS["clustered"]()
    calc = AccuracyCalculator(exclude=("NMI", "AMI"))
    out = calc.get_accuracy(x.numpy(), labels.numpy(), include=("precision_at_1", "r_precision"))
    assert list(out) == ["precision_at_1", "r_precision"]
    assert out == calc.get_accuracy(x, labels, include=("precision_at_1", "r_precision"))


# ---------------------------------------------------------------- hand-computed cases


def test_hand_computed_ranks():
    # 1-D points. Query 0 (label 0) ranks: 1 (label 0), 2 (label 1), 3 (label 0), 4 (label 1).
    x = torch.tensor([[0.0], [1.0], [2.0], [3.0], [10.0]])
    labels = torch.tensor([0, 0, 1, 0, 1])
    result = evaluate(
        x[:1], labels[:1], x, labels, ref_includes_query=True,
        metrics=("precision_at_1", "r_precision", "mean_average_precision_at_r",
                 "mean_average_precision", "mean_reciprocal_rank", "recall_at_k"),
        recall_at=(1, 2), precision_at=(2, 3),
    )  # fmt: skip
    # R = 2: relevant at ranks 1 and 3.
    assert result["precision_at_1"] == 1.0
    assert result["precision_at_2"] == 0.5
    assert result["precision_at_3"] == pytest.approx(2 / 3)
    assert result["r_precision"] == 0.5
    assert result["mean_average_precision_at_r"] == 0.5  # (1/2)(1/1)
    assert result["mean_average_precision"] == pytest.approx((1 + 2 / 3) / 2)
    assert result["mean_reciprocal_rank"] == 1.0
    assert result["recall_at_1"] == 1.0


def test_ties_rank_by_lower_index_and_recall_counts_them_for_the_query():
    # Query 0 at the origin; references 1 and 2 (other labels) and 3 (its label) all at distance 1.
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [9.0, 9.0]])
    labels = torch.tensor([0, 1, 2, 0, 1])
    result = evaluate(x[:1], labels[:1], x, labels, ref_includes_query=True,
                      metrics=("precision_at_1", "recall_at_k", "mean_reciprocal_rank"),
                      recall_at=(1,))  # fmt: skip
    assert result["precision_at_1"] == 0.0  # the tie goes to index 1
    assert result["mean_reciprocal_rank"] == pytest.approx(1 / 3)
    assert result["recall_at_1"] == 1.0  # no other label is strictly nearer


def test_positives_with_negative_similarity_do_not_count_the_query_itself():
    # DDTAS's code zeroes the self-similarity instead of excluding the query; when every
    # positive has negative cosine similarity the query then finds itself first. Here query 0's
    # only positive (item 1) has cosine -1 and both negatives -0.5.
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [-0.5, 0.866], [-0.5, -0.866]])
    labels = torch.tensor([0, 0, 1, 2])
    result = evaluate(x[:1], labels[:1], x, labels, ref_includes_query=True,
                      knn=TorchKNN("cosine"), metrics=("precision_at_1", "recall_at_k"),
                      recall_at=(1, 2, 3))  # fmt: skip
    assert result["precision_at_1"] == 0.0
    assert [result[f"recall_at_{k}"] for k in (1, 2, 3)] == [0.0, 0.0, 1.0]


def test_lone_queries_are_left_out_and_counted():
    x = torch.tensor([[0.0], [0.1], [5.0], [9.0]])
    labels = torch.tensor([0, 0, 1, 2])  # labels 1 and 2 are lone
    result = evaluate(x, labels, metrics=("precision_at_1", "mean_average_precision_at_r"))
    assert result.num_lone_queries == 2
    assert result["precision_at_1"] == 1.0
    assert result["mean_average_precision_at_r"] == 1.0


def test_all_lone_queries_give_nan_with_a_warning():
    x = torch.randn(4, 3)
    with pytest.warns(RuntimeWarning, match="NaN"):
        result = evaluate(x, torch.arange(4), metrics=("precision_at_1",))
    assert math.isnan(result["precision_at_1"])
    with pytest.warns(RuntimeWarning):
        out = AccuracyCalculator(include=("r_precision",), return_per_class=True).get_accuracy(
            x, torch.arange(4)
        )
    assert len(out["r_precision"]) == 4 and all(math.isnan(v) for v in out["r_precision"])


@pytest.mark.parametrize("k", [None, "max_bin_count", 1])
def test_all_lone_queries_give_nan_for_every_k(k):
    x, labels = torch.randn(6, 3), torch.arange(6)
    with pytest.warns(RuntimeWarning, match="NaN"):
        out = AccuracyCalculator(k=k, exclude=("NMI", "AMI")).get_accuracy(x, labels)
    assert all(math.isnan(value) for value in out.values())
    # A separate reference that shares no label with the queries: every query is lone too.
    with pytest.warns(RuntimeWarning, match="NaN"):
        out = AccuracyCalculator(k="max_bin_count", include=("precision_at_1",)).get_accuracy(
            x[:3], labels[:3], x[3:], labels[3:]
        )
    assert math.isnan(out["precision_at_1"])


def test_result_keys_follow_the_requested_order():
    x, labels = clustered(100, 4, (2, 10), noise=0.5)
    names = ("mean_average_precision_at_r", "recall_at_k", "precision_at_1")
    result = evaluate(x, labels, metrics=names, recall_at=(1, 2))
    assert list(result.metrics) == ["mean_average_precision_at_r", "recall_at_1", "recall_at_2",
                                    "precision_at_1"]  # fmt: skip


def test_per_class_average_and_values():
    # 1-D: class 0 at 0, 0.1, 0.22; class 1 at 5, 5.1, 5.2 and one stray at 0.15.
    x = torch.tensor([[0.0], [0.1], [0.22], [5.0], [5.1], [0.15], [5.2]])
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    by_query = evaluate(x, labels, metrics=("precision_at_1",), return_per_class=True)
    by_class = evaluate(x, labels, metrics=("precision_at_1",), average="class")
    # Hits: item 0 only in class 0 (items 1 and 2 find the stray); items 3, 4, 6 in class 1.
    assert by_query.per_class == {"precision_at_1": pytest.approx({0: 1 / 3, 1: 3 / 4})}
    assert by_query["precision_at_1"] == pytest.approx(4 / 7)
    assert by_class["precision_at_1"] == pytest.approx((1 / 3 + 3 / 4) / 2)


# ---------------------------------------------------------------- Recall@K, all search paths


def recall_oracle(query, q_labels, ks, reference=None, r_labels=None, exclude_self=True):
    ref, r_lab = (query, q_labels) if reference is None else (reference, r_labels)
    scores = -torch.cdist(query.double(), ref.double()).pow(2) / 2
    same = q_labels[:, None] == r_lab[None, :]
    if exclude_self:
        scores.diagonal().fill_(-math.inf)
        same.diagonal().fill_(False)
    best = scores.masked_fill(~same, -math.inf).amax(1)
    above = ((scores > best[:, None]) & ~same).sum(1)
    keep = same.any(1)
    return {k: float((above[keep] < k).double().mean()) for k in ks}


# Cut-offs above 32 are counted for the queries their lists cannot decide: a second code path.
@pytest.mark.parametrize("ks", [(1, 2, 4, 8), (1, 40, 100)])
@pytest.mark.parametrize("block_size", [8, 64, 4096])
@pytest.mark.parametrize("n", [200, 2000])
def test_recall_at_k_tie_rule_against_brute_force(ks, block_size, n):
    x, labels = tie_heavy(n, 3, n // 20, seed=2)
    result = evaluate(x, labels, metrics=("recall_at_k",), recall_at=ks,
                      knn=TorchKNN(block_size=block_size))  # fmt: skip
    expected = recall_oracle(x, labels, ks)
    for k, value in expected.items():
        assert result[f"recall_at_{k}"] == pytest.approx(value, abs=1e-12)


@pytest.mark.parametrize("ref_includes_query", [False, True])
def test_recall_at_large_k_with_a_separate_reference(ref_includes_query):
    x, labels = tie_heavy(1500, 3, 60, seed=4)
    query, q_labels = x[:300], labels[:300]
    reference, r_labels = (x, labels) if ref_includes_query else (x[300:], labels[300:])
    ks = (1, 5, 50, 200)
    result = evaluate(query, q_labels, reference, r_labels, ref_includes_query=ref_includes_query,
                      metrics=("recall_at_k",), recall_at=ks)  # fmt: skip
    expected = recall_oracle(query, q_labels, ks, reference, r_labels, ref_includes_query)
    for k, value in expected.items():
        assert result[f"recall_at_{k}"] == pytest.approx(value, abs=1e-12)


def test_recall_at_k_equals_top_k_hit_rate_without_ties():
    x, labels = clustered(500, 8, (2, 10), noise=1.5, seed=3)
    result = evaluate(x, labels, metrics=("recall_at_k",), recall_at=(1, 5))
    order, _ = brute_force(x, 5, exclude_self=True)
    hit = labels[order] == labels[:, None]
    for k in (1, 5):
        assert result[f"recall_at_{k}"] == pytest.approx(float(hit[:, :k].any(1).double().mean()))


def test_metric_functions_on_a_known_block():
    correct = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    relevant = torch.tensor([2.0, 1.0], dtype=torch.float64)
    assert M.precision_at_k(correct, 3).tolist() == pytest.approx([2 / 3, 0.0])
    assert M.r_precision(correct, relevant).tolist() == [0.5, 0.0]
    assert M.mean_average_precision_at_r(correct, relevant).tolist() == [0.5, 0.0]
    assert M.average_precision_at_k(correct, relevant, 4).tolist() == pytest.approx(
        [(1 + 2 / 3) / 2, 0.25]
    )
    assert M.reciprocal_rank(correct, 4).tolist() == [1.0, 0.25]
    assert M.reciprocal_rank(correct, 3).tolist() == [1.0, 0.0]


# ---------------------------------------------------------------- faiss


@needs_faiss
def test_faiss_flat_lists_equal_torch_lists():
    x, _ = clustered(1500, 16, (2, 12), noise=1.0)
    torch_lists = torch.cat([b.indices for b in TorchKNN().search(x, 10)])
    faiss_lists = torch.cat([b.indices for b in FaissKNN(block_size=500).search(x, 10)])
    assert (torch_lists == faiss_lists).double().mean() > 0.999  # float rounding near-ties only


@needs_faiss
@pytest.mark.parametrize("index", ["ivf", "hnsw"])
def test_approximate_faiss_indexes_say_so_and_stay_close(index):
    x, labels = clustered(4000, 16, (2, 12), noise=0.8)
    exact = evaluate(x, labels)
    approx = evaluate(x, labels, knn=FaissKNN(index=index))
    assert exact.exact and not approx.exact
    assert "approximate" in str(approx)
    assert approx["mean_average_precision_at_r"] == pytest.approx(
        exact["mean_average_precision_at_r"], abs=0.05
    )


# ---------------------------------------------------------------- inputs and results


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda x, y: evaluate(x, y[:-1]), "query_labels has length"),
        (lambda x, y: evaluate(x.clone().index_fill_(0, torch.tensor([3]), math.nan), y), "NaN"),
        (lambda x, y: evaluate(x.clone().index_fill_(0, torch.tensor([3]), math.inf), y), "Inf"),
        (
            lambda x, y: evaluate(x, y, torch.randn(5, 7), torch.zeros(5, dtype=torch.long)),
            "dimension",
        ),
        (lambda x, y: evaluate(x, y, metrics=("precision_at_2",)), "known metrics: precision_at_1"),
        (lambda x, y: evaluate(x, y, recall_at=(50,)), "only 19 candidates"),
        (lambda x, y: evaluate(x, y, k=20), "only 19 candidates"),
        (lambda x, y: AccuracyCalculator(k=20).get_accuracy(x, y), "only 19 candidates"),
        (lambda x, y: AccuracyCalculator(include=("recall",)), "known metrics"),
        (lambda x, y: evaluate(x, y.float()), "integer dtype"),
        (lambda x, y: evaluate(x, y, x), "without reference_labels"),
        (
            lambda x, y: evaluate(x[:5], y[:5], x.flip(0), y, ref_includes_query=True),
            "first len\\(query\\) rows",
        ),
        (lambda x, y: evaluate(x, y, average="median"), "average"),
        (lambda x, y: evaluate(x * 1e20, y), "too large for float32"),
        (lambda x, y: evaluate(x[:0], y[:0], x, y), "query is empty"),
        (lambda x, y: evaluate(x, y, x[:0], y[:0]), "reference is empty"),
        (lambda x, y: evaluate(x, y, metrics="r_precision"), "not a string"),
        (lambda x, y: evaluate(x, y, metrics=("recall_at_k",), recall_at=()), "cut-off"),
        (lambda x, y: next(TorchKNN().search(x, 20)), "k must be an integer in \\[1, 19\\]"),
        (lambda x, y: next(TorchKNN().search(x, 0)), "k must be"),
    ],
)
def test_bad_input_gets_a_clear_error(call, message):
    x, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
    with pytest.raises(ValueError, match=message):
        call(x, y)


def test_result_prints_as_a_table():
    x, labels = clustered(200, 8, (2, 10), noise=0.5)
    text = str(evaluate(x, labels))
    for name in ("precision_at_1", "recall_at_8", "r_precision", "mean_average_precision_at_r"):
        assert name in text
    assert "200 queries" in text and "exact kNN in torch" in text


def test_default_recall_cutoffs_follow_the_set_size():
    x, labels = clustered(300, 4, (2, 10), noise=0.5)
    assert {"recall_at_1", "recall_at_8"} <= set(evaluate(x, labels).metrics)
    big_x, big_labels = clustered(10_050, 4, (2, 12), noise=0.5)
    assert "recall_at_1000" in evaluate(big_x, big_labels).metrics


def test_clustering_scores_with_a_fixed_clusterer():
    x, labels = clustered(300, 8, (20, 30), noise=0.1)
    result = evaluate(x, labels, metrics=("NMI", "AMI"), kmeans=SklearnKMeans(n_init=3))
    assert result["NMI"] > 0.95 and result["AMI"] > 0.9


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_search_matches_cpu():
    x, labels = clustered(5000, 32, (2, 12), noise=1.0)
    cpu = evaluate(x, labels)
    gpu = evaluate(x.cuda(), labels.cuda())
    for name, value in cpu.metrics.items():
        assert gpu[name] == pytest.approx(value, abs=1e-4)


def test_memory_stays_bounded_without_an_n_by_n_matrix():
    # 30,000 items: an N×N float32 matrix would take 3.4 GiB.
    script = """
import resource, torch
from dmlkit.evaluation import evaluate
torch.manual_seed(0)
x = torch.randn(30_000, 32)
labels = torch.randint(0, 3000, (30_000,))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
evaluate(x, labels, metrics=("precision_at_1", "r_precision", "mean_average_precision_at_r"))
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert float(out.stdout.strip()) < 600
