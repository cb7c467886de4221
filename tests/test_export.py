"""Model export (:mod:`dmlkit.models.export`): ONNX and TorchScript parity with PyTorch at two
batch sizes (the batch axis is dynamic), on real Omniglot and CUB images where ``$DMLKIT_DATA``
has them; the JSON sidecar; export from a checkpoint and from a Trainer; errors; atomic writes.

Models are small and untrained (the project's builders, no pretrained weights); the checkpoint
comes from a 2-step run on scikit-learn's digits.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dmlkit.data import eval_transform, omniglot
from dmlkit.models import EmbeddingModel
from dmlkit.models.export import (
    check_export,
    export_model,
    read_sidecar,
    run_exported,
    sidecar_path,
)
from dmlkit.models.fingerprint import state_digest
from dmlkit.training import Config, Trainer, load_config, split_dataset
from dmlkit.training.builders import build_embedding_model
from dmlkit.training.inference import load_trained_model
from real_data import REAL_DATA
from run_helpers import DIGITS_RUN

FORMATS = ("onnx", "torchscript")
SUFFIX = {"onnx": ".onnx", "torchscript": ".pt"}
TOLERANCE = 1e-4
BATCHES = (2, 5)  # two batch sizes: the exported batch axis is dynamic


def _real(name: str, what: str) -> Path:
    path = REAL_DATA / name
    if not path.is_dir():
        pytest.skip(f"{path} not found; {what} export tests skipped")
    return path


def _model(config: Config, in_channels: int) -> EmbeddingModel:
    torch.manual_seed(0)
    return build_embedding_model(config.model, in_channels, pretrained=False).eval()


def _assert_parity(path: Path, model: EmbeddingModel, images: torch.Tensor) -> None:
    for batch in BATCHES:
        inputs = images[:batch]
        assert inputs.shape[0] == batch
        diff = check_export(path, model, inputs)
        assert diff <= TOLERANCE, f"{path.name}, batch {batch}: max abs diff {diff}"
        out = run_exported(path, inputs)
        assert out.shape == (batch, model.head.embedding_dim)
        assert torch.allclose(out.norm(dim=1), torch.ones(batch), atol=1e-5)


# --- ConvNet on Omniglot (1 channel, 105 x 105) -------------------------------------------


@pytest.fixture(scope="module")
def omniglot_images() -> torch.Tensor:
    root = _real("omniglot", "Omniglot")
    dataset = omniglot(root, "evaluation")
    # Characters of different alphabets (20 drawings per character).
    return torch.stack([dataset[i * 997][0] for i in range(max(BATCHES))])


@pytest.mark.parametrize("fmt", FORMATS)
def test_convnet_parity_on_omniglot(
    fmt: str, omniglot_images: torch.Tensor, tmp_path: Path
) -> None:
    config = load_config(None, ["data.name=omniglot", "model.backbone=convnet"])
    model = _model(config, 1)
    path = export_model(model, fmt, tmp_path / f"convnet{SUFFIX[fmt]}", config=config)  # type: ignore[arg-type]
    assert omniglot_images.shape[1:] == (1, 105, 105)
    side = read_sidecar(path)
    assert side["input_size"] == [1, 105, 105]
    # Omniglot's image files are dark ink on white; its arrays (the model's input) hold ink = 1.
    prep = side["preprocessing"]
    assert prep["invert"] is True and prep["mode"] == "L" and prep["size"] == [105, 105]
    assert "invert" in prep["recipe"]
    _assert_parity(path, model, omniglot_images)


# --- MobileNetV2 on the CUB subset (3 channels) -------------------------------------------

MOBILENET = [
    "data.name=cub100_subset",
    "model.backbone=mobilenet_v2",
    "model.embedding_dim=32",
    "data.transform.eval_resize=128",
    "data.transform.eval_crop=112",
]


@pytest.fixture(scope="module", params=FORMATS)
def mobilenet_export(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, Path, EmbeddingModel, Config]:
    fmt = request.param
    config = load_config(None, MOBILENET)
    model = _model(config, 3)
    out = tmp_path_factory.mktemp("mobilenet") / f"mobilenet_v2{SUFFIX[fmt]}"
    return fmt, export_model(model, fmt, out, config=config), model, config  # type: ignore[arg-type]


def test_mobilenet_v2_parity_on_cub(
    mobilenet_export: tuple[str, Path, EmbeddingModel, Config],
) -> None:
    _, path, model, _ = mobilenet_export
    root = _real("cub100_subset", "CUB subset")
    files = sorted((root / "images").glob("*/*.jpg"))[::97][: max(BATCHES)]
    assert len(files) == max(BATCHES)
    # Preprocessed as the sidecar says: resize, centre crop to the model's input, normalise.
    side = read_sidecar(path)["preprocessing"]
    transform = eval_transform(
        resize=side["resize"], crop=side["crop"], mean=side["mean"], std=side["std"]
    )
    images = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])
    assert images.shape[1:] == (3, 112, 112)
    _assert_parity(path, model, images)


def test_mobilenet_v2_parity_on_random_inputs(
    mobilenet_export: tuple[str, Path, EmbeddingModel, Config],
) -> None:
    """Random tensors, not images: runs whether or not the CUB subset is present."""
    _, path, model, _ = mobilenet_export
    images = torch.randn(max(BATCHES), 3, 112, 112, generator=torch.Generator().manual_seed(0))
    _assert_parity(path, model, images)


def test_sidecar_of_an_image_dataset(
    mobilenet_export: tuple[str, Path, EmbeddingModel, Config],
) -> None:
    fmt, path, model, config = mobilenet_export
    assert sidecar_path(path) == path.with_name(path.name + ".json")
    side = json.loads(sidecar_path(path).read_text())
    assert side["format"] == "dmlkit-export" and side["export_format"] == fmt
    assert side["input_size"] == [3, 112, 112] and side["input_shape"][0] == "batch"
    assert side["embedding_size"] == 32 and side["backbone"] == "mobilenet_v2"
    assert side["l2_normalized"] is True
    prep = side["preprocessing"]
    assert prep["resize"] == 128 and prep["crop"] == 112
    assert prep["mean"] == list(config.data.transform.mean)
    assert prep["std"] == list(config.data.transform.std)
    assert prep["channel_order"] == "RGB" and prep["value_scale"] == 1.0
    assert side["fingerprint"]["model_digest"] == state_digest(model)
    assert side["fingerprint"]["checkpoint_sha256"] is None
    if fmt == "onnx":
        _assert_dynamic_batch(path)


def _assert_dynamic_batch(path: Path) -> None:
    import onnx

    graph = onnx.load(str(path)).graph
    for value in (graph.input[0], graph.output[0]):
        dims = value.type.tensor_type.shape.dim
        assert dims[0].dim_param == "batch" and not dims[0].HasField("dim_value")
    assert [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim[1:]] == [3, 112, 112]


# --- From a real checkpoint and from a Trainer ---------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Trainer, Path]:
    config = load_config(
        None,
        [
            *DIGITS_RUN,
            "train.max_steps=2",
            "sampler.classes_per_batch=5",
            "sampler.samples_per_class=4",
            "logging.progress=false",
            "validation.before_training=false",
        ],
    )
    run = tmp_path_factory.mktemp("run")
    trainer = Trainer(config, run)
    trainer.fit()
    checkpoint = run / "last.pt"
    assert checkpoint.is_file()
    return trainer, checkpoint


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_from_checkpoint(fmt: str, trained: tuple[Trainer, Path], tmp_path: Path) -> None:
    _, checkpoint = trained
    path = export_model(checkpoint, fmt, tmp_path / "sub" / f"digits{SUFFIX[fmt]}")  # type: ignore[arg-type]
    assert path == tmp_path / "sub" / f"digits{SUFFIX[fmt]}" and path.is_file()
    config, model = load_trained_model(checkpoint)
    test = split_dataset(config, "test")
    images = torch.stack([test[i][0] for i in range(0, 50 * max(BATCHES), 50)])
    _assert_parity(path, model, images)
    side = read_sidecar(path)
    assert side["input_size"] == [1, 8, 8] and side["backbone"] == "convnet"
    assert side["embedding_size"] == config.model.embedding_dim
    assert side["preprocessing"]["mean"] == [0.0] and side["preprocessing"]["std"] == [1.0]
    fingerprint = side["fingerprint"]
    assert fingerprint["model_digest"] == state_digest(model)
    import hashlib

    assert fingerprint["checkpoint_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert side["checkpoint"] == str(checkpoint)


def test_export_from_trainer(trained: tuple[Trainer, Path], tmp_path: Path) -> None:
    trainer, checkpoint = trained
    model = trainer.model
    was_training = model.training
    before = state_digest(model)
    path = export_model(trainer, "torchscript", tmp_path / "trainer.pt")
    assert model.training == was_training and state_digest(model) == before
    # The trainer's model is the checkpoint's: same fingerprint either way.
    _, loaded = load_trained_model(checkpoint)
    assert read_sidecar(path)["fingerprint"]["model_digest"] == state_digest(loaded)
    assert check_export(path, model, torch.rand(3, 1, 8, 8)) <= TOLERANCE


def test_normalisation_is_in_the_graph(tmp_path: Path) -> None:
    """A model that does not normalise its own output still exports unit-length embeddings."""
    config = load_config(None, [*DIGITS_RUN, "model.normalize=false"])
    model = _model(config, 1)
    inputs = torch.rand(4, 1, 8, 8)
    assert not torch.allclose(model(inputs).norm(dim=1), torch.ones(4))
    for fmt in FORMATS:
        path = export_model(model, fmt, tmp_path / f"raw{SUFFIX[fmt]}", config=config)  # type: ignore[arg-type]
        out = run_exported(path, inputs)
        assert torch.allclose(out.norm(dim=1), torch.ones(4), atol=1e-5)
        assert check_export(path, model, inputs) <= TOLERANCE


# --- Errors and atomicity ---------------------------------------------------------------------


@pytest.fixture()
def small() -> tuple[EmbeddingModel, Config]:
    config = load_config(None, DIGITS_RUN)
    return _model(config, 1), config


def test_unknown_format(small: tuple[EmbeddingModel, Config], tmp_path: Path) -> None:
    model, config = small
    with pytest.raises(ValueError, match="format must be one of"):
        export_model(model, "tflite", tmp_path / "m.tflite", config=config)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_output_path_is_a_folder(small: tuple[EmbeddingModel, Config], tmp_path: Path) -> None:
    model, config = small
    with pytest.raises(ValueError, match="is a folder"):
        export_model(model, "onnx", tmp_path, config=config)


def test_not_a_dmlkit_checkpoint(tmp_path: Path) -> None:
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(ValueError, match="not a dmlkit checkpoint"):
        export_model(other, "onnx", tmp_path / "m.onnx")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot be read"):
        export_model(garbage, "torchscript", tmp_path / "m.pt")
    with pytest.raises(FileNotFoundError):
        export_model(tmp_path / "missing.pt", "onnx", tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "m.pt").exists()


def test_unknown_input_size(tmp_path: Path) -> None:
    config = load_config(None, DIGITS_RUN)
    model = _model(config, 1)
    with pytest.raises(ValueError, match="input_size"):
        export_model(model, "torchscript", tmp_path / "m.pt")
    path = export_model(model, "torchscript", tmp_path / "m.pt", input_size=(1, 8, 8))
    assert read_sidecar(path)["preprocessing"]["mean"] is None


def test_missing_onnxruntime_names_the_extra(
    small: tuple[EmbeddingModel, Config], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, config = small
    path = export_model(model, "onnx", tmp_path / "m.onnx", config=config)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails
    with pytest.raises(ImportError, match=r"pip install dmlkit\[export\]"):
        check_export(path, model, torch.rand(2, 1, 8, 8))


def test_failed_export_leaves_no_file(
    small: tuple[EmbeddingModel, Config], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, config = small
    out = tmp_path / "m.onnx"
    out.write_bytes(b"previous export")

    def broken_export(*args: object, **kwargs: object) -> None:
        kwargs_f = args[2] if len(args) > 2 else kwargs.get("f")
        kwargs_f.write(b"partial")  # type: ignore[attr-defined]
        raise RuntimeError("exporter failed")

    monkeypatch.setattr(torch.onnx, "export", broken_export)
    with pytest.raises(RuntimeError, match="exporter failed"):
        export_model(model, "onnx", out, config=config)
    assert out.read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_interrupted_write_leaves_no_partial_file(
    small: tuple[EmbeddingModel, Config], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, config = small
    out = tmp_path / "m.pt"

    def crash(fd: int) -> None:  # the bytes are written, the rename has not happened
        raise OSError("disk gone")

    import dmlkit.training.checkpoint as checkpoint_module

    monkeypatch.setattr(checkpoint_module.os, "fsync", crash)
    with pytest.raises(OSError, match="disk gone"):
        export_model(model, "torchscript", out, config=config)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    export_model(model, "torchscript", out, config=config)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt", "m.pt.json"]
    assert not np.isnan(check_export(out, model, torch.rand(2, 1, 8, 8)))


def test_export_command(
    trained: tuple[Trainer, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from dmlkit.cli import main

    _, checkpoint = trained
    out = tmp_path / "model.pt"
    assert main(["export", str(checkpoint), "--format", "torchscript", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"sidecar: {out}.json" in printed
    difference = float(printed.strip().rsplit(" ", 1)[-1])
    assert difference <= 1e-4
    assert main(["export", str(checkpoint), "--format", "onnx", "--out", str(tmp_path)]) == 2
