"""Per-device memory of a training config, computed with jax.eval_shape: no array is allocated
and no device of the planned kind is needed.

    hellochat train --config configs/hellochat-7b.yaml --plan --plan-devices 64

Parameters, gradients and optimizer state: every leaf's bytes divided by the mesh axes its
logical names map to under the config's rules (the same `logical_to_spec` that places the
real arrays). Activations: the residuals the backward pass keeps for one micro-batch (traced
abstractly, so the remat policy is honoured), measured at 1 and 2 rows: the per-row part is
divided by the batch's ways, the fixed part like the parameters. Tensor-parallel splitting of
activations is not counted, nor are transient buffers inside the backward pass.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from hellochat_jax.train.config import TrainConfig, batch_axes_size, validate
from hellochat_jax.train.lora import trainable_filter
from hellochat_jax.train.losses import Objective
from hellochat_jax.train.model import build
from hellochat_jax.train.optim import make_optimizer

from hellochat_jax.components.hellochat.model import group_of
from hellochat_jax.core import sharding as shd

GiB = 1024**3


def _ways(var, mesh, rules) -> int:
    """Into how many shards the rules cut this variable on this mesh."""
    value = var.get_value() if isinstance(var, nnx.Variable) else var
    names = var.get_metadata().get("out_sharding") if isinstance(var, nnx.Variable) else None
    ways = 1
    for axes in shd.logical_to_spec(names, value.shape, mesh, rules):
        for axis in (axes,) if isinstance(axes, str) else (axes or ()):
            ways *= mesh.shape[axis]
    return ways


def _nbytes(x) -> float:
    x = x.get_value() if isinstance(x, nnx.Variable) else x
    return float(math.prod(x.shape) * np.dtype(x.dtype).itemsize)


def _saved_residuals(fn, *args) -> list:
    """What the backward pass of fn keeps, excluding fn's own inputs (params, batch): the
    residual list behind jax.ad_checkpoint.print_saved_residuals, traced abstractly."""
    from jax._src.ad_checkpoint import (
        saved_residuals,  # the data print_saved_residuals prints
    )

    return [aval for aval, where in saved_residuals(fn, *args) if not where.startswith("from the argument")]


def _by_group(state, mesh, rules) -> dict[str, float]:
    out: dict[str, float] = {}
    for path, var in nnx.to_flat_state(state):
        group = str(group_of(path))
        out[group] = out.get(group, 0.0) + _nbytes(var) / _ways(var, mesh, rules)
    return out


def plan_batch(cfg: TrainConfig, rows: int) -> dict[str, jax.ShapeDtypeStruct]:
    """One micro-batch's shapes as the trainer receives them (`rows` rows)."""
    if cfg.data.source == "corpus":
        from hellochat_jax.train.corpus import CorpusData, pipeline_config

        data = CorpusData.__new__(CorpusData)  # the shapes only: no dataset or tokenizer needed
        data.pipeline_cfg = dataclasses.replace(pipeline_config(cfg), batch_size=rows)
        data.keys = CorpusData.keys_for(cfg)
        data.talker = cfg.model.talker
        data.speech_len = data.pipeline_cfg.speech_text_len + data.pipeline_cfg.speech_token_len + 2
        return data.local_spec()
    t = cfg.data.seq_len
    i32 = jax.ShapeDtypeStruct((rows, t), jnp.int32)
    return {"input_ids": i32, "targets": i32, "segment_ids": i32, "positions": i32, "task_id": i32,
            "loss_mask": jax.ShapeDtypeStruct((rows, t), jnp.float32)}


def plan(cfg: TrainConfig, devices: int) -> dict[str, Any]:
    mesh_shape = validate(cfg, devices)
    mesh = jax.sharding.AbstractMesh(tuple(mesh_shape.values()), tuple(mesh_shape.keys()))
    rules = shd.rules_from_config(cfg.rules)
    m = cfg.model
    keep = trainable_filter(m.frozen, m.lora.groups if m.lora else [])
    abstract = shd.abstract_model(build(m, cfg.seed))
    graphdef, params, rest = nnx.split(abstract, keep, ...)
    tx = make_optimizer(cfg)
    opt = jax.eval_shape(tx.init, params)

    param_bytes = _by_group(params, mesh, rules)
    rest_bytes = _by_group(rest, mesh, rules)
    # Optimizer leaves that mirror a parameter are sharded like it; the others are replicated.
    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    opt_leaves = optax.tree_map_params(tx, lambda leaf, var: _nbytes(leaf) / _ways(var, mesh, rules), opt, params,
                                       transform_non_params=_nbytes, is_leaf=is_var)
    opt_bytes = sum(jax.tree.leaves(opt_leaves))
    grad_bytes = sum(param_bytes.values())

    ways = batch_axes_size(mesh_shape, rules)
    rows = cfg.data.batch_size  # one micro-step, global
    objective = Objective(tuple(f"t{i}" for i in range(8)), remat=cfg.model.remat != "none")

    def loss(p, rest, batch):
        # Gradients flow to the trainable params only, as in the train step.
        rest, batch = jax.lax.stop_gradient((rest, batch))
        model = nnx.merge(graphdef, p, rest)
        return objective(model, batch, jax.random.key(0), {"thinker": 1.0, "talker": 1.0})[0]

    def saved_bytes(n: int) -> float:
        with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())):
            return sum(_nbytes(x) for x in _saved_residuals(loss, params, rest, plan_batch(cfg, n)))

    # Residuals grow linearly with the rows: the per-row part is sharded with the batch, the
    # rest (e.g. the layer-stacked weights of scan_layers) like the parameters.
    one, two = saved_bytes(1), saved_bytes(2)
    per_row, fixed = two - one, 2 * one - two
    param_fraction = sum(param_bytes.values()) / max(sum(_nbytes(v) for v in jax.tree.leaves(params)), 1.0)
    act_bytes = per_row * rows / ways + fixed * param_fraction
    total = sum(param_bytes.values()) + sum(rest_bytes.values()) + grad_bytes + opt_bytes + act_bytes
    return {
        "mesh": mesh_shape, "devices": devices, "rows_per_device": rows / ways, "seq_len": cfg.data.seq_len,
        "param_count": sum(math.prod(v.shape) for v in jax.tree.leaves(params)) + sum(math.prod(v.shape) for v in jax.tree.leaves(rest)),
        "trainable_count": sum(math.prod(v.shape) for v in jax.tree.leaves(params)),
        "trainable_gib": {k: v / GiB for k, v in param_bytes.items()},
        "frozen_gib": {k: v / GiB for k, v in rest_bytes.items()},
        "grads_gib": grad_bytes / GiB,
        "optimizer_gib": opt_bytes / GiB,
        "activations_gib": act_bytes / GiB,
        "total_gib": total / GiB,
    }


def print_plan(cfg: TrainConfig, devices: int | None = None) -> dict[str, Any]:
    devices = devices or jax.device_count()
    p = plan(cfg, devices)
    print(f"mesh {p['mesh']} on {p['devices']} devices; {p['param_count'] / 1e9:.2f}B parameters "
          f"({p['trainable_count'] / 1e9:.2f}B trainable); {p['rows_per_device']:g} rows x {p['seq_len']} tokens per device and micro-step")
    print(f"{'per device':24s} {'GiB':>8s}")
    for k, v in p["trainable_gib"].items():
        print(f"{'  params ' + k:24s} {v:8.2f}")
    for k, v in p["frozen_gib"].items():
        print(f"{'  frozen ' + k:24s} {v:8.2f}")
    print(f"{'  gradients':24s} {p['grads_gib']:8.2f}")
    print(f"{'  optimizer (AdamW)':24s} {p['optimizer_gib']:8.2f}")
    print(f"{'  activations (saved)':24s} {p['activations_gib']:8.2f}")
    print(f"{'total':24s} {p['total_gib']:8.2f}")
    return p
