"""dmlkit.data: datasets, subsets, class-disjoint splits, folder/CSV loaders and transforms."""

from __future__ import annotations

import gc
import pickle
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from dmlkit.data import (
    ArrayDataset,
    CenterCrop,
    Fold,
    ImageFileDataset,
    ImageReadError,
    ImageTransform,
    LabelledDataset,
    RandomHorizontalFlip,
    RandomResizedCrop,
    Resize,
    class_disjoint_halves,
    class_kfold,
    classes_subset,
    csv_manifest,
    digits,
    eval_transform,
    image_folder,
    pil_to_tensor,
    subset,
    train_transform,
)


def _write_image(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (16, 12)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _gradient_image(width: int, height: int) -> Image.Image:
    """An RGB image whose every pixel differs, so crops and flips are visible in the values."""
    y, x = np.mgrid[0:height, 0:width]
    arr = np.stack([x * 255 // (width - 1), y * 255 // (height - 1), (x + y) % 256], axis=-1)
    return Image.fromarray(arr.astype(np.uint8), "RGB")


# --- ArrayDataset --------------------------------------------------------------------------------


def test_array_dataset_reads_float_items_and_int_labels() -> None:
    data = np.zeros((3, 1, 2, 2), dtype=bool)
    data[1, 0, 0, 1] = True
    ds = ArrayDataset(data, [7, 8, 9], transform=lambda x: x * 2)
    assert isinstance(ds, LabelledDataset)
    assert ds.labels.dtype == np.int64 and ds.labels.tolist() == [7, 8, 9]
    sample, label = ds[1]
    assert sample.dtype == torch.float32 and label == 8 and isinstance(label, int)
    assert sample.tolist() == [[[0.0, 2.0], [0.0, 0.0]]]
    assert len(ds) == 3 and ds.data.dtype == torch.bool  # stored compactly, converted per item


def test_array_dataset_rejects_bad_labels() -> None:
    with pytest.raises(ValueError, match="3 items but labels has 2"):
        ArrayDataset(torch.zeros(3, 4), [0, 1])
    with pytest.raises(ValueError, match="labels must be integers, got dtype float64"):
        ArrayDataset(torch.zeros(2, 4), [0.0, 1.0])
    with pytest.raises(ValueError, match="labels must be 1-D"):
        ArrayDataset(torch.zeros(2, 4), [[0], [1]])


# --- ImageFileDataset ----------------------------------------------------------------------------


def test_image_file_dataset_decodes_with_pillow(tmp_path: Path) -> None:
    red = _write_image(tmp_path / "a.png", (255, 0, 51))
    blue = _write_image(tmp_path / "b.png", (0, 0, 255))
    ds = ImageFileDataset([red, str(blue)], np.array([3, 5]), class_names=["x", "y"])
    assert isinstance(ds, LabelledDataset)
    image, label = ds[0]
    assert image.shape == (3, 12, 16) and label == 3
    torch.testing.assert_close(image[:, 0, 0], torch.tensor([1.0, 0.0, 0.2]))
    assert ds.paths == [red, blue] and ds.class_names == ["x", "y"] and ds.skipped == []

    gray = ImageFileDataset([red], [0], mode="L")[0][0]
    assert gray.shape == (1, 12, 16)
    expected = Image.new("RGB", (1, 1), (255, 0, 51)).convert("L").getpixel((0, 0))
    assert gray[0, 0, 0].item() == pytest.approx(expected / 255)


def test_raise_mode_names_the_missing_or_corrupt_file(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"this is not a jpeg")
    missing = tmp_path / "missing.png"
    ds = ImageFileDataset([corrupt, missing], [0, 1])  # construction does not read anything
    for i, path in enumerate([corrupt, missing]):
        with pytest.raises(ImageReadError, match=f"cannot read image {path}"):
            ds[i]
    assert issubclass(ImageReadError, ValueError)


def test_worker_error_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # After a worker error, torch waits this long (default 5 s) for the worker to exit.
    monkeypatch.setattr(torch.utils.data._utils, "MP_STATUS_CHECK_INTERVAL", 0.2, raising=False)
    good = _write_image(tmp_path / "good.png", (1, 2, 3))
    missing = tmp_path / "gone.png"
    loader = DataLoader(ImageFileDataset([good, missing], [0, 1]), batch_size=2, num_workers=1)
    batches = iter(loader)
    with pytest.raises(ImageReadError) as info:
        next(batches)
    message = str(info.value)
    # The traceback holds the iterator; free it while the short shutdown wait is in force.
    del info, batches
    gc.collect()
    assert "DataLoader worker" in message and str(missing) in message


def test_skip_mode_drops_unreadable_files_with_one_warning(tmp_path: Path) -> None:
    good = [_write_image(tmp_path / f"g{i}.png", (i, i, i)) for i in range(3)]
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(good[0].read_bytes()[:40])  # a truncated PNG
    missing = tmp_path / "missing.jpg"
    paths = [good[0], corrupt, good[1], missing, good[2]]
    with pytest.warns(UserWarning, match=r"skipped 2 unreadable image\(s\) of 5") as record:
        ds = ImageFileDataset(paths, [10, 11, 12, 13, 14], on_error="skip")
    assert len(record) == 1
    assert ds.paths == good and ds.labels.tolist() == [10, 12, 14]
    assert [p for p, _ in ds.skipped] == [corrupt, missing]
    assert all(reason for _, reason in ds.skipped)
    assert ds[2][0][0, 0, 0].item() == pytest.approx(2 / 255)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(ImageFileDataset(good, [0, 1, 2], on_error="skip")) == 3


def test_skip_mode_with_nothing_readable_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"all 1 images are unreadable; first: .*nope\.png"):
        ImageFileDataset([tmp_path / "nope.png"], [0], on_error="skip")


def test_image_file_dataset_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="on_error must be 'raise' or 'skip'"):
        ImageFileDataset([tmp_path / "a.png"], [0], on_error="ignore")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mode must be a Pillow image mode"):
        ImageFileDataset([tmp_path / "a.png"], [0], mode="rgb")
    with pytest.raises(ValueError, match="2 paths but 1 labels"):
        ImageFileDataset([tmp_path / "a.png", tmp_path / "b.png"], [0])


# --- subset --------------------------------------------------------------------------------------


def test_subset_keeps_labels_consistent_and_composes() -> None:
    data = torch.arange(6, dtype=torch.float32).view(6, 1)
    base = ArrayDataset(data, [0, 0, 1, 1, 2, 2])
    sub = subset(base, np.array([5, 2, 3]))
    assert isinstance(sub, LabelledDataset) and len(sub) == 3
    assert sub.labels.tolist() == [2, 1, 1]
    assert [(x.item(), y) for x, y in (sub[i] for i in range(3))] == [(5.0, 2), (2.0, 1), (3.0, 1)]
    nested = subset(sub, [2, 0])
    assert nested.labels.tolist() == [1, 2] and nested[0][0].item() == 3.0
    assert getattr(nested, "dataset") is base  # noqa: B009 - not part of the protocol
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 6\).*\[6, -1\]"):
        subset(base, [0, 6, -1])


# --- splits --------------------------------------------------------------------------------------


def test_class_disjoint_halves() -> None:
    labels = np.array([3, 1, 2, 1, 4, 3])
    first, second = class_disjoint_halves(labels)
    assert first.tolist() == [1, 2, 3] and second.tolist() == [0, 4, 5]
    first, second = class_disjoint_halves(torch.tensor([0, 1, 2, 2]))  # odd: second gets extra
    assert first.tolist() == [0] and second.tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match="at least 2 classes"):
        class_disjoint_halves([5, 5])


def test_classes_subset() -> None:
    labels = [4, 1, 4, 2, 9]
    assert classes_subset(labels, [4, 9]).tolist() == [0, 2, 4]
    with pytest.raises(ValueError, match=r"classes not present in labels: \[3\]"):
        classes_subset(labels, [1, 3])


def test_class_kfold_validates_every_class_once() -> None:
    labels = np.repeat(np.arange(10), 3)[np.random.default_rng(1).permutation(30)]
    folds = class_kfold(labels, n_folds=4, seed=3)
    assert len(folds) == 4 and all(isinstance(f, Fold) for f in folds)
    val = np.concatenate([f.val_classes for f in folds])
    assert sorted(val.tolist()) == list(range(10))
    assert sorted(len(f.val_classes) for f in folds) == [2, 2, 3, 3]
    for fold in folds:
        assert not set(fold.train_classes.tolist()) & set(fold.val_classes.tolist())
        assert sorted(np.concatenate([fold.train_indices, fold.val_indices]).tolist()) == list(
            range(30)
        )
        assert set(labels[fold.val_indices].tolist()) == set(fold.val_classes.tolist())
        assert set(labels[fold.train_indices].tolist()) == set(fold.train_classes.tolist())

    again = class_kfold(labels, n_folds=4, seed=3)
    assert all(
        np.array_equal(a.val_indices, b.val_indices) for a, b in zip(folds, again, strict=True)
    )
    other = class_kfold(labels, n_folds=4, seed=4)
    assert any(
        not np.array_equal(a.val_classes, b.val_classes) for a, b in zip(folds, other, strict=True)
    )


def test_class_kfold_rejects_impossible_fold_counts() -> None:
    with pytest.raises(ValueError, match=r"n_folds \(4\) exceeds the number of classes \(3\)"):
        class_kfold([0, 1, 2, 2], n_folds=4)
    with pytest.raises(ValueError, match="at least 2"):
        class_kfold([0, 1, 2], n_folds=1)


# --- digits --------------------------------------------------------------------------------------


def test_digits_is_class_disjoint_and_scaled() -> None:
    from sklearn.datasets import load_digits

    train, test, everything = digits("train"), digits("test"), digits("all")
    assert set(train.labels.tolist()) == {0, 1, 2, 3, 4}
    assert set(test.labels.tolist()) == {5, 6, 7, 8, 9}
    assert len(everything) == 1797 == len(train) + len(test)
    image, label = everything[0]
    assert image.shape == (1, 8, 8) and 0.0 <= everything.data.min() <= everything.data.max() <= 1
    raw = load_digits()
    assert label == raw.target[0]
    torch.testing.assert_close(image[0], torch.tensor(raw.images[0] / 16, dtype=torch.float32))
    with pytest.raises(ValueError, match="split must be one of"):
        digits("val")


# --- image_folder --------------------------------------------------------------------------------


def test_image_folder_labels_follow_sorted_folders(tmp_path: Path) -> None:
    _write_image(tmp_path / "zebra" / "1.png", (0, 0, 0))
    _write_image(tmp_path / "zebra" / "nested" / "2.JPG", (0, 0, 0))
    _write_image(tmp_path / "ant" / "1.png", (255, 255, 255))
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden").mkdir()
    ds = image_folder(tmp_path)
    assert ds.class_names == ["ant", "zebra"]
    assert ds.labels.tolist() == [0, 1, 1]
    assert [p.relative_to(tmp_path).as_posix() for p in ds.paths] == [
        "ant/1.png",
        "zebra/1.png",
        "zebra/nested/2.JPG",
    ]
    assert ds[0][0].min().item() == 1.0 and ds[1][0].max().item() == 0.0


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"image folder .*absent not found"):
        image_folder(tmp_path / "absent")
    with pytest.raises(ValueError, match="has no class sub-folders"):
        image_folder(tmp_path)
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(ValueError, match=r"class folder .*empty_class holds no image files"):
        image_folder(tmp_path)


# --- csv_manifest --------------------------------------------------------------------------------


def test_csv_manifest_int_labels_split_and_relative_paths(tmp_path: Path) -> None:
    a = _write_image(tmp_path / "imgs" / "a.png", (10, 10, 10))
    b = _write_image(tmp_path / "imgs" / "b.png", (20, 20, 20))
    manifest = tmp_path / "list.csv"
    manifest.write_text(f"path,label,split\nimgs/a.png,4,train\n{b},7,test\nimgs/a.png,2,train\n")
    ds = csv_manifest(manifest, split="train")
    assert ds.paths == [a, a] and ds.labels.tolist() == [4, 2] and ds.class_names is None
    assert csv_manifest(manifest).labels.tolist() == [4, 7, 2]
    assert csv_manifest(manifest, split="test").paths == [b]

    elsewhere = tmp_path / "sub" / "list.csv"
    elsewhere.parent.mkdir()
    elsewhere.write_text("label,path\n1,a.png\n")  # column order does not matter
    assert csv_manifest(elsewhere, root=tmp_path / "imgs").paths == [a]
    assert csv_manifest(elsewhere).paths == [tmp_path / "sub" / "a.png"]


def test_csv_manifest_string_labels_map_to_sorted_ids(tmp_path: Path) -> None:
    manifest = tmp_path / "list.csv"
    rows = "path,label,split\n1.png,dog,a\n2.png,cat,b\n3.png,emu,a\n4.png,dog,b\n"
    manifest.write_text("\ufeff" + rows, encoding="utf-8")  # with a byte-order mark
    ds_a, ds_b = csv_manifest(manifest, split="a"), csv_manifest(manifest, split="b")
    assert ds_a.class_names == ds_b.class_names == ["cat", "dog", "emu"]
    assert ds_a.labels.tolist() == [1, 2] and ds_b.labels.tolist() == [0, 1]


@pytest.mark.parametrize(
    ("text", "split", "message"),
    [
        (
            "path,lbl\nx.png,1\n",
            None,
            r"line 1: header \['path', 'lbl'\] lacks column\(s\) \['label'\]",
        ),
        ("path,label\nx.png,1\n", "train", r"lacks column\(s\) \['split'\]"),
        ("path,label\nx.png,1\ny.png,\n", None, r"line 3: empty 'label'"),
        ("path,label\nx.png,1\n,2\n", None, r"line 3: empty 'path'"),
        ("path,label\nx.png,1,extra\n", None, r"line 2: more fields than the header's 2"),
        ("path,label,split\nx.png,1,train\n", "val", r"no rows with split 'val'.*\['train'\]"),
        ("path,label\n", None, "lists no images"),
    ],
)
def test_csv_manifest_errors_name_the_line(
    tmp_path: Path, text: str, split: str | None, message: str
) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text(text)
    with pytest.raises(ValueError, match=message):
        csv_manifest(manifest, split=split)


def test_csv_manifest_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"CSV manifest .*none.csv not found"):
        csv_manifest(tmp_path / "none.csv")


# --- transforms ----------------------------------------------------------------------------------


def test_train_transform_is_reproducible_from_the_torch_seed_only() -> None:
    transform = train_transform(size=24, resize=40)
    image = _gradient_image(64, 48)
    torch.manual_seed(5)
    first = transform(image)
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(5)
    py_state, np_state = random.getstate(), np.random.get_state()
    second = transform(image)
    assert first.shape == (3, 24, 24) and torch.equal(first, second)
    assert random.getstate() == py_state  # transforms never draw from Python's or numpy's RNG
    assert np.array_equal(np.random.get_state()[1], np_state[1])
    outputs = {transform(image).sum().item() for _ in range(5)}
    assert len(outputs) > 1


def test_random_resized_crop_box_statistics() -> None:
    crop = RandomResizedCrop(size=8, scale=(0.16, 1.0), ratio=(3 / 4, 4 / 3))
    width, height = 200, 160
    boxes = np.array([crop.get_box(width, height) for _ in range(3000)])
    left, top, w, h = boxes.T
    assert (left >= 0).all() and (top >= 0).all()
    assert (left + w <= width).all() and (top + h <= height).all()
    area = w * h / (width * height)
    assert area.min() >= 0.16 * 0.97 and area.max() <= 1.0  # 3% slack for rounding to pixels
    assert np.quantile(area, 0.1) < 0.3 and np.quantile(area, 0.9) > 0.6
    aspect = w / h
    assert aspect.min() >= 0.75 * 0.97 and aspect.max() <= 4 / 3 * 1.03
    assert left.max() > 0.5 * width * (1 - 0.16) and top.max() > 0  # positions vary
    # An image far outside the ratio range gets the largest centred box within it.
    assert RandomResizedCrop(8, scale=(0.99, 1.0)).get_box(1000, 10) == (493, 0, 13, 10)


def test_random_resized_crop_crops_then_resizes() -> None:
    image = _gradient_image(50, 40)
    crop = RandomResizedCrop(size=10)
    torch.manual_seed(0)
    left, top, w, h = crop.get_box(50, 40)
    torch.manual_seed(0)
    out = crop(image)
    expected = image.crop((left, top, left + w, top + h)).resize(
        (10, 10), Image.Resampling.BILINEAR
    )
    assert out.size == (10, 10) and np.array_equal(np.array(out), np.array(expected))


def test_flip_resize_and_centre_crop_use_pillow_geometry() -> None:
    image = _gradient_image(40, 20)
    arr = np.array(image)
    assert np.array_equal(np.array(RandomHorizontalFlip(p=1.0)(image)), arr[:, ::-1])
    assert RandomHorizontalFlip(p=0.0)(image) is image
    assert Resize(10)(image).size == (20, 10)
    assert np.array_equal(np.array(CenterCrop(10)(image)), arr[5:15, 15:25])
    with pytest.raises(ValueError, match="smaller than the 30-pixel centre crop"):
        CenterCrop(30)(image)


def test_eval_transform_normalises_in_the_requested_convention() -> None:
    image = Image.new("RGB", (30, 20), (10, 20, 30))
    torch_style = eval_transform(resize=10, crop=8)(image)
    assert torch_style.shape == (3, 8, 8)
    expected = (torch.tensor([10, 20, 30]) / 255 - torch.tensor([0.485, 0.456, 0.406])) / (
        torch.tensor([0.229, 0.224, 0.225])
    )
    torch.testing.assert_close(torch_style[:, 3, 3], expected)

    caffe = eval_transform(
        resize=10, crop=8, mean=(104, 117, 123), std=(1, 1, 1), channel_order="BGR", value_scale=255
    )(image)
    torch.testing.assert_close(caffe[:, 0, 0], torch.tensor([30.0 - 104, 20.0 - 117, 10.0 - 123]))


def test_transforms_pickle_and_have_readable_reprs() -> None:
    transform = train_transform(size=16, flip=True)
    clone = pickle.loads(pickle.dumps(transform))
    assert repr(clone) == repr(transform)
    assert "RandomResizedCrop(size=16, scale=(0.16, 1.0)" in repr(transform)
    assert "RandomHorizontalFlip(p=0.5)" in repr(transform)
    image = _gradient_image(32, 32)
    torch.manual_seed(9)
    a = transform(image)
    torch.manual_seed(9)
    assert torch.equal(a, clone(image))


def test_transform_argument_errors() -> None:
    with pytest.raises(ValueError, match="'BGR' needs a 3-channel image"):
        ImageTransform(mean=(0.5,), std=(0.5,), channel_order="BGR")(Image.new("L", (4, 4)))
    with pytest.raises(ValueError, match="mean/std have 3 channels but the image"):
        ImageTransform()(Image.new("LA", (4, 4)))
    with pytest.raises(ValueError, match="std must be positive"):
        ImageTransform(std=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="scale must be"):
        train_transform(scale=(0.5, 0.2))
    with pytest.raises(ValueError, match=r"crop \(300\) must not exceed resize \(256\)"):
        eval_transform(crop=300)


def test_pil_to_tensor_modes() -> None:
    bits = Image.new("1", (3, 2), 1)
    bits.putpixel((0, 0), 0)
    out = pil_to_tensor(bits)
    assert out.shape == (1, 2, 3) and out.tolist() == [[[0.0, 1.0, 1.0], [1.0, 1.0, 1.0]]]
    with pytest.raises(ValueError, match="palette"):
        pil_to_tensor(Image.new("P", (2, 2)))
    with pytest.raises(ValueError, match="not 8-bit"):
        pil_to_tensor(Image.new("I", (2, 2)))
