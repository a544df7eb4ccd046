"""MiDashengLM: Dasheng encoder + audio adapter + Qwen2 thinker.

With ``audio_encoder=None`` it is the Qwen2 thinker alone (no encoder, no adapter): a text-only
Hello-Chat trains and serves through the same class and parameter paths.

    waveforms [A, S] --DashengEncoder--> [A, T, D_enc] (25 Hz) --AudioAdapter--> [A, T // 5, D]
    input_ids [B, L] with <|AUDIO|> placeholders --embed_tokens--> [B, L, D]
    placeholder embeddings <- audio rows, in order --Qwen2Thinker--> logits

Audio clip a contributes its first N_a = ((1 + len_a // 160) // 4) // 5 adapter rows; the
prompt holds exactly sum(N_a) placeholders, filled in reading order (row by row, left to
right), so a conversation may hold several clips and a batch row any number of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hellochat_jax.components.adapter.model import AudioAdapter
from hellochat_jax.components.dasheng.model import (
    FRAMES_PER_PATCH,
    DashengConfig,
    DashengEncoder,
    encode_long,
)
from hellochat_jax.components.qwen2.model import Qwen2Config, Qwen2Thinker


@dataclasses.dataclass(frozen=True)
class MiDashengLMConfig:
    audio_encoder: DashengConfig | None = DashengConfig()  # None: text only
    text: Qwen2Config = Qwen2Config()
    subsample_factor: int = 5
    audio_token_id: int | None = 151646

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides: Any) -> "MiDashengLMConfig":
        """From a MiDashengLM config.json. ``dtype``, ``param_dtype`` and ``precision``
        overrides apply to both the encoder and the thinker."""
        if hf.get("model_type", "midashenglm") != "midashenglm":
            raise ValueError(f"expected a midashenglm config, got model_type={hf.get('model_type')!r}")
        for key in ("audio_encoder_config", "text_config", "audio_token_id"):
            if key not in hf:
                raise ValueError(f"MiDashengLM config.json lacks {key!r}")
        shared = {k: overrides.pop(k) for k in ("dtype", "param_dtype", "precision") if k in overrides}
        encoder = DashengConfig.from_hf(hf["audio_encoder_config"], **shared)
        text = Qwen2Config.from_hf(hf["text_config"], **shared)
        return cls(encoder, text, int(hf.get("subsample_factor", 5)), int(hf["audio_token_id"]), **overrides)

    def to_hf(self) -> dict[str, Any]:
        if self.audio_encoder is None:
            raise ValueError("a text-only thinker (no audio encoder) has no MiDashengLM config; export its decoder as Qwen2")
        text = self.text.to_hf()
        text.pop("architectures", None)
        dtype = text.pop("torch_dtype", "float32")
        return {
            "architectures": ["MiDashengLMModel"],
            "model_type": "midashenglm",
            "audio_encoder_config": self.audio_encoder.to_hf(),
            "subsample_factor": self.subsample_factor,
            "text_config": text,
            "audio_token_id": self.audio_token_id,
            "torch_dtype": dtype,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MiDashengLMConfig":
        """From ``dataclasses.asdict`` output (our converted checkpoints' hellochat.json)."""
        from hellochat_jax.core.config import from_dict

        return from_dict(cls, data, where="midashenglm config")

    def num_audio_tokens(self, num_samples: int) -> int:
        frames = 1 + int(num_samples) // self.audio_encoder.hop_size
        return (frames // FRAMES_PER_PATCH) // self.subsample_factor


def audio_token_counts(lengths: jax.Array, cfg: MiDashengLMConfig) -> jax.Array:
    """[A] placeholders each clip fills (``MiDashengLMConfig.num_audio_tokens``, on device)."""
    frames = 1 + lengths.astype(jnp.int32) // cfg.audio_encoder.hop_size
    return (frames // FRAMES_PER_PATCH) // cfg.subsample_factor


def splice_audio(text_embeds: jax.Array, input_ids: jax.Array, audio_embeds: jax.Array, counts: jax.Array, audio_token_id: int) -> jax.Array:
    """Replaces the embeddings at ``audio_token_id`` positions, in reading order, by the first
    ``counts[a]`` rows of ``audio_embeds[a]`` for a = 0, 1, ... (jit-able: static shapes).

    The caller guarantees (``check_placeholders``) that there are exactly sum(counts)
    placeholders; extra placeholders would repeat the last audio row.
    """
    a, s, d = audio_embeds.shape
    used = (jnp.arange(s)[None, :] < counts[:, None]).reshape(-1)
    # flat index of the k-th used audio row, k = 0 .. sum(counts) - 1
    source = jnp.nonzero(used, size=a * s, fill_value=a * s - 1)[0]
    is_audio = (input_ids == audio_token_id).reshape(-1)
    k = jnp.clip(jnp.cumsum(is_audio) - 1, 0, a * s - 1)
    rows = audio_embeds.reshape(a * s, d)[source[k]].astype(text_embeds.dtype)
    flat = text_embeds.reshape(-1, d)
    return jnp.where(is_audio[:, None], rows, flat).reshape(text_embeds.shape)


def check_placeholders(input_ids: np.ndarray, lengths: Sequence[int], cfg: MiDashengLMConfig) -> None:
    """Host-side check that the prompt holds one placeholder per audio row it will receive."""
    want = sum(cfg.num_audio_tokens(n) for n in lengths)
    have = int(np.sum(np.asarray(input_ids) == cfg.audio_token_id))
    if have != want:
        raise ValueError(
            f"the prompt holds {have} audio placeholder(s) (id {cfg.audio_token_id}) but the {len(lengths)} audio clip(s) "
            f"of {list(map(int, lengths))} samples yield {want} audio token(s); build prompts with the processor"
        )


class MiDashengLM(nnx.Module):
    def __init__(self, cfg: MiDashengLMConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        encoder = projector = None
        if cfg.audio_encoder is not None:
            if cfg.audio_token_id is None:
                raise ValueError("an audio encoder needs audio_token_id (the <|AUDIO|> placeholder id)")
            encoder = DashengEncoder(cfg.audio_encoder, rngs=rngs)
            projector = AudioAdapter(
                cfg.audio_encoder.embed_dim, cfg.text.hidden_size, subsample=cfg.subsample_factor,
                dtype=cfg.text.dtype, param_dtype=cfg.text.param_dtype, precision=cfg.text.precision, rngs=rngs,
            )
        # Absent parts stay None (static attributes): no variables, no path.
        self.audio_encoder, self.audio_projector = encoder, projector
        self.decoder = Qwen2Thinker(cfg.text, rngs=rngs)

    def encode_audio(self, waveform: jax.Array, lengths: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Waveforms [A, S] -> (adapter rows [A, T // 5, D_text], encoder features [A, T, D_enc])."""
        features, _ = self.audio_encoder(waveform, lengths)
        return self.audio_projector(features), features

    def embed(self, input_ids: jax.Array, audio_embeds: jax.Array, lengths: jax.Array) -> jax.Array:
        """Token embeddings with the audio rows spliced over the placeholders."""
        text = self.decoder.model.embed_tokens(input_ids)
        counts = audio_token_counts(lengths, self.cfg)
        return splice_audio(text, input_ids, audio_embeds, counts, self.cfg.audio_token_id)

    def embed_rows(self, input_ids: jax.Array, audio: jax.Array | None, audio_lengths: jax.Array | None,
                   return_features: bool = False) -> jax.Array | tuple[jax.Array, jax.Array | None, jax.Array | None]:
        """Token embeddings [B, L, D] of a packed training batch, placeholders filled row by row.

        `audio` [B, A, S] holds each row's clips in the order of its placeholder runs, with
        `audio_lengths` [B, A] (0 = no clip). Splicing is per row (vmap), so it stays local to
        the devices that hold the row. Without an encoder or audio: the text embeddings.
        """
        embeds = self.decoder.model.embed_tokens(input_ids)
        if self.audio_encoder is None or audio is None:
            return (embeds, None, None) if return_features else embeds
        b, a, s = audio.shape
        lengths = audio_lengths.reshape(b * a)
        clip_rows, features = self.encode_audio(audio.reshape(b * a, s), lengths)
        audio_embeds = clip_rows.reshape(b, a, *clip_rows.shape[1:])
        counts = audio_token_counts(lengths, self.cfg).reshape(b, a)

        def one_row(e, ids, clips, n):
            return splice_audio(e[None], ids[None], clips, n, self.cfg.audio_token_id)[0]

        spliced = jax.vmap(one_row)(embeds, input_ids, audio_embeds, counts)
        # with return_features: the encoder's features [B * A, N, D_enc] and the adapter's rows
        # [B * A, N // subsample, D] too (auxiliary losses)
        return (spliced, features, clip_rows) if return_features else spliced

    def __call__(
        self,
        input_ids: jax.Array,
        waveform: jax.Array,
        lengths: jax.Array,
        *,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> jax.Array:
        """Logits [B, L, vocab] of a prompt batch with its audio clips (teacher forcing)."""
        audio_embeds, _ = self.encode_audio(waveform, lengths)
        embeds = self.embed(input_ids, audio_embeds, lengths)
        logits, _ = self.decoder(inputs_embeds=embeds, attention_mask=attention_mask, positions=positions)
        return logits


def with_encoder_options(model: MiDashengLM, **changes: Any) -> MiDashengLMConfig:
    """Changes inference-only encoder options (e.g. ``top_db_per_sample``) of a loaded model
    in place; returns the new config."""
    encoder_cfg = dataclasses.replace(model.cfg.audio_encoder, **changes)
    model.cfg = dataclasses.replace(model.cfg, audio_encoder=encoder_cfg)
    model.audio_encoder.cfg = encoder_cfg
    return model.cfg


# ----------------------------------------------------------------------------- inference


@nnx.jit
def _audio_embeds(model: MiDashengLM, waveform, lengths):
    return model.encode_audio(waveform, lengths)[0]


@nnx.jit
def _project(model: MiDashengLM, features):
    return model.audio_projector(features)


@nnx.jit
def _embed(model: MiDashengLM, input_ids, audio_embeds, lengths):
    return model.embed(input_ids, audio_embeds, lengths)


def prompt_embeddings(
    model: MiDashengLM,
    input_ids: np.ndarray,
    waveform: np.ndarray,
    lengths: np.ndarray,
    *,
    long_audio_seconds: float = 60.0,
) -> jax.Array:
    """inputs_embeds [B, L, D] for a prompt batch. Audio longer than ``long_audio_seconds`` is
    encoded segment by segment (``encode_long``: bounded memory, same result)."""
    cfg = model.cfg
    check_placeholders(input_ids, lengths, cfg)
    lengths = np.asarray(lengths, np.int32)
    if waveform.shape[1] > long_audio_seconds * cfg.audio_encoder.sample_rate:
        features, _ = encode_long(model.audio_encoder, waveform, lengths)
        audio_embeds = _project(model, jnp.asarray(features))
    else:
        audio_embeds = _audio_embeds(model, jnp.asarray(waveform), jnp.asarray(lengths))
    return _embed(model, jnp.asarray(input_ids, jnp.int32), audio_embeds, jnp.asarray(lengths))


def generate(
    model: MiDashengLM,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    waveform: np.ndarray,
    lengths: np.ndarray,
    **generate_kwargs: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """Replies to LEFT-padded prompts with audio: the thinker's KV-cached ``generate`` started
    from the audio-spliced prompt embeddings. Returns (tokens [B, N], lengths [B])."""
    from hellochat_jax.core import decoding as gen

    embeds = prompt_embeddings(model, input_ids, waveform, lengths)
    return gen.generate(model.decoder, input_ids, attention_mask, inputs_embeds=embeds, **generate_kwargs)
