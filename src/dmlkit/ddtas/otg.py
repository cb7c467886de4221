"""The Online Threshold Generator's computations on a model (docs/ddtas.md §5), with torch.func.

Both exact forms are here. The literal one (§5.1) takes a virtual SGD step
θ̂ = θ − η·∇_θ L^t(θ, λ), evaluates the meta loss at θ̂ and differentiates it with respect to the
per-pair variables λ by double backward. The closed form (§5.3) uses that at λ = 0 the virtual
step is a no-op, so u_k = η·c_k·⟨∇_θ L^m(θ), ∇_θ S_k(θ)⟩ exactly: one backward pass on the meta
batch and one forward-mode Jacobian-vector product on the training batch. That product uses
PyTorch's forward-mode rules except where they waste work on an exact tangent: a first layer
(no tangent on its input) and BatchNorm on batch statistics (:class:`_LeanTangents`).

The variants' first-order form (:func:`first_order_gradient`) generalises the closed form to any
variables of the training loss (per-pair loss weights, a threshold): ∂L^m(θ̂(v))/∂v ≈
−η·∂²L^t/∂S∂v·(J_S·∇_θL^m), exact as η → 0 and at a v whose virtual step is a no-op.

``scope`` restricts the virtual step to part of the model (``"head"``, or
``"head_and_last_block"``), a cheaper OTG that differentiates fewer parameters.

The model is never copied or rebuilt: parameters are swapped with
``torch.func.functional_call``. Every virtual forward pass runs on copies of the buffers, so
the OTG never changes BatchNorm running statistics; the model runs in whatever mode the caller
left it (see :class:`~dmlkit.ddtas.DDTAS` for why).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Literal, get_args

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from ..functional.masks import PairIndices
from ..functional.pairwise import cosine_similarity_matrix

# The loss of a meta batch as a function of its (B, D) embeddings (the meta loss), or of the
# mined pairs' similarities and the OTG's variables (the training loss).
MetaLoss = Callable[[Tensor], Tensor]
PairTrainingLoss = Callable[[Tensor, Tensor], Tensor]
VirtualScope = Literal["all", "head", "head_and_last_block"]


def trainable_parameters(model: nn.Module, scope: VirtualScope = "all") -> dict[str, Tensor]:
    """The parameters the OTG differentiates: every one that requires grad, or those of the
    model's ``head`` (and of the last block of its ``backbone`` that has parameters; a
    backbone's unused classifier is not a block). A model without a ``head`` is all head."""
    chosen: dict[str, Tensor] = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if scope not in get_args(VirtualScope):
        raise ValueError(f"scope must be one of {get_args(VirtualScope)}, got {scope!r}")
    if scope == "all":
        return chosen
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Module):
        # A model without a separate head (the head alone, trained on cached features) is
        # all head.
        return chosen
    prefixes = ["head."]
    backbone = getattr(model, "backbone", None)
    if scope == "head_and_last_block" and isinstance(backbone, nn.Module):
        unused = getattr(backbone, "classifier_key", None)  # kept, never applied
        blocks = [
            name
            for name, block in backbone.named_modules()
            if name
            and not list(block.children())
            and any(True for _ in block.parameters())
            and (unused is None or name.split(".")[0] != unused)
        ]
        if blocks:
            # The last leaf module with parameters, and its siblings in the same parent block.
            parent = blocks[-1].rpartition(".")[0]
            prefixes.append(f"backbone.{parent}." if parent else f"backbone.{blocks[-1]}.")
    scoped: dict[str, Tensor] = {
        name: p for name, p in chosen.items() if name.startswith(tuple(prefixes))
    }
    if not scoped:
        raise ValueError(f"scope={scope!r} selects no parameter that requires grad")
    return scoped


def _math_attention() -> AbstractContextManager[None]:
    """Fused attention kernels have neither forward-mode nor second-order derivatives; the
    reference implementation has both."""
    return sdpa_kernel(SDPBackend.MATH)


def _tangent(value: object) -> Tensor | None:
    """The forward-mode tangent a tensor carries at the current dual level, if any."""
    return fwAD.unpack_dual(value).tangent if isinstance(value, Tensor) else None


def _primal(value: Any) -> Any:
    return fwAD.unpack_dual(value).primal if isinstance(value, Tensor) else value


def _affine_with_tangent(
    func: Callable[..., Tensor],
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *args: Any,
    **kwargs: Any,
) -> Tensor | None:
    """A linear or convolution layer whose input carries no tangent: the tangent is
    func(input, ẇ, ḃ), one call. PyTorch's rule would add func(0, w) on a zero tangent
    it materialises for the input, a whole wasted layer (the first layer of every model)."""
    if _tangent(input) is not None or _tangent(weight) is None:
        return None
    primal = func(input, _primal(weight), _primal(bias), *args, **kwargs)
    with torch.no_grad():
        tangent = func(input, _tangent(weight), _tangent(bias), *args, **kwargs)
    return fwAD.make_dual(primal, tangent)


class _BatchStatisticsNorm(torch.autograd.Function):
    """BatchNorm on the batch's own statistics, y = γ·x̂ + β with x̂ = (x − μ)·σ⁻¹, with a
    fused forward-mode rule.

    Per channel the Jacobian in x, γσ⁻¹(I − 11ᵀ/N − x̂x̂ᵀ/N), is symmetric, so its product
    with the input's tangent is the backward kernel applied to that tangent; the parameters
    add γ̇·x̂ + β̇. PyTorch's generic rule spends about a dozen passes over the activation on
    the same quantity, the costliest part of a ConvNet's tangent. Forward and backward are
    the primitives F.batch_norm reaches on the CPU, running statistics updated in place.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        momentum: float,
        eps: float,
    ) -> Tensor:
        out, mean, invstd = torch.native_batch_norm(
            x, weight, bias, running_mean, running_var, True, momentum, eps
        )
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.save_for_forward(x, weight, mean, invstd)
        ctx.eps = eps
        ctx.set_materialize_grads(False)  # absent tangents come as None, not zeros
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        if grad is None:
            return (None,) * 7
        x, weight, mean, invstd = ctx.saved_tensors
        grads = torch.ops.aten.native_batch_norm_backward(
            grad, x, weight, None, None, mean, invstd, True, ctx.eps, ctx.needs_input_grad[:3]
        )
        return (*grads, None, None, None, None)

    @staticmethod
    def jvp(  # type: ignore[override]
        ctx: Any,
        x_tangent: Tensor | None,
        weight_tangent: Tensor | None,
        bias_tangent: Tensor | None,
        *_: Any,
    ) -> Tensor:
        x, weight, mean, invstd = ctx.saved_tensors
        channel = (1, -1, *[1] * (x.ndim - 2))
        if x_tangent is None:
            tangent = torch.zeros_like(x)
        else:
            tangent = torch.ops.aten.native_batch_norm_backward(
                x_tangent, x, weight, None, None, mean, invstd, True, ctx.eps, [True, False, False]
            )[0]
        # γ̇·(x − μ)·σ⁻¹ + β̇ as x·a + b per channel, the forward kernel's own arithmetic.
        shift = bias_tangent
        if weight_tangent is not None:
            scale = weight_tangent * invstd
            tangent.addcmul_(x, scale.view(channel))
            shift = -mean * scale if shift is None else shift - mean * scale
        if shift is not None:
            tangent.add_(shift.view(channel))
        return tangent


def _batch_norm_with_tangent(
    func: Callable[..., Tensor],
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor | None:
    """F.batch_norm on batch statistics through :class:`_BatchStatisticsNorm`, when a tangent
    enters it."""
    if not training or input.ndim < 2 or input.numel() <= input.shape[1] or eps <= 0:
        return None  # running statistics (cheap already), or F.batch_norm's own error
    if all(_tangent(t) is None for t in (input, weight, bias)):
        return None
    out: Tensor = _BatchStatisticsNorm.apply(
        input, weight, bias, running_mean, running_var, momentum, eps
    )
    return out


_TANGENT_RULES: dict[Callable[..., Tensor], Callable[..., Tensor | None]] = {
    F.linear: _affine_with_tangent,
    F.conv1d: _affine_with_tangent,
    F.conv2d: _affine_with_tangent,
    F.conv3d: _affine_with_tangent,
    F.batch_norm: _batch_norm_with_tangent,
}


class _LeanTangents(TorchFunctionMode):
    """Forward-mode rules that do less work than PyTorch's for the same exact tangent, where
    they apply (:func:`_affine_with_tangent`, :class:`_BatchStatisticsNorm`); every other
    call, and every call they decline, runs as usual. The primal goes through the layer's
    own primitive, so its value, its autograd graph and the running statistics are those of
    an ordinary training forward pass."""

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        rule = _TANGENT_RULES.get(func)
        result = None if rule is None else rule(func, *args, **kwargs)
        return func(*args, **kwargs) if result is None else result


def _buffer_copies(model: nn.Module) -> dict[str, Tensor]:
    return {name: b.clone() for name, b in model.named_buffers()}


def _embeddings(model: nn.Module, parameters: dict[str, Tensor], x: Tensor) -> Tensor:
    """The model's embeddings with (some) parameters swapped, buffers untouched."""
    return functional_call(model, {**parameters, **_buffer_copies(model)}, (x,))


def _similarities(model: nn.Module, parameters: dict[str, Tensor], x: Tensor) -> Tensor:
    """Cosine matrix of the model's embeddings with swapped parameters, buffers untouched."""
    return cosine_similarity_matrix(_embeddings(model, parameters, x))


def meta_gradient(
    model: nn.Module, x_meta: Tensor, meta_loss: MetaLoss, scope: VirtualScope = "all"
) -> tuple[dict[str, Tensor], Tensor]:
    """v = ∇_θ L^m(θ) on the meta batch, without touching ``.grad`` or the buffers.

    Returns:
        (v by parameter name, the meta loss's value, detached).
    """
    parameters = trainable_parameters(model, scope)
    with torch.enable_grad(), _math_attention():
        loss = meta_loss(_embeddings(model, parameters, x_meta))
        grads = torch.autograd.grad(
            loss, list(parameters.values()), allow_unused=True, materialize_grads=True
        )
    return dict(zip(parameters, grads, strict=True)), loss.detach()


def similarities_with_tangent(
    model: nn.Module, x: Tensor, tangent: dict[str, Tensor]
) -> tuple[Tensor, Tensor, Tensor]:
    """The training forward pass, carrying a forward-mode tangent along parameter direction v.

    The returned similarity matrix keeps its ordinary autograd graph (so the real step can
    back-propagate through it); the tangent is J_S·v, the directional derivative of every
    similarity along v. Running statistics update as in any training forward pass: this is the
    real step's forward, shared with the OTG.

    Args:
        model: The embedding model, in the mode of the real step.
        x: The training batch.
        tangent: v by parameter name (see :func:`meta_gradient`); its parameters carry it,
            the others none.

    Returns:
        (embeddings with graph (B, D), S with graph (B, B), dS/dv detached (B, B)).
    """
    parameters = {name: p for name, p in model.named_parameters() if name in tangent}
    with fwAD.dual_level(), _math_attention():
        duals = {name: fwAD.make_dual(p, tangent[name]) for name, p in parameters.items()}
        with _LeanTangents():
            embeddings = functional_call(model, duals, (x,))
        sim, sim_tangent = fwAD.unpack_dual(cosine_similarity_matrix(embeddings))
        embeddings = fwAD.unpack_dual(embeddings).primal
    if sim_tangent is None:
        raise ValueError("the model's output does not depend on any parameter that requires grad")
    return embeddings, sim, sim_tangent.detach()


def closed_form_scores(
    slopes: Tensor, sim_tangent: Tensor, pairs: PairIndices, virtual_lr: float
) -> Tensor:
    """u_k = η·c_k·(J_S·v)_k (docs/ddtas.md §5.3): exact at λ = 0.

    Args:
        slopes: (K,) c_k = ∂L^t/∂(λ_k S_k) at λ = 0.
        sim_tangent: (B, B) J_S·v from :func:`similarities_with_tangent`.
        pairs: The mined pairs.
        virtual_lr: η.
    """
    return virtual_lr * slopes * pairs.take(sim_tangent)


def virtual_parameters(
    model: nn.Module,
    x: Tensor,
    pairs: PairIndices,
    variables: Tensor,
    training_loss: PairTrainingLoss,
    virtual_lr: float,
    scope: VirtualScope = "all",
) -> dict[str, Tensor]:
    """θ̂ = θ − η·∇_θ L^t(θ, λ), differentiable with respect to λ (docs/ddtas.md §5.1 step 5).

    Args:
        model: The embedding model.
        x: The training batch.
        pairs: The mined pairs.
        variables: (K,) λ, requiring grad.
        training_loss: L^t from the pairs' similarities and λ.
        virtual_lr: η (plain SGD, as released).
        scope: Which parameters take the virtual step.

    Returns:
        θ̂ by parameter name.
    """
    parameters = trainable_parameters(model, scope)
    with torch.enable_grad(), _math_attention():
        loss = training_loss(pairs.take(_similarities(model, parameters, x)), variables)
        grads = torch.autograd.grad(
            loss,
            list(parameters.values()),
            create_graph=True,
            allow_unused=True,
            materialize_grads=True,
        )
    return {
        name: p - virtual_lr * g for (name, p), g in zip(parameters.items(), grads, strict=True)
    }


def double_backward_gradient(
    model: nn.Module,
    x: Tensor,
    pairs: PairIndices,
    variables: Tensor,
    training_loss: PairTrainingLoss,
    x_meta: Tensor,
    meta_loss: MetaLoss,
    virtual_lr: float,
    scope: VirtualScope = "all",
) -> tuple[Tensor, Tensor]:
    """∂L^m(θ̂(λ))/∂λ by double backward through the virtual step (docs/ddtas.md §5.1 steps 5–8).

    Returns:
        ((K,) gradient with respect to λ, the meta loss at θ̂, detached).
    """
    variables = variables.detach().requires_grad_(True)
    with torch.enable_grad(), _math_attention():
        virtual = virtual_parameters(model, x, pairs, variables, training_loss, virtual_lr, scope)
        loss = meta_loss(_embeddings(model, virtual, x_meta))
        (grad,) = torch.autograd.grad(loss, variables, allow_unused=True, materialize_grads=True)
    return grad, loss.detach()


def first_order_gradient(
    training_loss: PairTrainingLoss,
    similarities: Tensor,
    variables: Tensor,
    pair_tangent: Tensor,
    virtual_lr: float,
) -> Tensor:
    """∂L^m(θ̂(v))/∂v to first order in η: −η·∂²L^t/∂v∂S·(J_S·∇_θL^m).

    From θ̂ = θ − η·J_Sᵀ∇_S L^t(S, v): ∂θ̂/∂v = −η·J_Sᵀ∂²L^t/∂S∂v, and ∇_θL^m(θ̂) ≈ ∇_θL^m(θ),
    so only the K pair similarities are differentiated twice (cheap), never the model. At
    the multiplier reading's λ = 0 it equals the closed form η·c_k·(J_S·v)_k exactly.

    Args:
        training_loss: L^t from the pairs' similarities and the variables.
        similarities: (K,) the mined pairs' similarities.
        variables: v, where the gradient is taken (any shape).
        pair_tangent: (K,) J_S·∇_θL^m of the pairs (from :func:`similarities_with_tangent`).
        virtual_lr: η.

    Returns:
        The gradient, shaped like ``variables``.
    """
    s = similarities.detach().requires_grad_(True)
    v = variables.detach().requires_grad_(True)
    with torch.enable_grad():
        (slopes,) = torch.autograd.grad(training_loss(s, v), s, create_graph=True)
        (grad,) = torch.autograd.grad(
            (slopes * pair_tangent).sum(), v, allow_unused=True, materialize_grads=True
        )
    return -virtual_lr * grad
