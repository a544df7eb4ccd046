"""Verify entry for `s3tokenizer-v2` fixtures: log-mel, encoder output, FSQ projection, tokens."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from hellochat_jax.components.s3tokenizer import weights as convert
from hellochat_jax.components.s3tokenizer.model import fsq_tokens, log_mel_128
from hellochat_jax.core import sharding as shd


def run(case, mesh, rules) -> dict[str, np.ndarray]:
    _, model = convert.load(case.checkpoint, mesh, rules, precision="highest")
    inputs = shd.put_batch(
        {"waveform": case.inputs["waveform"].astype(np.float32), "lengths": case.inputs["lengths"].astype(np.int32)}, mesh, rules
    )
    out = _forward(model, inputs["waveform"], inputs["lengths"])
    out["mel"] = jnp.swapaxes(out["mel"], 1, 2)  # the reference's [B, 128, T]
    return out


@nnx.jit
def _forward(model, waveform, lengths):
    mel, mel_lens = log_mel_128(waveform, lengths)
    hidden, token_lens = model.encode(mel, mel_lens)
    proj = model.project(hidden)
    return {
        "mel": mel,
        "mel_lens": mel_lens,
        "encoder_out": hidden,
        "fsq_proj": proj,
        "tokens": fsq_tokens(proj),
        "token_lens": token_lens,
        "token_valid": jnp.arange(hidden.shape[1])[None, :] < token_lens[:, None],
    }
