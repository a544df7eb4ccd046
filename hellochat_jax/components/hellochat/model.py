"""Hello-Chat: the one model class from training to serving.

    thinker  MiDashengLM     Dasheng encoder + audio adapter + Qwen2 decoder (encoder optional)
    talker   SpeechTokenLM   (optional) text -> speech tokens
    flow     FlowDecoder     (optional) speech tokens -> mel
    hift     HiFTVocoder     (optional) mel -> 24 kHz audio

Each part is the component module a converter builds, under the same attribute names, so a
trained Hello-Chat and a converted one share parameter paths (`thinker.decoder.model.layers.0...`)
and either loads into the other by plain path matching. Absent parts are None: no variables.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import nnx

from hellochat_jax.components.midashenglm.model import MiDashengLM, MiDashengLMConfig

# part attribute -> the registry component whose config and module class it is
PARTS: dict[str, str] = {
    "thinker": "midashenglm",
    "talker": "cosyvoice2-llm",
    "flow": "cosyvoice2-flow",
    "hift": "cosyvoice2-hift",
    "speech_tokenizer": "s3tokenizer-v2",
}

# Parameter groups (the names freezing, LoRA and `init_from` use in training configs) -> the
# path prefix of their variables in HelloChat. A variable belongs to the first group whose
# prefix starts its path.
PARAM_GROUPS: dict[str, tuple[str, ...]] = {
    "encoder": ("thinker", "audio_encoder"),
    "adapter": ("thinker", "audio_projector"),
    "thinker": ("thinker", "decoder"),
    "talker": ("talker",),
    "flow": ("flow",),
    "hift": ("hift",),
    "speech_tokenizer": ("speech_tokenizer",),
    "heads": ("heads",),
}


def group_of(path: tuple) -> str | None:
    """The parameter group of a variable path (None for a path outside every group)."""
    names = tuple(str(p) for p in path)
    for group, prefix in PARAM_GROUPS.items():
        if names[: len(prefix)] == prefix:
            return group
    return None


@dataclasses.dataclass(frozen=True)
class HelloChatConfig:
    thinker: MiDashengLMConfig | None = MiDashengLMConfig()
    talker: Any = None  # SpeechTokenLMConfig | None
    flow: Any = None  # FlowConfig | None
    hift: Any = None  # HiFTConfig | None
    speech_tokenizer: Any = None  # S3TokenizerConfig | None
    heads: Any = None  # HeadsConfig | None (training only: export leaves them out)

    @property
    def parts(self) -> list[str]:
        """The parts present, in PARTS order (heads last)."""
        return [p for p in (*PARTS, "heads") if getattr(self, p) is not None]

    def to_dict(self) -> dict[str, Any]:
        from hellochat_jax.checkpoint.load import config_to_dict

        out = {p: (config_to_dict(getattr(self, p)) if getattr(self, p) is not None else None) for p in PARTS}
        if self.heads is not None:
            out["heads"] = dataclasses.asdict(self.heads)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HelloChatConfig:
        """From `to_dict` output (a model folder's hellochat.json); each part by its component's rules."""
        from hellochat_jax.checkpoint.load import config_from_dict

        from hellochat_jax.components.hellochat.heads import HeadsConfig

        unknown = set(data) - set(PARTS) - {"heads"}
        if unknown:
            raise ValueError(f"hellochat config: unknown parts {sorted(unknown)}; the parts are {list(PARTS)}")
        if not any(data.get(p) is not None for p in PARTS):
            raise ValueError("hellochat config: no parts")
        parts = {p: config_from_dict(PARTS[p], data[p]) for p in PARTS if data.get(p) is not None}
        if data.get("heads") is not None:
            parts["heads"] = HeadsConfig(**data["heads"])
        return cls(**{"thinker": None, **parts})


class HelloChat(nnx.Module):
    def __init__(self, cfg: HelloChatConfig, *, rngs: nnx.Rngs):
        from hellochat_jax import components

        from hellochat_jax.components.hellochat.heads import TrainingHeads

        self.cfg = cfg
        self.thinker = MiDashengLM(cfg.thinker, rngs=rngs) if cfg.thinker is not None else None
        built = {}
        for part in ("talker", "flow", "hift", "speech_tokenizer"):
            part_cfg = getattr(cfg, part)
            built[part] = None
            if part_cfg is not None:
                _, module_cls = components.get(PARTS[part]).classes()
                built[part] = module_cls(part_cfg, rngs=rngs)
        # Absent parts stay None (static attributes): no variables, no path.
        self.talker, self.flow, self.hift = built["talker"], built["flow"], built["hift"]
        self.speech_tokenizer = built["speech_tokenizer"]
        self.heads = TrainingHeads(cfg.heads, cfg, rngs=rngs) if cfg.heads is not None else None
