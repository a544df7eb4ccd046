"""Bad input: non-finite steps are skipped and counted, K in a row stop the run with a usable
checkpoint; config errors are reported before any compute."""

from __future__ import annotations

import time

import grain
import jax
import numpy as np
import pytest
from hellochat_jax.train import config as train_config
from hellochat_jax.train.checkpoint import Checkpointer
from hellochat_jax.train.data import SyntheticData
from hellochat_jax.train.metrics import read_jsonl
from hellochat_jax.train.trainer import EXIT_BAD_STEPS, Trainer
from train_util import tiny_config, write_config

from hellochat_jax import cli
from hellochat_jax.core.config import from_dict


class PoisonedData(SyntheticData):
    """Synthetic batches with NaN loss masks at the given micro-batch indices."""

    def __init__(self, cfg, seed, poisoned):
        super().__init__(cfg.data, seed)
        self.poisoned = poisoned

    def batch(self, index):
        b = super().batch(index)
        if self.poisoned(index):
            b["loss_mask"] = np.full_like(b["loss_mask"], np.nan)
        return b

    def iterator(self):
        return iter(grain.MapDataset.range(2**40).map(self.batch).to_iter_dataset())


def test_nonfinite_steps_are_skipped_and_k_in_a_row_stop(tmp_path):
    cfg = from_dict(train_config.TrainConfig, tiny_config(tmp_path / "run", steps=20, max_bad_steps=3, checkpoint={"every": 4}))
    # step s reads micro-batch s - 1: step 2 is bad alone; steps 6, 7, 8 ... are bad in a row
    data = PoisonedData(cfg, cfg.seed, lambda i: i == 1 or i >= 5)
    trainer = Trainer(cfg, data=data)
    code = trainer.fit()
    assert code == EXIT_BAD_STEPS

    records = {r["step"]: r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r}
    assert records[1]["skipped_steps"] == 0
    assert records[2]["skipped_steps"] == 1 and records[2]["loss"] is None  # NaN is written as null
    assert records[3]["bad_in_row"] == 0 and records[3]["skipped_steps"] == 1
    assert records[8]["bad_in_row"] == 3
    stop = int(jax.device_get(trainer.final_state["step"]))
    assert stop in (8, 9)  # metrics are read one step late

    # The stopping checkpoint holds the parameters of the last good step (5), unchanged since.
    ckpt = Checkpointer(tmp_path / "run" / "checkpoints")
    assert ckpt.latest_step() == stop
    last = ckpt.restore(stop, trainer.abstract_state)
    ckpt.close()
    leaves = jax.tree.leaves(last["params"])
    assert all(np.isfinite(np.asarray(x)).all() for x in leaves)
    assert int(last["skipped"]) == 1 + (stop - 5)
    for a, b in zip(leaves, jax.tree.leaves(trainer.final_state["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _cli(tmp_path, capsys, *overrides):
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path / "run"))
    t0 = time.perf_counter()
    code = cli.main(["train", "--config", str(config), *overrides])
    elapsed = time.perf_counter() - t0
    return code, capsys.readouterr().err, elapsed


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.learning_rate=1e-3", "unknown key(s) ['learning_rate']"),
        ("mesh.data=3", "does not divide the 8 available devices"),
        ("data.batch_size=4", "data.batch_size=4 does not divide over the batch axes"),
        ("model.frozen=[decoder]", "unknown component group 'decoder'"),
        ("optim.lr=fast", "expected a number"),
    ],
)
def test_config_errors_are_reported_before_compute(tmp_path, capsys, override, message):
    code, err, elapsed = _cli(tmp_path, capsys, override)
    assert code == 1
    assert err.startswith("error: ") and message in err
    assert elapsed < 10  # no model was built or compiled
    assert not (tmp_path / "run").exists()
