"""The model being trained: components as attributes named by parameter group.

    encoder  DashengEncoder      (optional) waveform -> 25 Hz features
    adapter  AudioAdapter        (optional) -> 5 Hz thinker-width embeddings, spliced over <|AUDIO|>
    thinker  Qwen2Thinker        text (and audio) -> text
    talker   SpeechTokenLM       (optional) text -> speech tokens

A parameter's group is the first element of its path, so freezing, LoRA and checkpoint
initialisation (`model.frozen`, `model.lora.groups`, `model.init_from`) address components by
these four names. Absent components are None and hold no variables. A new component is one
more attribute here, its config builder below, and its term in losses.Objective.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
from flax import nnx
from hellochat_jax.train.config import ModelConfig

from hellochat_jax.components.qwen2.model import Qwen2Config, Qwen2Thinker
from hellochat_jax.core import config as config_lib


def _common(cfg: ModelConfig) -> dict[str, Any]:
    return dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)


def thinker_config(cfg: ModelConfig) -> Qwen2Config:
    return dataclasses.replace(cfg.thinker, remat=cfg.remat, scan_layers=cfg.scan_layers, **_common(cfg))


def encoder_config(cfg: ModelConfig):
    from hellochat_jax.components.dasheng.model import DashengConfig

    fields = {k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg.encoder.items()}
    preset = fields.pop("preset", None)
    try:
        enc = DashengConfig.preset(preset, **fields) if preset else DashengConfig(**fields)
    except (TypeError, ValueError) as e:  # an unknown field or an inconsistent size
        raise config_lib.ConfigError(f"model.encoder: {e}") from None
    return dataclasses.replace(enc, **_common(cfg))


def talker_config(cfg: ModelConfig):
    from hellochat_jax.components.speech_lm.model import SpeechTokenLMConfig

    fields = dict(cfg.talker)
    qwen2 = fields.pop("qwen2", {})
    backbone = dataclasses.replace(
        config_lib.from_dict(Qwen2Config, qwen2, where="model.talker.qwen2") if isinstance(qwen2, dict) else qwen2,
        remat=cfg.remat, scan_layers=cfg.scan_layers, **_common(cfg),
    )
    try:
        return SpeechTokenLMConfig.from_dict({**fields, "qwen2": backbone})
    except (TypeError, ValueError) as e:  # an unknown field or an inconsistent size
        raise config_lib.ConfigError(f"model.talker: {e}") from None


class HelloChat(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.thinker = Qwen2Thinker(thinker_config(cfg), rngs=rngs)
        encoder = adapter = talker = audio_cfg = None
        if cfg.encoder is not None:
            from hellochat_jax.components.adapter.model import AudioAdapter
            from hellochat_jax.components.dasheng.model import DashengEncoder
            from hellochat_jax.components.midashenglm.model import MiDashengLMConfig

            enc = encoder_config(cfg)
            subsample = int(dict(cfg.adapter or {}).get("subsample", 5))
            # The MiDashengLM config says how many placeholders each clip fills.
            audio_cfg = MiDashengLMConfig(enc, self.thinker.cfg, subsample, cfg.audio_token_id)
            encoder = DashengEncoder(enc, rngs=rngs)
            adapter = AudioAdapter(
                enc.embed_dim, cfg.thinker.hidden_size, subsample=subsample,
                dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs,
            )
        if cfg.talker is not None:
            from hellochat_jax.components.speech_lm.model import SpeechTokenLM

            talker = SpeechTokenLM(talker_config(cfg), rngs=rngs)
        # Absent components stay None (static attributes): no variables, no path.
        self.encoder, self.adapter, self.talker, self.audio_cfg = encoder, adapter, talker, audio_cfg
        if cfg.lora is not None:
            from hellochat_jax.train.lora import add_lora

            if not add_lora(self, cfg.lora.groups, cfg.lora.targets, cfg.lora.rank, cfg.lora.alpha, rngs):
                raise config_lib.ConfigError(f"model.lora: no Linear named {cfg.lora.targets} in groups {cfg.lora.groups}")

    def thinker_inputs(self, input_ids: jax.Array, audio: jax.Array | None, audio_lengths: jax.Array | None) -> jax.Array:
        """Token embeddings with the <|AUDIO|> placeholders replaced by adapter outputs.

        `audio` [B, A, S] holds each row's clips in the order of its placeholder runs, with
        `audio_lengths` [B, A] (0 = no clip): clip a of row b fills the next N_a placeholders of
        row b (N_a from its length, as MiDashengLM counts). Splicing is per row, so it stays
        local to the devices that hold the row.
        """
        embeds = self.thinker.model.embed_tokens(input_ids)
        if self.encoder is None or audio is None:
            return embeds
        from hellochat_jax.components.midashenglm.model import (
            audio_token_counts,
            splice_audio,
        )

        b, a, s = audio.shape
        lengths = audio_lengths.reshape(b * a)
        features, _ = self.encoder(audio.reshape(b * a, s), lengths)
        audio_embeds = self.adapter(features)
        audio_embeds = audio_embeds.reshape(b, a, *audio_embeds.shape[1:])
        counts = audio_token_counts(lengths, self.audio_cfg).reshape(b, a)
        audio_id = self.audio_cfg.audio_token_id

        def one_row(e, ids, clips, n):
            return splice_audio(e[None], ids[None], clips, n, audio_id)[0]

        return jax.vmap(one_row)(embeds, input_ids, audio_embeds, counts)


def build(cfg: ModelConfig, seed: int) -> Callable[[], HelloChat]:
    """The factory that `sharding.init_sharded` / `abstract_model` call."""
    return lambda: HelloChat(cfg, rngs=nnx.Rngs(seed))

