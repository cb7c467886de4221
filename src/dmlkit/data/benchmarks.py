"""The standard metric-learning benchmarks in their published layouts.

Each split is class-disjoint, following the usual protocol: train on the first half of the
classes, test on the second. Labels are the published class ids.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from ._common import (
    LabelArray,
    check_choice,
    parse_int,
    read_rows,
    require_file,
    split_by_first_test_class,
)
from .datasets import ImageFileDataset, ImageToTensor, OnError
from .download import (
    CARS196_ANNOTATIONS,
    CARS196_IMAGES,
    CUB200_ARCHIVE,
    SOP_ARCHIVE,
    RemoteFile,
    download_and_extract,
    download_file,
)
from .splits import classes_subset

_SPLITS = ("train", "test", "all")


def _obtain(
    required: Path,
    root: Path,
    remote: RemoteFile,
    download: bool,
    url: str | None,
    checksum: str | None,
    extract: bool = True,
) -> Path:
    """Makes sure ``required`` exists, downloading ``remote`` into ``root`` when allowed.

    Nothing is fetched when ``required`` is already there, whatever ``download`` says.
    """
    if not required.exists():
        source = url or remote.url
        if not download:
            raise FileNotFoundError(
                f"{required} not found; pass download=True to fetch {remote.filename} from "
                f"{source} into {root}"
            )
        if extract:
            download_and_extract(source, root, checksum or remote.checksum, remote.filename)
        else:
            download_file(source, root / remote.filename, checksum or remote.checksum)
        require_file(required, f"{remote.filename} from {source} did not provide it")
    return required


def _read_cub_index(folder: Path, sep: str | None) -> tuple[list[str], LabelArray]:
    """Reads CUB's ``images.txt`` and ``image_class_labels.txt``, joined on the image id."""
    images_txt = folder / "images.txt"
    labels_txt = require_file(folder / "image_class_labels.txt", "it comes with images.txt")
    label_of = {
        parse_int(image_id, labels_txt, line_no, "image id"): parse_int(
            class_id, labels_txt, line_no, "class id"
        )
        for line_no, (image_id, class_id) in read_rows(labels_txt, 2, sep)
    }
    paths, labels = [], []
    for line_no, (image_id, rel_path) in read_rows(images_txt, 2, sep):
        key = parse_int(image_id, images_txt, line_no, "image id")
        if key not in label_of:
            raise ValueError(
                f"{labels_txt} has no label for image id {key} ({images_txt}, line {line_no})"
            )
        paths.append(rel_path)
        labels.append(label_of[key])
    return paths, np.asarray(labels, dtype=np.int64)


def cub200(
    root: str | Path,
    split: str = "train",
    transform: ImageToTensor | None = None,
    download: bool = False,
    on_error: OnError = "raise",
    *,
    url: str | None = None,
    checksum: str | None = None,
) -> ImageFileDataset:
    """CUB-200-2011 birds: 11,788 images of 200 species.

    Args:
        root: Folder holding ``CUB_200_2011/`` (``images.txt``, ``image_class_labels.txt``,
            ``images/``).
        split: ``"train"`` (classes 1-100, 5,864 images), ``"test"`` (101-200, 5,924) or
            ``"all"``.
        transform: Pillow image to tensor; ``None`` gives float ``[3, H, W]`` in ``[0, 1]``.
        download: Fetch and extract ``CUB_200_2011.tgz`` into ``root`` if it is not there.
        on_error: ``"raise"`` or ``"skip"`` unreadable images (see :class:`ImageFileDataset`).
        url: Download address overriding the official one (e.g. a mirror).
        checksum: ``"md5:<hex>"`` or ``"sha256:<hex>"`` overriding the official checksum.

    Returns:
        The dataset; labels are the CUB class ids 1-200.
    """
    check_choice("split", split, _SPLITS)
    root = Path(root)
    folder = root / "CUB_200_2011"
    _obtain(folder / "images.txt", root, CUB200_ARCHIVE, download, url, checksum)
    rel_paths, labels = _read_cub_index(folder, sep=None)
    keep = split_by_first_test_class(labels, split, first_test_class=101)
    paths = [folder / "images" / rel_paths[i] for i in keep]
    return ImageFileDataset(paths, labels[keep], transform, on_error)


def cub100_subset(
    root: str | Path,
    split: str = "train",
    transform: ImageToTensor | None = None,
    on_error: OnError = "raise",
) -> ImageFileDataset:
    """The 100-class CUB subset (227x227 JPEGs) with the standard class split.

    The split comes from the ``standard_split`` column of ``cub_original_ids.tsv``: a class is
    ``train`` when its original CUB id is 1-100, which gives 58 training classes (3,428 images)
    and 42 test classes (2,474 images).

    Args:
        root: The subset's folder (``images.txt``, ``image_class_labels.txt``, ``classes.txt``,
            ``cub_original_ids.tsv``, ``images/<Class>/<NNNN>.jpg``).
        split: ``"train"``, ``"test"`` or ``"all"``.
        transform: Pillow image to tensor; ``None`` gives float ``[3, 227, 227]`` in ``[0, 1]``.
        on_error: ``"raise"`` or ``"skip"`` unreadable images (see :class:`ImageFileDataset`).

    Returns:
        The dataset; labels are the subset class ids 0-99 and ``class_names[label]`` names them.
    """
    check_choice("split", split, _SPLITS)
    root = Path(root)
    require_file(root / "images.txt", "expected the cub100_subset folder")
    rel_paths, labels = _read_cub_index(root, sep=",")

    classes_txt = require_file(root / "classes.txt", "it comes with images.txt")
    names = {
        parse_int(class_id, classes_txt, line_no, "class id"): name
        for line_no, (class_id, name) in read_rows(classes_txt, 2, ",")
    }
    if sorted(names) != list(range(len(names))):
        raise ValueError(f"{classes_txt}: class ids must be 0..{len(names) - 1}")

    tsv = require_file(root / "cub_original_ids.tsv", "it holds the standard_split column")
    split_of: dict[int, str] = {}
    with tsv.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t")
        for column in ("subset_class_id", "standard_split"):
            if column not in (reader.fieldnames or []):
                raise ValueError(f"{tsv}, line 1: no column {column!r}")
        for row in reader:
            class_id = parse_int(row["subset_class_id"], tsv, reader.line_num, "subset_class_id")
            split_of[class_id] = check_choice(
                f"{tsv}, line {reader.line_num}: standard_split", row["standard_split"], _SPLITS[:2]
            )
    unknown = sorted(set(labels.tolist()) - set(split_of))
    if unknown:
        raise ValueError(f"{tsv} gives no standard_split for class id(s) {unknown[:10]}")

    if split == "all":
        keep = np.arange(len(labels), dtype=np.int64)
    else:
        keep = classes_subset(labels, sorted(c for c, s in split_of.items() if s == split))
    paths = [root / "images" / rel_paths[i] for i in keep]
    class_names = [names[i] for i in range(len(names))]
    return ImageFileDataset(paths, labels[keep], transform, on_error, class_names)


def cars196(
    root: str | Path,
    split: str = "train",
    transform: ImageToTensor | None = None,
    download: bool = False,
    on_error: OnError = "raise",
    *,
    url: str | None = None,
    checksum: str | None = None,
    annotations_url: str | None = None,
    annotations_checksum: str | None = None,
) -> ImageFileDataset:
    """Stanford Cars196: 16,185 images of 196 car models.

    The ``test`` field of ``cars_annos.mat`` (a within-class classification split) is ignored:
    metric learning splits by class.

    Args:
        root: Folder holding ``cars_annos.mat`` and ``car_ims/``.
        split: ``"train"`` (classes 1-98, 8,054 images), ``"test"`` (99-196, 8,131) or
            ``"all"``.
        transform: Pillow image to tensor; ``None`` gives float ``[3, H, W]`` in ``[0, 1]``.
        download: Fetch ``car_ims.tgz`` and ``cars_annos.mat`` into ``root`` if they are not
            there.
        on_error: ``"raise"`` or ``"skip"`` unreadable images (see :class:`ImageFileDataset`).
        url: Address of ``car_ims.tgz`` overriding the official one.
        checksum: Checksum of ``car_ims.tgz`` overriding the official one.
        annotations_url: Address of ``cars_annos.mat`` overriding the official one.
        annotations_checksum: Checksum of ``cars_annos.mat`` overriding the official one.

    Returns:
        The dataset; labels are the class ids 1-196.
    """
    check_choice("split", split, _SPLITS)
    root = Path(root)
    annotations = _obtain(
        root / "cars_annos.mat",
        root,
        CARS196_ANNOTATIONS,
        download,
        annotations_url,
        annotations_checksum,
        extract=False,
    )
    _obtain(root / "car_ims", root, CARS196_IMAGES, download, url, checksum)
    # Imported here so that importing dmlkit.data does not pay for scipy's start-up.
    import scipy.io

    try:
        mat = scipy.io.loadmat(annotations, squeeze_me=True)
    except (ValueError, OSError, TypeError, scipy.io.matlab.MatReadError) as exc:
        raise ValueError(f"cannot read {annotations} as a MATLAB file: {exc}") from exc
    if "annotations" not in mat:
        raise ValueError(f"{annotations} has no 'annotations' variable")
    records = np.atleast_1d(mat["annotations"])
    fields = records.dtype.names or ()
    for field in ("relative_im_path", "class"):
        if field not in fields:
            raise ValueError(f"{annotations}: annotations have no field {field!r}; got {fields}")
    rel_paths = [str(p) for p in np.atleast_1d(records["relative_im_path"])]
    labels = np.array([int(c) for c in np.atleast_1d(records["class"])], dtype=np.int64)
    keep = split_by_first_test_class(labels, split, first_test_class=99)
    return ImageFileDataset([root / rel_paths[i] for i in keep], labels[keep], transform, on_error)


_SOP_HEADER = ["image_id", "class_id", "super_class_id", "path"]
_SOP_FILES = {
    "train": ("Ebay_train.txt",),
    "test": ("Ebay_test.txt",),
    "all": ("Ebay_train.txt", "Ebay_test.txt"),
}


def stanford_online_products(
    root: str | Path,
    split: str = "train",
    transform: ImageToTensor | None = None,
    download: bool = False,
    on_error: OnError = "raise",
    *,
    url: str | None = None,
    checksum: str | None = None,
) -> ImageFileDataset:
    """Stanford Online Products: 120,053 images of 22,634 products.

    The split is the published one: ``Ebay_train.txt`` (11,318 classes, 59,551 images) and
    ``Ebay_test.txt`` (11,316 classes, 60,502 images).

    Args:
        root: Folder holding ``Stanford_Online_Products/`` (``Ebay_train.txt``,
            ``Ebay_test.txt`` and the ``<category>_final/`` image folders).
        split: ``"train"``, ``"test"`` or ``"all"``.
        transform: Pillow image to tensor; ``None`` gives float ``[3, H, W]`` in ``[0, 1]``.
        download: Fetch and extract ``Stanford_Online_Products.zip`` into ``root`` if it is not
            there.
        on_error: ``"raise"`` or ``"skip"`` unreadable images (see :class:`ImageFileDataset`).
        url: Download address overriding the official one.
        checksum: Checksum overriding the official one.

    Returns:
        The dataset; labels are the product class ids (``class_id``).
    """
    check_choice("split", split, _SPLITS)
    root = Path(root)
    folder = root / "Stanford_Online_Products"
    paths: list[Path] = []
    labels: list[int] = []
    for name in _SOP_FILES[split]:
        index = _obtain(folder / name, root, SOP_ARCHIVE, download, url, checksum)
        rows = read_rows(index, len(_SOP_HEADER))
        if not rows or rows[0][1] != _SOP_HEADER:
            raise ValueError(f"{index}: the first line must be the header {' '.join(_SOP_HEADER)}")
        for line_no, (_, class_id, _, rel_path) in rows[1:]:
            labels.append(parse_int(class_id, index, line_no, "class_id"))
            paths.append(folder / rel_path)
    return ImageFileDataset(paths, labels, transform, on_error)
