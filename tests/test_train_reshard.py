"""A checkpoint written on an 8-device (2, 2, 2) mesh restores onto another mesh shape and onto
a single device, with the target layouts, and training continues from it."""

from __future__ import annotations

import shutil

import jax
import numpy as np
from hellochat_jax.train import config as train_config
from hellochat_jax.train.checkpoint import Checkpointer
from hellochat_jax.train.trainer import Trainer
from train_util import losses, run_train, tiny_config, write_config

from hellochat_jax.core.config import from_dict


def _cfg(tmp_path, **mesh):
    raw = tiny_config(tmp_path / "run", steps=4, optim={"decay_steps": 10}, checkpoint={"every": 3}, mesh=mesh)
    return raw, from_dict(train_config.TrainConfig, raw)


def test_checkpoint_restores_onto_other_meshes(tmp_path):
    raw, cfg = _cfg(tmp_path, data=2, fsdp=2, tensor=2)
    trainer = Trainer(cfg)
    assert trainer.fit() == 0
    sharded = trainer.state_shardings["params"]["thinker"]["decoder"]["model"]["layers"][0]["mlp"]["gate_proj"]["kernel"]
    assert sharded.spec == jax.sharding.PartitionSpec("fsdp", "tensor")  # really laid out on the mesh

    ckpt = Checkpointer(tmp_path / "run" / "checkpoints")
    assert ckpt.all_steps() == [3, 4]
    saved = ckpt.restore(3, trainer.abstract_state)

    # Another mesh shape in the same process: every array equal, in the new layout.
    _, other_cfg = _cfg(tmp_path / "other", data=1, fsdp=4, tensor=2)
    other = Trainer(other_cfg)
    moved = ckpt.restore(3, other.abstract_state)
    ckpt.close()
    for a, b, want in zip(jax.tree.leaves(saved), jax.tree.leaves(moved), jax.tree.leaves(other.abstract_state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert b.sharding.is_equivalent_to(want.sharding, b.ndim)

    # One device, in a fresh process: resume from step 3 and take step 4 as the 8-device run did.
    single_ckpts = tmp_path / "single" / "checkpoints"
    shutil.copytree(tmp_path / "run" / "checkpoints" / "3", single_ckpts / "3")
    config = write_config(tmp_path / "c.yaml", {**raw, "mesh": {"data": -1, "fsdp": 1, "tensor": 1}})
    result = run_train(config, f"run_dir={tmp_path / 'single'}", devices=1, resume=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from step 3" in result.stdout
    one_device = losses(tmp_path / "single")
    eight_devices = losses(tmp_path / "run")
    assert list(one_device) == [4]
    np.testing.assert_allclose(one_device[4], eight_devices[4], rtol=1e-5)
