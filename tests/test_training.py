"""The trainer end to end on small data: seeded determinism, exact resume after an interruption
(in process and after SIGKILL), worker-independent augmentation, early stopping, logs, frozen
backbone feature caching, atomic checkpoints, and the ``dmlkit`` command."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dmlkit.cli import main
from dmlkit.training import (
    Config,
    ConfigError,
    Trainer,
    load_checkpoint,
    load_config,
    save_atomic,
)
from host_syncs import HostSyncCounter
from real_data import REAL_DATA
from run_helpers import (
    DIGITS_RUN,
    StopTrainingError,
    log_without_timing,
    stop_at,
    write_image_folder,
)

ROOT = Path(__file__).resolve().parents[1]

# A few seconds on one core: digits 0-4 (train) / 5-9 (test), 8x8 inputs.
FAST = [
    *DIGITS_RUN,
    "train.epochs=3",
    "sampler.classes_per_batch=5",
    "sampler.samples_per_class=8",
    "logging.progress=false",
    "logging.log_every=1",
]


def _config(*overrides: str) -> Config:
    return load_config(None, [*FAST, *overrides])


def _same_state(a: Path, b: Path) -> None:
    left, right = load_checkpoint(a), load_checkpoint(b)
    assert left["state"] == right["state"]
    for name, tensor in left["model"].items():
        assert torch.equal(tensor, right["model"][name]), name


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 classes × 6 random 40×32 RGB images; each class has its own mean colour."""
    return write_image_folder(tmp_path_factory.mktemp("folder"), 8, 6, 32, 40)


def _folder_config(root: Path, *overrides: str) -> Config:
    return load_config(
        None,
        [
            "data.name=folder",
            f"data.root={root}",
            "data.transform.train_crop=24",
            "data.transform.eval_resize=28",
            "data.transform.eval_crop=24",
            "model.embedding_dim=16",
            "sampler.classes_per_batch=2",
            "sampler.samples_per_class=3",
            "train.epochs=2",
            "logging.progress=false",
            "logging.log_every=1",
            *overrides,
        ],
    )


def test_same_seed_same_numbers_and_training_changes_the_model(tmp_path: Path) -> None:
    first = Trainer(_config(), tmp_path / "a").fit()
    second = Trainer(_config(), tmp_path / "b").fit()
    assert first.after == second.after
    assert first.before == second.before
    _same_state(tmp_path / "a" / "last.pt", tmp_path / "b" / "last.pt")
    assert first.before != first.after
    assert first.steps == second.steps > 0
    log = log_without_timing(tmp_path / "a" / "train.csv")
    assert log == log_without_timing(tmp_path / "b" / "train.csv")


@pytest.mark.parametrize("step", [1, 4, 7])
def test_resume_after_interruption_is_exact(tmp_path: Path, step: int) -> None:
    whole = Trainer(_config(), tmp_path / "whole").fit()
    run = tmp_path / "cut"
    cut = _config("train.checkpoint_every=1")
    with pytest.raises(StopTrainingError):
        Trainer(cut, run, callbacks=[stop_at(step)]).fit()
    assert load_checkpoint(run / "last.pt")["state"]["step"] == step
    resumed = Trainer(cut, run).fit(resume=True)
    assert resumed.after == whole.after
    assert resumed.before == whole.before
    _same_state(tmp_path / "whole" / "last.pt", run / "last.pt")
    assert log_without_timing(run / "train.csv") == log_without_timing(
        tmp_path / "whole" / "train.csv"
    )


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path: Path) -> None:
    """A real kill at an unpredictable moment, then ``dmlkit train --resume``."""
    overrides = [*FAST, "train.epochs=6", "train.checkpoint_every=1"]
    args = [a for o in overrides for a in ("--set", o)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "dmlkit.cli", "train", *args]
    assert main(["train", *args, "--run-dir", str(tmp_path / "whole")]) == 0

    run = tmp_path / "killed"
    process = subprocess.Popen(
        [*command, "--run-dir", str(run)], env=env, stdout=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if (run / "last.pt").exists() and load_checkpoint(run / "last.pt")["state"]["step"] >= 3:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = load_checkpoint(run / "last.pt")["state"]["step"]
    total = load_checkpoint(tmp_path / "whole" / "last.pt")["state"]["step"]
    if killed_at >= total:
        pytest.skip("the run finished before it could be killed; nothing to resume")
    resumed = subprocess.run(
        [*command, "--run-dir", str(run), "--resume"], env=env, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    whole = json.loads((tmp_path / "whole" / "results.json").read_text())
    again = json.loads((run / "results.json").read_text())
    assert again["after"] == whole["after"]
    assert again["steps"] == whole["steps"]
    _same_state(tmp_path / "whole" / "last.pt", run / "last.pt")


def test_augmentation_does_not_depend_on_workers_or_restarts(
    tmp_path: Path, image_folder: Path
) -> None:
    serial = Trainer(_folder_config(image_folder), tmp_path / "serial").fit()
    workers = _folder_config(image_folder, "data.num_workers=2", "train.checkpoint_every=1")
    with pytest.raises(StopTrainingError):
        Trainer(workers, tmp_path / "workers", callbacks=[stop_at(3)]).fit()
    resumed = Trainer(workers, tmp_path / "workers").fit(resume=True)
    assert resumed.after == serial.after
    _same_state(tmp_path / "serial" / "last.pt", tmp_path / "workers" / "last.pt")


def test_early_stopping_on_the_chosen_metric(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _config(
        "data.val_classes=0.4",
        "sampler.classes_per_batch=3",
        "validation.unit=step",
        "validation.every=1",
        "validation.patience=2",
        "validation.metric=precision_at_1",
        "train.epochs=20",
    )
    trainer = Trainer(config, tmp_path)
    assert trainer.data.val is not None
    assert not set(trainer.data.val.labels) & set(trainer.data.train.labels)
    values = iter([0.5, 0.6, 0.55, 0.58, 0.9])
    real = trainer.evaluate_on

    def scripted(dataset):  # type: ignore[no-untyped-def]
        if dataset is trainer.data.val:
            return {"precision_at_1": next(values)}
        return real(dataset)

    monkeypatch.setattr(trainer, "evaluate_on", scripted)
    result = trainer.fit()
    assert result.stopped_early
    assert result.steps == 4
    assert result.best_validation == 0.6
    assert load_checkpoint(tmp_path / "best.pt")["state"]["step"] == 2
    assert [row["precision_at_1"] for row in result.history] == [0.5, 0.6, 0.55, 0.58]


def test_logs_csv_and_tensorboard(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="tensorboard is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = _config(
        "logging.tensorboard=true", "data.val_classes=0.4", "sampler.classes_per_batch=3"
    )
    result = Trainer(config, tmp_path).fit()
    rows = (tmp_path / "train.csv").read_text().splitlines()
    assert rows[0] == "step,epoch,loss,mined,lr,images_per_second"
    assert len(rows) == 1 + result.steps
    validation = (tmp_path / "validation.csv").read_text().splitlines()
    assert len(validation) == 1 + 3  # one per epoch
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert len(events.Scalars("train/loss")) == result.steps
    assert len(events.Scalars("validation/mean_average_precision_at_r")) == 3
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["after"] == result.after


def test_tensorboard_events_are_not_duplicated_by_a_resume(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="tensorboard is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = _config("logging.tensorboard=true", "train.checkpoint_every=5")
    with pytest.raises(StopTrainingError):
        Trainer(config, tmp_path, callbacks=[stop_at(8)]).fit()  # checkpoint at step 5
    result = Trainer(config, tmp_path).fit(resume=True)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    steps = [event.step for event in events.Scalars("train/loss")]
    assert steps == list(range(1, result.steps + 1))


def test_frozen_backbone_trains_the_head_on_cached_features(
    tmp_path: Path, image_folder: Path
) -> None:
    config = _folder_config(image_folder, "model.freeze_backbone=true", "train.epochs=3")
    trainer = Trainer(config, tmp_path)
    backbone = {k: v.clone() for k, v in trainer.model.backbone.state_dict().items()}
    head = {k: v.clone() for k, v in trainer.model.head.state_dict().items()}
    result = trainer.fit()
    assert sorted(p.name for p in (tmp_path / "features").iterdir())[0].endswith("-test.pt")
    after = trainer.model.state_dict()
    assert all(torch.equal(v, after[f"backbone.{k}"]) for k, v in backbone.items())
    assert not all(torch.equal(v, after[f"head.{k}"]) for k, v in head.items())
    # The whole model, evaluated from images, gives the metrics the cached features gave.
    assert main(["evaluate", str(tmp_path / "last.pt")]) == 0
    out = tmp_path / "emb"
    assert main(["embed", str(tmp_path / "last.pt"), "--out", str(out)]) == 0
    embeddings = np.load(out / "embeddings.npy")
    labels = np.load(out / "labels.npy")
    assert embeddings.shape == (len(labels), 16)
    from dmlkit.evaluation import evaluate

    metrics = evaluate(torch.from_numpy(embeddings), labels).metrics
    for name, value in result.after.items():
        assert metrics[name] == pytest.approx(value, abs=1e-6)


def test_atomic_checkpoint_keeps_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    path = save_atomic({"model": {"w": torch.ones(2)}}, tmp_path / "last.pt")

    class Unpicklable:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        save_atomic({"model": {}, "bad": Unpicklable()}, path)
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_atomic_arrays_keep_the_old_file_when_writing_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What `dmlkit embed` writes: an interrupted write leaves the previous .npy whole."""
    from dmlkit.training.checkpoint import save_array_atomic

    path = save_array_atomic(np.arange(6.0), tmp_path / "embeddings.npy")

    def failing(file: object, array: object, allow_pickle: bool = False) -> None:
        file.write(b"half a file")  # type: ignore[attr-defined]
        raise OSError("disk full")

    monkeypatch.setattr(np, "save", failing)
    with pytest.raises(OSError, match="disk full"):
        save_array_atomic(np.zeros(3), path)
    monkeypatch.undo()
    np.testing.assert_array_equal(np.load(path), np.arange(6.0))
    assert [p.name for p in tmp_path.iterdir()] == ["embeddings.npy"]


def test_cli_train_default_prints_before_and_after(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [a for o in FAST for a in ("--set", o)]
    assert main(["train", *args, "--run-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "training on 5 digits (0–4), 901 items; testing on 5 unseen digits (5–9)" in out
    assert "Retrieval on the 5 unseen digits (5–9)" in out
    assert "metric" in out and "before" in out and "after" in out
    assert "precision_at_1" in out and "mean_average_precision_at_r" in out
    assert (tmp_path / "config.yaml").is_file()


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--set", "optimizer.lrr=1"]) == 2
    assert "did you mean 'lr'?" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "nothing.pt")]) == 2
    assert "nothing.pt" in capsys.readouterr().err
    assert main(["train", "--resume", "--set", "train.epochs=1"]) == 2
    assert "--resume needs the run folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "train" in capsys.readouterr().out


def test_shipped_omniglot_config_runs_a_step(tmp_path: Path) -> None:
    data = REAL_DATA / "omniglot"
    if not data.is_dir():
        pytest.skip(f"{data} not found; Omniglot config test skipped")
    config = load_config(
        ROOT / "configs" / "omniglot.yaml",
        [
            "train.max_steps=2",
            "validation.before_training=false",
            "validation.every=0",
            "logging.progress=false",
        ],
    )
    result = Trainer(config, tmp_path).fit()
    assert result.steps == 2


def test_resume_refuses_a_changed_config_and_a_fresh_run_refuses_a_used_folder(
    tmp_path: Path,
) -> None:
    config = _config("train.checkpoint_every=1")
    with pytest.raises(StopTrainingError):
        Trainer(config, tmp_path, callbacks=[stop_at(2)]).fit()
    with pytest.raises(ConfigError, match=r"differs from the run's in optimizer\.lr"):
        Trainer(_config("train.checkpoint_every=1", "optimizer.lr=0.5"), tmp_path).fit(True)
    with pytest.raises(ConfigError, match="already holds a run"):
        Trainer(config, tmp_path).fit()
    # Logging settings may change; the CLI resumes from the run's own config.yaml.
    assert (
        main(["train", "--run-dir", str(tmp_path), "--resume", "--set", "logging.log_every=5"]) == 0
    )


def test_validates_once_more_at_the_end_when_the_schedule_skips_it(tmp_path: Path) -> None:
    config = _config("data.val_classes=0.4", "sampler.classes_per_batch=3", "validation.every=2")
    result = Trainer(config, tmp_path).fit()
    steps = [int(row["step"]) for row in result.history]
    assert steps == [steps[0], result.steps]  # epoch 2, then the end of epoch 3
    with pytest.raises(ConfigError, match=r"validation\.metric 'nmi'"):
        Trainer(_config("validation.metric=nmi"), tmp_path / "x")


def test_frozen_backbone_by_zero_learning_rate_keeps_batchnorm_statistics(tmp_path: Path) -> None:
    trainer = Trainer(_config("optimizer.backbone_lr=0", "train.max_steps=3"), tmp_path)
    before = {k: v.clone() for k, v in trainer.model.backbone.state_dict().items()}
    trainer.fit()
    after = trainer.model.backbone.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())


def test_folder_with_separate_test_folder(tmp_path: Path, image_folder: Path) -> None:
    config = _folder_config(image_folder, f"data.test_root={image_folder}", "train.max_steps=2")
    trainer = Trainer(config, tmp_path)
    assert set(trainer.data.test.labels) == set(range(8, 16))
    assert set(trainer.data.train.labels) == set(range(8))


def test_bad_settings_are_config_errors() -> None:
    for override, message in [
        ("logging.log_every=0", "logging.log_every must be at least 1"),
        ("optimizer.lr=nan", "optimizer.lr must be a finite number"),
        ("data.name=[abc", "not valid YAML"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(None, [override])
    with pytest.raises(ConfigError, match=r"train\.device: 'gpu' is not a device"):
        Trainer(_config("train.device=gpu"))


class _SyncWatch:
    """A trainer callback counting host syncs from the end of step ``first`` to the end of step
    ``last``: whole loop iterations (data, step, bookkeeping), without set-up and evaluation.
    The optimiser's step counters stay on the CPU in a CUDA run: reading them is not counted."""

    def __init__(self, trainer: Trainer, first: int, last: int) -> None:
        self.trainer, self.first, self.last = trainer, first, last
        self.counter: HostSyncCounter | None = None

    def __call__(self, state: Any) -> None:
        if state.step == self.first:
            steps = [s["step"] for s in self.trainer.optimizer.state.values() if "step" in s]
            self.counter = HostSyncCounter(host_resident=steps)
            self.counter.__enter__()
        elif state.step == self.last:
            assert self.counter is not None
            self.counter.__exit__(None, None, None)


@pytest.mark.parametrize(
    ("overrides", "per_step"),
    [(["miner.name=null"], 0), ([], 1)],
    ids=["loss only", "miner and loss"],
)
def test_training_steps_wait_for_the_device_only_for_mined_indices_and_logging(
    tmp_path: Path, overrides: list[str], per_step: int
) -> None:
    # Steps 3-5 counted; log_every=5 makes step 5 a logged one (one read of the loss). Batches
    # are collated in a worker, as in GPU training: collated in process, their labels would be
    # built on the CPU under the counter, which cannot tell that from a copy to the device.
    config = _config(
        *overrides,
        "data.num_workers=1",
        "logging.log_every=5",
        "train.max_steps=6",
        "validation.every=0",
        "validation.before_training=false",
        f"logging.run_dir={tmp_path / 'run'}",
    )
    trainer = Trainer(config)
    watch = _SyncWatch(trainer, first=2, last=5)
    trainer.callbacks.append(watch)
    trainer.fit(test=False)
    assert watch.counter is not None
    assert watch.counter.total <= 3 * per_step + 1, watch.counter
    assert watch.counter.ops["aten._local_scalar_dense.default"] >= 1  # the logged loss


def test_a_diverging_run_is_stopped_at_the_next_logged_step(tmp_path: Path) -> None:
    config = _config(
        "optimizer.lr=1e30",
        "logging.log_every=2",
        "validation.every=0",
        "validation.before_training=false",
        f"logging.run_dir={tmp_path / 'run'}",
    )
    with pytest.raises(ValueError, match="training diverged: the loss is nan at step"):
        Trainer(config).fit(test=False)


def test_a_divergence_between_logged_steps_is_caught_before_anything_is_saved(
    tmp_path: Path,
) -> None:
    config = _config(
        "optimizer.lr=1e30",
        "logging.log_every=1000",  # no logged step at all
        "validation.every=0",
        "validation.before_training=false",
        f"logging.run_dir={tmp_path / 'run'}",
    )
    with pytest.raises(ValueError, match="training diverged: the loss is nan at step"):
        Trainer(config).fit(test=False)
    assert not (tmp_path / "run" / "last.pt").exists()
