"""``dmlkit train`` on two processes (torchrun, gloo) against one process with the same global
batches: the same weights, every file written once, and a resume that needs the same process
count."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from dmlkit.cli import main
from dmlkit.training import ConfigError, Trainer, load_checkpoint, load_config
from run_helpers import DIGITS_RUN

# Multi-process runs one at a time, in one test worker: two launches at once on two cores have
# made a rank abort at start-up under load.
pytestmark = pytest.mark.xdist_group("multi_process")

TESTS = Path(__file__).parent
RUN = [
    *DIGITS_RUN,
    "data.name=user_parts:shifted_digits",
    "train.epochs=1",
    "train.max_steps=24",
    "train.checkpoint_every=8",
    "sampler.classes_per_batch=4",
    "sampler.samples_per_class=4",
    "logging.progress=false",
    "logging.log_every=1",
    "validation.before_training=false",
    "miner.name=MultiSimilarityMiner",
    "loss.name=MultiSimilarityLoss",
    # A frozen backbone keeps BatchNorm in evaluation mode: without SyncBatchNorm (CUDA only),
    # batch statistics would be each process's own.
    "optimizer.backbone_lr=0",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("distributed")
    environment = {
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    saved = {key: os.environ.get(key) for key in environment}
    os.environ.update(environment)
    try:
        two = folder / "two"
        overrides = [part for option in RUN for part in ("--set", option)]
        args = ["train", *overrides, "--run-dir", str(two)]
        assert main([*args, "--nproc-per-node", "2"]) == 0
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    one = Trainer(load_config(None, RUN), folder / "one")
    one.fit()
    return one, two


def test_two_processes_train_the_weights_of_one(runs, tmp_path) -> None:
    one, two = runs
    expected = one.model.state_dict()
    got = load_checkpoint(two / "last.pt")["model"]
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)
    initial = Trainer(load_config(None, RUN), tmp_path / "fresh").model.state_dict()
    trained = [key for key in initial if not torch.equal(initial[key], expected[key])]
    assert trained and all(key.startswith("head") for key in trained)  # the backbone is frozen
    assert load_checkpoint(two / "last.pt")["state"]["step"] == 24


def test_two_processes_evaluate_as_one(runs) -> None:
    """Each rank embeds a share of the test items, rank 0 scores them all."""
    import json

    one, two = runs
    expected = json.loads((one.run_dir / "results.json").read_text())
    got = json.loads((two / "results.json").read_text())
    assert got["after"].keys() == expected["after"].keys()
    # The weights agree to float rounding (1e-5), which can move a near-tie neighbour: a few
    # queries' values, at most a fraction of a percent of the metric.
    for name, value in expected["after"].items():
        assert got["after"][name] == pytest.approx(value, abs=2e-3), name
    assert got["best_validation"] == pytest.approx(expected["best_validation"], abs=2e-3)


def test_rank_zero_writes_each_file_once(runs) -> None:
    _, two = runs
    lines = (two / "train.csv").read_text().splitlines()
    assert len(lines) == 1 + 24  # a header and one row per step, not one per process
    assert (two / "results.json").is_file() and (two / "config.yaml").is_file()
    rng = load_checkpoint(two / "last.pt")["rng"]
    assert len(rng["ranks"]) == 2


def test_a_resume_needs_the_same_number_of_processes(runs) -> None:
    _, two = runs
    trainer = Trainer(load_config(two / "config.yaml"), two)
    with pytest.raises(ConfigError, match="written by 2 process"):
        trainer.fit(resume=True)


def test_a_process_count_that_does_not_divide_the_batch_stops_every_process(
    tmp_path, monkeypatch, capfd
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    overrides = [part for option in RUN for part in ("--set", option)]
    args = ["train", *overrides, "--run-dir", str(tmp_path / "three")]
    assert main([*args, "--nproc-per-node", "3"]) == 2
    err = capfd.readouterr().err
    assert "classes_per_batch=4 must be divisible by world_size=3" in err
    assert "failed; all processes were stopped" in err
    assert not (tmp_path / "three" / "last.pt").exists()


def test_efficient_mode_trains_from_a_config(tmp_path, monkeypatch) -> None:
    """Each rank's anchors against the gathered batch (objective option ``distributed``), on
    cached backbone features (rank 0 writes the cache, the other rank reads it)."""
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    options = [
        *RUN,
        "train.max_steps=4",
        "objective.options.distributed=efficient",
        "model.freeze_backbone=true",
    ]
    overrides = [part for option in options for part in ("--set", option)]
    run = tmp_path / "efficient"
    assert main(["train", *overrides, "--run-dir", str(run), "--nproc-per-node", "2"]) == 0
    assert load_checkpoint(run / "last.pt")["state"]["step"] == 4
    with pytest.raises(ConfigError, match="distributed"):
        load_config(None, [*RUN, "objective.options.distributed=everywhere"])


def test_two_processes_killed_and_resumed_end_bit_identical(tmp_path, monkeypatch) -> None:
    """Rank 1 dies by SIGKILL mid-run (torchrun stops rank 0); resumed on 2 processes, the run
    ends with the uninterrupted 2-process run's weights, bit for bit."""
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    options = [*RUN, "data.name=user_parts:killed_digits", "train.checkpoint_every=1"]
    overrides = [part for option in options for part in ("--set", option)]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main(["train", *overrides, "--run-dir", str(whole), "--nproc-per-node", "2"]) == 0
    monkeypatch.setenv("DMLKIT_TEST_KILL_RANK", "1")
    monkeypatch.setenv("DMLKIT_TEST_KILL_AFTER", str(5 * 8))  # during step 6 (8 items a step)
    assert main(["train", *overrides, "--run-dir", str(cut), "--nproc-per-node", "2"]) == 2
    stopped_at = load_checkpoint(cut / "last.pt")["state"]["step"]
    assert 0 < stopped_at < 24
    monkeypatch.delenv("DMLKIT_TEST_KILL_RANK")
    resume = ["train", "--run-dir", str(cut), "--resume", "--nproc-per-node", "2"]
    assert main(resume) == 0
    expected = load_checkpoint(whole / "last.pt")
    got = load_checkpoint(cut / "last.pt")
    assert got["state"]["step"] == expected["state"]["step"] == 24
    for key, value in expected["model"].items():
        assert torch.equal(value, got["model"][key]), key


def test_efficient_mode_refuses_the_losses_it_cannot_use() -> None:
    import dmlkit.losses as dl
    from dmlkit.objectives import MetricLossObjective

    for loss, message in [
        (dl.DynamicSoftMarginLoss(), "states would diverge"),
        (dl.CrossBatchMemory(dl.ContrastiveLoss(), 4), "global mode only"),
        (dl.ArcFaceLoss(3, 4), "takes ref_emb"),
    ]:
        with pytest.raises(ValueError, match=message):
            MetricLossObjective(loss, distributed="efficient")


def _mismatched_worker(rank: int, store: str, folder: str) -> None:
    import torch.distributed as dist

    os.environ["OMP_NUM_THREADS"] = "1"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    steps = 8 if rank == 0 else 9
    try:
        Trainer(load_config(None, [*RUN, f"train.max_steps={steps}"]), Path(folder) / "run")
    except ConfigError as error:
        (Path(folder) / f"rank{rank}.txt").write_text(str(error))
    dist.destroy_process_group()


def test_ranks_given_different_configs_are_refused(tmp_path, monkeypatch) -> None:
    import torch.multiprocessing as mp

    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    mp.spawn(_mismatched_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    for rank in range(2):
        message = (tmp_path / f"rank{rank}.txt").read_text()
        assert "ranks [1] were given another config or run folder than rank 0" in message


def test_cross_batch_memory_on_two_processes_equals_one(tmp_path, monkeypatch) -> None:
    """The gathered global batch is queued once, identically, on every rank."""
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    options = [
        *RUN,
        "loss.name=dmlkit.losses:CrossBatchMemory",
        "loss.options.loss.name=ContrastiveLoss",
        "loss.options.memory_size=40",
        "miner.name=null",
    ]
    overrides = [part for option in options for part in ("--set", option)]
    two = tmp_path / "two"
    assert main(["train", *overrides, "--run-dir", str(two), "--nproc-per-node", "2"]) == 0
    one = Trainer(load_config(None, options), tmp_path / "one")
    one.fit(test=False)
    got = load_checkpoint(two / "last.pt")
    for key, value in one.model.state_dict().items():
        torch.testing.assert_close(got["model"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    memory = one.objective.state_dict()
    for key in ("loss.embedding_memory", "loss.label_memory"):
        torch.testing.assert_close(got["objective"][key], memory[key], rtol=1e-5, atol=1e-6)
