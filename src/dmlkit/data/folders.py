"""Generic image datasets: one folder per class, or a CSV manifest of paths and labels."""

from __future__ import annotations

import csv
from pathlib import Path

from .datasets import ImageFileDataset, ImageToTensor, OnError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)


def image_folder(
    root: str | Path,
    transform: ImageToTensor | None = None,
    on_error: OnError = "raise",
    mode: str = "RGB",
) -> ImageFileDataset:
    """Images arranged as ``<root>/<class name>/**/<image>``, one sub-folder per class.

    Classes are the sub-folders in sorted order (hidden ones ignored); the label of an image is
    its class folder's index. Files are found recursively and kept when their extension is a
    known image type (case-insensitive); anything else (READMEs, thumbnails databases) is ignored.

    Args:
        root: The folder holding one sub-folder per class.
        transform: Pillow image to tensor; ``None`` gives float ``[C, H, W]`` in ``[0, 1]``.
        on_error: ``"raise"`` or ``"skip"`` unreadable images (see :class:`ImageFileDataset`).
        mode: Pillow mode to convert each image to.

    Returns:
        The dataset, with ``class_names`` set to the folder names.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} not found or not a folder")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise ValueError(f"{root} has no class sub-folders; expected <root>/<class>/<image>")
    paths: list[Path] = []
    labels: list[int] = []
    for label, class_dir in enumerate(class_dirs):
        files = sorted(
            p for p in class_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not files:
            raise ValueError(f"class folder {class_dir} holds no image files")
        paths.extend(files)
        labels.extend([label] * len(files))
    return ImageFileDataset(
        paths, labels, transform, on_error, class_names=[d.name for d in class_dirs], mode=mode
    )


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def csv_manifest(
    path: str | Path,
    split: str | None = None,
    transform: ImageToTensor | None = None,
    root: str | Path | None = None,
    on_error: OnError = "raise",
    mode: str = "RGB",
) -> ImageFileDataset:
    """Images listed in a CSV file with a header and columns ``path,label[,split]``.

    Labels are integers when every label in the file is an integer literal; otherwise all are
    treated as names, mapped to ids in sorted name order (over the whole file, so ids agree
    between splits), and kept in ``class_names``.

    Args:
        path: The CSV file.
        split: Keep only rows whose ``split`` column equals this; ``None`` keeps every row.
        transform: Pillow image to tensor; ``None`` gives float ``[C, H, W]`` in ``[0, 1]``.
        root: Folder that relative image paths are resolved against; default: the CSV's folder.
        on_error: ``"raise"`` or ``"skip"`` unreadable images (see :class:`ImageFileDataset`).
        mode: Pillow mode to convert each image to.

    Returns:
        The dataset.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CSV manifest {path} not found")
    base = Path(root) if root is not None else path.parent
    required = ["path", "label"] + (["split"] if split is not None else [])
    rows: list[tuple[str, str, str | None]] = []
    # utf-8-sig: spreadsheet programs often start a CSV with a byte-order mark.
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [name.strip() for name in reader.fieldnames or []]
        missing = [name for name in required if name not in header]
        if missing:
            raise ValueError(
                f"{path}, line 1: header {header} lacks column(s) {missing}; "
                "expected path,label[,split]"
            )
        reader.fieldnames = header
        for row in reader:
            if None in row:
                raise ValueError(
                    f"{path}, line {reader.line_num}: more fields than the header's {len(header)}"
                )
            values = {key: (value or "").strip() for key, value in row.items()}
            for column in required:
                if not values.get(column):
                    raise ValueError(f"{path}, line {reader.line_num}: empty {column!r}")
            rows.append((values["path"], values["label"], values.get("split")))
    if not rows:
        raise ValueError(f"{path} lists no images")

    label_texts = [label for _, label, _ in rows]
    class_names: list[str] | None = None
    if all(_is_int(text) for text in label_texts):
        label_ids = [int(text) for text in label_texts]
    else:
        class_names = sorted(set(label_texts))
        index = {name: i for i, name in enumerate(class_names)}
        label_ids = [index[text] for text in label_texts]

    keep = [i for i, row in enumerate(rows) if split is None or row[2] == split]
    if not keep:
        found = sorted({row[2] for row in rows if row[2] is not None})
        raise ValueError(f"{path} has no rows with split {split!r}; splits present: {found}")
    paths = [base / rows[i][0] for i in keep]
    return ImageFileDataset(
        paths, [label_ids[i] for i in keep], transform, on_error, class_names, mode=mode
    )
