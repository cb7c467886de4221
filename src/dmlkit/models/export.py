"""Exporting a trained embedding model to ONNX or TorchScript, for serving without dmlkit.

The exported module takes a float image batch ``[N, C, H, W]``, already preprocessed (resized,
centre-cropped, normalised as the sidecar file says), and returns L2-normalised embeddings
``[N, D]``; the batch dimension is dynamic. The normalisation is part of the exported graph,
whether or not the model normalises its own output (normalising twice changes nothing).

Beside the model file ``<out>``, :func:`export_model` writes ``<out>.json``: the format, the
input shape, the preprocessing (resize, crop, mean/std, channel order, value scale), the
embedding size, the backbone name and fingerprints of the weights. Both files are written
atomically (a temporary file in the same folder, then a rename), so a failed export never
leaves a partial file.

ONNX export needs the ``onnx`` package and checking an ONNX file needs ``onnxruntime``
(``pip install dmlkit[export]``); TorchScript needs only torch.
"""

from __future__ import annotations

import copy
import io
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .embedding import EmbeddingModel
from .fingerprint import file_sha256, state_digest

if TYPE_CHECKING:
    from ..training.config import Config

ExportFormat = Literal["onnx", "torchscript"]
EXPORT_FORMATS: tuple[str, ...] = get_args(ExportFormat)
SIDECAR_FORMAT = "dmlkit-export"
SIDECAR_VERSION = 1
INPUT_NAME = "images"
OUTPUT_NAME = "embeddings"
ONNX_OPSET = 17
_INSTALL_HINT = "pip install dmlkit[export]"


class NormalizedEmbedding(nn.Module):
    """The module that is exported: the model's embeddings, L2-normalised along dim 1.

    Args:
        model: Maps ``[N, C, H, W]`` images to ``[N, D]`` embeddings.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Tensor:
        """Unit-length embeddings.

        Args:
            images: ``[N, C, H, W]``, preprocessed.

        Returns:
            ``[N, D]``.
        """
        return F.normalize(self.model(images), p=2.0, dim=1)


@dataclass(frozen=True)
class _Source:
    model: EmbeddingModel
    config: Config | None
    in_channels: int
    checkpoint: Path | None


def sidecar_path(out: str | os.PathLike[str]) -> Path:
    """The JSON file written beside an exported model: ``<out>.json`` (``model.onnx.json``).

    Args:
        out: The exported model's path.
    """
    out = Path(out)
    return out.with_name(out.name + ".json")


def _check_format(format: str) -> ExportFormat:
    if format not in EXPORT_FORMATS:
        raise ValueError(f"export format must be one of {EXPORT_FORMATS}, got {format!r}")
    return format  # type: ignore[return-value]


def _check_out(out: str | os.PathLike[str]) -> Path:
    path = Path(out)
    if path.is_dir():
        raise ValueError(f"export output {str(path)!r} is a folder; give a file name")
    if sidecar_path(path).is_dir():
        raise ValueError(f"{str(sidecar_path(path))!r} (the sidecar file's path) is a folder")
    return path


def _resolve_source(source: Any, config: Config | None) -> _Source:
    """A checkpoint path, a :class:`~dmlkit.training.Trainer` or an :class:`EmbeddingModel`."""
    if isinstance(source, str | os.PathLike):
        from ..training.checkpoint import load_checkpoint
        from ..training.inference import load_trained_model

        path = Path(source)
        if path.is_dir():
            raise ValueError(f"checkpoint {str(path)!r} is a folder; give a run's last.pt/best.pt")
        payload = load_checkpoint(path)  # ValueError when it is not a dmlkit checkpoint
        if "config" not in payload or "in_channels" not in payload:
            raise ValueError(
                f"{str(path)!r} is not a dmlkit training checkpoint (no config or in_channels)"
            )
        run_config, model = load_trained_model(path)
        return _Source(model, config or run_config, int(payload["in_channels"]), path)
    trainer_model = getattr(source, "model", None)
    data = getattr(source, "data", None)
    if isinstance(trainer_model, EmbeddingModel) and data is not None and hasattr(source, "config"):
        # A Trainer: copy its model, so exporting moves nothing and changes no mode.
        exported = copy.deepcopy(trainer_model).cpu().eval()
        return _Source(exported, config or source.config, int(data.in_channels), None)
    if isinstance(source, EmbeddingModel):
        first = next(source.parameters(), None)
        in_channels = int(first.shape[1]) if first is not None and first.ndim == 4 else 0
        return _Source(copy.deepcopy(source).cpu().eval(), config, in_channels, None)
    raise TypeError(
        "export_model needs a checkpoint path, a dmlkit Trainer or an EmbeddingModel, got "
        f"{type(source).__name__}"
    )


def _preprocessing(
    config: Config | None, in_channels: int
) -> tuple[tuple[int, int] | None, dict[str, Any]]:
    """The input (height, width) and the preprocessing of a run's evaluation data."""
    if config is None:
        return None, {"mean": None, "std": None, "note": "no run config: preprocessing unknown"}
    from ..training.preprocessing import evaluation_preprocessing, input_shape

    description = evaluation_preprocessing(config, in_channels)
    if description["kind"] == "image":
        recipe = (
            "resize the shorter side to 'resize', centre-crop 'crop' x 'crop', scale pixels to "
            "[0, value_scale], then (pixels - mean) / std per channel"
        )
    else:
        height, width = description["size"]
        description = {
            **description,
            "mean": [0.0] * in_channels,
            "std": [1.0] * in_channels,
            "value_scale": 1.0,
        }
        recipe = (
            f"read the image in {description['mode']} mode, scale pixels to [0, 1]"
            + (
                ", invert them (1 - x: the training arrays hold the ink as 1)"
                if description["invert"]
                else ""
            )
            + f", area-resize to {height} x {width}; no mean/std normalisation"
        )
    return input_shape(description), {**description, "recipe": recipe}


def _export_bytes(
    module: nn.Module, format: ExportFormat, example: Tensor, *, opset: int = ONNX_OPSET
) -> bytes:
    buffer = io.BytesIO()
    # The tracer warns about Python conditions on shapes (a backbone's "pool only if the map is
    # at least 2x2", the head's input check): they depend on C, H and W, which the export fixes,
    # never on the batch size, which stays dynamic.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # TorchScript and the TorchScript-based ONNX exporter are deprecated in recent torch
        # releases, but they are the exporters that trace these models fastest and exactly.
        warnings.simplefilter("ignore", DeprecationWarning)
        if format == "torchscript":
            traced = torch.jit.trace(module, example, check_trace=False)
            torch.jit.save(traced, buffer)
        else:
            try:
                import onnx  # noqa: F401  (torch.onnx needs it)
            except ImportError as error:
                raise ImportError(f"ONNX export needs the onnx package: {_INSTALL_HINT}") from error
            torch.onnx.export(
                module,
                (example,),
                buffer,  # type: ignore[arg-type]  # the TorchScript-based exporter takes a BytesIO
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
    return buffer.getvalue()


def _write_bytes_atomic(data: bytes, path: Path) -> Path:
    from ..training.checkpoint import _write_atomic

    return _write_atomic(path, lambda file: file.write(data))


def export_model(
    source: Any,
    format: ExportFormat,
    out: str | os.PathLike[str],
    *,
    config: Config | None = None,
    input_size: tuple[int, int, int] | None = None,
) -> Path:
    """Export an embedding model to ONNX or TorchScript, with a JSON sidecar beside it.

    Args:
        source: A run's checkpoint (``last.pt``/``best.pt``; its model is rebuilt as
            ``dmlkit embed`` does), a :class:`~dmlkit.training.Trainer` (its model is copied to
            the CPU), or an :class:`EmbeddingModel` (give ``config`` or ``input_size``).
        format: ``"onnx"`` or ``"torchscript"``.
        out: The model file; its folder is created if needed. ``<out>.json`` is written too.
        config: The run config that says the preprocessing; by default the checkpoint's or
            the trainer's.
        input_size: ``(C, H, W)`` of the input; by default from the config (the evaluation
            crop of an image dataset, ``data.image_size`` or the native side of an array one).

    Returns:
        The model file's path.

    Raises:
        ValueError: Unknown format, ``out`` is a folder, ``source`` is not a dmlkit checkpoint,
            or the input size cannot be worked out.
        ImportError: ONNX export without the ``onnx`` package.
    """
    fmt = _check_format(format)
    path = _check_out(out)
    resolved = _resolve_source(source, config)
    shape, preprocessing = _preprocessing(resolved.config, resolved.in_channels)
    if input_size is None:
        if shape is None or resolved.in_channels < 1:
            raise ValueError(
                "cannot tell the model's input size from its config; pass input_size=(C, H, W)"
            )
        input_size = (resolved.in_channels, *shape)
    if len(input_size) != 3 or any(int(v) < 1 for v in input_size):
        raise ValueError(f"input_size must be (C, H, W) with positive sides, got {input_size}")
    channels, height, width = (int(v) for v in input_size)
    model = resolved.model.eval()
    wrapper = NormalizedEmbedding(model).eval()
    # A batch of 2, so no exporter specialises the graph to a single item.
    example = torch.zeros(2, channels, height, width)
    data = _export_bytes(wrapper, fmt, example)
    backbone = (
        resolved.config.model.backbone
        if resolved.config is not None
        else type(model.backbone).__name__
    )
    sidecar: dict[str, Any] = {
        "format": SIDECAR_FORMAT,
        "version": SIDECAR_VERSION,
        "export_format": fmt,
        "file": path.name,
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "input_shape": ["batch", channels, height, width],
        "input_size": [channels, height, width],
        "dtype": "float32",
        "preprocessing": preprocessing,
        "embedding_size": model.head.embedding_dim,
        "l2_normalized": True,
        "backbone": backbone,
        "pooling": model.pool.mode,
        "fingerprint": {
            "model_digest": state_digest(model),
            "backbone_digest": state_digest(model.backbone),
            "checkpoint_sha256": (
                file_sha256(resolved.checkpoint) if resolved.checkpoint is not None else None
            ),
        },
        "checkpoint": str(resolved.checkpoint) if resolved.checkpoint is not None else None,
        "torch_version": torch.__version__,
        "onnx_opset": ONNX_OPSET if fmt == "onnx" else None,
    }
    _write_bytes_atomic(data, path)
    from ..training.checkpoint import write_text_atomic

    write_text_atomic(json.dumps(sidecar, indent=2) + "\n", sidecar_path(path))
    return path


def read_sidecar(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The sidecar of an exported model (``<path>.json``).

    Args:
        path: The exported model's path.

    Raises:
        FileNotFoundError: No sidecar.
        ValueError: The sidecar is not a dmlkit export's.
    """
    side = sidecar_path(path)
    if not side.is_file():
        raise FileNotFoundError(f"export sidecar {str(side)!r} not found")
    content = json.loads(side.read_text())
    if not isinstance(content, dict) or content.get("format") != SIDECAR_FORMAT:
        raise ValueError(f"{str(side)!r} is not a dmlkit export sidecar")
    return content


def _format_of(path: Path, format: str | None) -> ExportFormat:
    if format is not None:
        return _check_format(format)
    side = sidecar_path(path)
    if side.is_file():
        try:
            return _check_format(str(read_sidecar(path).get("export_format")))
        except ValueError:
            pass  # an unreadable sidecar says nothing: the suffix decides
    return "onnx" if path.suffix.lower() == ".onnx" else "torchscript"


def run_exported(
    path: str | os.PathLike[str], inputs: Tensor, *, format: ExportFormat | None = None
) -> Tensor:
    """Run an exported model file on a batch.

    Args:
        path: An ONNX or TorchScript file written by :func:`export_model`.
        inputs: ``[N, C, H, W]`` preprocessed images.
        format: ``"onnx"`` or ``"torchscript"``; by default the sidecar's, else ``.onnx`` files
            are ONNX and others TorchScript.

    Returns:
        The embeddings ``[N, D]``, float32 on the CPU.

    Raises:
        ImportError: An ONNX file without ``onnxruntime`` installed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"exported model {str(path)!r} not found")
    fmt = _format_of(path, format)
    batch = inputs.detach().cpu().float().contiguous()
    if fmt == "onnx":
        try:
            import onnxruntime
        except ImportError as error:
            raise ImportError(
                f"checking an ONNX export needs onnxruntime: {_INSTALL_HINT}"
            ) from error
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        (result,) = session.run(None, {name: batch.numpy()})
        return torch.from_numpy(result)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated in 2.9+
        loaded = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        out: Tensor = loaded(batch)
    return out.float()


def check_export(
    path: str | os.PathLike[str],
    model: nn.Module,
    inputs: Tensor,
    *,
    format: ExportFormat | None = None,
) -> float:
    """The largest absolute difference between an exported model's embeddings and the PyTorch
    model's (L2-normalised, as exported) on ``inputs``.

    Args:
        path: The exported file.
        model: The PyTorch model it was exported from; run in evaluation mode on the CPU and
            returned to its original mode.
        inputs: ``[N, C, H, W]`` preprocessed images.
        format: See :func:`run_exported`.

    Returns:
        ``max |exported - reference|`` over every embedding entry.

    Raises:
        ImportError: An ONNX file without ``onnxruntime`` (the message says what to install).
        ValueError: The two outputs' shapes differ.
    """
    exported = run_exported(path, inputs, format=format)
    was_training = model.training
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    model.eval()
    try:
        with torch.no_grad():
            reference = NormalizedEmbedding(model)(inputs.to(device).float()).float().cpu()
    finally:
        model.train(was_training)
    if reference.shape != exported.shape:
        raise ValueError(
            f"exported model gives shape {tuple(exported.shape)}, the model "
            f"{tuple(reference.shape)}"
        )
    return float((exported - reference).abs().max().item())
