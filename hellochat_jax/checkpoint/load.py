"""Rebuilding a module from a converted (Orbax) checkpoint.

`hellochat convert` writes `hellochat.json` {component, config} beside the Orbax state; the
component registry (`hellochat_jax.components.REGISTRY`) says which classes those names mean.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
from flax import nnx

from hellochat_jax import components
from hellochat_jax.core import sharding as shd
from hellochat_jax.core.config import from_dict


def classes(component: str) -> tuple[type, type]:
    return components.get(component).classes()


def config_from_dict(component: str, data: dict[str, Any], **overrides: Any):
    config_cls, _ = classes(component)
    if hasattr(config_cls, "from_dict"):
        return config_cls.from_dict({**data, **overrides})
    return from_dict(config_cls, {**data, **overrides}, where=f"{component} config")


def config_to_dict(config: Any) -> dict[str, Any]:
    return config.to_dict() if hasattr(config, "to_dict") else dataclasses.asdict(config)


def load_checkpoint(ckpt_dir: str | os.PathLike, mesh: jax.sharding.Mesh | None = None, rules: shd.Rules = shd.DEFAULT_RULES, **overrides: Any):
    """(component, config, module) restored from a converted checkpoint onto `mesh`."""
    from hellochat_jax.checkpoint.io import read_meta, restore_orbax

    meta = read_meta(ckpt_dir)
    component = meta["component"]
    config = config_from_dict(component, meta["config"], **overrides)
    _, module_cls = classes(component)
    mesh = mesh if mesh is not None else shd.make_mesh()
    abstract = shd.abstract_model(lambda: module_cls(config, rngs=nnx.Rngs(0)))
    return component, config, restore_orbax(abstract, ckpt_dir, mesh, rules)
