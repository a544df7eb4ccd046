"""Components start from converted checkpoints: the thinker from a converted Qwen2 folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flax import nnx
from hellochat_jax.train import config as train_config
from hellochat_jax.train.trainer import Trainer
from train_util import tiny_config

from hellochat_jax.checkpoint.io import save_orbax
from hellochat_jax.checkpoint.load import config_to_dict
from hellochat_jax.components.qwen2 import weights as hf_qwen2
from hellochat_jax.core import sharding as shd
from hellochat_jax.core.config import ConfigError, from_dict


@pytest.fixture(scope="module")
def converted_qwen2(fixtures_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("qwen2") / "ckpt"
    cfg, model = hf_qwen2.load(fixtures_dir / "qwen2-tiny" / "checkpoint", shd.make_mesh())
    save_orbax(model, out, component="qwen2", config=config_to_dict(cfg))
    return out, model


def test_thinker_starts_from_a_converted_checkpoint(tmp_path, fixtures_dir, converted_qwen2):
    ckpt, reference = converted_qwen2
    hf = json.loads((fixtures_dir / "qwen2-tiny" / "checkpoint" / "config.json").read_text())
    thinker = {k: hf[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                  "num_attention_heads", "num_key_value_heads", "rope_theta", "tie_word_embeddings")}
    cfg = from_dict(train_config.TrainConfig, tiny_config(
        tmp_path / "run", model={"thinker": thinker, "init_from": {"thinker": str(ckpt)}, "lora": {"rank": 2}}))
    state = Trainer(cfg).init_state()
    ours = {p[2:]: v for p, v in nnx.to_flat_state(state["rest"]) if p[:2] == ("thinker", "decoder")}
    want = dict(nnx.to_flat_state(nnx.state(reference)))
    assert set(ours) == set(want)  # with LoRA on, every base weight is frozen and loaded
    for path, var in want.items():
        np.testing.assert_array_equal(np.asarray(ours[path].get_value()), np.asarray(var.get_value()))


def test_a_checkpoint_that_does_not_fit_is_refused_by_name(tmp_path, converted_qwen2):
    ckpt, _ = converted_qwen2
    cfg = from_dict(train_config.TrainConfig, tiny_config(tmp_path / "run", model={"init_from": {"thinker": str(ckpt)}}))
    with pytest.raises(ConfigError, match="has shape"):
        Trainer(cfg).init_state()
