"""Audio adapter: 25 Hz encoder features -> 5 Hz thinker-width embeddings.

Drops the trailing T mod k frames, concatenates every k consecutive frames (time order,
``b (s k) d -> b s (k d)``), then Linear -> exact GELU -> Linear into the thinker width
(MiDashengLM's ``audio_projector``, k = subsample_factor = 5).
"""

from __future__ import annotations

import jax
from flax import nnx

from hellochat_jax.core.layers import Linear, as_dtype, gelu_exact


class AudioAdapter(nnx.Module):
    def __init__(self, encoder_dim: int, thinker_dim: int, *, subsample: int = 5, dtype: str = "float32",
                 param_dtype: str = "float32", precision: str | None = None, rngs: nnx.Rngs):
        self.subsample = subsample
        kw = dict(dtype=as_dtype(dtype), param_dtype=as_dtype(param_dtype), precision=precision, rngs=rngs)
        self.fc1 = Linear(encoder_dim * subsample, thinker_dim, names=("audio_mlp", "embed"), **kw)
        self.fc2 = Linear(thinker_dim, thinker_dim, names=("embed", "embed"), **kw)

    def num_outputs(self, num_frames: int) -> int:
        return num_frames // self.subsample

    def __call__(self, features: jax.Array) -> jax.Array:
        """features [B, T, D_enc] -> embeddings [B, T // k, D_thinker]. Which rows a sample
        really uses is decided by its audio length (``audio.num_audio_tokens``)."""
        b, t, d = features.shape
        s = t // self.subsample
        if s == 0:
            raise ValueError(f"AudioAdapter: {t} encoder frames are fewer than one group of {self.subsample}")
        x = features[:, : s * self.subsample].reshape(b, s, self.subsample * d)
        return self.fc2(gelu_exact(self.fc1(x)))
