"""Rebuilding a module from a converted (Orbax) checkpoint: component name -> (config, module).

`hellochat convert` writes `hellochat.json` {component, config} beside the Orbax state; this
table says which classes those names mean, one line per component.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from typing import Any

import jax
from flax import nnx

from hellochat_jax import sharding as shd
from hellochat_jax.config import from_dict

# component -> "module:ConfigClass:ModuleClass"
MODELS: dict[str, str] = {
    "qwen2": "hellochat_jax.nn.qwen2:Qwen2Config:Qwen2Thinker",
    "dasheng": "hellochat_jax.nn.dasheng:DashengConfig:DashengEncoder",
    "midashenglm": "hellochat_jax.nn.midashenglm:MiDashengLMConfig:MiDashengLM",
    "s3tokenizer-v2": "hellochat_jax.nn.s3tokenizer:S3TokenizerConfig:S3Tokenizer",
    "cosyvoice2-llm": "hellochat_jax.nn.speech_lm:SpeechTokenLMConfig:SpeechTokenLM",
    "cosyvoice2-flow": "hellochat_jax.nn.flow:FlowConfig:FlowDecoder",
    "cosyvoice2-hift": "hellochat_jax.nn.hift:HiFTConfig:HiFTVocoder",
}


def classes(component: str) -> tuple[type, type]:
    if component not in MODELS:
        raise ValueError(f"unknown component {component!r}; known: {sorted(MODELS)}")
    module, config_cls, module_cls = MODELS[component].split(":")
    mod = importlib.import_module(module)
    return getattr(mod, config_cls), getattr(mod, module_cls)


def config_from_dict(component: str, data: dict[str, Any], **overrides: Any):
    config_cls, _ = classes(component)
    if hasattr(config_cls, "from_dict"):
        return config_cls.from_dict({**data, **overrides})
    return from_dict(config_cls, {**data, **overrides}, where=f"{component} config")


def config_to_dict(config: Any) -> dict[str, Any]:
    return config.to_dict() if hasattr(config, "to_dict") else dataclasses.asdict(config)


def load_checkpoint(ckpt_dir: str | os.PathLike, mesh: jax.sharding.Mesh | None = None, rules: shd.Rules = shd.DEFAULT_RULES, **overrides: Any):
    """(component, config, module) restored from a converted checkpoint onto `mesh`."""
    from hellochat_jax.convert.common import read_meta, restore_orbax

    meta = read_meta(ckpt_dir)
    component = meta["component"]
    config = config_from_dict(component, meta["config"], **overrides)
    _, module_cls = classes(component)
    mesh = mesh if mesh is not None else shd.make_mesh()
    abstract = shd.abstract_model(lambda: module_cls(config, rngs=nnx.Rngs(0)))
    return component, config, restore_orbax(abstract, ckpt_dir, mesh, rules)
