"""MiDashengLM Hugging Face folder (config.json + safetensors, sharded or not) <-> our MiDashengLM.

The folder holds three key families: ``audio_encoder.*`` (the dasheng release keys without the
front-end buffers, ``init_bn.1.X`` renamed ``init_bn.X``), ``audio_projector.net.{0,2}.*`` and
``decoder.*`` (transformers Qwen2ForCausalLM keys). One table maps all three; the encoder and
decoder rows are the dasheng and Qwen2 tables with their prefixes.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

from hellochat_jax.checkpoint.io import TRANSPOSE, CheckpointError, KeyRule, KeyTable, SafetensorsSource, TensorSource
from hellochat_jax.checkpoint.io import drop_tied_copy, export_tensors, keep_stored_dtype, read_json_config, save_hf_folder
from hellochat_jax.checkpoint.load import load_release
from hellochat_jax.components.dasheng.weights import DASHENG_KEYS
from hellochat_jax.components.midashenglm.model import MiDashengLM, MiDashengLMConfig
from hellochat_jax.components.qwen2.weights import QWEN2_KEYS

COMPONENT = "midashenglm"

ENCODER_KEYS = [
    KeyRule("audio_encoder." + rule.theirs.replace("init_bn.1.", "init_bn."), "audio_encoder." + rule.ours, rule.transform)
    for rule in DASHENG_KEYS
    if rule.ours is not None  # the front-end buffers are not stored in this format
]
PROJECTOR_KEYS = [
    KeyRule("audio_projector.net.0.weight", "audio_projector.fc1.kernel", TRANSPOSE),
    KeyRule("audio_projector.net.0.bias", "audio_projector.fc1.bias"),
    KeyRule("audio_projector.net.2.weight", "audio_projector.fc2.kernel", TRANSPOSE),
    KeyRule("audio_projector.net.2.bias", "audio_projector.fc2.bias"),
]
DECODER_KEYS = [
    KeyRule("decoder." + rule.theirs, None if rule.ours is None else "decoder." + rule.ours, rule.transform)
    for rule in QWEN2_KEYS
]
MIDASHENGLM_KEYS = ENCODER_KEYS + PROJECTOR_KEYS + DECODER_KEYS
TABLE = KeyTable(MIDASHENGLM_KEYS)


def read_config(path: str | os.PathLike, **overrides: Any) -> MiDashengLMConfig:
    hf = read_json_config(path)
    try:
        return MiDashengLMConfig.from_hf(hf, **keep_stored_dtype(hf, overrides))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def open_release(path: str | os.PathLike, **overrides: Any) -> tuple[MiDashengLMConfig, TensorSource, str]:
    """An HF MiDashengLM folder (model.safetensors, or shards with an index)."""
    return read_config(path, **overrides), SafetensorsSource(path), str(path)


def prepare_source(cfg: MiDashengLMConfig, source: TensorSource, what: str) -> tuple[MiDashengLMConfig, TensorSource, KeyTable]:
    if cfg.text.tie_word_embeddings:
        source = drop_tied_copy(source, "decoder.lm_head.weight", "decoder.model.embed_tokens.weight", what)
    return cfg, source, TABLE


# (config, MiDashengLM) from an HF folder or a converted one: checkpoint.load.load_release.
load = functools.partial(load_release, COMPONENT)


def export(model: MiDashengLM, cfg: MiDashengLMConfig, path: str | os.PathLike, *, max_shard_bytes: int | None = None) -> Path:
    """Writes config.json + model.safetensors (sharded with an index when max_shard_bytes is set)."""
    return save_hf_folder(export_tensors(model, TABLE), cfg.to_hf(), path, max_shard_bytes=max_shard_bytes)
