"""Checksummed downloads and safe archive extraction for the standard datasets.

A download streams to ``<file>.part``, is checked against its Content-Length and checksum, and
only then is renamed into place, so an interrupted or corrupt download is never mistaken for a
good one. An extraction writes a marker file when it finishes, so a finished one is not redone.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import tarfile
import urllib.parse
import urllib.request
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

_CHUNK_BYTES = 1 << 20
_HEX_LENGTHS = {"md5": 32, "sha256": 64}


class DownloadError(OSError):
    """A download failed, was cut short, or does not match its checksum."""


@dataclass(frozen=True)
class RemoteFile:
    """A published file: where to fetch it and what it must hash to.

    Attributes:
        url: The download address.
        checksum: ``"md5:<hex>"`` or ``"sha256:<hex>"``.
        filename: The name it is saved under.
    """

    url: str
    checksum: str
    filename: str


# The md5 values below are the ones published for these archives; they agree with the values in
# pytorch-metric-learning's and several other projects' dataset code. The archives themselves
# were not downloaded here (no network), so the values are not independently confirmed, and the
# hosts may have moved: pass url= (and checksum=) to the loaders to use a mirror.
CUB200_ARCHIVE = RemoteFile(
    url="https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz",
    checksum="md5:97eceeb196236b17998738112f37df78",
    filename="CUB_200_2011.tgz",
)
# The ai.stanford.edu/~jkrause pages have been taken down at times; other code fetches the same
# files (same md5) from http://imagenet.stanford.edu/internal/car196/.
CARS196_IMAGES = RemoteFile(
    url="http://ai.stanford.edu/~jkrause/car196/car_ims.tgz",
    checksum="md5:d5c8f0aa497503f355e17dc7886c3f14",
    filename="car_ims.tgz",
)
CARS196_ANNOTATIONS = RemoteFile(
    url="http://ai.stanford.edu/~jkrause/car196/cars_annos.mat",
    checksum="md5:b407c6086d669747186bd1d764ff9dbc",
    filename="cars_annos.mat",
)
# Some networks block FTP; the same file is also served as
# http://ftp.cs.stanford.edu/cs/cvgl/Stanford_Online_Products.zip.
SOP_ARCHIVE = RemoteFile(
    url="ftp://cs.stanford.edu/cs/cvgl/Stanford_Online_Products.zip",
    checksum="md5:7f73d41a2f44250d4779881525aea32e",
    filename="Stanford_Online_Products.zip",
)

REGISTRY: dict[str, tuple[RemoteFile, ...]] = {
    "cub200": (CUB200_ARCHIVE,),
    "cars196": (CARS196_IMAGES, CARS196_ANNOTATIONS),
    "stanford_online_products": (SOP_ARCHIVE,),
}


def _parse_checksum(checksum: str) -> tuple[str, str]:
    algorithm, _, digest = checksum.partition(":")
    algorithm, digest = algorithm.lower(), digest.lower()
    if algorithm not in _HEX_LENGTHS or len(digest) != _HEX_LENGTHS[algorithm]:
        raise ValueError(f"checksum must be 'md5:<32 hex>' or 'sha256:<64 hex>', got {checksum!r}")
    try:
        int(digest, 16)
    except ValueError:
        raise ValueError(f"checksum digest is not hexadecimal: {checksum!r}") from None
    return algorithm, digest


def _file_digest(path: Path, algorithm: str) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


def _interrupted(url: str, got: int, expected: int | None) -> DownloadError:
    return DownloadError(f"download of {url} was interrupted: got {got} of {expected} bytes")


def _fetch(url: str, part: Path, algorithm: str, timeout: float) -> str:
    """Streams ``url`` into ``part``; returns the hex digest of what was received."""
    digest = hashlib.new(algorithm)
    got = 0
    expected: int | None = None
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, part.open("wb") as out:
            length = response.headers.get("Content-Length")
            expected = int(length) if length is not None and length.isdigit() else None
            while chunk := response.read(_CHUNK_BYTES):
                digest.update(chunk)
                out.write(chunk)
                got += len(chunk)
    except http.client.IncompleteRead as exc:
        raise _interrupted(url, got + len(exc.partial), expected) from exc
    except (OSError, http.client.HTTPException) as exc:
        raise DownloadError(f"download of {url} failed: {exc}") from exc
    # http.client returns a short body without complaint when the server closes early.
    if expected is not None and got != expected:
        raise _interrupted(url, got, expected)
    return digest.hexdigest()


def download_file(url: str, path: str | Path, checksum: str, *, timeout: float = 60.0) -> Path:
    """Downloads ``url`` to ``path`` unless a file with the right checksum is already there.

    An existing file with the wrong checksum is reported (a warning), deleted and downloaded
    again. The download goes to ``<path>.part`` and replaces ``path`` only once its length and
    checksum are right; on any failure the ``.part`` file is deleted.

    Args:
        url: What to fetch (``http``, ``https``, ``ftp`` or ``file``).
        path: Where to save it.
        checksum: ``"md5:<hex>"`` or ``"sha256:<hex>"``.
        timeout: Seconds to wait for the server before giving up.

    Returns:
        ``path``.
    """
    algorithm, expected = _parse_checksum(checksum)
    path = Path(path)
    if path.is_file():
        actual = _file_digest(path, algorithm)
        if actual == expected:
            return path
        warnings.warn(
            f"{path} exists but its {algorithm} is {actual}, expected {expected}; "
            f"deleting it and downloading {url} again",
            stacklevel=2,
        )
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    try:
        actual = _fetch(url, part, algorithm, timeout)
        if actual != expected:
            raise DownloadError(
                f"checksum mismatch for {url}: expected {algorithm} {expected}, got {actual}; "
                "the download was deleted"
            )
        os.replace(part, path)
    finally:
        part.unlink(missing_ok=True)
    return path


def _check_member(name: str, archive: Path) -> None:
    posix = PurePosixPath(name.replace("\\", "/"))
    if posix.is_absolute() or PureWindowsPath(name).drive or ".." in posix.parts:
        raise DownloadError(
            f"refusing to extract {archive}: member {name!r} has an absolute path or '..'"
        )


def extract_archive(archive: str | Path, dest: str | Path) -> None:
    """Extracts a tar (optionally gzip/bz2/xz-compressed) or zip archive into ``dest``.

    The format is read from the file's content, not its name. Members with absolute paths or
    ``..`` are rejected before anything is written; tar links, devices and permissions are
    further restricted by tarfile's ``"data"`` filter.

    Args:
        archive: The archive file.
        dest: The folder to extract into (created if needed).
    """
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                for name in zf.namelist():
                    _check_member(name, archive)
                zf.extractall(dest)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tf:
                for member in tf.getmembers():
                    _check_member(member.name, archive)
                tf.extractall(dest, filter="data")
        else:
            raise DownloadError(f"{archive} is neither a tar nor a zip archive")
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as exc:
        raise DownloadError(f"cannot extract {archive}: {exc}") from exc


def download_and_extract(
    url: str,
    root: str | Path,
    checksum: str,
    filename: str | None = None,
    *,
    timeout: float = 60.0,
) -> Path:
    """Downloads an archive into ``root`` and extracts it there, once.

    A marker file ``<root>/.<filename>.extracted`` records a finished extraction (with the
    checksum it was for); when it is present nothing is downloaded or extracted again. The
    archive is kept next to the extracted files.

    Args:
        url: The archive's address.
        root: The folder to download and extract into.
        checksum: ``"md5:<hex>"`` or ``"sha256:<hex>"`` of the archive.
        filename: The archive's name on disk; default: the last part of the URL's path.
        timeout: Seconds to wait for the server before giving up.

    Returns:
        ``root``.
    """
    algorithm, digest = _parse_checksum(checksum)
    name = filename or PurePosixPath(urllib.parse.urlsplit(url).path).name
    if not name:
        raise ValueError(f"cannot tell the archive's file name from {url!r}; pass filename=")
    root = Path(root)
    marker = root / f".{name}.extracted"
    stamp = f"{algorithm}:{digest}"
    if marker.is_file() and marker.read_text(encoding="utf-8").strip() == stamp:
        return root
    archive = download_file(url, root / name, checksum, timeout=timeout)
    extract_archive(archive, root)
    marker.write_text(stamp + "\n", encoding="utf-8")
    return root
