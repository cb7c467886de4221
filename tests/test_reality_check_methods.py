"""The Reality Check's 14 methods as protocol presets: each builds, its search space holds the
paper's tuned CUB200 values, and a method whose loss cannot get its parameters is refused
before anything trains."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dmlkit.protocol.config import bench_config_from_dict, method_presets
from dmlkit.training import ConfigError

# The paper's tuned CUB200 values (batch 32), in dmlkit's config keys. Source: powerful-benchmarker
# docs/papers/mlrc.md, "Optimal hyperparameters".
PAPER_CUB200 = {
    "contrastive": {"loss.options.pos_margin": -0.2, "loss.options.neg_margin": 0.3841},
    "triplet": {"loss.options.margin": 0.0961},
    "ntxent": {"loss.options.temperature": 0.0091},
    "proxy_nca": {"optimizer.loss_lr": 6.04e-3, "loss.options.softmax_scale": 13.98},
    "margin": {
        "optimizer.loss_lr": 1.31e-3,
        "loss.options.margin": 0.0878,
        "loss.options.beta": 0.7838,
    },
    "margin_per_class": {
        "optimizer.loss_lr": 2.65e-4,
        "loss.options.margin": 0.0779,
        "loss.options.beta": 0.9796,
    },
    "normalized_softmax": {"optimizer.loss_lr": 4.46e-3, "loss.options.temperature": 0.1087},
    "cosface": {
        "optimizer.loss_lr": 2.53e-3,
        "loss.options.margin": 0.6182,
        "loss.options.scale": 100.0,
    },
    "arcface": {
        "optimizer.loss_lr": 5.13e-3,
        "loss.options.margin": 23.22,
        "loss.options.scale": 100.0,
    },
    "fast_ap": {"loss.options.num_bins": 17},
    "snr_contrastive": {
        "loss.options.pos_margin": 0.3264,
        "loss.options.neg_margin": 0.8446,
        "loss.options.embedding_reg_weight": 0.1382,
    },
    "multi_similarity": {
        "loss.options.alpha": 0.01,
        "loss.options.beta": 50.60,
        "loss.options.base": 0.56,
    },
    "multi_similarity_miner": {
        "loss.options.alpha": 17.97,
        "loss.options.beta": 75.66,
        "loss.options.base": 0.77,
        "miner.options.epsilon": 0.39,
    },
    "soft_triple": {
        "optimizer.loss_lr": 5.37e-5,
        "loss.options.la": 78.02,
        "loss.options.gamma": 58.95,
        "loss.options.weight_reg_weight": 0.3754,
        "loss.options.margin": 0.4307,
    },
}


def _bench(**methods: object) -> dict[str, object]:
    return {
        "training": {"data": {"name": "digits"}, "validation": {"every": 1}},
        "protocol": {"folds": 2},
        "methods": methods,
    }


def test_all_fourteen_methods_are_presets_and_build() -> None:
    assert set(PAPER_CUB200) <= set(method_presets())
    bench = bench_config_from_dict(_bench(**{key: {} for key in PAPER_CUB200}))
    assert list(bench.methods) == list(PAPER_CUB200)


@pytest.mark.parametrize("method", sorted(PAPER_CUB200))
def test_search_space_holds_the_papers_tuned_values(method: str) -> None:
    search = bench_config_from_dict(_bench(**{method: {}})).methods[method].search
    assert set(search) == set(PAPER_CUB200[method])
    for key, value in PAPER_CUB200[method].items():
        param = search[key]
        assert param.low is not None and param.high is not None
        assert param.low <= value <= param.high, (key, value, param)


@pytest.mark.parametrize("method", sorted(PAPER_CUB200))
def test_the_papers_tuned_values_train_a_step(method: str, tmp_path: Path) -> None:
    """Each preset at the paper's values builds its run and trains (digits, two steps)."""
    from dmlkit.training import Trainer

    bench = bench_config_from_dict(
        {
            **_bench(**{method: {}}),
            "training": {
                "data": {"name": "digits"},
                "validation": {"every": 1},
                "train": {"max_steps": 2},
                "sampler": {"classes_per_batch": 2, "samples_per_class": 4},
            },
        }
    )
    config = bench.run_config(method, PAPER_CUB200[method], fold=0, seed=0, run_dir=tmp_path)
    assert Trainer(config, tmp_path).fit(test=False).steps == 2


def test_a_method_whose_loss_cannot_get_its_parameters_is_refused_before_training() -> None:
    cases = [
        (
            {
                "config": {
                    "loss": {
                        "name": "SoftTripleLoss",
                        "options": {"weight_regularizer": {"name": "SparseCentersRegularizer"}},
                    }
                }
            },
            "SparseCentersRegularizer needs 'centers_per_class'",
        ),
        (
            {"config": {"loss": {"name": "ProxyAnchorLoss", "options": {"num_classes": "all"}}}},
            "loss.options.num_classes: expected an integer",
        ),
        ({"config": {"loss": {"name": "ArcFaceLos"}}}, "did you mean 'ArcFaceLoss'"),
        # Values the constructors refuse, found before any run although the losses need the
        # number of classes, which only the data knows.
        (
            {"config": {"loss": {"name": "SubCenterArcFaceLoss", "options": {"sub_centers": 0}}}},
            "methods.mine: loss SubCenterArcFaceLoss:",
        ),
        (
            {"config": {"loss": {"name": "LargeMarginSoftmaxLoss", "options": {"margin": 2.5}}}},
            "methods.mine: loss LargeMarginSoftmaxLoss:",
        ),
        ({"preset": "nope"}, "methods.mine.preset: unknown method 'nope'"),
    ]
    for method, message in cases:
        with pytest.raises(ConfigError, match=re.escape(message)):
            bench_config_from_dict(_bench(mine={**method, "search": {}}))


def test_bench_help_lists_every_builtin_method(capsys: pytest.CaptureFixture[str]) -> None:
    from dmlkit.cli import main

    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    listed = " ".join(capsys.readouterr().out.split())
    for method in method_presets():
        assert re.search(rf"\b{method}\b", listed), method
