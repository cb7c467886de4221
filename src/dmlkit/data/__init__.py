"""Datasets, class-disjoint splits, downloads and image transforms for metric learning.

Every dataset is a :class:`LabelledDataset`: ``(sample, label)`` items plus an int64 ``labels``
array that can be read without decoding any image. This package imports nothing else from
dmlkit, so any part of the library can build on it.
"""

from .arrays import digits, omniglot, omniglot28
from .benchmarks import cars196, cub100_subset, cub200, stanford_online_products
from .datasets import (
    ArrayDataset,
    ImageFileDataset,
    ImageReadError,
    LabelledDataset,
    Subset,
    read_image,
    subset,
)
from .download import (
    REGISTRY,
    DownloadError,
    RemoteFile,
    download_and_extract,
    download_file,
    extract_archive,
)
from .folders import IMAGE_EXTENSIONS, csv_manifest, image_folder
from .splits import Fold, class_disjoint_halves, class_kfold, classes_subset
from .transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CenterCrop,
    Compose,
    ImageTransform,
    RandomHorizontalFlip,
    RandomResizedCrop,
    Resize,
    ToTensor,
    eval_transform,
    pil_to_tensor,
    train_transform,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "REGISTRY",
    "ArrayDataset",
    "CenterCrop",
    "Compose",
    "DownloadError",
    "Fold",
    "ImageFileDataset",
    "ImageReadError",
    "ImageTransform",
    "LabelledDataset",
    "RandomHorizontalFlip",
    "RandomResizedCrop",
    "RemoteFile",
    "Resize",
    "Subset",
    "ToTensor",
    "cars196",
    "class_disjoint_halves",
    "class_kfold",
    "classes_subset",
    "csv_manifest",
    "cub100_subset",
    "cub200",
    "digits",
    "download_and_extract",
    "download_file",
    "eval_transform",
    "extract_archive",
    "image_folder",
    "omniglot",
    "omniglot28",
    "pil_to_tensor",
    "read_image",
    "stanford_online_products",
    "subset",
    "train_transform",
]
