"""Every public PML 2.9 class has a dmlkit counterpart of the same name, and every loss takes
PML's plug-in arguments (regularisers, and for losses with weights their init and regulariser).

The exclusion list holds PML's mixins and base classes only; a PML class missing from dmlkit
and from the list fails the test by name.
"""

from __future__ import annotations

import importlib
import inspect

import pytest

pml = pytest.importorskip("pytorch_metric_learning")

MODULES = ("losses", "miners", "distances", "reducers", "regularizers", "samplers")

# PML's mixins and abstract bases, which a user subclasses rather than uses; dmlkit's own
# bases (BaseMetricLossFunction, BaseMiner, BaseDistance, BaseReducer, BaseRegularizer) take
# their place.
EXCLUDED = {
    "losses": {
        "BaseLossWrapper",  # the base of PML's wrapper losses
        "GenericPairLoss",  # the base of PML's pair losses
        "EmbeddingRegularizerMixin",
        "WeightRegularizerMixin",
    },
    "miners": set(),
    "distances": set(),
    "reducers": set(),
    "regularizers": set(),
    "samplers": set(),
}


def _public_classes(module) -> dict[str, type]:
    return {
        name: value
        for name, value in vars(module).items()
        if inspect.isclass(value) and not name.startswith("_")
    }


@pytest.mark.parametrize("module", MODULES)
def test_every_public_pml_class_has_a_dmlkit_counterpart(module: str) -> None:
    theirs = _public_classes(importlib.import_module(f"pytorch_metric_learning.{module}"))
    ours = importlib.import_module(f"dmlkit.{module}")
    missing = sorted(set(theirs) - EXCLUDED[module] - set(dir(ours)))
    assert not missing, f"dmlkit.{module} lacks PML's {missing}"
    stale = sorted(EXCLUDED[module] - set(theirs))
    assert not stale, f"the exclusion list names classes PML no longer has: {stale}"


def test_the_exclusions_are_mixins_and_bases() -> None:
    for module, names in EXCLUDED.items():
        theirs = _public_classes(importlib.import_module(f"pytorch_metric_learning.{module}"))
        for name in names:
            assert (
                name.startswith("Base")
                or name.endswith("Mixin")
                or any(
                    issubclass(other, theirs[name]) and other is not theirs[name]
                    for other in theirs.values()
                )
            ), f"{module}.{name} is neither a mixin nor a base of another PML class"


def _pml_losses() -> list[str]:
    import pytorch_metric_learning.losses as pl

    return sorted(
        name
        for name, cls in _public_classes(pl).items()
        if issubclass(cls, pl.BaseMetricLossFunction) and name not in EXCLUDED["losses"]
    )


@pytest.mark.parametrize("name", _pml_losses())
def test_every_loss_takes_pmls_plug_in_arguments(name: str) -> None:
    """PML's losses take an embedding regulariser; those with weights also a weight
    regulariser and a weight init. The dmlkit class of the same name takes the same."""
    import pytorch_metric_learning.losses as pl

    import dmlkit.losses as dl

    ours = inspect.signature(getattr(dl, name)).parameters
    expected = ["embedding_regularizer", "embedding_reg_weight"]
    if issubclass(getattr(pl, name), pl.WeightRegularizerMixin):
        expected += ["weight_regularizer", "weight_reg_weight", "weight_init_func"]
    missing = [argument for argument in expected if argument not in ours]
    assert not missing, f"{name} lacks PML's {missing}"
