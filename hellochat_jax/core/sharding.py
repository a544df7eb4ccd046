"""The one mesh and the logical-axis rules that lay out every parameter and activation.

Parameters are created with logical axis names (``nnx.Param(v, out_sharding=("embed", "mlp"))``).
The rules below map those names to the three mesh axes. A mesh axis is only used for a
dimension it divides; otherwise that dimension is replicated, so tiny test models (1 KV head,
odd sizes) run on any mesh and real models get the layout the rules ask for.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or axes, or None = replicated). The first entry of a name wins.
# "batch" spans data and fsdp: FSDP shards parameters on "fsdp" and the batch on both.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),
    ("audio_embed", "fsdp"),  # encoder widths (Dasheng, conformer, U-Net channels)
    ("audio_mlp", "tensor"),
    ("conv", None),  # kernel taps, frequency bins, small constant axes
)

Rules = Sequence[tuple[str, Any]]


# Flax's eager sharding would place each parameter at creation with the raw rules, which fails
# on dimensions the mesh does not divide; we place parameters ourselves (see `shardings_for`).
nnx.use_eager_sharding(False)


@dataclasses.dataclass
class MeshConfig:
    """Mesh shape: -1 takes the devices the other axes leave."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1


def parse_mesh_arg(text: str | None) -> MeshConfig:
    """Parses ``data=2,fsdp=2,tensor=2`` (the CLI's ``--mesh``)."""
    cfg = MeshConfig()
    if not text:
        return cfg
    for part in text.split(","):
        key, _, value = part.partition("=")
        key = key.strip()
        if key not in MESH_AXES or not value.strip().lstrip("-").isdigit():
            raise ValueError(f"--mesh: expected axis=N with axis in {MESH_AXES}, got {part!r}")
        setattr(cfg, key, int(value))
    return cfg


def make_mesh(cfg: MeshConfig | Mapping[str, int] | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """Builds the (data, fsdp, tensor) mesh over all (global) devices."""
    if cfg is None:
        cfg = MeshConfig()
    if isinstance(cfg, Mapping):
        unknown = set(cfg) - set(MESH_AXES)
        if unknown:
            raise ValueError(f"mesh: unknown axes {sorted(unknown)}; the axes are {MESH_AXES}")
        cfg = MeshConfig(**cfg)
    devices = list(jax.devices() if devices is None else devices)
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    if sum(s == -1 for s in sizes) > 1:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: sizes must be positive or -1")
    known = math.prod(s for s in sizes if s != -1)
    if len(devices) % known:
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes))} does not divide the {len(devices)} available devices"
        )
    sizes = [len(devices) // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
            f"but {len(devices)} are available"
        )
    device_grid = np.asarray(devices, dtype=object).reshape(sizes)
    try:  # topology-aware order on TPU/GPU slices
        from jax.experimental import mesh_utils

        device_grid = mesh_utils.create_device_mesh(sizes, devices=devices, allow_split_physical_axes=True)
    except Exception:  # CPU and odd device counts: plain order is fine
        pass
    return Mesh(device_grid, MESH_AXES)


def rules_from_config(rules: Mapping[str, Any] | Rules | None) -> tuple[tuple[str, Any], ...]:
    """Config rules (a mapping ``name: axis | [axes] | null``) override the defaults by name."""
    if rules is None:
        return DEFAULT_RULES
    items = list(rules.items()) if isinstance(rules, Mapping) else list(rules)
    overridden = {name for name, _ in items}
    normalised = [(n, tuple(a) if isinstance(a, list) else a) for n, a in items]
    return tuple(normalised) + tuple(r for r in DEFAULT_RULES if r[0] not in overridden)


def logical_to_spec(
    names: Sequence[str | None] | None,
    shape: Sequence[int],
    mesh: Mesh,
    rules: Rules = DEFAULT_RULES,
) -> PartitionSpec:
    """Resolves logical names to a PartitionSpec, dropping mesh axes that do not divide a dim
    or that an earlier dimension already uses."""
    if not names:
        return PartitionSpec()
    if len(names) != len(shape):
        raise ValueError(f"logical axes {tuple(names)} do not match shape {tuple(shape)}")
    table = {}
    for name, axes in rules:
        table.setdefault(name, axes)
    used: set[str] = set()
    spec = []
    for name, dim in zip(names, shape):
        axes = table.get(name) if name is not None else None
        if axes is None:
            spec.append(None)
            continue
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        kept = []
        size = 1
        for axis in axes:
            n = mesh.shape[axis]
            if axis in used or n == 1:
                continue
            if dim % (size * n) == 0:
                kept.append(axis)
                size *= n
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*spec)


def logical_sharding(names, shape, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(names, shape, mesh, rules))


def _logical_names(var: nnx.Variable) -> tuple | None:
    return var.get_metadata().get("out_sharding")


def shardings_for(abstract_state: nnx.State, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> nnx.State:
    """NamedShardings for a model state (abstract or concrete), from each Variable's names."""

    def one(var):
        return logical_sharding(_logical_names(var), var.shape, mesh, rules)

    return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def abstract_model(factory: Callable[[], nnx.Module]) -> nnx.Module:
    """The model's structure with ShapeDtypeStruct leaves: no memory, no compute.

    Evaluated outside any mesh: flax would otherwise turn the logical names into raw
    PartitionSpecs itself; placement is ours (`shardings_for`), with the divisibility rule.
    """
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())):
        return nnx.eval_shape(factory)


def init_sharded(factory: Callable[[], nnx.Module], mesh: Mesh, rules: Rules = DEFAULT_RULES) -> nnx.Module:
    """Initialises a model with every parameter created directly in its target sharding."""
    graphdef, abstract_state = nnx.split(abstract_model(factory))
    out_shardings = shardings_for(abstract_state, mesh, rules)

    def init():
        return nnx.state(factory())

    state = jax.jit(init, out_shardings=out_shardings)()
    return nnx.merge(graphdef, state)


def shard_model(model: nnx.Module, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> nnx.Module:
    """Moves an existing model's state onto the rule-given shardings (in place)."""
    state = nnx.state(model)
    shardings = shardings_for(state, mesh, rules)
    nnx.update(model, jax.device_put(state, shardings))
    return model


def constrain(x: jax.Array, names: Sequence[str | None], rules: Rules | None = None) -> jax.Array:
    """Sharding constraint on an activation by logical names; a no-op outside a mesh context.

    Models call this at block boundaries so activations follow the same rules as parameters
    (batch over data+fsdp, heads over tensor) whatever mesh is active.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or math.prod(mesh.shape.values()) == 1:
        return x
    rules = rules if rules is not None else current_rules()
    spec = logical_to_spec(names, x.shape, mesh, rules)
    return jax.lax.with_sharding_constraint(x, spec)


_ACTIVE_RULES: list[tuple] = []


class use_rules:
    """Context manager setting the rules that `constrain` resolves names with."""

    def __init__(self, rules: Rules):
        self.rules = tuple(rules)

    def __enter__(self):
        _ACTIVE_RULES.append(self.rules)
        return self

    def __exit__(self, *exc):
        _ACTIVE_RULES.pop()


def current_rules() -> Rules:
    return _ACTIVE_RULES[-1] if _ACTIVE_RULES else DEFAULT_RULES


def batch_sharding(mesh: Mesh, ndim: int, rules: Rules = DEFAULT_RULES, shape: Sequence[int] | None = None) -> NamedSharding:
    """Sharding for a host batch: dim 0 over the batch axes, the rest replicated."""
    names = ("batch",) + (None,) * (ndim - 1)
    if shape is None:
        table = dict(rules)
        axes = table.get("batch")
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        return NamedSharding(mesh, PartitionSpec(axes if axes else None, *([None] * (ndim - 1))))
    return logical_sharding(names, shape, mesh, rules)


def put_batch(tree: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """Places a host batch (numpy leaves with a leading batch dim) onto the mesh.

    Falls back to replication when the batch does not divide the batch axes, so verify and
    inference with batch 2 work on an 8-device mesh.
    """
    return jax.tree.map(
        lambda x: jax.device_put(jnp.asarray(x), logical_sharding(("batch",) + (None,) * (np.ndim(x) - 1), np.shape(x), mesh, rules))
        if np.ndim(x) > 0
        else jax.device_put(jnp.asarray(x), NamedSharding(mesh, PartitionSpec())),
        tree,
    )
