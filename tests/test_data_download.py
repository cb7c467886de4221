"""dmlkit.data downloads and the CUB-200 / Cars196 / SOP loaders, against a local HTTP server.

The archives are built here in the published layouts, with a few 16x16 images each.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
import threading
import zipfile
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from dmlkit.data import (
    REGISTRY,
    DownloadError,
    cars196,
    cub200,
    download_and_extract,
    download_file,
    extract_archive,
    stanford_online_products,
)


class FileServer:
    """Serves in-memory files over HTTP on 127.0.0.1 and counts the requests for each."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.truncated: set[str] = set()
        self.requests: Counter[str] = Counter()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                name = self.path.lstrip("/")
                server.requests[name] += 1
                body = server.files.get(name)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                # An interrupted transfer: announce twice the bytes, send half, hang up.
                cut = name in server.truncated
                self.send_header("Content-Length", str(2 * len(body) if cut else len(body)))
                self.end_headers()
                self.wfile.write(body)
                self.close_connection = True

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"


@pytest.fixture
def server() -> Iterator[FileServer]:
    srv = FileServer()
    srv.thread.start()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _image_bytes(value: int, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (value, value, value)).save(buf, format=fmt)
    return buf.getvalue()


def _tar_gz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _cub_archive() -> bytes:
    """CUB_200_2011.tgz with classes 1, 2 (train) and 101, 150 (test), two images each.

    The image of id ``i`` has grey level ``10 * i``; ids are listed out of class order.
    """
    classes = {1: 1, 2: 101, 3: 2, 4: 150, 5: 1, 6: 101, 7: 2, 8: 150}
    files = {
        f"CUB_200_2011/images/{c:03d}.Bird_{c}/img_{i}.jpg": _image_bytes(10 * i, "PNG")
        for i, c in classes.items()
    }
    files["CUB_200_2011/images.txt"] = "".join(
        f"{i} {c:03d}.Bird_{c}/img_{i}.jpg\n" for i, c in classes.items()
    ).encode()
    files["CUB_200_2011/image_class_labels.txt"] = "".join(
        f"{i} {c}\n" for i, c in classes.items()
    ).encode()
    files["attributes.txt"] = b"the official archive has this file at the top level\n"
    return _tar_gz(files)


def _cars_files(tmp_path: Path) -> tuple[bytes, bytes]:
    """car_ims.tgz and cars_annos.mat with classes 1, 98 (train) and 99, 196 (test)."""
    classes = [1, 99, 98, 196, 1, 99]
    images = {f"car_ims/{i + 1:06d}.jpg": _image_bytes(20 * i, "JPEG") for i in range(6)}
    records = np.zeros(
        (1, len(classes)), dtype=[("relative_im_path", "O"), ("class", "O"), ("test", "O")]
    )
    for i, c in enumerate(classes):
        records[0, i] = (
            f"car_ims/{i + 1:06d}.jpg",
            np.array([[c]], dtype=np.uint8),
            np.array([[i % 2]]),
        )
    mat = tmp_path / "annos_source.mat"
    scipy.io.savemat(mat, {"annotations": records})
    return _tar_gz(images), mat.read_bytes()


def _sop_archive() -> bytes:
    header = "image_id class_id super_class_id path\n"
    train = (
        header
        + "1 1 1 bicycle_final/a_0.JPG\n2 1 1 bicycle_final/a_1.JPG\n3 2 2 chair_final/b_0.JPG\n"
    )
    test = header + "1 11319 1 bicycle_final/c_0.JPG\n2 22634 3 table_final/d_0.JPG\n"
    files = {
        "Stanford_Online_Products/Ebay_train.txt": train.encode(),
        "Stanford_Online_Products/Ebay_test.txt": test.encode(),
    }
    for i, rel in enumerate(
        [
            "bicycle_final/a_0.JPG",
            "bicycle_final/a_1.JPG",
            "chair_final/b_0.JPG",
            "bicycle_final/c_0.JPG",
            "table_final/d_0.JPG",
        ]
    ):
        files[f"Stanford_Online_Products/{rel}"] = _image_bytes(30 * i, "JPEG")
    return _zip(files)


# --- the standard datasets, downloaded from the local server -------------------------------------


def test_cub200_downloads_extracts_once_and_splits_by_class(
    server: FileServer, tmp_path: Path
) -> None:
    archive = _cub_archive()
    server.files["cub.tgz"] = archive
    root = tmp_path / "data"
    args = {"download": True, "url": server.url("cub.tgz"), "checksum": sha256(archive)}

    train = cub200(root, "train", **args)
    assert train.labels.tolist() == [1, 2, 1, 2]
    assert [p.name for p in train.paths] == ["img_1.jpg", "img_3.jpg", "img_5.jpg", "img_7.jpg"]
    image, label = train[1]
    assert label == 2 and image.shape == (3, 16, 16)
    assert image[0, 0, 0].item() == pytest.approx(30 / 255)  # image id 3

    test = cub200(root, "test", **args)
    assert test.labels.tolist() == [101, 150, 101, 150]
    assert len(cub200(root, "all", **args)) == 8
    assert server.requests["cub.tgz"] == 1  # later calls reuse the extracted files
    assert (root / "CUB_200_2011.tgz").read_bytes() == archive
    assert not list(root.glob("*.part"))


def test_cars196_downloads_both_files_and_splits_by_class(
    server: FileServer, tmp_path: Path
) -> None:
    images, annotations = _cars_files(tmp_path)
    server.files.update({"car_ims.tgz": images, "cars_annos.mat": annotations})
    args = {
        "download": True,
        "url": server.url("car_ims.tgz"),
        "checksum": sha256(images),
        "annotations_url": server.url("cars_annos.mat"),
        "annotations_checksum": sha256(annotations),
    }
    root = tmp_path / "cars"
    train = cars196(root, "train", **args)
    assert train.labels.tolist() == [1, 98, 1]
    assert [p.name for p in train.paths] == ["000001.jpg", "000003.jpg", "000005.jpg"]
    assert cars196(root, "test", **args).labels.tolist() == [99, 196, 99]
    image, _ = train[1]
    assert image.mean().item() == pytest.approx(40 / 255, abs=2 / 255)  # JPEG: nearly exact
    assert server.requests == Counter({"car_ims.tgz": 1, "cars_annos.mat": 1})


def test_sop_downloads_and_uses_the_published_split(server: FileServer, tmp_path: Path) -> None:
    archive = _sop_archive()
    server.files["sop.zip"] = archive
    args = {"download": True, "url": server.url("sop.zip"), "checksum": sha256(archive)}
    train = stanford_online_products(tmp_path, "train", **args)
    assert train.labels.tolist() == [1, 1, 2]
    assert train.paths[2] == tmp_path / "Stanford_Online_Products" / "chair_final" / "b_0.JPG"
    test = stanford_online_products(tmp_path, "test", **args)
    assert test.labels.tolist() == [11319, 22634]
    assert test[1][0].shape == (3, 16, 16)
    assert len(stanford_online_products(tmp_path, "all", **args)) == 5
    assert server.requests["sop.zip"] == 1


# --- failure modes -------------------------------------------------------------------------------


def test_corrupt_archive_is_reported_and_not_kept(server: FileServer, tmp_path: Path) -> None:
    good = _cub_archive()
    server.files["cub.tgz"] = good[:-10] + b"0123456789"  # same length, wrong bytes
    expected = hashlib.sha256(good).hexdigest()
    actual = hashlib.sha256(server.files["cub.tgz"]).hexdigest()
    with pytest.raises(DownloadError) as info:
        cub200(tmp_path, download=True, url=server.url("cub.tgz"), checksum=sha256(good))
    message = str(info.value)
    assert server.url("cub.tgz") in message and expected in message and actual in message
    assert list(tmp_path.iterdir()) == []  # no archive, no .part, no extraction, no marker


def test_interrupted_download_is_detected(server: FileServer, tmp_path: Path) -> None:
    body = b"x" * 5000
    server.files["big.bin"] = body
    server.truncated.add("big.bin")
    with pytest.raises(DownloadError, match=r"interrupted: got 5000 of 10000 bytes") as info:
        download_file(server.url("big.bin"), tmp_path / "big.bin", sha256(body))
    assert server.url("big.bin") in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_existing_file_is_verified_not_refetched(server: FileServer, tmp_path: Path) -> None:
    body = b"payload"
    server.files["f.bin"] = body
    target = tmp_path / "f.bin"
    target.write_bytes(body)
    md5 = "md5:" + hashlib.md5(body).hexdigest()
    assert download_file(server.url("f.bin"), target, md5) == target
    assert server.requests["f.bin"] == 0

    target.write_bytes(b"stale or corrupt")
    stale = hashlib.md5(b"stale or corrupt").hexdigest()
    with pytest.warns(UserWarning, match=f"exists but its md5 is {stale}, expected {md5[4:]}"):
        download_file(server.url("f.bin"), target, md5)
    assert target.read_bytes() == body and server.requests["f.bin"] == 1


def test_existing_bad_archive_is_redownloaded_before_extraction(
    server: FileServer, tmp_path: Path
) -> None:
    archive = _cub_archive()
    server.files["CUB_200_2011.tgz"] = archive
    (tmp_path / "CUB_200_2011.tgz").write_bytes(b"half an archive")
    with pytest.warns(UserWarning, match="CUB_200_2011.tgz exists but its sha256 is"):
        download_and_extract(server.url("CUB_200_2011.tgz"), tmp_path, sha256(archive))
    assert server.requests["CUB_200_2011.tgz"] == 1
    assert (tmp_path / "CUB_200_2011" / "images.txt").is_file()
    download_and_extract(server.url("CUB_200_2011.tgz"), tmp_path, sha256(archive))
    assert server.requests["CUB_200_2011.tgz"] == 1


def test_http_error_names_the_url(server: FileServer, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match=r"download of http://127\.0\.0\.1:\d+/nothing failed"):
        download_file(server.url("nothing"), tmp_path / "x", "md5:" + "0" * 32)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("name", "payload"),
    [("../evil.txt", b"x"), ("/tmp/evil_abs.txt", b"x"), ("ok/../../evil.txt", b"x")],
)
@pytest.mark.parametrize("pack", [_tar_gz, _zip])
def test_unsafe_archive_members_are_rejected(
    tmp_path: Path, name: str, payload: bytes, pack: object
) -> None:
    archive = tmp_path / "a.bin"
    archive.write_bytes(pack({"fine.txt": b"ok", name: payload}))  # type: ignore[operator]
    dest = tmp_path / "out"
    with pytest.raises(DownloadError, match=f"member {name!r} has an absolute path or '..'"):
        extract_archive(archive, dest)
    assert not (tmp_path / "evil.txt").exists() and not (dest / "fine.txt").exists()


def test_bad_checksum_strings_are_rejected(tmp_path: Path) -> None:
    for bad in ["abc", "md5:123", "crc32:" + "0" * 8, "sha256:" + "g" * 64]:
        with pytest.raises(ValueError, match="checksum"):
            download_file("http://127.0.0.1:9/x", tmp_path / "x", bad)


def test_registry_lists_the_official_archives() -> None:
    urls = {f.filename: (f.url, f.checksum) for files in REGISTRY.values() for f in files}
    assert urls["CUB_200_2011.tgz"] == (
        "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz",
        "md5:97eceeb196236b17998738112f37df78",
    )
    assert urls["Stanford_Online_Products.zip"][1] == "md5:7f73d41a2f44250d4779881525aea32e"
    assert urls["car_ims.tgz"][1] == "md5:d5c8f0aa497503f355e17dc7886c3f14"
    assert urls["cars_annos.mat"][1] == "md5:b407c6086d669747186bd1d764ff9dbc"


# --- missing and malformed data ------------------------------------------------------------------


def test_missing_data_says_how_to_download(tmp_path: Path) -> None:
    with pytest.raises(
        FileNotFoundError, match=r"CUB_200_2011/images.txt not found; pass download=True"
    ):
        cub200(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"cars_annos.mat not found; pass download=True"):
        cars196(tmp_path, "test")
    with pytest.raises(FileNotFoundError, match=r"Ebay_test.txt not found; pass download=True"):
        stanford_online_products(tmp_path, "test")


def test_malformed_index_files_name_the_problem(tmp_path: Path) -> None:
    cub = tmp_path / "CUB_200_2011"
    cub.mkdir()
    (cub / "images.txt").write_text("1 a/1.jpg\n2 a/2.jpg\n")
    (cub / "image_class_labels.txt").write_text("1 1\n")
    with pytest.raises(ValueError, match=r"no label for image id 2 \(.*images.txt, line 2\)"):
        cub200(tmp_path)
    (cub / "image_class_labels.txt").write_text("1 1\n2 x\n")
    with pytest.raises(
        ValueError, match=r"image_class_labels.txt, line 2: class id must be an integer"
    ):
        cub200(tmp_path)

    sop = tmp_path / "Stanford_Online_Products"
    sop.mkdir()
    (sop / "Ebay_train.txt").write_text("id class path\n")
    with pytest.raises(ValueError, match=r"Ebay_train.txt, line 1: expected 4 fields"):
        stanford_online_products(tmp_path)
    (sop / "Ebay_train.txt").write_text("a b c d\n")
    with pytest.raises(ValueError, match=r"Ebay_train.txt: the first line must be the header"):
        stanford_online_products(tmp_path)

    (tmp_path / "car_ims").mkdir()
    scipy.io.savemat(
        tmp_path / "cars_annos.mat", {"annotations": np.zeros((1, 2), dtype=[("class", "O")])}
    )
    with pytest.raises(ValueError, match="annotations have no field 'relative_im_path'"):
        cars196(tmp_path)
    (tmp_path / "cars_annos.mat").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"cannot read .*cars_annos.mat as a MATLAB file"):
        cars196(tmp_path)
