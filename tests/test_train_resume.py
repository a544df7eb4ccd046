"""Exact resume: a run killed with SIGKILL, or stopped with SIGTERM, continues from its last
checkpoint and produces bit-identical losses to a run that never stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from train_util import device_env, losses, run_train, tiny_config, train_command, write_config

STEPS, EVERY = 8, 4


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict[int, float]:
    """The reference: STEPS steps without interruption."""
    tmp = tmp_path_factory.mktemp("straight")
    config = write_config(tmp / "c.yaml", tiny_config(tmp / "run", steps=STEPS, checkpoint={"every": EVERY}))
    result = run_train(config)
    assert result.returncode == 0, result.stderr[-3000:]
    out = losses(tmp / "run")
    assert sorted(out) == list(range(1, STEPS + 1))
    return out


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"training exited early (rc {proc.returncode}): {proc.stderr.read()[-3000:]}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the training subprocess")
        time.sleep(0.05)


def _slow_run(tmp: Path, every: int) -> tuple[Path, subprocess.Popen]:
    # A simulated input latency keeps the run going long enough to be interrupted mid-way.
    cfg = tiny_config(tmp / "run", steps=STEPS, checkpoint={"every": every}, data={"synthetic": {"delay_s": 0.4}})
    config = write_config(tmp / "c.yaml", cfg)
    proc = subprocess.Popen(train_command(config), env=device_env(1), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    return config, proc


def test_kill9_then_resume_matches_straight_run(tmp_path, straight):
    config, proc = _slow_run(tmp_path, EVERY)
    first_ckpt = tmp_path / "run" / "checkpoints" / str(EVERY)  # appears only once fully committed
    _wait_for(first_ckpt.exists, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL

    killed = losses(tmp_path / "run")
    assert all(killed[s] == straight[s] for s in killed), "the first run already differs"

    resumed = run_train(config, f"run_dir={tmp_path / 'resumed'}", f"checkpoint.dir={tmp_path / 'run' / 'checkpoints'}", resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = losses(tmp_path / "resumed")
    assert min(after) == EVERY + 1, f"resumed at {min(after)}, expected after the step-{EVERY} checkpoint"
    assert after == {s: straight[s] for s in range(EVERY + 1, STEPS + 1)}  # bit-identical


def test_sigterm_finishes_step_saves_and_exits_zero(tmp_path, straight):
    config, proc = _slow_run(tmp_path, every=0)  # no periodic checkpoints: only the SIGTERM save
    metrics = tmp_path / "run" / "metrics.jsonl"
    _wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "SIGTERM: stopping after step" in out

    steps = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
    assert len(steps) == 1 and 2 <= steps[0] < STEPS, steps
    stopped_at = steps[0]
    assert max(losses(tmp_path / "run")) == stopped_at  # the finished step was logged, then saved

    resumed = run_train(config, f"run_dir={tmp_path / 'resumed'}", f"checkpoint.dir={tmp_path / 'run' / 'checkpoints'}", resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses(tmp_path / "resumed") == {s: straight[s] for s in range(stopped_at + 1, STEPS + 1)}
