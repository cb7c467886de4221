"""Verification curves of a set of embeddings: ROC (with FMR on a log scale, where verification
is judged) and precision–recall over the similarity threshold."""

from __future__ import annotations

from pathlib import Path

from ..evaluation.verification import Curves


def plot_verification(curves: Curves, path: Path, title: str = "") -> Path:
    """Writes the ROC and precision–recall curves to a PNG.

    Args:
        curves: :func:`dmlkit.evaluation.verification.curves` of the pairs.
        path: The PNG to write.
        title: The figure's title.

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (roc, pr) = plt.subplots(1, 2, figsize=(11, 4))
    fpr, tpr = curves.fpr.numpy(), curves.tpr.numpy()
    shown = fpr > 0  # a log axis cannot show FMR 0
    roc.plot(fpr[shown], tpr[shown])
    roc.set_xscale("log")
    roc.set_xlabel("false match rate (FMR, log scale)")
    roc.set_ylabel("true match rate (1 − FNMR)")
    roc.set_title("ROC")
    roc.grid(True, alpha=0.3)
    pr.plot(curves.tpr.numpy(), curves.precision.numpy())
    pr.set_xlabel("recall (true match rate)")
    pr.set_ylabel("precision")
    pr.set_title("precision–recall")
    pr.grid(True, alpha=0.3)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
