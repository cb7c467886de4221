"""Two ``dmlkit tune`` workers on several processes share one Optuna study on a real PostgreSQL
server; one is killed mid-trial, and nothing finished is lost: the killed trial is run again.

A throwaway server is started in a temporary folder (Debian's PostgreSQL: ``.ci/run`` installs
it where it can); the test skips, saying why, where no server can be started.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")
from optuna.trial import TrialState  # noqa: E402

METHOD = "contrastive"
RUN = [
    "training.train.epochs=1",
    "training.validation.every=1",
    "training.train.max_steps=40",
    "training.logging.log_every=1",
    "protocol.heartbeat_interval=1",
    "protocol.grace_period=2",
]


def _binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    pytest.importorskip("psycopg2", reason="psycopg2 (the PostgreSQL driver) is not installed")
    initdb, pg_ctl = _binary("initdb"), _binary("pg_ctl")
    if initdb is None or pg_ctl is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl): .ci/run installs them")
    # Not under pytest's private temporary folders: the server's own user must reach it.
    folder = Path(tempfile.mkdtemp(prefix="dmlkit-postgres-"))
    data, sockets, port = folder / "data", folder / "sockets", _free_port()
    sockets.mkdir()
    as_user: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root
        runuser = shutil.which("runuser")
        if runuser is None:
            pytest.skip("running as root without runuser: cannot start PostgreSQL")
        shutil.chown(folder, "postgres")
        shutil.chown(sockets, "postgres")
        as_user = [runuser, "-u", "postgres", "--"]
    options = f"-p {port} -k {sockets} -c listen_addresses=''"
    try:
        subprocess.run([*as_user, initdb, "-D", str(data), "-A", "trust", "-U", "dmlkit"],
                       check=True, capture_output=True, timeout=120)  # fmt: skip
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-l", str(folder / "log"),
                        "-o", options, "-w", "start"], check=True, capture_output=True,
                       timeout=120)  # fmt: skip
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, KeyError) as error:
        shutil.rmtree(folder, ignore_errors=True)
        detail = getattr(error, "stderr", b"") or b""
        pytest.skip(f"could not start a PostgreSQL server: {error} {detail.decode()[-300:]}")
    try:
        yield f"postgresql+psycopg2://dmlkit@/postgres?host={sockets}&port={port}"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)  # fmt: skip
        shutil.rmtree(folder, ignore_errors=True)


def _worker(out: Path, url: str, log: Path) -> subprocess.Popen[bytes]:
    args = ["tune", "digits", "--method", METHOD, "--out", str(out), "--trials", "4"]
    args += [arg for option in [*RUN, f"protocol.storage={url}"] for arg in ("--set", option)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with log.open("w") as stdout:
        return subprocess.Popen([sys.executable, "-m", "dmlkit.cli", *args], env=env,
                                stdout=stdout, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip


def _running_trial(log: Path) -> int | None:
    """The trial the worker last announced (``[method] trial N: ...``)."""
    started = re.findall(rf"\[{METHOD}\] trial (\d+): \w+=", log.read_text())
    return int(started[-1]) if started else None


def test_two_workers_on_postgresql_lose_nothing_when_one_is_killed(
    postgres_url: str, tmp_path: Path
) -> None:
    out = tmp_path / "bench"
    killed_log, other_log = tmp_path / "killed.txt", tmp_path / "other.txt"
    victim = _worker(out, postgres_url, killed_log)
    other = _worker(out, postgres_url, other_log)
    try:
        deadline = time.monotonic() + 300
        killed_trial = None
        while killed_trial is None:
            assert time.monotonic() < deadline, "the workers finished no trial in time"
            assert victim.poll() is None, killed_log.read_text()
            trials = optuna.load_study(study_name=METHOD, storage=postgres_url).get_trials() \
                if _running_trial(killed_log) is not None else []  # fmt: skip
            number = _running_trial(killed_log)
            complete = [t for t in trials if t.state == TrialState.COMPLETE]
            mine = [t for t in trials if t.number == number and t.state == TrialState.RUNNING]
            if complete and mine:
                os.killpg(victim.pid, signal.SIGKILL)
                killed_trial = number
            time.sleep(0.05)
        victim.wait()
        before = {t.number: t for t in complete}
        assert other.wait(timeout=600) == 0, other_log.read_text()
    finally:
        for process in (victim, other):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    time.sleep(2.5)  # the killed worker's heartbeat is now stale
    final = _worker(out, postgres_url, tmp_path / "final.txt")
    assert final.wait(timeout=600) == 0, (tmp_path / "final.txt").read_text()

    after = {
        t.number: t for t in optuna.load_study(study_name=METHOD, storage=postgres_url).get_trials()
    }
    for number, trial in before.items():  # finished trials are untouched
        assert after[number].state == TrialState.COMPLETE
        assert after[number].value == trial.value and after[number].params == trial.params
    assert after[killed_trial].state == TrialState.FAIL
    (again,) = [t for t in after.values() if t.user_attrs.get("run_of") == killed_trial]
    assert again.state == TrialState.COMPLETE and again.params == after[killed_trial].params
    assert len([t for t in after.values() if t.state == TrialState.COMPLETE]) >= 4
