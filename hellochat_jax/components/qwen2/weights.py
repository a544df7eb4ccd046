"""Hugging Face Qwen2 / Qwen2.5 (config.json + safetensors) <-> our Qwen2Thinker.

Import streams one tensor at a time straight onto its target sharding; export writes
safetensors + config.json that `transformers.Qwen2ForCausalLM.from_pretrained` loads.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax

from hellochat_jax.checkpoint.io import (
    IDENTITY,
    TRANSPOSE,
    KeyRule,
    KeyTable,
    SafetensorsSource,
    TensorSource,
    abstract_module,
    drop_tied_copy,
    export_tensors,
    keep_stored_dtype,
    load_into,
    read_json_config,
    save_hf_folder,
)
from hellochat_jax.components.qwen2.model import Qwen2Config, Qwen2Thinker
from hellochat_jax.core import sharding as shd

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


def load_from_source(
    cfg: Qwen2Config,
    source: TensorSource,
    mesh: jax.sharding.Mesh,
    rules: shd.Rules = shd.DEFAULT_RULES,
    *,
    what: str = "qwen2 checkpoint",
    progress: bool = False,
) -> Qwen2Thinker:
    """Any tensor source with HF Qwen2 keys (e.g. a prefixed_source over MiDashengLM's decoder.*)."""
    if cfg.tie_word_embeddings:
        source = drop_tied_copy(source, "lm_head.weight", "model.embed_tokens.weight", what)
    return load_into(abstract_module(Qwen2Thinker, cfg), source, TABLE, mesh, rules, what=what, progress=progress)


def load(
    path: str | os.PathLike,
    mesh: jax.sharding.Mesh | None = None,
    rules: shd.Rules = shd.DEFAULT_RULES,
    *,
    progress: bool = False,
    **config_overrides: Any,
) -> tuple[Qwen2Config, Qwen2Thinker]:
    """Reads an HF Qwen2 folder (model.safetensors or sharded with an index)."""
    mesh = mesh if mesh is not None else shd.make_mesh()
    cfg = read_config(path, **config_overrides)
    source = SafetensorsSource(path)
    return cfg, load_from_source(cfg, source, mesh, rules, what=str(path), progress=progress)


def export(model: Qwen2Thinker, cfg: Qwen2Config, path: str | os.PathLike, *, max_shard_bytes: int | None = None) -> Path:
    """Writes an HF folder: config.json + model.safetensors (sharded with an index if asked)."""
    return save_hf_folder(export_tensors(model, TABLE), cfg.to_hf(), path, max_shard_bytes=max_shard_bytes)
