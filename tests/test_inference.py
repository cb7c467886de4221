"""embed_dataset: inference mode, channels-last, DataLoader workers, autocast, and what it must
leave untouched (the model's mode and memory format, the global RNG)."""

from __future__ import annotations

from typing import cast

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from dmlkit.data import ArrayDataset, LabelledDataset
from dmlkit.models import EmbeddingModel, build_model
from dmlkit.training import embed_dataset


@torch.no_grad()
def _old_embed(model: nn.Module, dataset: LabelledDataset, batch_size: int) -> Tensor:
    """The previous implementation (contiguous, no_grad, no workers), as the reference."""
    was_training = model.training
    model.eval()
    loader: DataLoader[tuple[Tensor, int]] = DataLoader(
        cast(Dataset[tuple[Tensor, int]], dataset), batch_size=batch_size, shuffle=False
    )
    chunks = [model(x).float().cpu() for x, _ in loader]
    model.train(was_training)
    return torch.cat(chunks)


def _images(n: int = 10, size: int = 20, channels: int = 3) -> ArrayDataset:
    generator = torch.Generator().manual_seed(1)
    data = torch.rand(n, channels, size, size, generator=generator)
    return ArrayDataset(data, np.arange(n) % 3)


def _convnet(**options: object) -> EmbeddingModel:
    torch.manual_seed(2)
    model = build_model("convnet", 16, width=8, depth=2, **options)  # type: ignore[arg-type]
    # Non-trivial BatchNorm statistics, so evaluation mode matters.
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            assert module.running_mean is not None and module.running_var is not None
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model


def _state(model: nn.Module) -> list[tuple[str, int, tuple[int, ...], Tensor]]:
    """Each tensor's name, storage pointer, strides and a copy of its values."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    return [(n, t.data_ptr(), t.stride(), t.detach().clone()) for n, t in tensors]


def _assert_same_state(
    model: nn.Module, before: list[tuple[str, int, tuple[int, ...], Tensor]]
) -> None:
    after = _state(model)
    assert [(n, p, s) for n, p, s, _ in after] == [(n, p, s) for n, p, s, _ in before]
    for (_, _, _, a), (_, _, _, b) in zip(after, before, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("model_factory", ["convnet", "mobilenet_v2"])
def test_default_path_matches_the_old_loop(model_factory: str) -> None:
    if model_factory == "convnet":
        model: nn.Module = _convnet()
        dataset = _images()
    else:
        torch.manual_seed(3)
        model = build_model("mobilenet_v2", 16)
        dataset = _images(n=6, size=64)
    expected = _old_embed(model, dataset, batch_size=4)
    embeddings, labels = embed_dataset(model, dataset, batch_size=4)
    assert embeddings.dtype == torch.float32 and embeddings.shape == expected.shape
    torch.testing.assert_close(embeddings, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(labels, dataset.labels)


def test_contiguous_path_is_bitwise_the_old_loop() -> None:
    model, dataset = _convnet(), _images()
    expected = _old_embed(model, dataset, batch_size=3)
    embeddings, _ = embed_dataset(model, dataset, batch_size=3, channels_last=False)
    assert torch.equal(embeddings, expected)


def test_channels_last_matches_contiguous() -> None:
    model, dataset = _convnet(), _images()
    contiguous, _ = embed_dataset(model, dataset, batch_size=4, channels_last=False)
    nhwc, _ = embed_dataset(model, dataset, batch_size=4, channels_last=True)
    torch.testing.assert_close(nhwc, contiguous, rtol=1e-4, atol=1e-5)


def test_workers_give_the_same_embeddings() -> None:
    model, dataset = _convnet(), _images()
    serial, _ = embed_dataset(model, dataset, batch_size=4)
    parallel, _ = embed_dataset(model, dataset, batch_size=4, num_workers=2)
    assert torch.equal(parallel, serial)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_global_rng_is_not_consumed(num_workers: int) -> None:
    model, dataset = _convnet(), _images()
    state = torch.get_rng_state()
    embed_dataset(model, dataset, batch_size=4, num_workers=num_workers)
    assert torch.equal(torch.get_rng_state(), state)


def test_random_transform_does_not_advance_the_global_rng() -> None:
    model = _convnet()
    data = torch.rand(6, 3, 20, 20)
    dataset = ArrayDataset(data, np.zeros(6, dtype=np.int64), transform=lambda x: x + torch.rand(1))
    state = torch.get_rng_state()
    embed_dataset(model, dataset, batch_size=4)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("channels_last", [None, True, False])
def test_model_mode_and_memory_format_are_restored(
    training: bool, channels_last: bool | None
) -> None:
    model = _convnet(freeze_bn=True).train(training)
    modes = [m.training for m in model.modules()]
    params = list(model.parameters())
    before = _state(model)
    embed_dataset(model, _images(), batch_size=4, channels_last=channels_last)
    assert [m.training for m in model.modules()] == modes
    assert list(model.parameters()) == params  # the same Parameter objects
    assert all(p.is_contiguous() for p in params)
    _assert_same_state(model, before)


def test_a_channels_last_model_stays_channels_last() -> None:
    model = _convnet().to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    before = _state(model)
    embed_dataset(model, _images(), batch_size=4, channels_last=False)
    _assert_same_state(model, before)
    conv = next(p for p in model.parameters() if p.ndim == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last)


class _Failing(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        self.bn(self.conv(x))
        raise RuntimeError("boom")


def test_state_is_restored_when_the_model_raises() -> None:
    model = _Failing().train()
    before = _state(model)
    rng = torch.get_rng_state()
    with pytest.raises(RuntimeError, match="boom"):
        embed_dataset(model, _images(), batch_size=4)
    assert model.training and model.bn.training
    _assert_same_state(model, before)
    assert torch.equal(torch.get_rng_state(), rng)


def test_flat_inputs_run_as_before() -> None:
    """A head on cached features: 2-D inputs, no layout change."""
    torch.manual_seed(4)
    head = nn.Sequential(nn.Linear(12, 8), nn.Dropout(0.5))
    dataset = ArrayDataset(torch.randn(9, 12), np.arange(9))
    expected = _old_embed(head, dataset, batch_size=4)
    embeddings, _ = embed_dataset(head, dataset, batch_size=4)
    assert torch.equal(embeddings, expected)
    assert head.training
    with pytest.raises(ValueError, match="4-D"):
        embed_dataset(head, dataset, channels_last=True)


def test_result_is_an_ordinary_tensor() -> None:
    embeddings, _ = embed_dataset(_convnet(), _images(), batch_size=4)
    assert not embeddings.is_inference()
    assert embeddings.is_contiguous()
    embeddings.mul_(2.0)  # in-place use outside inference mode is allowed


def test_autocast_is_ignored_with_a_warning_on_cpu() -> None:
    model, dataset = _convnet(), _images()
    expected, _ = embed_dataset(model, dataset, batch_size=4)
    with pytest.warns(UserWarning, match="only used on CUDA"):
        embeddings, _ = embed_dataset(model, dataset, batch_size=4, autocast="bf16")
    assert torch.equal(embeddings, expected)
    with pytest.raises(ValueError, match="autocast must be"):
        embed_dataset(model, dataset, autocast="fp8")  # type: ignore[arg-type]


def test_empty_dataset_is_refused() -> None:
    empty = ArrayDataset(torch.zeros(0, 3, 8, 8), np.zeros(0, dtype=np.int64))
    with pytest.raises(ValueError, match="empty"):
        embed_dataset(_convnet(), empty)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("autocast", [None, "bf16", "fp16"])
def test_cuda_matches_cpu(autocast: str | None) -> None:
    model, dataset = _convnet(), _images()
    expected, _ = embed_dataset(model, dataset, batch_size=4)
    model.cuda()
    embeddings, _ = embed_dataset(
        model,
        dataset,
        batch_size=4,
        device="cuda",
        num_workers=1,
        autocast=autocast,  # type: ignore[arg-type]
    )
    tolerance = 1e-4 if autocast is None else 5e-2
    torch.testing.assert_close(embeddings, expected, rtol=tolerance, atol=tolerance)
