"""Starting parameter groups from converted checkpoints or model folders.

    model.init_from:
      thinker: ckpt/qwen2.5-7b           # a qwen2 checkpoint, a midashenglm one, or a model folder
      encoder: ckpt/midashenglm-7b       # dasheng, midashenglm or a model folder
      adapter: ckpt/midashenglm-7b       # midashenglm or a model folder
      talker:  ckpt/cosyvoice2-llm       # cosyvoice2-llm or a model folder

A group is the path prefix `hellochat.PARAM_GROUPS[group]` of our model (e.g. `thinker.decoder`
for `thinker`). The checkpoint (`load_model_folder`) holds the same variables under that prefix
or under a trailing part of it: a model folder under the whole prefix, a midashenglm
checkpoint under `decoder`, a qwen2 one at its root. Variables are then matched by path; a
missing, extra or mis-shaped one is an error naming it (LoRA adapters are new, so never
expected). The loaded arrays are placed onto the train state's shardings.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from hellochat_jax.components.hellochat.model import PARAM_GROUPS
from hellochat_jax.core.config import ConfigError


def _dotted(path: tuple) -> str:
    return ".".join(map(str, path))


def group_variables(module: nnx.Module, prefix: tuple[str, ...]) -> dict[tuple, nnx.Variable]:
    """The variables of `module` under the longest trailing part of `prefix` it has, keyed by
    their path below it (the whole module when it has none: a bare component)."""
    flat = [(tuple(str(p) for p in path), var) for path, var in nnx.to_flat_state(nnx.state(module))]
    for start in range(len(prefix) + 1):
        sub = prefix[start:]
        found = {path[len(sub):]: var for path, var in flat if path[: len(sub)] == sub}
        if found:
            return found
    return {}


def load_groups(trainer, state: dict[str, Any]) -> dict[str, Any]:
    """Overwrites the named groups of a fresh train state (in place) and returns it."""
    from hellochat_jax.checkpoint.folder import load_model_folder

    for group, ckpt_dir in trainer.cfg.model.init_from.items():
        prefix = PARAM_GROUPS[group]
        source = load_model_folder(ckpt_dir, trainer.mesh, trainer.rules).model
        theirs = group_variables(source, prefix)
        missing = []
        for part in ("params", "rest"):
            for path, var in nnx.to_flat_state(state[part]):
                path = tuple(str(p) for p in path)
                if path[: len(prefix)] != prefix or isinstance(var, nnx.LoRAParam):  # adapters are new
                    continue
                have = theirs.pop(path[len(prefix):], None)
                if have is None:
                    missing.append(_dotted(path[len(prefix):]))
                    continue
                old = var.get_value()
                if tuple(have.shape) != tuple(old.shape):
                    raise ConfigError(f"model.init_from.{group}: {_dotted(path[len(prefix):])} has shape "
                                      f"{tuple(have.shape)} in {ckpt_dir}, the model wants {tuple(old.shape)}")
                var.set_value(jax.device_put(have.get_value().astype(old.dtype), old.sharding))
        if missing or theirs:
            raise ConfigError(
                f"model.init_from.{group} ({ckpt_dir}) does not fit the model's {_dotted(prefix)}: missing from the "
                f"checkpoint {missing[:8]}, unexpected {[_dotted(k) for k in list(theirs)[:8]]}"
            )
    return state
