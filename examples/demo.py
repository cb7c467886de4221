"""Train a small embedding with DDTAS's loss and mining, and watch retrieval improve on characters
it never saw.

A small ConvNet learns 64-d embeddings of Omniglot's 964 background characters (28×28, 32
classes × 4 drawers per batch) with ``SoftContrastiveLoss`` on ``ATASMSMiner`` pairs. The test set
is 200 characters of the evaluation alphabets, disjoint from training: each of its 4,000 images
queries the others. Precision@1 and MAP@R are printed before and after; about a minute on 2 CPU
cores.

The data is read from ``$DMLKIT_DATA/omniglot`` (``make demo`` sets ``DMLKIT_DATA=../shared/data``).

Why not the digits bundled with scikit-learn: with only 5 training classes every loss we tried
made retrieval on the 5 unseen digits *worse* (P@1 0.964 → 0.90–0.95): the embedding specialises
to the few classes it sees. Metric learning needs many training classes.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dmlkit.evaluation import TorchKNN, evaluate
from dmlkit.losses import SoftContrastiveLoss
from dmlkit.miners import ATASMSMiner

DATA_ROOT = Path(os.environ.get("DMLKIT_DATA", "$DMLKIT_DATA-is-not-set"))
DRAWERS = 20


def load_omniglot(split: str, n_classes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (ink = 1) downsampled to 28×28, and class labels, of one Omniglot split."""
    path = DATA_ROOT / "omniglot" / f"images_{split}.npz"
    if not path.exists():
        sys.exit(
            f"{path} not found: the demo needs Omniglot; set DMLKIT_DATA to a folder holding "
            "omniglot/images_background.npz (make demo sets it to ../shared/data)"
        )
    images = np.load(path)["images"][:n_classes]
    x = torch.from_numpy(~images).float().reshape(-1, 1, 105, 105)
    x = F.interpolate(x, size=(28, 28), mode="area")
    return x, torch.arange(images.shape[0]).repeat_interleave(DRAWERS)


def conv_net(embedding_size: int = 64) -> nn.Module:
    def block(c_in: int, c_out: int) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)
        )

    return nn.Sequential(
        block(1, 32),
        block(32, 64),
        block(64, 64),
        nn.Flatten(),
        nn.Linear(64 * 3 * 3, embedding_size),
    )


def retrieval(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Precision@1 and MAP@R, each image querying all others (itself excluded by index)."""
    model.eval()
    with torch.no_grad():
        embeddings = model(x)
    model.train()
    result = evaluate(embeddings, y, knn=TorchKNN("cosine"),
                      metrics=("precision_at_1", "mean_average_precision_at_r"))  # fmt: skip
    return result["precision_at_1"], result["mean_average_precision_at_r"]


def main() -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x_train, y_train = load_omniglot("background")
    x_test, y_test = load_omniglot("evaluation", n_classes=200)
    n_classes = int(y_train.max()) + 1
    model = conv_net()
    loss_fn, miner = SoftContrastiveLoss(), ATASMSMiner()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    p1, map_r = retrieval(model, x_test, y_test)
    print(f"200 unseen characters, before training: P@1 {p1:.3f}  MAP@R {map_r:.3f}")
    start = time.perf_counter()
    for step in range(1, 301):
        classes = torch.randperm(n_classes, generator=g)[:32]
        drawers = torch.stack([torch.randperm(DRAWERS, generator=g)[:4] for _ in classes])
        batch = (classes[:, None] * DRAWERS + drawers).flatten()
        emb = model(x_train[batch])
        pairs = miner(emb, y_train[batch])
        loss = loss_fn(emb, y_train[batch], pairs)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0:
            s = miner.last_stats
            print(
                f"step {step}: loss {loss.item():.4f}  mined {s.num_pos_pairs} pos / "
                f"{s.num_neg_pairs} neg pairs  gamma_pos {s.gamma_pos:.4f}  "
                f"gamma_neg {s.gamma_neg:.4f}  skipped anchors {s.num_skipped_anchors}"
            )
    p1, map_r = retrieval(model, x_test, y_test)
    print(f"200 unseen characters, after training:  P@1 {p1:.3f}  MAP@R {map_r:.3f}")
    print(f"({time.perf_counter() - start:.0f} s of training)")


if __name__ == "__main__":
    main()
