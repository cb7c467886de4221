"""Backbones, checkpoint loading, the embedding model and the feature cache.

Real-data tests read ``$DMLKIT_DATA`` (``make`` sets ``../shared/data``) and skip, naming the
path, when it is absent. The timm success path cannot run here (timm needs torchvision,
which is unusable on these machines); it is exercised with a stand-in ``timm`` module.
"""

from __future__ import annotations

import argparse
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor, nn

from dmlkit.models import (
    Backbone,
    BNInception,
    EmbeddingHead,
    EmbeddingModel,
    GlobalPool,
    MobileNetV2,
    ResNet,
    build_model,
    cache_features,
    create_backbone,
    list_backbones,
    load_feature_cache,
    load_weights,
    resnet18,
    resnet50,
    timm_backbone,
)
from dmlkit.models import cache as cache_module
from real_data import REAL_DATA

SHARED_DATA = REAL_DATA
MOBILENET_CHECKPOINT = SHARED_DATA / "mobilenet_v2_imagenet" / "mobilenet_v2-b0353104.pth"
CUB_IMAGES = SHARED_DATA / "cub100_subset" / "images"
# CUB species that are ImageNet-1k classes (the README beside the weights in $DMLKIT_DATA).
CUB_TO_IMAGENET = {
    "American_Goldfinch": 11,
    "Indigo_Bunting": 14,
    "Blue_Jay": 17,
    "Black_footed_Albatross": 146,
    "Ruby_throated_Hummingbird": 94,
    "Brown_Pelican": 144,
    "Red_breasted_Merganser": 98,
    "Mallard": 97,
}
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def backbone_in_channels(backbone: nn.Module) -> int:
    first_conv = next(m for m in backbone.modules() if isinstance(m, nn.Conv2d))
    return first_conv.in_channels


@pytest.fixture(scope="module")
def full_resnet50() -> ResNet:
    # The only ResNet-50 the file builds: it is the slowest backbone to construct.
    return resnet50(num_classes=1000).eval()


@pytest.fixture
def mobilenet_checkpoint() -> Path:
    if not MOBILENET_CHECKPOINT.is_file():
        pytest.skip(f"{MOBILENET_CHECKPOINT} not found; ImageNet MobileNetV2 tests skipped")
    return MOBILENET_CHECKPOINT


# ---------------------------------------------------------------------------- registry


def test_list_backbones() -> None:
    assert list_backbones() == ["bn_inception", "convnet", "mobilenet_v2", "resnet18", "resnet50"]


def test_unknown_backbone_names_known_ones_and_suggests_the_closest() -> None:
    with pytest.raises(ValueError, match=r"did you mean 'resnet18'\?") as info:
        create_backbone("resnet_18")
    for name in list_backbones():
        assert name in str(info.value)
    assert "timm:<model name>" in str(info.value)
    with pytest.raises(ValueError, match=r"unknown backbone 'zzz'"):
        create_backbone("zzz")
    with pytest.raises(TypeError, match="must be a str"):
        create_backbone(18)  # type: ignore[arg-type]


def test_unknown_backbone_option_is_rejected_with_the_accepted_ones() -> None:
    with pytest.raises(ValueError, match=r"convnet has no option 'num_classes'"):
        create_backbone("convnet", num_classes=10)
    with pytest.raises(ValueError, match=r"did you mean 'width'\? Valid: in_channels, width"):
        create_backbone("convnet", widht=8)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("in_channels", 0, "in_channels must be a positive integer"),
        ("width", -1, "width must be a positive integer"),
        ("depth", 1.5, "depth: expected an integer, got 1.5"),
        ("num_classes", 0, "num_classes must be a positive integer"),
    ],
)
def test_invalid_backbone_options(name: str, value: object, message: str) -> None:
    backbone = "resnet18" if name == "num_classes" else "convnet"
    with pytest.raises(ValueError, match=message):
        create_backbone(backbone, **{name: value})


# ---------------------------------------------------------------------------- architectures


def test_resnet_parameter_counts_and_names_match_torchvision(full_resnet50: ResNet) -> None:
    net18 = resnet18(num_classes=1000)
    assert n_params(net18) == 11_689_512
    assert n_params(full_resnet50) == 25_557_032
    assert len(net18.state_dict()) == 122
    assert len(full_resnet50.state_dict()) == 320
    expected18 = {
        "conv1.weight": (64, 3, 7, 7),
        "bn1.running_var": (64,),
        "layer1.0.conv1.weight": (64, 64, 3, 3),
        "layer1.1.bn2.weight": (64,),
        "layer2.0.conv1.weight": (128, 64, 3, 3),
        "layer2.0.downsample.0.weight": (128, 64, 1, 1),
        "layer2.0.downsample.1.running_mean": (128,),
        "layer4.1.conv2.weight": (512, 512, 3, 3),
        "fc.weight": (1000, 512),
        "fc.bias": (1000,),
    }
    expected50 = {
        "layer1.0.conv1.weight": (64, 64, 1, 1),
        "layer1.0.conv3.weight": (256, 64, 1, 1),
        "layer1.0.downsample.0.weight": (256, 64, 1, 1),
        # v1.5: the stride sits in the 3x3 convolution; the weight shape is the same either way.
        "layer2.0.conv2.weight": (128, 128, 3, 3),
        "layer3.5.bn3.weight": (1024,),
        "layer4.2.bn3.weight": (2048,),
        "fc.weight": (1000, 2048),
    }
    got18, got50 = shapes(net18), shapes(full_resnet50)
    assert {k: got18[k] for k in expected18} == expected18
    assert {k: got50[k] for k in expected50} == expected50
    assert "layer1.0.downsample.0.weight" not in got18
    assert full_resnet50.layer2[0].conv2.stride == (2, 2)


def test_mobilenet_v2_parameter_names_follow_the_checkpoint_table() -> None:
    net = MobileNetV2(num_classes=1000)
    assert n_params(net) == 3_504_872
    assert n_params(MobileNetV2()) == 3_504_872 - 1_281_000
    got = shapes(net)
    assert len(got) == 314
    expected = {
        "features.0.0.weight": (32, 3, 3, 3),
        "features.0.1.weight": (32,),
        "features.1.conv.0.0.weight": (32, 1, 3, 3),
        "features.1.conv.1.weight": (16, 32, 1, 1),
        "features.1.conv.2.weight": (16,),
        "features.2.conv.0.0.weight": (96, 16, 1, 1),
        "features.2.conv.1.0.weight": (96, 1, 3, 3),
        "features.2.conv.2.weight": (24, 96, 1, 1),
        "features.2.conv.3.running_var": (24,),
        "features.17.conv.2.weight": (320, 960, 1, 1),
        "features.18.0.weight": (1280, 320, 1, 1),
        "features.18.1.weight": (1280,),
        "classifier.1.weight": (1000, 1280),
        "classifier.1.bias": (1000,),
    }
    assert {k: got[k] for k in expected} == expected


def test_bn_inception_parameter_names_and_count() -> None:
    net = BNInception(num_classes=1000)
    # 69 convolutions with biases and BatchNorms, plus last_linear (Cadene's module: same).
    assert n_params(net) == 11_295_240
    assert n_params(net) - n_params(net.last_linear) == 10_270_240
    got = shapes(net)
    assert len(got) == 69 * 2 + 69 * 5 + 2
    expected = {
        "conv1_7x7_s2.weight": (64, 3, 7, 7),
        "conv1_7x7_s2.bias": (64,),
        "conv1_7x7_s2_bn.running_mean": (64,),
        "conv2_3x3_reduce.weight": (64, 64, 1, 1),
        "conv2_3x3.weight": (192, 64, 3, 3),
        "inception_3a_1x1.weight": (64, 192, 1, 1),
        "inception_3a_1x1_bn.weight": (64,),
        "inception_3a_pool_proj.weight": (32, 192, 1, 1),
        "inception_3c_3x3.weight": (160, 128, 3, 3),
        "inception_3c_double_3x3_2.weight": (96, 96, 3, 3),
        "inception_4e_double_3x3_1.weight": (256, 192, 3, 3),
        "inception_5a_1x1.weight": (352, 1056, 1, 1),
        "inception_5b_double_3x3_2_bn.weight": (224,),
        "inception_5b_pool_proj.weight": (128, 1024, 1, 1),
        "last_linear.weight": (1000, 1024),
    }
    assert {k: got[k] for k in expected} == expected
    # The stride-2 blocks have neither a 1x1 branch nor a pooling projection.
    assert not [k for k in got if k.startswith(("inception_3c_1x1", "inception_4e_pool_proj"))]


@pytest.mark.parametrize(
    ("build", "size", "expected"),
    [
        (lambda: create_backbone("resnet18"), 64, (1, 512, 2, 2)),
        (lambda: create_backbone("mobilenet_v2"), 64, (1, 1280, 2, 2)),
        (lambda: create_backbone("bn_inception"), 224, (1, 1024, 7, 7)),
        (lambda: create_backbone("bn_inception"), 227, (1, 1024, 7, 7)),
        (lambda: create_backbone("convnet", in_channels=1), 105, (1, 64, 6, 6)),
        (lambda: create_backbone("convnet", in_channels=1), 8, (1, 64, 1, 1)),
        (lambda: create_backbone("convnet", in_channels=1, width=16, depth=2), 8, (1, 16, 2, 2)),
    ],
)
def test_backbones_return_the_feature_map(
    build: Callable[[], Backbone], size: int, expected: tuple[int, ...]
) -> None:
    backbone = build().eval()
    with torch.no_grad():
        out = backbone(torch.randn(1, backbone_in_channels(backbone), size, size))
    assert out.shape == expected
    assert backbone.num_features == expected[1]


def test_resnet50_feature_map(full_resnet50: ResNet) -> None:
    with torch.no_grad():
        out = full_resnet50(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 2048, 2, 2)
    assert full_resnet50.num_features == 2048


def test_classifier_is_kept_only_on_request_and_never_applied() -> None:
    headless = create_backbone("resnet18", in_channels=1)
    assert not hasattr(headless, "fc")
    assert headless.conv1.weight.shape == (64, 1, 7, 7)
    with_fc = create_backbone("resnet18", num_classes=10).eval()
    assert with_fc.fc.out_features == 10
    with torch.no_grad():
        assert with_fc(torch.randn(2, 3, 32, 32)).shape == (2, 512, 1, 1)


def test_bn_inception_rejects_sizes_its_stride_2_blocks_cannot_concatenate() -> None:
    # 200 gives a 25x25 map before inception_3c: its conv and pooling branches differ in size.
    with pytest.raises(ValueError, match=r"inception_3c is \(25, 25\).*multiples of 32"):
        BNInception().eval()(torch.randn(1, 3, 200, 200))


# ---------------------------------------------------------------------------- ImageNet weights


def test_mobilenet_v2_imagenet_checkpoint_loads_with_every_key(mobilenet_checkpoint: Path) -> None:
    state = torch.load(mobilenet_checkpoint, map_location="cpu", weights_only=True)
    full = MobileNetV2(num_classes=1000)
    report = load_weights(full, mobilenet_checkpoint)
    assert report.complete and len(report.loaded) == len(state) == 314
    assert torch.equal(full.classifier[1].weight, state["classifier.1.weight"])

    # Headless, as an embedding model uses it: the published classifier is skipped.
    model = build_model("mobilenet_v2", 16, pretrained=mobilenet_checkpoint)
    assert not hasattr(model.backbone, "classifier")
    assert torch.equal(model.backbone.features[18][0].weight, state["features.18.0.weight"])
    report = model.backbone.load_pretrained(state)
    assert report.ignored == ("classifier.1.bias", "classifier.1.weight")
    assert report.complete and len(report.loaded) == 312


def test_mobilenet_v2_imagenet_classifies_real_cub_birds(mobilenet_checkpoint: Path) -> None:
    if not CUB_IMAGES.is_dir():
        pytest.skip(f"{CUB_IMAGES} not found; real-image classification test skipped")
    net = create_backbone("mobilenet_v2", pretrained=mobilenet_checkpoint, num_classes=1000)
    images, targets = [], []
    for folder, imagenet_class in CUB_TO_IMAGENET.items():
        for path in sorted((CUB_IMAGES / folder).glob("*.jpg"))[:2]:
            rgb = Image.open(path).convert("RGB").resize((224, 224), Image.Resampling.BILINEAR)
            pixels = (np.asarray(rgb, dtype=np.float32) / 255 - IMAGENET_MEAN) / IMAGENET_STD
            images.append(torch.from_numpy(pixels.transpose(2, 0, 1).copy()))
            targets.append(imagenet_class)
    net.eval()
    with torch.no_grad():
        logits = net.classifier(net(torch.stack(images)).mean(dim=(2, 3)))
    correct = (logits.argmax(dim=1) == torch.tensor(targets)).sum().item()
    # Measured 15/16 (one Blue Jay is called a magpie); a wrong layer or name gives ~0.
    assert correct >= 14, f"only {correct}/16 CUB images got their ImageNet class"


def test_bn_inception_loads_a_caffe_port_checkpoint() -> None:
    # The published bn_inception-52deb4733.pth stores BatchNorm vectors as (1, C), has no
    # num_batches_tracked (saved before PyTorch 0.4.1) and carries last_linear.
    source = BNInception(num_classes=1000)
    for m in source.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.running_mean)
    state = {
        k: v.unsqueeze(0) if v.ndim == 1 and "_bn." in k else v
        for k, v in source.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    assert state["conv1_7x7_s2_bn.weight"].shape == (1, 64)

    backbone = create_backbone("bn_inception", pretrained=state)
    for key, value in backbone.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(value, source.state_dict()[key]), key


# ---------------------------------------------------------------------------- load_weights


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)
        self.fc2 = nn.Linear(2, 2)


def tiny_state() -> dict[str, Tensor]:
    donor = Tiny()
    for p in donor.parameters():
        nn.init.uniform_(p)
    return donor.state_dict()


def assert_loaded(
    module: nn.Module, state: dict[str, Tensor], keys: list[str] | None = None
) -> None:
    got = module.state_dict()
    for key in keys if keys is not None else list(state):
        assert torch.equal(got[key], state[key]), key


@pytest.mark.parametrize(
    "wrap",
    [
        lambda s: s,
        lambda s: {"state_dict": s, "epoch": 3},
        lambda s: {"model": s},
        lambda s: {"model": {"state_dict": s}},
        lambda s: {f"module.{k}": v for k, v in s.items()},
        lambda s: {"state_dict": {f"module.{k}": v for k, v in s.items()}},
    ],
    ids=["plain", "state_dict", "model", "nested", "data_parallel", "wrapped_data_parallel"],
)
def test_load_weights_unwraps_common_layouts(wrap: Callable[[dict[str, Any]], Any]) -> None:
    state = tiny_state()
    module = Tiny()
    report = load_weights(module, wrap(state))
    assert report.complete and set(report.loaded) == set(state)
    assert_loaded(module, state)


def test_load_weights_from_a_file(tmp_path: Path) -> None:
    state = tiny_state()
    path = tmp_path / "tiny.pt"
    torch.save({"state_dict": state, "epoch": 1}, path)
    module = Tiny()
    load_weights(module, str(path))
    assert_loaded(module, state)


def test_strict_mismatch_lists_every_problem_and_loads_nothing() -> None:
    state = tiny_state()
    del state["fc.bias"]
    state["extra.weight"] = torch.zeros(1)
    state["conv.weight"] = torch.zeros(4, 1, 3, 3)
    module = Tiny()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(ValueError) as info:
        load_weights(module, state)
    message = str(info.value)
    assert "checkpoint does not match Tiny" in message
    assert "missing keys (1): fc.bias" in message
    assert "unexpected keys (1): extra.weight" in message
    assert "conv.weight: expected (4, 3, 3, 3), got (4, 1, 3, 3)" in message
    assert_loaded(module, before)


def test_long_key_lists_are_truncated() -> None:
    state = tiny_state()
    state.update({f"head.{i:02d}.weight": torch.zeros(1) for i in range(25)})
    with pytest.raises(ValueError) as info:
        load_weights(Tiny(), state)
    message = str(info.value)
    assert "unexpected keys (25): head.00.weight" in message
    assert "head.09.weight, ... and 15 more" in message
    assert "head.10.weight" not in message


def test_non_strict_loads_what_matches_and_reports_the_rest() -> None:
    state = tiny_state()
    del state["fc.bias"]
    state["conv.weight"] = torch.zeros(4, 1, 3, 3)
    state["extra.weight"] = torch.zeros(1)
    module = Tiny()
    conv_before = module.conv.weight.detach().clone()
    report = load_weights(module, state, strict=False)
    assert report.missing == ("fc.bias",)
    assert report.unexpected == ("extra.weight",)
    assert report.mismatched == (("conv.weight", (4, 3, 3, 3), (4, 1, 3, 3)),)
    assert not report.complete
    assert torch.equal(module.conv.weight, conv_before)
    assert_loaded(module, state, ["fc.weight", "fc2.weight", "bn.running_var"])


def test_ignore_skips_whole_prefix_components_on_both_sides() -> None:
    state = tiny_state()
    state["fc.weight"] = torch.zeros(7, 7)  # would mismatch if not ignored
    module = Tiny()
    fc_before = module.fc.weight.detach().clone()
    report = load_weights(module, {k: v for k, v in state.items() if k != "fc.bias"}, ignore=["fc"])
    assert report.complete
    assert report.ignored == ("fc.bias", "fc.weight")
    assert torch.equal(module.fc.weight, fc_before)
    assert_loaded(module, state, ["fc2.weight", "fc2.bias", "conv.weight"])


def test_missing_batchnorm_counters_are_not_missing_keys() -> None:
    state = tiny_state()
    del state["bn.num_batches_tracked"]
    assert load_weights(Tiny(), state).complete


def test_unreadable_checkpoints_raise_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="checkpoint file not found"):
        load_weights(Tiny(), tmp_path / "absent.pt")
    path = tmp_path / "with_args.pt"
    torch.save({"state_dict": tiny_state(), "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(ValueError, match="cannot be loaded with weights_only=True"):
        load_weights(Tiny(), path)
    with pytest.raises(ValueError, match="'epoch' is not a tensor but int"):
        load_weights(Tiny(), {**tiny_state(), "epoch": 3})  # type: ignore[dict-item]


# ---------------------------------------------------------------------------- embedding model


@pytest.mark.parametrize("mode", ["avg", "max", "avgmax"])
def test_global_pooling(mode: str) -> None:
    x = torch.randn(2, 3, 4, 5)
    avg = torch.nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)
    mx = torch.nn.functional.adaptive_max_pool2d(x, 1).flatten(1)
    expected = {"avg": avg, "max": mx, "avgmax": avg + mx}[mode]
    torch.testing.assert_close(GlobalPool(mode)(x), expected)  # type: ignore[arg-type]


def test_global_pooling_errors() -> None:
    with pytest.raises(ValueError, match="pooling must be one of"):
        GlobalPool("gem")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"needs a \[B, C, H, W\] map"):
        GlobalPool()(torch.randn(2, 3))


def test_embedding_head() -> None:
    x = torch.randn(5, 12) * 10
    linear = EmbeddingHead(12, 4)
    out = linear(x)
    assert out.shape == (5, 4)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(5))
    raw = EmbeddingHead(12, 4, normalize=False)
    assert not torch.allclose(raw(x).norm(dim=1), torch.ones(5))
    mlp = EmbeddingHead(12, 4, hidden_dim=8)
    assert [type(m) for m in mlp.layers] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert mlp(x).shape == (5, 4)
    with pytest.raises(ValueError, match=r"expects \[B, 12\] inputs, got \(5, 13\)"):
        linear(torch.randn(5, 13))


def test_build_model_embeds_and_exposes_pooled_features() -> None:
    model = build_model("convnet", 16, in_channels=1, width=8, pooling="avgmax")
    x = torch.randn(4, 1, 8, 8)
    model.eval()
    features = model.features(x)
    assert features.shape == (4, 8)
    feature_map = model.backbone(x)
    torch.testing.assert_close(features, feature_map.mean((2, 3)) + feature_map.amax((2, 3)))
    embeddings = model(x)
    assert embeddings.shape == (4, 16)
    torch.testing.assert_close(embeddings, model.head(features))
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(4))
    with pytest.raises(TypeError, match="integer num_features"):
        EmbeddingModel(nn.Linear(2, 2), 4)  # type: ignore[arg-type]


def bn_statistics(module: nn.Module) -> list[Tensor]:
    return [
        m.running_mean.clone()
        for m in module.modules()
        if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None
    ]


@pytest.mark.parametrize("freeze_bn", [True, False])
def test_freeze_bn_keeps_backbone_statistics_but_trains_affine(freeze_bn: bool) -> None:
    model = build_model("convnet", 4, in_channels=1, width=8, hidden_dim=6, freeze_bn=freeze_bn)
    model.eval().train()  # a later train() must not unfreeze
    before = bn_statistics(model.backbone)
    head_bn = model.head.layers[1]
    assert isinstance(head_bn, nn.BatchNorm1d)
    head_before = head_bn.running_mean.clone()  # type: ignore[union-attr]
    model(torch.randn(8, 1, 8, 8) + 3).sum().backward()
    after = bn_statistics(model.backbone)
    assert model.training and head_bn.training
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True)) == freeze_bn
    assert not torch.equal(head_bn.running_mean, head_before)  # type: ignore[arg-type]
    bns = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(m.weight.grad is not None and m.training != freeze_bn for m in bns)


def test_convnet_learns_sklearn_digits() -> None:
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    x = torch.tensor(digits.images[:400], dtype=torch.float32).unsqueeze(1) / 16
    y = torch.tensor(digits.target[:400])
    # Unnormalised 10-d embeddings used directly as logits: the quickest check of trainability.
    model = build_model("convnet", 10, in_channels=1, width=16, normalize=False)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(60):
        batch = torch.arange(step * 64, step * 64 + 64) % len(x)
        loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert accuracy > 0.9


# ---------------------------------------------------------------------------- timm


def test_timm_backbone_explains_why_timm_is_unusable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # makes "import timm" fail
    with pytest.raises(ImportError, match="'timm' package, which is not importable") as info:
        create_backbone("timm:resnet18")
    assert "torchvision" in str(info.value)

    def broken_import(name: str) -> types.ModuleType:
        raise RuntimeError("operator torchvision::nms does not exist")

    monkeypatch.setattr(timm_backbone.importlib, "import_module", broken_import)
    with pytest.raises(ImportError, match="RuntimeError: operator torchvision::nms"):
        create_backbone("timm:resnet18")
    with pytest.raises(ValueError, match="names no timm model"):
        create_backbone("timm:")
    with pytest.raises(ValueError, match="num_classes are set by dmlkit"):
        create_backbone("timm:resnet18", num_classes=10)


class FakeTimmModel(nn.Module):
    default_cfg = {"classifier": "fc"}  # noqa: RUF012

    def __init__(self, in_chans: int, tokens: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chans, 6, 3, padding=1)
        self.num_features = 6
        self.tokens = tokens

    def forward_features(self, x: Tensor) -> Tensor:
        out: Tensor = self.conv(x)
        return out.flatten(2).transpose(1, 2) if self.tokens else out


def test_timm_backbone_wraps_forward_features(monkeypatch: pytest.MonkeyPatch) -> None:
    # A stand-in timm: the real one cannot be imported here.
    calls: list[dict[str, Any]] = []

    def create_model(name: str, **kwargs: Any) -> FakeTimmModel:
        calls.append({"name": name, **kwargs})
        return FakeTimmModel(kwargs["in_chans"], tokens=name == "vit")

    monkeypatch.setitem(sys.modules, "timm", types.SimpleNamespace(create_model=create_model))
    donor = FakeTimmModel(1, tokens=False)
    checkpoint = {**donor.state_dict(), "fc.weight": torch.zeros(3, 6), "fc.bias": torch.zeros(3)}
    backbone = create_backbone("timm:convy", in_channels=1, pretrained=checkpoint, drop_rate=0.1)
    assert calls[0] == {
        "name": "convy",
        "pretrained": False,
        "num_classes": 0,
        "global_pool": "",
        "in_chans": 1,
        "drop_rate": 0.1,
    }
    assert backbone.num_features == 6
    assert torch.equal(backbone.model.conv.weight, donor.conv.weight)
    assert backbone(torch.randn(2, 1, 5, 5)).shape == (2, 6, 5, 5)
    with pytest.raises(ValueError, match=r"must return a \[B, C, H, W\] feature map"):
        create_backbone("timm:vit")(torch.randn(2, 3, 5, 5))


# ---------------------------------------------------------------------------- feature cache


class ImageDataset(torch.utils.data.Dataset[tuple[Tensor, int]]):
    def __init__(self, n: int, fail_at: int | None = None) -> None:
        generator = torch.Generator().manual_seed(n)
        self.images = torch.randn(n, 1, 8, 8, generator=generator)
        self.labels = np.arange(n, dtype=np.int64) % 3
        self.item_labels = self.labels.copy()
        self.fail_at = fail_at

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        if index == self.fail_at:
            raise OSError("unreadable image")
        return self.images[index], int(self.item_labels[index])


def counting_model() -> tuple[EmbeddingModel, list[int]]:
    model = build_model("convnet", 4, in_channels=1, width=8, pooling="max")
    calls: list[int] = []
    model.backbone.register_forward_hook(lambda module, args, out: calls.append(len(args[0])))
    return model, calls


@pytest.mark.parametrize("suffix", [".pt", ".npz"])
def test_cache_is_written_reused_and_matches_model_features(tmp_path: Path, suffix: str) -> None:
    model, calls = counting_model()
    dataset = ImageDataset(10)
    path = tmp_path / "sub" / f"features{suffix}"
    cache = cache_features(model, dataset, path, batch_size=4)
    assert calls == [4, 4, 2]
    assert model.training  # restored after the eval-mode pass
    model.eval()
    with torch.no_grad():
        expected = model.features(dataset.images)
    calls.clear()
    torch.testing.assert_close(cache.features, expected)
    assert cache.features.dtype == torch.float32 and cache.labels.dtype == np.int64
    np.testing.assert_array_equal(cache.labels, dataset.labels)
    assert cache.metadata["pooling"] == "max" and cache.metadata["num_items"] == 10
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]

    loaded = load_feature_cache(path)
    assert torch.equal(loaded.features, cache.features)
    np.testing.assert_array_equal(loaded.labels, cache.labels)
    assert loaded.metadata == cache.metadata

    reused = cache_features(model, dataset, path, batch_size=4)
    assert calls == []  # no forward pass
    assert torch.equal(reused.features, cache.features)

    cache_features(model, dataset, path, overwrite=True)
    assert calls == [10]


def test_cache_is_recomputed_when_weights_or_labels_change(tmp_path: Path) -> None:
    model, calls = counting_model()
    path = tmp_path / "features.pt"
    dataset = ImageDataset(6)
    cache_features(model, dataset, path)
    with torch.no_grad():
        model.backbone.blocks[0][0].weight.add_(1)
    cache_features(model, dataset, path)
    assert len(calls) == 2
    dataset.labels = dataset.item_labels = dataset.labels[::-1].copy()
    np.testing.assert_array_equal(cache_features(model, dataset, path).labels, dataset.labels)
    assert len(calls) == 3
    dataset.labels = dataset.labels + 1
    # The items' labels no longer match dataset.labels: a broken dataset, reported.
    with pytest.raises(ValueError, match=r"differ from dataset\.labels"):
        cache_features(model, dataset, path)


def test_cache_leaves_no_partial_file_on_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, _ = counting_model()
    path = tmp_path / "features.npz"
    with pytest.raises(OSError, match="unreadable image"):
        cache_features(model, ImageDataset(6, fail_at=4), path)
    assert list(tmp_path.iterdir()) == []

    good = cache_features(model, ImageDataset(6), path)
    original = path.read_bytes()

    def failing_savez(file: Any, **arrays: Any) -> None:
        file.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(cache_module.np, "savez", failing_savez)
    with pytest.raises(OSError, match="disk full"):
        cache_features(model, ImageDataset(7), path)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    assert path.read_bytes() == original
    assert torch.equal(load_feature_cache(path).features, good.features)


def test_cache_argument_errors(tmp_path: Path) -> None:
    model, _ = counting_model()
    with pytest.raises(ValueError, match=r"must end in \.pt or \.npz"):
        cache_features(model, ImageDataset(3), tmp_path / "features.pkl")
    no_labels = ImageDataset(3)
    del no_labels.labels
    with pytest.raises(ValueError, match="labels attribute"):
        cache_features(model, no_labels, tmp_path / "f.pt")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dataset is empty"):
        cache_features(model, ImageDataset(0), tmp_path / "f.pt")
    with pytest.raises(FileNotFoundError, match="feature cache not found"):
        load_feature_cache(tmp_path / "absent.pt")
    torch.save({"features": torch.zeros(2, 2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a dmlkit feature cache"):
        load_feature_cache(tmp_path / "other.pt")
