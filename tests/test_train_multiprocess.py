"""Two JAX processes (4 simulated CPU devices each, gloo collectives, jax.distributed on
localhost) train like one process with 8 devices on the same global batch, each process
reading only its own rows."""

from __future__ import annotations

import socket
import subprocess

import numpy as np
import pytest
from train_util import device_env, losses, run_train, tiny_config, train_command, write_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiprocess
def test_two_processes_match_one_process(tmp_path):
    raw = tiny_config(tmp_path / "single", steps=5, checkpoint={"every": 5}, data={"batch_size": 8})
    config = write_config(tmp_path / "c.yaml", raw)
    single = run_train(config, devices=8)
    assert single.returncode == 0, single.stderr[-3000:]

    port = _free_port()
    procs = [
        subprocess.Popen(
            train_command(
                config, f"run_dir={tmp_path / 'multi'}", f"distributed.coordinator=127.0.0.1:{port}",
                "distributed.num_processes=2", f"distributed.process_id={i}", "distributed.cpu_collectives=gloo",
            ),
            env=device_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=400) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "2 process(es)" in outs[0][0]

    one, two = losses(tmp_path / "single"), losses(tmp_path / "multi")
    assert sorted(two) == list(range(1, 6))
    np.testing.assert_allclose([two[s] for s in sorted(two)], [one[s] for s in sorted(one)], rtol=2e-6)
    # Both processes took part in the checkpoint: one iterator state file each.
    data_dir = tmp_path / "multi" / "checkpoints" / "5" / "data"
    assert sorted(p.name for p in data_dir.glob("*.json")) == ["process_0-of-2.json", "process_1-of-2.json"]
