"""The optimizer: AdamW with warmup + cosine, global-norm clipping and a weight-decay mask.

It only ever sees the trainable variables (frozen groups are split off before
differentiation, see `lora.trainable_filter`), so frozen weights cost no gradient and no
optimizer memory. Gradient accumulation happens inside the train step (see trainer.py).
"""

from __future__ import annotations

import jax
import optax
from hellochat_jax.train.config import TrainConfig


def schedule(cfg: TrainConfig) -> optax.Schedule:
    o = cfg.optim
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=o.lr,
        warmup_steps=o.warmup_steps,
        decay_steps=max(cfg.decay_steps, o.warmup_steps + 1),
        end_value=o.lr * o.end_lr_ratio,
    )


def _path_names(path) -> list[str]:
    names = []
    for k in path:
        name = getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))
        names.append(str(name))
    return names


def decay_mask(no_decay: list[str]):
    """True where weight decay applies: parameters none of whose path names contain a
    `no_decay` entry (biases, norm scales by default)."""

    def mask(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: not any(word in name for name in _path_names(path) for word in no_decay), params
        )

    return mask


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    o = cfg.optim
    parts = []
    if o.clip_norm is not None:
        parts.append(optax.clip_by_global_norm(o.clip_norm))
    parts.append(
        optax.adamw(schedule(cfg), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=decay_mask(o.no_decay))
    )
    return optax.chain(*parts)
