"""Starting components from converted checkpoints (`hellochat convert ...` output).

    model.init_from:
      thinker: ckpt/qwen2.5-7b           # a qwen2 checkpoint, or a midashenglm one (its decoder)
      encoder: ckpt/midashenglm-7b       # dasheng, or midashenglm (its audio_encoder)
      adapter: ckpt/midashenglm-7b       # midashenglm (its audio_projector)
      talker:  ckpt/cosyvoice2-llm       # cosyvoice2-llm

Variables are matched by path inside the component; a missing, extra or mis-shaped one is an
error naming it. The loaded arrays are already on the mesh (`models.load_checkpoint` restores
onto it) and are placed onto the train state's shardings.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from hellochat_jax.config import ConfigError

# (checkpoint component, our group) -> the sub-tree of the checkpoint's module that fills it
SOURCES: dict[tuple[str, str], tuple[str, ...]] = {
    ("qwen2", "thinker"): (),
    ("midashenglm", "thinker"): ("decoder",),
    ("midashenglm", "encoder"): ("audio_encoder",),
    ("midashenglm", "adapter"): ("audio_projector",),
    ("dasheng", "encoder"): (),
    ("cosyvoice2-llm", "talker"): (),
}


def _flat(state) -> dict[tuple, Any]:
    return {tuple(str(p) for p in path): var for path, var in nnx.to_flat_state(state)}


def load_groups(trainer, state: dict[str, Any]) -> dict[str, Any]:
    from hellochat_jax.models import load_checkpoint

    ours = {**{("params",) + k: v for k, v in _flat(state["params"]).items()},
            **{("rest",) + k: v for k, v in _flat(state["rest"]).items()}}
    updates: dict[tuple, jax.Array] = {}
    for group, ckpt_dir in trainer.cfg.model.init_from.items():
        component, _, module = load_checkpoint(ckpt_dir, trainer.mesh, trainer.rules)
        if (component, group) not in SOURCES:
            known = sorted(c for c, g in SOURCES if g == group)
            raise ConfigError(f"model.init_from.{group}: a {component!r} checkpoint cannot fill it; use one of {known}")
        prefix = SOURCES[(component, group)]
        theirs = {k[len(prefix):]: v for k, v in _flat(nnx.state(module)).items() if k[: len(prefix)] == prefix}
        mine = {k[2:]: k for k in ours if k[1] == group}
        missing, extra = sorted(set(mine) - set(theirs)), sorted(set(theirs) - set(mine))
        if missing or extra:
            raise ConfigError(
                f"model.init_from.{group} ({ckpt_dir}): variables missing from the checkpoint: "
                f"{['.'.join(m) for m in missing[:8]]}; unexpected: {['.'.join(e) for e in extra[:8]]}"
            )
        for sub, full in mine.items():
            want, have = ours[full], theirs[sub]
            if tuple(want.shape) != tuple(have.shape):
                raise ConfigError(f"model.init_from.{group}: {'.'.join(sub)} has shape {have.shape}, the model wants {want.shape}")
            updates[full] = have.get_value().astype(want.dtype)

    def replace(where: str, tree):
        def one(path, var):
            key = (where,) + tuple(str(getattr(p, "key", p)) for p in path)
            return updates.get(key, var)

        return jax.tree_util.tree_map_with_path(one, tree)

    params = replace("params", _values(state["params"]))
    rest = replace("rest", _values(state["rest"]))
    new = dict(state, params=_rewrap(state["params"], params), rest=_rewrap(state["rest"], rest))
    return jax.device_put(new, trainer.state_shardings)


def _values(state):
    """State -> the same nesting with plain arrays (paths without the Variable wrapper)."""
    return nnx.to_pure_dict(state)


def _rewrap(template, pure):
    nnx.replace_by_pure_dict(template, pure)
    return template
