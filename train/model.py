"""The model being trained: `HelloChat` (hellochat_jax/components/hellochat), built from the
training config. Its parameter groups (`encoder`, `adapter`, `thinker`, `talker`: what
`model.frozen`, `model.lora.groups` and `model.init_from` name) are path prefixes in
`hellochat.PARAM_GROUPS`, so a training checkpoint has the parameter names of a converted one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from flax import nnx
from hellochat_jax.train.config import ModelConfig

from hellochat_jax.components.hellochat.model import HelloChat, HelloChatConfig
from hellochat_jax.components.midashenglm.model import MiDashengLMConfig
from hellochat_jax.components.qwen2.model import Qwen2Config
from hellochat_jax.core import config as config_lib

__all__ = ["HelloChat", "build", "encoder_config", "model_config", "talker_config", "thinker_config"]


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


def model_config(cfg: ModelConfig) -> HelloChatConfig:
    adapter = dict(cfg.adapter or {})
    unknown = set(adapter) - {"subsample"}
    if unknown:
        raise config_lib.ConfigError(f"model.adapter: unknown fields {sorted(unknown)}; the adapter takes subsample")
    thinker = MiDashengLMConfig(
        audio_encoder=encoder_config(cfg) if cfg.encoder is not None else None,
        text=thinker_config(cfg),
        subsample_factor=int(adapter.get("subsample", 5)),
        audio_token_id=cfg.audio_token_id,
    )
    return HelloChatConfig(thinker=thinker, talker=talker_config(cfg) if cfg.talker is not None else None)


def build(cfg: ModelConfig, seed: int) -> Callable[[], HelloChat]:
    """The factory that `sharding.init_sharded` / `abstract_model` call."""
    model_cfg = model_config(cfg)

    def make() -> HelloChat:
        rngs = nnx.Rngs(seed)
        model = HelloChat(model_cfg, rngs=rngs)
        if cfg.lora is not None:
            from hellochat_jax.train.lora import add_lora

            if not add_lora(model, cfg.lora.groups, cfg.lora.targets, cfg.lora.rank, cfg.lora.alpha, rngs):
                raise config_lib.ConfigError(f"model.lora: no Linear named {cfg.lora.targets} in groups {cfg.lora.groups}")
        return model

    return make
