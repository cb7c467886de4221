"""The Online Threshold Generator's computations on a model (docs/ddtas.md §5), with torch.func.

Both exact forms are here. The literal one (§5.1) takes a virtual SGD step
θ̂ = θ − η·∇_θ L^t(θ, λ), evaluates the meta loss at θ̂ and differentiates it with respect to the
per-pair variables λ by double backward. The closed form (§5.3) uses that at λ = 0 the virtual
step is a no-op, so u_k = η·c_k·⟨∇_θ L^m(θ), ∇_θ S_k(θ)⟩ exactly: one backward pass on the meta
batch and one forward-mode Jacobian-vector product on the training batch.

The model is never copied or rebuilt: parameters are swapped with
``torch.func.functional_call``. Every virtual forward pass runs on copies of the buffers, so
the OTG never changes BatchNorm running statistics; the model runs in whatever mode the caller
left it (see :class:`~dmlkit.ddtas.DDTAS` for why).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..functional.masks import PairIndices
from ..functional.pairwise import cosine_similarity_matrix

# The loss of a batch as a function of its (B, B) cosine similarity matrix (the meta loss), or
# of the mined pairs' similarities and the per-pair OTG variables (the training loss).
MetaLoss = Callable[[Tensor], Tensor]
PairTrainingLoss = Callable[[Tensor, Tensor], Tensor]


def trainable_parameters(model: nn.Module) -> dict[str, Tensor]:
    """The parameters the OTG differentiates: every one that requires grad."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _math_attention() -> AbstractContextManager[None]:
    """Fused attention kernels have neither forward-mode nor second-order derivatives; the
    reference implementation has both."""
    return sdpa_kernel(SDPBackend.MATH)


def _buffer_copies(model: nn.Module) -> dict[str, Tensor]:
    return {name: b.clone() for name, b in model.named_buffers()}


def _similarities(model: nn.Module, parameters: dict[str, Tensor], x: Tensor) -> Tensor:
    """Cosine matrix of the model's embeddings with swapped parameters, buffers untouched."""
    return cosine_similarity_matrix(
        functional_call(model, {**parameters, **_buffer_copies(model)}, (x,))
    )


def meta_gradient(
    model: nn.Module, x_meta: Tensor, meta_loss: MetaLoss
) -> tuple[dict[str, Tensor], Tensor]:
    """v = ∇_θ L^m(θ) on the meta batch, without touching ``.grad`` or the buffers.

    Returns:
        (v by parameter name, the meta loss's value, detached).
    """
    parameters = trainable_parameters(model)
    with torch.enable_grad(), _math_attention():
        loss = meta_loss(_similarities(model, parameters, x_meta))
        grads = torch.autograd.grad(
            loss, list(parameters.values()), allow_unused=True, materialize_grads=True
        )
    return dict(zip(parameters, grads, strict=True)), loss.detach()


def similarities_with_tangent(
    model: nn.Module, x: Tensor, tangent: dict[str, Tensor]
) -> tuple[Tensor, Tensor]:
    """The training forward pass, carrying a forward-mode tangent along parameter direction v.

    The returned similarity matrix keeps its ordinary autograd graph (so the real step can
    back-propagate through it); the tangent is J_S·v, the directional derivative of every
    similarity along v. Running statistics update as in any training forward pass: this is the
    real step's forward, shared with the OTG.

    Args:
        model: The embedding model, in the mode of the real step.
        x: The training batch.
        tangent: v by parameter name (see :func:`meta_gradient`).

    Returns:
        (S with graph, dS/dv detached), both (B, B).
    """
    parameters = trainable_parameters(model)
    with fwAD.dual_level(), _math_attention():
        duals = {name: fwAD.make_dual(p, tangent[name]) for name, p in parameters.items()}
        sim, sim_tangent = fwAD.unpack_dual(
            cosine_similarity_matrix(functional_call(model, duals, (x,)))
        )
    if sim_tangent is None:
        raise ValueError("the model's output does not depend on any parameter that requires grad")
    return sim, sim_tangent.detach()


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
) -> dict[str, Tensor]:
    """θ̂ = θ − η·∇_θ L^t(θ, λ), differentiable with respect to λ (docs/ddtas.md §5.1 step 5).

    Args:
        model: The embedding model.
        x: The training batch.
        pairs: The mined pairs.
        variables: (K,) λ, requiring grad.
        training_loss: L^t from the pairs' similarities and λ.
        virtual_lr: η (plain SGD, as released).

    Returns:
        θ̂ by parameter name.
    """
    parameters = trainable_parameters(model)
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
) -> tuple[Tensor, Tensor]:
    """∂L^m(θ̂(λ))/∂λ by double backward through the virtual step (docs/ddtas.md §5.1 steps 5–8).

    Returns:
        ((K,) gradient with respect to λ, the meta loss at θ̂, detached).
    """
    variables = variables.detach().requires_grad_(True)
    with torch.enable_grad(), _math_attention():
        virtual = virtual_parameters(model, x, pairs, variables, training_loss, virtual_lr)
        loss = meta_loss(_similarities(model, virtual, x_meta))
        (grad,) = torch.autograd.grad(loss, variables, allow_unused=True, materialize_grads=True)
    return grad, loss.detach()
