"""Starting components from converted checkpoints (`hellochat convert ...` output).

    model.init_from:
      thinker: ckpt/qwen2.5-7b           # a qwen2 checkpoint, or a midashenglm one (its decoder)
      encoder: ckpt/midashenglm-7b       # dasheng, or midashenglm (its audio_encoder)
      adapter: ckpt/midashenglm-7b       # midashenglm (its audio_projector)
      talker:  ckpt/cosyvoice2-llm       # cosyvoice2-llm

Variables are matched by path inside the component; a missing, extra or mis-shaped one is an
error naming it (LoRA adapters are new, so never expected). The loaded arrays are already on
the mesh (`models.load_checkpoint` restores onto it) and are placed onto the train state's
shardings.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from hellochat_jax.core.config import ConfigError

# (checkpoint component, our group) -> the sub-tree of the checkpoint's module that fills it
SOURCES: dict[tuple[str, str], tuple[str, ...]] = {
    ("qwen2", "thinker"): (),
    ("midashenglm", "thinker"): ("decoder",),
    ("midashenglm", "encoder"): ("audio_encoder",),
    ("midashenglm", "adapter"): ("audio_projector",),
    ("dasheng", "encoder"): (),
    ("cosyvoice2-llm", "talker"): (),
}


def load_groups(trainer, state: dict[str, Any]) -> dict[str, Any]:
    """Overwrites the named groups of a fresh train state (in place) and returns it."""
    from hellochat_jax.checkpoint.load import load_checkpoint

    for group, ckpt_dir in trainer.cfg.model.init_from.items():
        component, _, module = load_checkpoint(ckpt_dir, trainer.mesh, trainer.rules)
        if (component, group) not in SOURCES:
            known = sorted(c for c, g in SOURCES if g == group)
            raise ConfigError(f"model.init_from.{group}: a {component!r} checkpoint cannot fill it; use one of {known}")
        prefix = SOURCES[(component, group)]
        theirs = {path[len(prefix):]: var for path, var in nnx.to_flat_state(nnx.state(module)) if path[: len(prefix)] == prefix}
        missing = []
        for part in ("params", "rest"):
            for path, var in nnx.to_flat_state(state[part]):
                if path[0] != group or isinstance(var, nnx.LoRAParam):  # adapters are new
                    continue
                have = theirs.pop(path[1:], None)
                if have is None:
                    missing.append(".".join(map(str, path[1:])))
                    continue
                old = var.get_value()
                if tuple(have.shape) != tuple(old.shape):
                    raise ConfigError(f"model.init_from.{group}: {'.'.join(map(str, path[1:]))} has shape "
                                      f"{tuple(have.shape)} in {ckpt_dir}, the model wants {tuple(old.shape)}")
                var.set_value(jax.device_put(have.get_value().astype(old.dtype), old.sharding))
        if missing or theirs:
            raise ConfigError(
                f"model.init_from.{group} ({ckpt_dir}) does not fit the model: missing from the checkpoint "
                f"{missing[:8]}, unexpected {['.'.join(map(str, k)) for k in list(theirs)[:8]]}"
            )
    return state
