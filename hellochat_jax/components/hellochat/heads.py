"""Training-only heads of a Hello-Chat: classifiers that shape what a part learns and are then
dropped (`hellochat export` leaves them out of the model folder).

    encoder_ctc     Linear over the thinker's audio-encoder features (25 Hz) -> text-token CTC:
                    an auxiliary loss that teaches the encoder to hear words early in training
    encoder_emotion / encoder_events   utterance emotion (softmax, from the encoder's
                    mean-pooled features) and background events (sigmoid per event, each the
                    highest of its per-frame logits): the encoder learns how it was said and
                    what else sounds, which the thinker then verbalises
    tokenizer_ctc   a small decoder over the speech tokenizer's FSQ codes (8 dims, 25 Hz) ->
                    text-token CTC: CosyVoice 2's supervised semantic tokens, scaled down
    tokenizer_emotion  utterance emotion from the FSQ codes (mean-pooled): keeps how it was
                    said in the tokens, so the talker can learn speaking styles from them

CTC classes are the text tokenizer's ids; id 0 (a special token no transcript contains) is
the blank.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from hellochat_jax.core.layers import LayerNorm, Linear


@dataclasses.dataclass(frozen=True)
class HeadsConfig:
    vocab_size: int = 0  # CTC classes (the text tokenizer's vocabulary; 0 = the blank)
    encoder_ctc: bool = False
    tokenizer_ctc: bool = False
    tokenizer_width: int = 128
    tokenizer_layers: int = 2  # conv blocks over the FSQ codes before the CTC projection
    tokenizer_kernel: int = 5
    emotions: int = 0  # emotion classes for tokenizer_emotion (0: no such head)
    encoder_emotions: int = 0  # emotion classes for encoder_emotion (0: no such head; needs encoder_ctc)
    encoder_events: int = 0  # event classes for encoder_events (0: no such head; needs encoder_ctc)


class ConvBlock(nnx.Module):
    """Pre-norm 1-D conv block with a residual: local context for the CTC decoder."""

    def __init__(self, width: int, kernel: int, *, rngs: nnx.Rngs):
        self.norm = LayerNorm(width, names=("audio_embed",), rngs=rngs)
        self.conv = nnx.Conv(width, width, kernel_size=(kernel,), padding="SAME", rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + jax.nn.gelu(self.conv(self.norm(x)))


class TokenizerDecoder(nnx.Module):
    """FSQ codes [B, T, 8] -> CTC logits [B, T, vocab] (and pooled emotion logits)."""

    def __init__(self, cfg: HeadsConfig, code_dim: int, *, rngs: nnx.Rngs):
        self.proj_in = Linear(code_dim, cfg.tokenizer_width, names=(None, "audio_embed"), rngs=rngs)
        self.blocks = nnx.List([ConvBlock(cfg.tokenizer_width, cfg.tokenizer_kernel, rngs=rngs) for _ in range(cfg.tokenizer_layers)])
        self.norm = LayerNorm(cfg.tokenizer_width, names=("audio_embed",), rngs=rngs)
        self.ctc = Linear(cfg.tokenizer_width, cfg.vocab_size, names=("audio_embed", "vocab"), rngs=rngs)
        self.emotion = Linear(cfg.tokenizer_width, cfg.emotions, names=("audio_embed", None), rngs=rngs) if cfg.emotions else None

    def __call__(self, codes: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        x = self.proj_in(codes) * valid[..., None]
        for block in self.blocks:
            x = block(x) * valid[..., None]
        x = self.norm(x)
        emotion = None
        if self.emotion is not None:
            pooled = jnp.sum(x * valid[..., None], axis=1) / jnp.maximum(jnp.sum(valid, axis=1, keepdims=True), 1.0)
            emotion = self.emotion(pooled)
        return self.ctc(x), emotion


class TrainingHeads(nnx.Module):
    def __init__(self, cfg: HeadsConfig, model_cfg, *, rngs: nnx.Rngs):
        from hellochat_jax.components.s3tokenizer.model import FSQ_DIM

        self.cfg = cfg
        # Each attribute is assigned once: nnx refuses a module where None (static) stood.
        encoder_ctc = tokenizer = encoder_emotion = encoder_events = None
        if cfg.encoder_ctc:
            encoder = model_cfg.thinker.audio_encoder if model_cfg.thinker is not None else None
            if encoder is None:
                raise ValueError("heads.encoder_ctc needs a thinker with an audio encoder")
            encoder_ctc = Linear(encoder.embed_dim, cfg.vocab_size, names=("audio_embed", "vocab"), rngs=rngs)
            if cfg.encoder_emotions:
                encoder_emotion = Linear(encoder.embed_dim, cfg.encoder_emotions, names=("audio_embed", None), rngs=rngs)
            if cfg.encoder_events:
                encoder_events = Linear(encoder.embed_dim, cfg.encoder_events, names=("audio_embed", None), rngs=rngs)
        if cfg.tokenizer_ctc:
            if model_cfg.speech_tokenizer is None:
                raise ValueError("heads.tokenizer_ctc needs a speech_tokenizer part")
            tokenizer = TokenizerDecoder(cfg, FSQ_DIM, rngs=rngs)
        self.encoder_ctc, self.tokenizer = encoder_ctc, tokenizer
        self.encoder_emotion, self.encoder_events = encoder_emotion, encoder_events
