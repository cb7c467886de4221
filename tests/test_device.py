"""The device check (``make bench-gpu`` runs it): every registered loss and miner, the kNN, a
few training steps with mixed precision and DDTAS give on the device what they give on the CPU.

The device is ``$DMLKIT_TEST_DEVICE`` (``cuda`` or ``cpu``), else CUDA when present; without
either the module skips. ``DMLKIT_TEST_DEVICE=cpu`` runs the same checks on the CPU against
itself, so the check cannot rot on machines without a GPU.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import torch

from components import ALL_LOSSES, ALL_MINERS, make
from dmlkit.ddtas import DDTAS, OTGSettings
from dmlkit.evaluation.knn import TorchKNN
from dmlkit.models.inference import embed_dataset
from dmlkit.training import Trainer, load_config
from run_helpers import DIGITS_RUN

_NAMED = os.environ.get("DMLKIT_TEST_DEVICE")
DEVICE = torch.device(_NAMED or ("cuda" if torch.cuda.is_available() else "cpu"))
pytestmark = pytest.mark.skipif(
    _NAMED is None and not torch.cuda.is_available(),
    reason="no CUDA device (set DMLKIT_TEST_DEVICE=cpu to run the device checks on the CPU)",
)
if DEVICE.type == "cuda" and not torch.cuda.is_available():
    pytestmark = pytest.mark.skip(reason="DMLKIT_TEST_DEVICE=cuda but CUDA is not available")

# float32 on two devices: reductions in another order.
RTOL, ATOL = 1e-4, 1e-5


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(48) // 4
    centres = torch.randn(12, 16, generator=g)
    return centres[labels] + 0.5 * torch.randn(48, 16, generator=g), labels


@pytest.mark.parametrize("cls", ALL_LOSSES, ids=lambda c: c.__name__)
def test_losses_give_the_cpu_value_and_gradient(cls: type) -> None:
    emb, labels = _batch()
    torch.manual_seed(0)
    loss = make(cls, embedding_size=16)
    moved = make(cls, embedding_size=16)
    moved.load_state_dict(loss.state_dict())
    moved = moved.to(DEVICE)
    x_cpu = emb.clone().requires_grad_(True)
    x_dev = emb.to(DEVICE).requires_grad_(True)
    value_cpu = loss(x_cpu, labels)
    value_dev = moved(x_dev, labels.to(DEVICE))
    value_cpu.backward()
    value_dev.backward()
    torch.testing.assert_close(value_dev.cpu(), value_cpu.detach(), rtol=RTOL, atol=ATOL)
    assert x_cpu.grad is not None and x_dev.grad is not None
    torch.testing.assert_close(x_dev.grad.cpu(), x_cpu.grad, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("cls", ALL_MINERS, ids=lambda c: c.__name__)
def test_miners_give_the_cpu_tuples(cls: type) -> None:
    emb, labels = _batch(1)
    if "generator" in cls.__init__.__code__.co_varnames:
        on_cpu = make(cls, generator=torch.Generator().manual_seed(3))(emb, labels)
        on_dev = make(cls, generator=torch.Generator().manual_seed(3))(
            emb.to(DEVICE), labels.to(DEVICE)
        )
    else:
        on_cpu = make(cls)(emb, labels)
        on_dev = make(cls)(emb.to(DEVICE), labels.to(DEVICE))
    assert len(on_cpu) == len(on_dev)
    assert all(b.device.type == DEVICE.type for b in on_dev)
    # The same tuples, in whatever order the device produced them (pairs: each side apart).
    groups = [(0, 1), (2, 3)] if len(on_cpu) == 4 else [(0, 1, 2)]
    for group in groups:
        for side in (on_cpu, on_dev):
            assert len({side[i].numel() for i in group}) == 1
        cpu_rows = sorted(zip(*[on_cpu[i].tolist() for i in group], strict=True))
        dev_rows = sorted(zip(*[on_dev[i].cpu().tolist() for i in group], strict=True))
        assert dev_rows == cpu_rows


def test_knn_gives_the_cpu_neighbours() -> None:
    g = torch.Generator().manual_seed(2)
    ref = torch.randn(3000, 32, generator=g)
    query = torch.randn(200, 32, generator=g)
    knn = TorchKNN("cosine")
    on_cpu = torch.cat([b.indices for b in knn.search(query, 10, ref)])
    on_dev = torch.cat([b.indices.cpu() for b in knn.search(query.to(DEVICE), 10, ref.to(DEVICE))])
    agree = (on_cpu == on_dev).float().mean()
    assert float(agree) > 0.99  # ties between nearly equal scores may swap


def test_training_steps_with_mixed_precision_and_bf16_embedding(tmp_path: Path) -> None:
    overrides = [
        *DIGITS_RUN,
        f"train.device={DEVICE.type}",
        "train.amp=true",
        "train.max_steps=3",
        "sampler.classes_per_batch=5",
        "sampler.samples_per_class=4",
        "logging.progress=false",
        "validation.every=0",
    ]
    trainer = Trainer(load_config(None, overrides), tmp_path)
    result = trainer.fit()
    assert result.steps == 3 and result.after is not None
    with pytest.warns(UserWarning) if DEVICE.type != "cuda" else contextlib.nullcontext():
        bf16, _ = embed_dataset(
            trainer.model, trainer.data.test, device=DEVICE, autocast="bf16", batch_size=128
        )
    full, _ = embed_dataset(trainer.model, trainer.data.test, device=DEVICE, batch_size=128)
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(bf16, full, rtol=0.05, atol=0.05)


def test_ddtas_step_gives_the_cpu_loss() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 8))
    emb, labels = _batch(4)
    meta, meta_labels = emb[:10], labels[:10] // 2
    on_cpu = DDTAS(otg=OTGSettings(virtual_lr=1e-3))(model, emb, labels, (meta, meta_labels))
    moved = model.to(DEVICE)
    on_dev = DDTAS(otg=OTGSettings(virtual_lr=1e-3))(
        moved, emb.to(DEVICE), labels.to(DEVICE), (meta.to(DEVICE), meta_labels.to(DEVICE))
    )
    torch.testing.assert_close(
        on_dev.loss.detach().cpu(), on_cpu.loss.detach(), rtol=1e-3, atol=1e-5
    )
