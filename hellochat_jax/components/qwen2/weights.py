"""Hugging Face Qwen2 / Qwen2.5 (config.json + safetensors) <-> our Qwen2Thinker.

Import streams one tensor at a time straight onto its target sharding; export writes
safetensors + config.json that `transformers.Qwen2ForCausalLM.from_pretrained` loads.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

from hellochat_jax.checkpoint.io import IDENTITY, TRANSPOSE, KeyRule, KeyTable, SafetensorsSource, TensorSource
from hellochat_jax.checkpoint.io import drop_tied_copy, export_tensors, keep_stored_dtype, read_json_config, save_hf_folder
from hellochat_jax.checkpoint.load import load_release
from hellochat_jax.components.qwen2.model import Qwen2Config, Qwen2Thinker

COMPONENT = "qwen2"

# HF key (their) -> our variable path. One row per tensor kind; {i} is the layer index.
QWEN2_KEYS = [
    KeyRule("model.embed_tokens.weight", "model.embed_tokens.embedding", IDENTITY),
    KeyRule("model.layers.{i}.input_layernorm.weight", "model.layers.{i}.input_layernorm.scale", IDENTITY),
    KeyRule("model.layers.{i}.self_attn.q_proj.weight", "model.layers.{i}.self_attn.q_proj.kernel", TRANSPOSE),
    KeyRule("model.layers.{i}.self_attn.q_proj.bias", "model.layers.{i}.self_attn.q_proj.bias", IDENTITY),
    KeyRule("model.layers.{i}.self_attn.k_proj.weight", "model.layers.{i}.self_attn.k_proj.kernel", TRANSPOSE),
    KeyRule("model.layers.{i}.self_attn.k_proj.bias", "model.layers.{i}.self_attn.k_proj.bias", IDENTITY),
    KeyRule("model.layers.{i}.self_attn.v_proj.weight", "model.layers.{i}.self_attn.v_proj.kernel", TRANSPOSE),
    KeyRule("model.layers.{i}.self_attn.v_proj.bias", "model.layers.{i}.self_attn.v_proj.bias", IDENTITY),
    KeyRule("model.layers.{i}.self_attn.o_proj.weight", "model.layers.{i}.self_attn.o_proj.kernel", TRANSPOSE),
    KeyRule("model.layers.{i}.post_attention_layernorm.weight", "model.layers.{i}.post_attention_layernorm.scale", IDENTITY),
    KeyRule("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.gate_proj.kernel", TRANSPOSE),
    KeyRule("model.layers.{i}.mlp.up_proj.weight", "model.layers.{i}.mlp.up_proj.kernel", TRANSPOSE),
    KeyRule("model.layers.{i}.mlp.down_proj.weight", "model.layers.{i}.mlp.down_proj.kernel", TRANSPOSE),
    KeyRule("model.norm.weight", "model.norm.scale", IDENTITY),
    KeyRule("lm_head.weight", "lm_head.kernel", TRANSPOSE),
    # Recomputed from the config, never loaded (some old exports carry it).
    KeyRule("model.layers.{i}.self_attn.rotary_emb.inv_freq", None),
]
TABLE = KeyTable(QWEN2_KEYS)


def read_config(path: str | os.PathLike, **overrides: Any) -> Qwen2Config:
    hf = read_json_config(path)
    return Qwen2Config.from_hf(hf, **keep_stored_dtype(hf, overrides))


def open_release(path: str | os.PathLike, **overrides: Any) -> tuple[Qwen2Config, TensorSource, str]:
    """An HF Qwen2 folder (model.safetensors, or shards with an index)."""
    return read_config(path, **overrides), SafetensorsSource(path), str(path)


def prepare_source(cfg: Qwen2Config, source: TensorSource, what: str) -> tuple[Qwen2Config, TensorSource, KeyTable]:
    if cfg.tie_word_embeddings:
        source = drop_tied_copy(source, "lm_head.weight", "model.embed_tokens.weight", what)
    return cfg, source, TABLE


# (config, Qwen2Thinker) from an HF folder or a converted one: checkpoint.load.load_release.
load = functools.partial(load_release, COMPONENT)


def export(model: Qwen2Thinker, cfg: Qwen2Config, path: str | os.PathLike, *, max_shard_bytes: int | None = None) -> Path:
    """Writes an HF folder: config.json + model.safetensors (sharded with an index if asked)."""
    return save_hf_folder(export_tensors(model, TABLE), cfg.to_hf(), path, max_shard_bytes=max_shard_bytes)
