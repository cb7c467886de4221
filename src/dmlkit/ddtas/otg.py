"""The Online Threshold Generator's computations on a model (docs/ddtas.md §5), with torch.func.

Both exact forms are here. The literal one (§5.1) takes a virtual SGD step
θ̂ = θ − η·∇_θ L^t(θ, λ), evaluates the meta loss at θ̂ and differentiates it with respect to the
per-pair variables λ by double backward. The closed form (§5.3) uses that at λ = 0 the virtual
step is a no-op, so u_k = η·c_k·⟨∇_θ L^m(θ), ∇_θ S_k(θ)⟩ exactly: one backward pass on the meta
batch and one forward-mode Jacobian-vector product on the training batch.

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
from typing import Literal, get_args

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

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
