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


def part_config(cfg: ModelConfig, part: str) -> Any:
    """The component config of one of flow, hift, speech_tokenizer, heads from its section."""
    from hellochat_jax.components.flow.model import EstimatorConfig, FlowConfig
    from hellochat_jax.components.flow.conformer import UpsampleEncoderConfig
    from hellochat_jax.components.hellochat.heads import HeadsConfig
    from hellochat_jax.components.hift.model import HiFTConfig
    from hellochat_jax.components.s3tokenizer.model import S3TokenizerConfig

    fields = dict(getattr(cfg, part))
    common = _common(cfg)
    try:
        if part == "flow":
            enc = config_lib.from_dict(UpsampleEncoderConfig, _tuples(fields.pop("encoder", {})), where="model.flow.encoder")
            est = config_lib.from_dict(EstimatorConfig, _tuples(fields.pop("estimator", {})), where="model.flow.estimator")
            return FlowConfig(**_tuples(fields), encoder=enc, estimator=est, **common)
        if part == "hift":
            return HiFTConfig(**_tuples(fields), **common)
        if part == "speech_tokenizer":
            return S3TokenizerConfig(**fields, **common)
        if part == "heads":
            return HeadsConfig(**fields)
    except (TypeError, ValueError) as e:  # an unknown field or an inconsistent size
        raise config_lib.ConfigError(f"model.{part}: {e}") from None
    raise ValueError(f"unknown part {part!r}")


def _tuples(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: (tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v) for k, v in fields.items()}


def adapter_subsample(cfg: ModelConfig) -> int:
    """Encoder frames per thinker token (`model.adapter.subsample`, 5 as in the release)."""
    adapter = dict(cfg.adapter or {})
    unknown = set(adapter) - {"subsample"}
    if unknown:
        raise config_lib.ConfigError(f"model.adapter: unknown fields {sorted(unknown)}; the adapter takes subsample")
    return int(adapter.get("subsample", 5))


def model_config(cfg: ModelConfig, parts: tuple[str, ...] | None = None) -> HelloChatConfig:
    """The HelloChat config of the parts named (default: every part the config has)."""
    wanted = lambda part: (parts is None or part in parts) and (part == "thinker" or getattr(cfg, part) is not None)
    thinker = None
    if wanted("thinker"):
        thinker = MiDashengLMConfig(
            audio_encoder=encoder_config(cfg) if cfg.encoder is not None else None,
            text=thinker_config(cfg),
            subsample_factor=adapter_subsample(cfg),
            audio_token_id=cfg.audio_token_id,
        )
    others = {p: part_config(cfg, p) for p in ("flow", "hift", "speech_tokenizer", "heads") if wanted(p)}
    if "heads" in others:  # only the heads whose part is built
        heads = dataclasses.replace(others["heads"], encoder_ctc=others["heads"].encoder_ctc and thinker is not None
                                    and thinker.audio_encoder is not None,
                                    tokenizer_ctc=others["heads"].tokenizer_ctc and "speech_tokenizer" in others)
        others["heads"] = heads if heads.encoder_ctc or heads.tokenizer_ctc else None
    return HelloChatConfig(thinker=thinker, talker=talker_config(cfg) if wanted("talker") else None, **others)


def build(cfg: ModelConfig, seed: int, parts: tuple[str, ...] | None = None) -> Callable[[], HelloChat]:
    """The factory that `sharding.init_sharded` / `abstract_model` call."""
    model_cfg = model_config(cfg, parts)

    def make() -> HelloChat:
        rngs = nnx.Rngs(seed)
        model = HelloChat(model_cfg, rngs=rngs)
        if cfg.lora is not None:
            from hellochat_jax.train.lora import add_lora

            if not add_lora(model, cfg.lora.groups, cfg.lora.targets, cfg.lora.rank, cfg.lora.alpha, rngs):
                raise config_lib.ConfigError(f"model.lora: no Linear named {cfg.lora.targets} in groups {cfg.lora.groups}")
        return model

    return make
