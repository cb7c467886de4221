"""Builds the Omniglot set embedded in dmlkit (``dmlkit.data.omniglot28``) from the full arrays.

Reads ``<source>/images_background.npz``, ``images_evaluation.npz`` (checked against their
``.sha256`` files) and ``alphabets.tsv``, and writes every one of the 1,623 characters × 20
drawers at 28 × 28 as packed bits to ``src/dmlkit/data/embedded/omniglot28.npz``:

- Resize: the 105 × 105 image is padded with paper to 112 × 112 (3 pixels before, 4 after) and
  cut into 4 × 4 blocks; an output pixel is ink when at least 4 of its block's 16 pixels are ink.
  Integer counts only, so no floating-point rounding can change a pixel between machines.
- Arrays: ``images`` uint8 ``[1623, 20, 98]`` (``np.packbits`` of the 28 × 28 ink mask, 1 = ink,
  rows first), ``alphabet`` int16 ``[1623]`` (index into ``alphabets``) and ``alphabets`` (the
  50 alphabet names). Character ``k`` has the global Omniglot id ``k + 1``; ids 1–964 are the
  background set, 965–1623 the evaluation set.
- Bytes: an uncompressed zip with fixed entry dates, so the same source gives the same file on
  every machine (zlib's output can differ between builds; the file is 3.2 MB either way).

Usage: ``python scripts/build_embedded_omniglot.py [--source DIR] [--out FILE]``; the source
defaults to ``$DMLKIT_DATA/omniglot``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import os
import sys
import zipfile
from pathlib import Path

import numpy as np
import numpy.typing as npt

from dmlkit.training.checkpoint import _write_atomic

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "src" / "dmlkit" / "data" / "embedded" / "omniglot28.npz"
SIZE = 28
BLOCK = 4
PAD_BEFORE = 3  # 105 + 3 + 4 = 112 = 28 × 4
MIN_INK = 4  # of a block's 16 pixels: thin strokes survive without thickening the others
SETS = {"background": 964, "evaluation": 659}
DRAWERS = 20
# 1980-01-01, the earliest date a zip entry can hold.
ZIP_DATE = (1980, 1, 1, 0, 0, 0)


def _checked_npz(path: Path) -> npt.NDArray[np.bool_]:
    """The ``images`` array of a source npz file, after checking its SHA-256 and shape."""
    checksum_file = path.with_name(path.name + ".sha256")
    if not checksum_file.is_file():
        raise FileNotFoundError(f"{checksum_file} not found; it holds the expected SHA-256")
    expected = checksum_file.read_text().split()[0]
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    if actual != expected:
        raise ValueError(f"{path}: SHA-256 is {actual}, {checksum_file} says {expected}")
    with np.load(path) as archive:
        images = archive["images"]
    return images


def _alphabets(path: Path) -> tuple[list[str], npt.NDArray[np.int16]]:
    """The alphabet names, and the alphabet of every character (by global id − 1)."""
    names: list[str] = []
    alphabet = np.full(sum(SETS.values()), -1, dtype=np.int16)
    with path.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            first, last = int(row["first_char_id"]), int(row["last_char_id"])
            alphabet[first - 1 : last] = len(names)
            names.append(row["alphabet"])
    if (alphabet < 0).any():
        missing = np.flatnonzero(alphabet < 0) + 1
        raise ValueError(f"{path} gives no alphabet to character id(s) {missing[:10].tolist()}")
    return names, alphabet


def shrink(paper: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """105 × 105 PNG pixels (True = paper) to a 28 × 28 ink mask, as the module docstring says.

    Args:
        paper: bool ``[..., 105, 105]``.

    Returns:
        bool ``[..., 28, 28]``, True = ink.
    """
    side = SIZE * BLOCK
    padded = np.zeros((*paper.shape[:-2], side, side), dtype=np.bool_)
    height, width = paper.shape[-2:]
    padded[..., PAD_BEFORE : PAD_BEFORE + height, PAD_BEFORE : PAD_BEFORE + width] = ~paper
    blocks = padded.reshape(*paper.shape[:-2], SIZE, BLOCK, SIZE, BLOCK)
    return blocks.sum(axis=(-3, -1), dtype=np.int8) >= MIN_INK


def build(source: Path) -> bytes:
    """The embedded file's bytes, from the Omniglot folder ``source``.

    Args:
        source: The folder holding the two npz arrays, their ``.sha256`` files and
            ``alphabets.tsv``.

    Returns:
        The npz file's bytes.
    """
    packed = []
    for name, n_chars in SETS.items():
        images = _checked_npz(source / f"images_{name}.npz")
        if images.shape != (n_chars, DRAWERS, 105, 105):
            raise ValueError(
                f"images_{name}.npz: expected [{n_chars}, 20, 105, 105], got {images.shape}"
            )
        ink = shrink(images)
        packed.append(np.packbits(ink.reshape(n_chars, DRAWERS, SIZE * SIZE), axis=-1))
    names, alphabet = _alphabets(source / "alphabets.tsv")
    arrays: dict[str, np.ndarray] = {
        "images": np.concatenate(packed),
        "alphabet": alphabet,
        "alphabets": np.array(names),
    }
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for key, array in arrays.items():
            entry = io.BytesIO()
            np.lib.format.write_array(entry, array, allow_pickle=False)
            archive.writestr(zipfile.ZipInfo(f"{key}.npy", ZIP_DATE), entry.getvalue())
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> int:
    """The command line: builds the file and prints its path and SHA-256."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--source", type=Path, help="Omniglot folder (default $DMLKIT_DATA/omniglot)"
    )
    parser.add_argument("--out", type=Path, default=OUT, help=f"output file (default {OUT})")
    args = parser.parse_args(argv)
    source = args.source
    if source is None:
        if not os.environ.get("DMLKIT_DATA"):
            parser.error("give --source or set $DMLKIT_DATA (the folder holding omniglot/)")
        source = Path(os.environ["DMLKIT_DATA"]) / "omniglot"
    content = build(source)
    _write_atomic(args.out, lambda file: file.write(content))
    print(f"{args.out}: {len(content):,} bytes, sha256 {hashlib.sha256(content).hexdigest()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
