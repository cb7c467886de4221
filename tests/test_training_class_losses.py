"""Losses with their own parameters in training: built with the run's class count and
embedding size, trained in the ``loss`` parameter group at ``optimizer.loss_lr`` on labels the
trainer maps to class indices, resumed exactly after a kill, and their runs evaluated and
embedded by the ``dmlkit`` command."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dmlkit.cli import main
from dmlkit.training import Trainer, load_config
from run_helpers import DIGITS_RUN, StopTrainingError, stop_at

# Digits 0-4 with labels shifted to 100-104: the losses can only index their per-class
# parameters through the trainer's mapping to 0..4.
FAST = [
    *DIGITS_RUN,
    "data.name=user_parts:shifted_digits",
    "train.epochs=1",
    "train.max_steps=6",
    "train.checkpoint_every=1",
    "sampler.classes_per_batch=5",
    "sampler.samples_per_class=4",
    "logging.progress=false",
    "logging.log_every=1",
    "validation.before_training=false",
    "miner.name=null",
    "optimizer.loss_lr=0.01",
]
LOSSES = {
    "ProxyAnchorLoss": [],
    "ArcFaceLoss": [],
    "SoftTripleLoss": ["loss.options.centers_per_class=2"],
    "MarginLoss": ["loss.options.learn_beta=true"],
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_a_loss_with_parameters_trains_resumes_and_is_used(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    overrides = [*FAST, f"loss.name={name}", *LOSSES[name]]
    whole = Trainer(load_config(None, overrides), tmp_path / "whole")
    loss = whole.objective.loss
    parameters = list(loss.parameters())
    assert parameters, name
    group = next(g for g in whole.optimizer.param_groups if g["name"] == "loss")
    assert group["lr"] == 0.01
    assert {id(p) for p in group["params"]} == {id(p) for p in parameters}
    if name != "MarginLoss":  # per-class parameters sized by the run's 5 classes
        columns = 5 * (2 if name == "SoftTripleLoss" else 1)  # SoftTriple: 2 centres each
        assert columns in parameters[0].shape
    before = [p.detach().clone() for p in parameters]
    whole.fit()
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, parameters, strict=True))

    cut = tmp_path / "cut"
    with pytest.raises(StopTrainingError):
        Trainer(load_config(None, overrides), cut, callbacks=[stop_at(3)]).fit()
    resumed = Trainer(load_config(None, overrides), cut)
    resumed.fit(resume=True)
    for key, value in whole.objective.state_dict().items():
        assert torch.equal(value, resumed.objective.state_dict()[key]), key
    for key, value in whole.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key

    assert main(["evaluate", str(cut / "last.pt"), "--verification"]) == 0
    printed = capsys.readouterr().out
    assert "precision_at_1" in printed
    assert "fnmr_at_fmr_0.01" in printed and "best_f1_threshold" in printed
    out = tmp_path / "emb"
    assert main(["embed", str(cut / "last.pt"), "--out", str(out)]) == 0
    labels = np.load(out / "labels.npy")
    assert set(labels.tolist()) <= set(range(105, 110))  # the test digits 5-9, shifted
    page = tmp_path / "report.html"
    assert main(["report", str(cut), "--out", str(page), "--projection", "pca"]) == 0
    assert "<img" in page.read_text()


def test_a_classification_loss_is_also_a_classifier_head(tmp_path: Path) -> None:
    """Softmax over ``get_logits`` classifies the training classes far above chance."""
    overrides = [*FAST, "loss.name=NormalizedSoftmaxLoss", "train.epochs=20", "train.max_steps=200"]
    trainer = Trainer(load_config(None, overrides), tmp_path)
    trainer.fit(test=False)
    embeddings, labels = trainer.embed(trainer.data.train_eval)
    predicted = trainer.objective.loss.get_logits(embeddings).argmax(1).numpy()
    classes = trainer.classes
    accuracy = float((classes[predicted] == labels).mean())
    assert accuracy > 0.6  # chance: 0.2
