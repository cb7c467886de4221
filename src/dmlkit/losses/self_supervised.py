"""Self-supervised losses, which compare two views of each input and take no labels: VICReg.

:class:`VICRegLoss` is not in the loss registry: the registry's losses are called with labels
(by the trainer's objectives and by the tests every registered loss must pass), and VICReg
refuses them, as PML's does. Build it directly, or name it by import path
(``dmlkit.losses:VICRegLoss``) for code that calls it with two views.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from ..functional.reduction import Reducer
from ..functional.self_supervised import vicreg_loss
from ..regularizers import BaseRegularizer
from ..validation import check_embeddings, check_positive_number
from .base import BaseMetricLossFunction, add_regularization

_LOW_PRECISION = (torch.float16, torch.bfloat16)


class VICRegLoss(BaseMetricLossFunction):
    """VICReg (Bardes, Ponce and LeCun, 2022), PML's ``VICRegLoss``:
    ``λ·s(Z, Z′) + μ·[v(Z) + v(Z′)] + ν·[c(Z) + c(Z′)]`` for two views ``Z`` (``embeddings``)
    and ``Z′`` (``ref_emb``) of the same N inputs, row by row.

    * ``s``: the mean squared difference of each row pair, reduced over the rows.
    * ``v``: ``relu(1 − √(Var + eps)) / 2`` of each column (unbiased variance over the batch),
      reduced over the columns, each view on its own.
    * ``c``: the sum of the squared off-diagonal entries of the view's unbiased covariance,
      over D; not reduced (PML's "already reduced" term).

    Called as PML's: ``loss(embeddings, ref_emb=ref_emb)``. Without ``ref_emb`` the embeddings
    are their own second view, as in PML (``s`` is then 0 and ``v`` and ``c`` count twice).
    Labels, ``ref_labels``, an ``indices_tuple`` and ``anchor_in_ref`` are refused (PML refuses
    the first three), and so is a ``distance`` (PML: a ``ValueError``; here it is not a
    parameter).

    Differences from PML, deliberate (``embeddings`` and ``ref_emb`` are checked as every
    loss's are: finite, floating-point, 2-D; half precision is computed in float32):

    * An ``embedding_regularizer`` is applied, as by every dmlkit loss: its value on
      ``embeddings`` (never ``ref_emb``) times ``embedding_reg_weight`` is added. PML's VICReg
      refuses one.
    * Fewer than two embeddings, whose variance is undefined (PML returns NaN), and a
      ``ref_emb`` not shaped like ``embeddings`` (PML broadcasts or fails in the arithmetic)
      raise ``ValueError``.
    * ``eps`` must be positive and the weights non-negative: with ``eps = 0`` a constant column
      has an infinite gradient.
    * The covariance term is computed through the N × N product when D > 2N (the same value,
      at a fraction of the cost; see
      :func:`~dmlkit.functional.self_supervised.vicreg_statistics`), and the gradients are
      first-order only.

    Args:
        invariance_lambda: λ, the weight of the invariance term.
        variance_mu: μ, the weight of the variance terms.
        covariance_v: ν, the weight of the covariance terms.
        eps: Added to each variance before the square root.
        reducer: Reduces the invariance terms and each view's variance terms, separately (PML
            applies a copy of it to each); default ``MeanReducer()``.
        embedding_regularizer: Regulariser of ``embeddings``, or None (see
            :class:`~dmlkit.losses.base.BaseMetricLossFunction`).
        embedding_reg_weight: Its weight.
    """

    def __init__(
        self,
        invariance_lambda: float = 25,
        variance_mu: float = 25,
        covariance_v: float = 1,
        eps: float = 1e-4,
        reducer: Reducer | None = None,
        embedding_regularizer: BaseRegularizer | None = None,
        embedding_reg_weight: float = 1,
    ) -> None:
        super().__init__(None, reducer, embedding_regularizer, embedding_reg_weight)
        self.invariance_lambda = _check_weight(invariance_lambda, "invariance_lambda")
        self.variance_mu = _check_weight(variance_mu, "variance_mu")
        self.covariance_v = _check_weight(covariance_v, "covariance_v")
        self.eps = check_positive_number(eps, "eps")

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor | None = None,
        indices_tuple: tuple[Tensor, ...] | None = None,
        ref_emb: Tensor | None = None,
        ref_labels: Tensor | None = None,
        anchor_in_ref: Tensor | None = None,
    ) -> Tensor:
        """Computes the loss of two views.

        Args:
            embeddings: (N, D) first views, N ≥ 2.
            labels: Refused: the pairs are given by the rows.
            indices_tuple: Refused.
            ref_emb: (N, D) second views, row ``i`` a view of the same input as
                ``embeddings[i]``; None uses ``embeddings`` again.
            ref_labels: Refused.
            anchor_in_ref: Refused.

        Returns:
            Scalar loss, in the dtype of ``embeddings``.
        """
        if labels is not None or ref_labels is not None:
            raise ValueError(
                "VICRegLoss takes no labels or ref_labels: embeddings[i] and ref_emb[i] are two "
                "views of one input; call it as loss(embeddings, ref_emb=ref_emb)"
            )
        if indices_tuple is not None:
            raise ValueError("VICRegLoss does not support indices_tuple")
        if anchor_in_ref is not None:
            raise ValueError("VICRegLoss does not support anchor_in_ref")
        emb = check_embeddings(embeddings)
        ref = emb if ref_emb is None else check_embeddings(ref_emb, "ref_emb")
        if ref.shape != emb.shape:
            raise ValueError(
                f"ref_emb has shape {tuple(ref.shape)} but embeddings have {tuple(emb.shape)}: "
                "VICRegLoss pairs embeddings[i] with ref_emb[i]"
            )
        if ref.dtype != emb.dtype or ref.device != emb.device:
            raise ValueError(
                f"ref_emb ({ref.dtype}, {ref.device}) must match embeddings ({emb.dtype}, "
                f"{emb.device})"
            )
        if emb.shape[0] < 2:
            raise ValueError(
                f"VICRegLoss needs at least 2 embeddings (its variances and covariances are "
                f"over the batch), got {emb.shape[0]}"
            )
        if emb.dtype in _LOW_PRECISION:
            emb, ref = emb.float(), ref.float()
        loss = vicreg_loss(
            emb,
            ref,
            self.invariance_lambda,
            self.variance_mu,
            self.covariance_v,
            self.eps,
            self.reducer,
        )
        loss = add_regularization(loss, self.embedding_regularizer, self.embedding_reg_weight, emb)
        return loss.to(embeddings.dtype)

    def extra_repr(self) -> str:
        text = (
            f"invariance_lambda={self.invariance_lambda}, variance_mu={self.variance_mu}, "
            f"covariance_v={self.covariance_v}, eps={self.eps}, reducer={self.reducer!r}"
        )
        if self.embedding_regularizer is not None:
            text += f", embedding_reg_weight={self.embedding_reg_weight}"
        return text


def _check_weight(value: object, name: str) -> float:
    """A term's weight: a finite real number ≥ 0 (0 leaves the term out)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"{name} must be a non-negative number, got {value!r}")
    return float(value)


__all__ = ["VICRegLoss"]
