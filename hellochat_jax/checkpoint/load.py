"""Rebuilding a module from a converted (Orbax) checkpoint.

`hellochat convert` writes `hellochat.json` {component, config} beside the Orbax state; the
component registry (`hellochat_jax.components.REGISTRY`) says which classes those names mean.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
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


def load_checkpoint(
    ckpt_dir: str | os.PathLike,
    mesh: jax.sharding.Mesh | None = None,
    rules: shd.Rules = shd.DEFAULT_RULES,
    *,
    component: str | None = None,
    **overrides: Any,
) -> tuple[str, Any, nnx.Module]:
    """(component, config, module) restored from a converted checkpoint onto `mesh`;
    `component`, when given, is the one the caller needs (another is refused by name)."""
    from hellochat_jax.checkpoint.io import CheckpointError, abstract_module, read_meta, restore_orbax

    meta = read_meta(ckpt_dir)
    found = meta["component"]
    if component is not None and found != component:
        raise CheckpointError(f"{ckpt_dir}: holds a {found!r} checkpoint, not {component!r}")
    config = config_from_dict(found, meta["config"], **overrides)
    _, module_cls = classes(found)
    mesh = mesh if mesh is not None else shd.make_mesh()
    return found, config, restore_orbax(abstract_module(module_cls, config), ckpt_dir, mesh, rules)


def save_checkpoint(module: nnx.Module, config: Any, out_dir: str | os.PathLike, component: str) -> Path:
    """A converted checkpoint (Orbax state + hellochat.json) that `load_checkpoint` restores."""
    from hellochat_jax.checkpoint.io import save_orbax

    return save_orbax(module, out_dir, component=component, config=config_to_dict(config))
