"""Low-rank adapters (LoRA) on chosen Linear layers.

`add_lora` swaps each targeted `Linear` for a `LoRALinear` holding the SAME kernel/bias
variables (so their checkpoint paths do not change) plus `lora_a` [in, r] and `lora_b` [r, out]
as `nnx.LoRAParam`: y = x W + b + (alpha / r) x A B. B starts at zero, so the adapted model
starts equal to the base model. Which variables train is decided in `trainable_filter`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from hellochat_jax.components.hellochat.model import group_of
from hellochat_jax.core.layers import Linear


class LoRALinear(nnx.Module):
    def __init__(self, base: Linear, *, rank: int, alpha: float, rngs: nnx.Rngs):
        self.kernel = base.kernel
        self.bias = base.bias
        self.dtype = base.dtype
        self.precision = base.precision
        d_in, d_out = base.kernel.shape
        names = base.kernel.get_metadata().get("out_sharding") or (None, None)
        pdt = base.kernel.dtype
        self.lora_a = nnx.LoRAParam(
            nnx.initializers.he_uniform()(rngs.params(), (d_in, rank), pdt), out_sharding=(names[0], None)
        )
        self.lora_b = nnx.LoRAParam(jnp.zeros((rank, d_out), pdt), out_sharding=(None, names[1]))
        self.scale = alpha / rank

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        y = jnp.dot(x, self.kernel[...].astype(self.dtype), precision=self.precision)
        low = jnp.dot(jnp.dot(x, self.lora_a[...].astype(self.dtype)), self.lora_b[...].astype(self.dtype))
        y = y + (self.scale * low).astype(self.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


def add_lora(model: nnx.Module, groups: Sequence[str], targets: Sequence[str], rank: int, alpha: float, rngs: nnx.Rngs) -> int:
    """Wraps every Linear named in `targets` inside the given parameter groups; returns how many."""
    found = [
        (path, node)
        for path, node in nnx.iter_graph(model)
        if isinstance(node, Linear) and group_of(path) in groups and str(path[-1]) in targets
    ]
    for path, node in found:
        parent = model
        for key in path[:-1]:
            parent = parent[key] if isinstance(key, int) else getattr(parent, key)
        setattr(parent, path[-1], LoRALinear(node, rank=rank, alpha=alpha, rngs=rngs))
    return len(found)


def trainable_filter(frozen_groups: Sequence[str], lora_groups: Sequence[str]):
    """nnx filter: the variables the optimizer updates.

    LoRA adapters always train; other Params train unless their group is frozen or adapted
    by LoRA. Non-Param variables (BatchNorm statistics, export-only weights) never train.
    """
    frozen = set(frozen_groups) | set(lora_groups)

    def keep(path: tuple, var) -> bool:
        if isinstance(var, nnx.LoRAParam):
            return True
        if not isinstance(var, nnx.Param):
            return False
        return group_of(path) not in frozen

    return keep
