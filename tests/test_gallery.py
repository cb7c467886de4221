"""The searchable gallery: built from a checkpoint and a folder of real images (Omniglot, and
the CUB subset with MobileNetV2 where present), saved, loaded, edited, and every search checked
against a brute-force ranking."""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dmlkit.evaluation.verification import pair_scores
from dmlkit.gallery import Gallery
from dmlkit.training import Trainer, load_config
from dmlkit.training.checkpoint import load_checkpoint, save_atomic
from real_data import REAL_DATA
from run_helpers import DIGITS_RUN

OMNIGLOT = REAL_DATA / "omniglot" / "images_evaluation.npz"
FAST = [
    *DIGITS_RUN,
    "train.epochs=3",
    "train.max_steps=2",
    "sampler.classes_per_batch=5",
    "sampler.samples_per_class=8",
    "logging.progress=false",
    "logging.log_every=1",
    "data.image_size=16",
]


def _score_matrix(query: torch.Tensor, ref: torch.Tensor, metric: str) -> torch.Tensor:
    q, r = query.double(), ref.double()
    if metric == "cosine":
        return F.normalize(q, dim=1) @ F.normalize(r, dim=1).T
    if metric == "dot":
        return q @ r.T
    return -torch.cdist(q, r)


def assert_bruteforce(gallery: Gallery, queries: torch.Tensor, result: object, k: int) -> None:
    """Every result row equals the brute-force ranking (score descending, lower index first);
    positions may differ only between scores equal to 1e-5."""
    ref = gallery.embeddings
    scores = _score_matrix(queries, ref, gallery.metric)
    ids, labels = gallery.ids, gallery.labels
    assert result.indices.shape == (queries.shape[0], k)  # type: ignore[attr-defined]
    for i in range(queries.shape[0]):
        row = scores[i].numpy()
        expected = np.lexsort((np.arange(len(row)), -row))[:k]
        got = result.indices[i].numpy()  # type: ignore[attr-defined]
        assert len(set(got.tolist())) == k
        for j in range(k):
            if got[j] != expected[j]:
                assert abs(row[got[j]] - row[expected[j]]) < 1e-5, (i, j)
        np.testing.assert_allclose(result.scores[i].numpy(), row[got], atol=1e-4)  # type: ignore[attr-defined]
        assert result.ids[i] == [ids[g] for g in got]  # type: ignore[attr-defined]
        assert result.labels[i].tolist() == labels[got].tolist()  # type: ignore[attr-defined]
        assert result.ranks[i].tolist() == list(range(1, k + 1))  # type: ignore[attr-defined]
        assert bool((result.scores[i][:-1] >= result.scores[i][1:]).all())  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- fixtures


def _checkpoint(run_dir: Path) -> Path:
    trainer = Trainer(load_config(None, FAST), run_dir=run_dir)
    trainer.fit(test=False)
    return run_dir / "last.pt"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def omniglot_pngs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A gallery folder (6 characters × 5 drawers) and an extra folder (2 more characters)."""
    if not OMNIGLOT.is_file():
        pytest.skip(f"Omniglot not found at {OMNIGLOT} (set $DMLKIT_DATA to the shared data)")
    with np.load(OMNIGLOT) as archive:
        images = archive["images"][:8, :5]  # True = white paper
    root = tmp_path_factory.mktemp("omniglot")
    folders = (root / "gallery", root / "extra")
    for char in range(8):
        folder = folders[0] if char < 6 else folders[1]
        class_dir = folder / f"character{char:02d}"
        class_dir.mkdir(parents=True)
        for drawer in range(5):
            pixels = images[char, drawer].astype(np.uint8) * 255
            Image.fromarray(pixels).save(class_dir / f"{drawer:02d}.png")
    return folders


@pytest.fixture(scope="module")
def built(checkpoint: Path, omniglot_pngs: tuple[Path, Path]) -> Gallery:
    return Gallery.from_checkpoint(checkpoint, omniglot_pngs[0], batch_size=16)


# --------------------------------------------------------------------------- real images


def test_from_checkpoint_search_save_load_add_remove(
    built: Gallery, checkpoint: Path, omniglot_pngs: tuple[Path, Path], tmp_path: Path
) -> None:
    folder, extra = omniglot_pngs
    paths = sorted(str(p) for p in folder.rglob("*.png"))
    gallery = Gallery.load(built.save(tmp_path / "g"))
    assert len(gallery) == 30 and gallery.ids == paths  # ids are the image paths, in order
    assert gallery.labels.tolist() == [c for c in range(6) for _ in range(5)]
    assert gallery.fingerprint == built.fingerprint is not None
    assert gallery.checkpoint == str(checkpoint.resolve())
    assert gallery.preprocessing == {
        "kind": "array",
        "mode": "L",
        "size": [16, 16],
        "invert": False,
    }
    assert torch.equal(gallery.embeddings, built.embeddings)

    # Image queries are embedded as the gallery was: each image finds itself first.
    queries = paths[::7]
    embedded = gallery.embed(queries)
    result = gallery.search(queries, k=5)
    assert result.exact and "torch" in result.method
    assert_bruteforce(gallery, embedded, result, 5)
    assert [row[0] for row in result.ids] == queries
    np.testing.assert_allclose(result.scores[:, 0].numpy(), 1.0, atol=1e-5)
    np.testing.assert_allclose(result.distances[:, 0].numpy(), 0.0, atol=1e-5)
    # An image tensor batch is model input as it is.
    as_tensor = gallery.search(torch.stack([gallery._model().transform(
        Image.open(p).convert("L")) for p in queries]), k=5)  # fmt: skip
    assert as_tensor.ids == result.ids

    # Add new characters as images (ids: their paths) and remove some items.
    new_paths = sorted(str(p) for p in extra.rglob("*.png"))
    gallery.add(new_paths, [100] * 5 + [101] * 5)
    assert len(gallery) == 40 and gallery.ids[30:] == new_paths
    removed = [paths[0], paths[12], new_paths[3], paths[29]]
    gallery.remove(removed)
    assert len(gallery) == 36 and not set(removed) & set(gallery.ids)
    gallery.add(gallery.embed(paths[:1]), [0], ["again-0"], fingerprint=gallery.fingerprint)

    everything = gallery.embeddings
    for k in (1, 7, len(gallery)):
        result = gallery.search(everything, k=k)
        assert_bruteforce(gallery, everything, result, k)
        assert not set(removed) & {i for row in result.ids for i in row}
    removed_queries = gallery.search([removed[0]], k=len(gallery))
    assert removed[0] not in removed_queries.ids[0]
    assert removed_queries.ids[0][0] == "again-0"  # the same image, under its new id

    # The round trip keeps ids, labels, embeddings and results.
    again = Gallery.load(gallery.save(tmp_path / "g"))
    assert again.ids == gallery.ids and np.array_equal(again.labels, gallery.labels)
    assert torch.equal(again.embeddings, gallery.embeddings)
    assert again.search(everything, k=5).ids == gallery.search(everything, k=5).ids
    assert again.search(new_paths[:2], k=3).ids == gallery.search(new_paths[:2], k=3).ids


def test_other_checkpoint_and_fingerprints(
    built: Gallery, checkpoint: Path, tmp_path: Path
) -> None:
    payload = load_checkpoint(checkpoint)
    name = next(n for n, t in payload["model"].items() if t.is_floating_point())
    payload["model"][name] = payload["model"][name] + 0.5
    other = save_atomic(payload, tmp_path / "other.pt")
    folder = built.save(tmp_path / "g")
    with pytest.raises(ValueError, match="another model"):
        Gallery.load(folder, checkpoint=other)
    # The stored checkpoint replaced by another model: found when embedding.
    moved = Gallery.load(folder)
    moved.checkpoint = str(other)
    with pytest.raises(ValueError, match="another model"):
        moved.embed(built.ids[:1])
    # Query embeddings of another model or preprocessing.
    with pytest.raises(ValueError, match="fingerprint"):
        built.search(built.embeddings[:2], k=1, fingerprint="0" * 32)
    built.search(built.embeddings[:2], k=1, fingerprint=built.fingerprint)
    # Image tensors that are not the model's preprocessed input size.
    with pytest.raises(ValueError, match=r"\(1, 20, 20\).*takes preprocessed \(1, 16, 16\)"):
        built.search(torch.rand(2, 1, 20, 20), k=1)
    with pytest.raises(ValueError, match="takes preprocessed"):
        built.add(torch.rand(1, 3, 16, 16), [0])
    # A gallery without a model takes no images.
    plain = Gallery.from_embeddings(built.embeddings, built.labels)
    with pytest.raises(ValueError, match="no model"):
        plain.search(built.ids[:1], k=1)


def test_unreadable_images(built: Gallery, tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match=r"bad\.png"):
        built.search([bad], k=1)
    with pytest.raises(ValueError, match=r"missing\.png"):
        built.embed([str(tmp_path / "missing.png")])
    with pytest.raises(ValueError, match=r"bad\.png"):
        built.add([bad], [0])
    assert len(built) == 30


def test_corrupt_or_truncated_folder(built: Gallery, tmp_path: Path) -> None:
    folder = built.save(tmp_path / "g")
    for name, damage in (
        ("embeddings.npy", lambda b: b[: len(b) // 2]),
        ("labels.npy", lambda b: b[:-3] + b"xyz"),
        ("ids.json", lambda b: b[:10]),
        ("gallery.json", lambda b: b[: len(b) // 3]),
    ):
        path = folder / name
        original = path.read_bytes()
        path.write_bytes(damage(original))
        with pytest.raises(ValueError, match=name):
            Gallery.load(folder)
        path.unlink()
        with pytest.raises(ValueError, match=name):
            Gallery.load(folder)
        path.write_bytes(original)
    assert Gallery.load(folder).ids == built.ids


def test_failed_save_keeps_the_old_gallery(
    built: Gallery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = built.save(tmp_path / "g")
    smaller = Gallery.load(folder)
    smaller.remove(smaller.ids[:10])

    def failing_save(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(np, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        smaller.save(folder)
    monkeypatch.undo()
    assert Gallery.load(folder).ids == built.ids
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g"]  # no temporary left
    smaller.save(folder)
    assert Gallery.load(folder).ids == smaller.ids
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not overwriting"):
        smaller.save(tmp_path / "other")


# --------------------------------------------------------------------------- synthetic


def _clustered(n: int, dim: int, classes: int, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    centres = torch.randn(classes, dim, generator=g) * 3
    return centres[labels] + torch.randn(n, dim, generator=g), labels.numpy()


@pytest.mark.parametrize("metric", ["cosine", "euclidean", "dot"])
def test_exact_search_matches_bruteforce(metric: str) -> None:
    emb, labels = _clustered(300, 16, 10)
    emb[50] = emb[10]  # exact ties: the lower position comes first
    emb[51] = emb[10]
    gallery = Gallery.from_embeddings(emb, labels, metric=metric)
    queries = torch.cat([emb[:40] + 0.01, emb[10:11], torch.randn(20, 16)])
    for k in (1, 10, 300):
        assert_bruteforce(gallery, queries, gallery.search(queries, k=k), k)
    tie = gallery.search(emb[10:11], k=3)
    assert tie.ids[0] == ["10", "50", "51"]
    gallery.remove(["10", "0"])
    result = gallery.search(queries, k=20)
    assert_bruteforce(gallery, queries, result, 20)
    assert not {"10", "0"} & {i for row in result.ids for i in row}
    gallery.add(torch.randn(3, 16), [1, 2, 3])
    assert gallery.ids[-3:] == ["300", "301", "302"]  # the next free integers


@pytest.mark.parametrize("index", ["hnsw", "ivf"])
def test_approximate_search_recall(index: str) -> None:
    pytest.importorskip("faiss")
    emb, labels = _clustered(3000, 32, 50, seed=1)
    gallery = Gallery.from_embeddings(emb, labels, metric="euclidean")
    queries = emb[:200] + 0.1 * torch.randn(200, 32)
    exact = gallery.search(queries, k=10)
    approx = gallery.search(queries, k=10, exact=False, index=index)  # type: ignore[arg-type]
    assert exact.exact and not approx.exact and index in approx.method
    hits = sum(len(set(a) & set(e)) for a, e in zip(approx.ids, exact.ids, strict=True))
    recall = hits / (200 * 10)
    assert recall >= 0.9, recall  # recall@10 against the exact lists
    found = approx.indices >= 0
    expected = _score_matrix(queries, emb, "euclidean").gather(1, approx.indices.clamp_min(0))
    np.testing.assert_allclose(
        approx.scores[found].numpy(), expected[found].numpy(), rtol=1e-3, atol=1e-3
    )


def test_match_and_calibration() -> None:
    emb, labels = _clustered(200, 8, 10, seed=2)
    gallery = Gallery.from_embeddings(emb, labels)
    threshold = gallery.calibrate_threshold(target_fmr=0.01)
    left, right = torch.triu_indices(200, 200, offset=1)
    scores = pair_scores(emb[left], emb[right], "cosine")
    impostor = torch.from_numpy(labels)[left] != torch.from_numpy(labels)[right]
    assert float((scores[impostor] >= threshold).float().mean()) <= 0.01
    assert float((scores[~impostor] >= threshold).float().mean()) > 0.5
    near = emb[:5] + 0.01
    far = -emb[:5].sign() * 100 * torch.ones(5, 8)  # points away from every cluster
    matched = gallery.match(torch.cat([near, far]), threshold)
    assert matched[:5].all()
    nearest = gallery.search(torch.cat([near, far]), k=1).scores[:, 0]
    assert torch.equal(matched, nearest >= threshold)
    sampled = gallery.calibrate_threshold(target_fmr=0.01, max_pairs=2000)
    assert float((scores[impostor] >= sampled).float().mean()) <= 0.03


def test_errors() -> None:
    emb, labels = _clustered(20, 4, 4)
    with pytest.raises(ValueError, match="duplicate ids: 'a'"):
        Gallery.from_embeddings(emb[:3], labels[:3], ids=["a", "b", "a"])
    gallery = Gallery.from_embeddings(emb, labels, ids=[f"x{i}" for i in range(20)])
    with pytest.raises(ValueError, match="'x3'"):
        gallery.add(emb[:2], [0, 1], ids=["new", "x3"])
    assert len(gallery) == 20
    with pytest.raises(ValueError, match=r"\[1, 20\]"):
        gallery.search(emb[:1], k=21)
    with pytest.raises(ValueError, match="k must"):
        gallery.search(emb[:1], k=0)
    with pytest.raises(ValueError, match="'nope'"):
        gallery.remove(["x1", "nope"])
    assert len(gallery) == 20
    with pytest.raises(ValueError, match="dimension"):
        gallery.search(torch.randn(2, 5), k=1)
    gallery.remove(gallery.ids)
    with pytest.raises(ValueError, match="empty"):
        gallery.search(emb[:1], k=1)
    gallery.add(emb[:2], [0, 1])
    assert gallery.search(emb[:1], k=1).ids == [["0"]]
    empty = Gallery.from_embeddings(torch.empty(0, 4), [])
    with pytest.raises(ValueError, match="empty"):
        empty.search(emb[:1], k=1)
    with pytest.raises(ValueError, match="unknown metric"):
        Gallery.from_embeddings(emb, labels, metric="manhattan")


def test_index_and_search_commands(
    checkpoint: Path,
    omniglot_pngs: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`dmlkit index` then `dmlkit search`: a table, JSON, and a one-line error for k too large."""
    import json

    from dmlkit.cli import main

    folder, _ = omniglot_pngs
    out = tmp_path / "gallery"
    assert main(["index", str(checkpoint), str(folder), "--out", str(out)]) == 0
    assert "indexed 30 items" in capsys.readouterr().out
    query = sorted(folder.rglob("*.png"))[0]
    assert main(["search", str(out), str(query), "--k", "3"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[-4].split() == ["rank", "id", "label", "score"]
    assert table[-3].split()[1] == str(query)  # the query itself is its own nearest
    assert main(["search", str(out), str(query), "--k", "2", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["queries"][0]["neighbours"][0]["id"] == str(query)
    assert main(["search", str(out), str(query), "--k", "999"]) == 2
    assert "error" in capsys.readouterr().err
    if importlib.util.find_spec("faiss") is None:
        return
    approximate = tmp_path / "approximate"
    command = ["index", str(checkpoint), str(folder), "--out", str(approximate)]
    assert main([*command, "--approximate-index", "hnsw", "--contiguous"]) == 0
    assert "with a faiss hnsw index" in capsys.readouterr().out
    assert (approximate / "index-hnsw.faiss").is_file()
    assert (
        main(["search", str(approximate), str(query), "--k", "3", "--approximate", "--json"]) == 0
    )
    payload = json.loads(capsys.readouterr().out)
    assert payload["exact"] is False and payload["queries"][0]["neighbours"][0]["id"] == str(query)


def test_removed_ids_are_never_handed_out_again(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    gallery = Gallery.from_embeddings(torch.randn(5, 4, generator=g), np.arange(5))
    gallery.remove(["4"])
    gallery.add(torch.randn(1, 4, generator=g), [9])
    assert "4" not in gallery.ids and gallery.ids[-1] == "5"
    gallery.save(tmp_path / "g")
    loaded = Gallery.load(tmp_path / "g")
    loaded.add(torch.randn(1, 4, generator=g), [9])
    assert "4" not in loaded.ids


def test_a_save_killed_between_its_renames_is_named_on_load(tmp_path: Path) -> None:
    gallery = Gallery.from_embeddings(torch.randn(3, 4), np.arange(3))
    folder = gallery.save(tmp_path / "g")
    folder.rename(tmp_path / ".g.abc123.old")  # what the kill leaves
    with pytest.raises(ValueError, match=r"a save was interrupted; the previous gallery is in"):
        Gallery.load(folder)


def test_omniglot_image_files_are_read_as_the_training_arrays(tmp_path: Path) -> None:
    """An Omniglot image file (dark ink on white paper) goes through the gallery's
    preprocessing to the item the run trained on (ink = 1, area-resized)."""
    from dmlkit.training.preprocessing import evaluation_preprocessing, preprocessing_transform

    if not OMNIGLOT.is_file():
        pytest.skip(f"Omniglot not found at {OMNIGLOT} (set $DMLKIT_DATA to the shared data)")
    config = load_config(
        None, ["data.name=omniglot", "data.image_size=28", f"data.root={OMNIGLOT.parent}"]
    )
    description = evaluation_preprocessing(config, 1)
    assert description["invert"] is True
    with np.load(OMNIGLOT) as archive:
        paper = archive["images"][0, 0]  # True = white paper, as the files
    path = tmp_path / "char.png"
    Image.fromarray(paper.astype(np.uint8) * 255).save(path)
    from dmlkit.data import read_image

    got = preprocessing_transform(description)(read_image(path, "L"))
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(~paper).float()[None, None], size=(28, 28), mode="area"
    )[0]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- CUB, MobileNetV2

CUB = REAL_DATA / "cub100_subset" / "images"


def _species_folder(root: Path, species: list[str], per_species: int) -> Path:
    """A folder of links to the first images of some species (the photos are not copied)."""
    root.mkdir()
    for name in species:
        (root / name).mkdir()
        for image in sorted((CUB / name).glob("*.jpg"))[:per_species]:
            (root / name / image.name).symlink_to(image)
    return root


def test_cub_photos_with_mobilenet_v2(tmp_path: Path) -> None:
    """Real photos through MobileNetV2: build, save, load, search (brute-force checked), add
    a new species, remove items, and the round trip."""
    if not CUB.is_dir():
        pytest.skip(f"CUB subset not found at {CUB} (set $DMLKIT_DATA to the shared data)")
    config = load_config(
        None,
        [
            "data.name=cub100_subset",
            "model.backbone=mobilenet_v2",
            f"model.pretrained={REAL_DATA / 'mobilenet_v2_imagenet' / 'mobilenet_v2-b0353104.pth'}",
            "model.embedding_dim=32",
            "data.transform.train_crop=64",
            "data.transform.eval_resize=72",
            "data.transform.eval_crop=64",
            "sampler.classes_per_batch=2",
            "sampler.samples_per_class=2",
            "train.epochs=1",
            "train.max_steps=1",
            "validation.every=0",
            "logging.progress=false",
        ],
    )
    Trainer(config, run_dir=tmp_path / "run").fit(test=False)
    checkpoint = tmp_path / "run" / "last.pt"
    species = sorted(p.name for p in CUB.iterdir())
    folder = _species_folder(tmp_path / "gallery", species[:4], 4)
    extra = _species_folder(tmp_path / "extra", species[4:5], 3)

    built = Gallery.from_checkpoint(checkpoint, folder, batch_size=8)
    assert built.preprocessing is not None and built.preprocessing["crop"] == 64
    gallery = Gallery.load(built.save(tmp_path / "g"))
    paths = sorted(str(p) for p in folder.rglob("*.jpg"))
    assert gallery.ids == paths and gallery.labels.tolist() == [
        c for c in range(4) for _ in range(4)
    ]
    assert torch.equal(gallery.embeddings, built.embeddings)
    result = gallery.search(paths[::5], k=6)
    assert_bruteforce(gallery, gallery.embed(paths[::5]), result, 6)
    assert [row[0] for row in result.ids] == paths[::5]  # each photo finds itself first
    np.testing.assert_allclose(result.scores[:, 0].numpy(), 1.0, atol=1e-5)
    assert float(result.scores[:, 1].max()) < 0.9999  # distinct photos, distinct embeddings

    new = sorted(str(p) for p in extra.rglob("*.jpg"))
    gallery.add(new, [7, 7, 7])
    removed = [paths[1], new[0]]
    gallery.remove(removed)
    everything = gallery.embeddings
    for k in (1, len(gallery)):
        result = gallery.search(everything, k=k)
        assert_bruteforce(gallery, everything, result, k)
        assert not set(removed) & {i for row in result.ids for i in row}
    again = Gallery.load(gallery.save(tmp_path / "g"))
    assert again.ids == gallery.ids and torch.equal(again.embeddings, gallery.embeddings)
    assert again.search(new[1:], k=3).ids == gallery.search(new[1:], k=3).ids


# --------------------------------------------------------------------------- saved faiss index


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_a_built_index_is_saved_loaded_and_dropped_on_change(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("faiss")
    from dmlkit.evaluation.knn import FaissKNN

    emb, labels = _clustered(2000, 16, 40, seed=4)
    gallery = Gallery.from_embeddings(emb, labels)
    gallery.build_index(kind)  # type: ignore[arg-type]
    queries = emb[:50] + 0.05
    before = gallery.search(queries, k=5, exact=False, index=kind)  # type: ignore[arg-type]
    folder = gallery.save(tmp_path / "g")
    assert (folder / f"index-{kind}.faiss").is_file()

    def no_rebuild(*args: object, **kwargs: object) -> None:
        raise AssertionError("the saved index was rebuilt")

    monkeypatch.setattr(FaissKNN, "build", no_rebuild)
    loaded = Gallery.load(folder)
    after = loaded.search(queries, k=5, exact=False, index=kind)  # type: ignore[arg-type]
    assert after.ids == before.ids and not after.exact
    monkeypatch.undo()

    # Adding drops the index; the next approximate search rebuilds it with the new item.
    loaded.add(torch.full((1, 16), 50.0), [99], ["far"])
    assert loaded.search(torch.full((1, 16), 50.0), k=1, exact=False, index=kind).ids == [["far"]]  # type: ignore[arg-type]
    loaded.remove(["far"])
    assert (
        "far" not in loaded.search(torch.full((1, 16), 50.0), k=3, exact=False, index=kind).ids[0]
    )  # type: ignore[arg-type]

    # A damaged index file is named.
    path = folder / f"index-{kind}.faiss"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=f"index-{kind}.faiss"):
        Gallery.load(folder)


def test_rescoring_in_chunks_equals_one_pass() -> None:
    """More than 2**24 gathered values: the neighbours are rescored in query chunks."""
    emb, labels = _clustered(2100, 8, 20, seed=5)
    gallery = Gallery.from_embeddings(emb, labels, metric="euclidean")
    queries = torch.randn(1000, 8)
    neighbours = torch.randint(0, 2100, (1000, 2100))
    assert neighbours.numel() * 8 > 1 << 24
    expected = -(queries[:, None, :] - emb[neighbours]).norm(dim=-1)
    torch.testing.assert_close(gallery._rescored(queries, neighbours), expected)
    result = gallery.search(queries[:3], k=2100)
    assert_bruteforce(gallery, queries[:3], result, 2100)


def test_built_from_a_csv_manifest_and_from_an_in_memory_dataset(
    built: Gallery, checkpoint: Path, omniglot_pngs: tuple[Path, Path], tmp_path: Path
) -> None:
    from dmlkit.data import Subset
    from dmlkit.training import split_dataset

    folder, _ = omniglot_pngs
    paths = sorted(folder.rglob("*.png"))
    manifest = tmp_path / "items.csv"
    manifest.write_text("path,label\n" + "".join(f"{p},{int(p.parent.name[-2:])}\n" for p in paths))
    from_csv = Gallery.from_checkpoint(checkpoint, manifest)
    assert from_csv.ids == [str(p) for p in paths]
    torch.testing.assert_close(from_csv.embeddings, built.embeddings)
    assert_bruteforce(from_csv, built.embeddings[:7], from_csv.search(built.embeddings[:7], k=9), 9)

    config = load_config(None, FAST)
    test = split_dataset(config, "test")
    items = Subset(test, np.arange(40))
    in_memory = Gallery.from_checkpoint(checkpoint, items)
    assert len(in_memory) == 40 and in_memory.ids == [str(i) for i in range(40)]
    queries = torch.stack([test[i][0] for i in range(5)])
    result = in_memory.search(queries, k=4)
    assert_bruteforce(in_memory, in_memory.embed(queries), result, 4)
    assert [row[0] for row in result.ids] == ["0", "1", "2", "3", "4"]
    wrong = load_config(None, [*FAST, "data.image_size=12"])
    with pytest.raises(ValueError, match="the dataset's items are"):
        Gallery.from_checkpoint(checkpoint, Subset(split_dataset(wrong, "test"), np.arange(4)))


def test_search_refuses_a_checkpoint_overwritten_by_another_model(
    omniglot_pngs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Training resumed into the same run folder: the gallery's last.pt now holds other weights."""
    from dmlkit.cli import main

    checkpoint = _checkpoint(tmp_path / "run")
    folder, _ = omniglot_pngs
    out = tmp_path / "gallery"
    assert main(["index", str(checkpoint), str(folder), "--out", str(out)]) == 0
    query = str(sorted(folder.rglob("*.png"))[0])
    payload = load_checkpoint(checkpoint)
    name = next(n for n, t in payload["model"].items() if t.is_floating_point())
    payload["model"][name] = payload["model"][name] * 2
    save_atomic(payload, checkpoint)
    capsys.readouterr()
    assert main(["search", str(out), query]) == 2
    assert "another model" in capsys.readouterr().err
    moved = tmp_path / "moved.pt"
    checkpoint.rename(moved)
    assert main(["search", str(out), query, "--checkpoint", str(moved)]) == 2
    assert "another model" in capsys.readouterr().err


def test_more_bad_input(tmp_path: Path) -> None:
    emb, labels = _clustered(50, 4, 5)
    gallery = Gallery.from_embeddings(emb, labels)
    with pytest.raises(AttributeError):
        gallery.metric = "euclidean"  # type: ignore[misc]
    # One embedding as a 1-D tensor is one query; non-finite queries are refused.
    assert gallery.search(emb[3], k=1).ids == [["3"]]
    with pytest.raises(ValueError, match="finite"):
        gallery.search(torch.tensor([[0.0, math.nan, 0.0, 1.0]]), k=1)
    gallery.remove(7)  # one id, not in a list
    assert "7" not in gallery.ids
    if importlib.util.find_spec("faiss") is not None:
        with pytest.raises(ValueError, match=r"nlist must be in \[1, 49\]"):
            gallery.build_index("ivf", nlist=100)
        with pytest.raises(ValueError, match="hnsw_m"):
            gallery.build_index("hnsw", hnsw_m=1)
        with pytest.raises(ValueError, match="nprobe"):
            gallery.search(emb[:1], k=1, exact=False, nprobe=0)
    # A folder holding someone's gallery.json is not a gallery: never overwritten.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "gallery.json").write_text('{"mine": true}')
    (foreign / "precious.txt").write_text("keep")
    with pytest.raises(ValueError, match="not overwriting"):
        gallery.save(foreign)
    assert (foreign / "precious.txt").read_text() == "keep"
    # Saved with the usual permissions, not mkdtemp's private 0700.
    folder = gallery.save(tmp_path / "g")
    umask = os.umask(0)
    os.umask(umask)
    assert folder.stat().st_mode & 0o777 == 0o777 & ~umask
    # A malformed manifest is a ValueError naming gallery.json.
    manifest = folder / "gallery.json"
    good = manifest.read_text()
    for bad in ('"sha256": []', '"indexes": {"hnsw": {"file": "../x.faiss"}}'):
        content = json.loads(good)
        content.update(json.loads("{" + bad + "}"))
        manifest.write_text(json.dumps(content))
        with pytest.raises(ValueError, match=r"gallery\.json"):
            Gallery.load(folder)
    manifest.write_text(good)


def test_calibrate_to_a_precision() -> None:
    emb, labels = _clustered(120, 8, 6, seed=6)
    gallery = Gallery.from_embeddings(emb, labels)
    threshold = gallery.calibrate_threshold(target_precision=0.95)
    left, right = torch.triu_indices(120, 120, offset=1)
    scores = pair_scores(emb[left], emb[right])
    same = torch.from_numpy(labels)[left] == torch.from_numpy(labels)[right]
    accepted = scores >= threshold
    assert float(same[accepted].float().mean()) >= 0.95
    with pytest.raises(ValueError, match="every pair"):
        gallery.calibrate_threshold(target_precision=0.95, max_pairs=100)
    with pytest.raises(ValueError, match="exactly one"):
        gallery.calibrate_threshold(target_fmr=0.1, target_precision=0.9)


def test_missing_neighbours_are_null_in_json() -> None:
    pytest.importorskip("faiss")
    emb, labels = _clustered(400, 8, 40, seed=7)
    gallery = Gallery.from_embeddings(emb, labels, metric="euclidean")
    gallery.build_index("ivf", nlist=40)
    result = gallery.search(emb[:20], k=100, exact=False, index="ivf", nprobe=1)
    missing = result.indices < 0
    assert bool(missing.any())  # one cell of ~10 items cannot fill 100 places
    payload = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    rows = [row for query in payload["queries"] for row in query]
    assert sum(row["score"] is None for row in rows) == int(missing.sum())


def test_image_queries_take_the_galleries_embedding_path(
    built: Gallery, checkpoint: Path, omniglot_pngs: tuple[Path, Path], tmp_path: Path
) -> None:
    """Query images are embedded as the gallery was (embed_dataset), and the gallery's autocast
    choice is kept with it."""
    folder, _ = omniglot_pngs
    paths = sorted(str(p) for p in folder.rglob("*.png"))
    torch.testing.assert_close(built.embed(paths), built.embeddings, rtol=0, atol=1e-6)
    with pytest.warns(UserWarning, match="only used on CUDA"):
        mixed = Gallery.from_checkpoint(checkpoint, folder, autocast="bf16")
    assert mixed.autocast == "bf16"
    loaded = Gallery.load(mixed.save(tmp_path / "g"))
    assert loaded.autocast == "bf16"
    assert built.autocast is None and Gallery.load(built.save(tmp_path / "h")).autocast is None
