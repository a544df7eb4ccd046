"""The component registry: one row per component, read by verify, convert, loading and training.

Each component is one folder, `components/<folder>/`, holding
    model.py    its Flax NNX module(s) and config dataclass
    weights.py  its key table and the import/export of its release format: `open_release` and
                `prepare_source`, which `checkpoint.load.load_release` reads through, and `export`
    parity.py   `run(case, mesh, rules) -> {output: array}` for `hellochat verify`
The registry key is the name fixtures (`fixture.json` "component") and model folders
(`hellochat.json`) use.
"""

from __future__ import annotations

import dataclasses
import importlib
from types import ModuleType


@dataclasses.dataclass(frozen=True)
class Component:
    name: str
    folder: str
    config_class: str
    module_class: str
    has_parity: bool = True

    def _import(self, part: str) -> ModuleType:
        return importlib.import_module(f"hellochat_jax.components.{self.folder}.{part}")

    @property
    def model(self) -> ModuleType:
        return self._import("model")

    @property
    def weights(self) -> ModuleType:
        return self._import("weights")

    @property
    def parity(self) -> ModuleType:
        return self._import("parity")

    def classes(self) -> tuple[type, type]:
        """(config class, module class)."""
        model = self.model
        return getattr(model, self.config_class), getattr(model, self.module_class)


REGISTRY: dict[str, Component] = {c.name: c for c in [
    #         name               folder         config class           module class
    Component("qwen2",           "qwen2",       "Qwen2Config",         "Qwen2Thinker"),
    Component("dasheng",         "dasheng",     "DashengConfig",       "DashengEncoder"),
    Component("midashenglm",     "midashenglm", "MiDashengLMConfig",   "MiDashengLM"),
    Component("s3tokenizer-v2",  "s3tokenizer", "S3TokenizerConfig",   "S3Tokenizer"),
    Component("cosyvoice2-llm",  "speech_lm",   "SpeechTokenLMConfig", "SpeechTokenLM"),
    Component("cosyvoice2-flow", "flow",        "FlowConfig",          "FlowDecoder"),
    Component("cosyvoice2-hift", "hift",        "HiFTConfig",          "HiFTVocoder"),
    # The whole model (thinker + talker parts): trained, exported and served; no release format.
    Component("hellochat",       "hellochat",   "HelloChatConfig",     "HelloChat", has_parity=False),
]}


def get(name: str) -> Component:
    if name not in REGISTRY:
        from hellochat_jax.core.errors import UserError

        raise UserError(f"unknown component {name!r}; known: {sorted(REGISTRY)}")
    return REGISTRY[name]
