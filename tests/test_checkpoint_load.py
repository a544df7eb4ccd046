"""One loader for every release format: `checkpoint.load.load_release` reads any component's
release (through its weights module's `open_release` / `prepare_source`) or a converted folder."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from conftest import FIXTURES, single_device_mesh
from flax import nnx

from hellochat_jax import components
from hellochat_jax.checkpoint.io import CheckpointError
from hellochat_jax.checkpoint.load import load_release, save_checkpoint


@pytest.mark.parametrize("name", [n for n, c in components.REGISTRY.items() if c.has_parity])
def test_every_release_format_loads_through_load_release(name):
    weights = components.get(name).weights
    assert weights.COMPONENT == name
    assert weights.load.func is load_release and weights.load.args == (name,)
    assert callable(weights.open_release) and callable(weights.prepare_source)


def test_a_converted_folder_loads_like_its_release(tmp_path):
    mesh = single_device_mesh()
    cfg, model = load_release("qwen2", FIXTURES / "qwen2-tiny" / "checkpoint", mesh)
    save_checkpoint(model, cfg, tmp_path / "converted", "qwen2")
    cfg2, model2 = load_release("qwen2", tmp_path / "converted", mesh)
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(model2)), nnx.to_pure_dict(nnx.state(model)))
    with pytest.raises(CheckpointError, match="holds a 'qwen2' checkpoint, not 'dasheng'"):
        load_release("dasheng", tmp_path / "converted", mesh)
