"""Rebuilding a component's module from a release checkpoint or a converted (Orbax) one.

`hellochat convert` writes `hellochat.json` {component, config} beside the Orbax state; the
component registry (`hellochat_jax.components.REGISTRY`) says which classes those names mean.

A release format is read through its component's weights module, which knows only the format:
    open_release(path, **overrides) -> (config, TensorSource, what)   config read, tensors opened
    prepare_source(config, source, what) -> (config, TensorSource, KeyTable)
                                          the source as the key table maps it (tied copies
                                          dropped, stored buffers checked, naming detected)
`load_release` and `load_from_source` do the rest, the same way for every component.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from hellochat_jax import components
from hellochat_jax.checkpoint.io import (
    META_FILE,
    CheckpointError,
    TensorSource,
    abstract_module,
    load_into,
    read_meta,
    restore_orbax,
    save_orbax,
)
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
    return save_orbax(module, out_dir, component=component, config=config_to_dict(config))


def load_release(
    component: str,
    path: str | os.PathLike,
    mesh: jax.sharding.Mesh | None = None,
    rules: shd.Rules = shd.DEFAULT_RULES,
    *,
    progress: bool = False,
    **overrides: Any,
) -> tuple[Any, nnx.Module]:
    """(config, module) of `component` read from its release format, or from a folder that
    `hellochat convert` wrote, streamed tensor by tensor onto `mesh`. `overrides` set config
    fields (e.g. precision="highest", dtype="bfloat16")."""
    mesh = mesh if mesh is not None else shd.make_mesh()
    if (Path(path) / META_FILE).is_file():
        _, config, module = load_checkpoint(path, mesh, rules, component=component, **overrides)
        return config, module
    config, source, what = components.get(component).weights.open_release(path, **overrides)
    return load_from_source(component, config, source, mesh, rules, what=what, progress=progress)


def load_from_source(
    component: str,
    config: Any,
    source: TensorSource,
    mesh: jax.sharding.Mesh,
    rules: shd.Rules = shd.DEFAULT_RULES,
    *,
    what: str = "checkpoint",
    progress: bool = False,
) -> tuple[Any, nnx.Module]:
    """(config, module) from any tensor source in `component`'s release key names (a file, or a
    DictSource in tests); the config comes back with what the source told (e.g. hift's naming)."""
    config, source, table = components.get(component).weights.prepare_source(config, source, what)
    _, module_cls = classes(component)
    return config, load_into(abstract_module(module_cls, config), source, table, mesh, rules, what=what, progress=progress)
