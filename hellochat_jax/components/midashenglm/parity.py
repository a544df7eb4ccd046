"""Verify entry for `midashenglm` fixtures: encoder features, adapter rows and thinker logits
of a batch of prompts with one audio clip each (right-padded, positions 0..T-1 per row)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from hellochat_jax.components.midashenglm import weights as convert_midashenglm
from hellochat_jax.components.midashenglm.model import (
    MiDashengLM,
    audio_token_counts,
    check_placeholders,
)
from hellochat_jax.core import sharding as shd


@nnx.jit
def _forward(model: MiDashengLM, input_ids, attention_mask, waveform, lengths):
    audio_embeds, features = model.encode_audio(waveform, lengths)
    embeds = model.embed(input_ids, audio_embeds, lengths)
    positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
    logits, _ = model.decoder(inputs_embeds=embeds, attention_mask=attention_mask, positions=positions)
    return logits, features, audio_embeds, audio_token_counts(lengths, model.cfg)


def run(case, mesh, rules) -> dict[str, np.ndarray]:
    cfg, model = convert_midashenglm.load(case.checkpoint, mesh, rules, precision="highest")
    lengths = case.inputs["lengths"].astype(np.int32)
    check_placeholders(case.inputs["input_ids"], lengths, cfg)
    x = shd.put_batch({
        "input_ids": case.inputs["input_ids"].astype(np.int32),
        "attention_mask": case.inputs["attention_mask"].astype(np.int32),
        "waveform": case.inputs["waveform"].astype(np.float32),
        "lengths": lengths,
    }, mesh, rules)
    logits, features, audio_embeds, counts = _forward(model, x["input_ids"], x["attention_mask"], x["waveform"], x["lengths"])
    n_enc, n_audio = features.shape[1], audio_embeds.shape[1]
    return {
        "logits": logits,  # compared where the fixture's own `valid` mask says
        "encoder_features": features,
        "encoder_valid": np.arange(n_enc)[None, :] < (lengths // cfg.audio_encoder.samples_per_patch)[:, None],
        "audio_embeds": audio_embeds,
        "audio_valid": np.arange(n_audio)[None, :] < np.asarray(counts)[:, None],
    }
