"""Layers shared by several components. Every parameter carries logical axis names."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

Names = tuple[str | None, ...]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def as_dtype(name: str | Any) -> Any:
    """Config dtype strings ("float32", "bfloat16") to jnp dtypes."""
    if isinstance(name, str):
        if name not in DTYPES:
            raise ValueError(f"unknown dtype {name!r}; use one of {sorted(DTYPES)}")
        return DTYPES[name]
    return name


def as_precision(name: str | None) -> jax.lax.Precision | None:
    """"highest" gives true f32 matmuls on TPU/GPU (parity); "default" lets XLA pick (speed)."""
    if name in (None, "default"):
        return None
    return jax.lax.Precision[name.upper()] if isinstance(name, str) else name


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def dense(x: jax.Array, kernel: jax.Array, precision: jax.lax.Precision | None = None) -> jax.Array:
    """x [..., in] @ kernel [in, out], with a kernel gradient that is cheap on CPU.

    The kernel gradient x^T @ dy contracts the token dimension, which is the major one of
    both operands; XLA's CPU dot wants it minor on the left, so one operand is transposed
    first. Left alone, XLA transposes dy (fused into its producer: the SiLU or RoPE backward,
    or the [tokens, vocab] logits gradient), once per projection. Here x is transposed
    instead, behind an optimization barrier so XLA keeps that choice: x is the narrower
    operand more often, and q/k/v (and gate/up) share one transpose of their common input.
    Train steps 1.1-1.3x faster on 2 CPU cores (bench/train.py; docs/performance.md).
    """
    return jnp.dot(x, kernel, precision=precision)


def _dense_fwd(x, kernel, precision):
    return jnp.dot(x, kernel, precision=precision), (x, kernel)


def _dense_bwd(precision, res, dy):
    x, kernel = res
    xt = jax.lax.optimization_barrier(x.reshape(-1, x.shape[-1]).T)
    dkernel = jnp.dot(xt, dy.reshape(-1, dy.shape[-1]), precision=precision)
    return jnp.dot(dy, kernel.T, precision=precision), dkernel


dense.defvjp(_dense_fwd, _dense_bwd)


def param(rngs: nnx.Rngs, init, shape: Sequence[int], names: Names, dtype=jnp.float32) -> nnx.Param:
    return nnx.Param(init(rngs.params(), tuple(shape), dtype), out_sharding=tuple(names))


class Linear(nnx.Module):
    """y = x @ kernel + bias, kernel [in, out] (torch's weight transposed)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        names: Names,
        use_bias: bool = True,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        precision: str | None = None,
        rngs: nnx.Rngs,
        kernel_init=nnx.initializers.lecun_normal(),
    ):
        self.kernel = param(rngs, kernel_init, (in_features, out_features), names, param_dtype)
        self.bias = param(rngs, nnx.initializers.zeros_init(), (out_features,), names[-1:], param_dtype) if use_bias else None
        self.dtype = dtype
        self.precision = as_precision(precision)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = dense(x.astype(self.dtype), self.kernel[...].astype(self.dtype), self.precision)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class LayerNorm(nnx.Module):
    """LayerNorm with torch's default layout (scale and bias over the last axis); computed in f32."""

    def __init__(self, dim: int, *, eps: float = 1e-5, names: Names = ("embed",), use_bias: bool = True, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.scale = param(rngs, nnx.initializers.ones_init(), (dim,), names, param_dtype)
        self.bias = param(rngs, nnx.initializers.zeros_init(), (dim,), names, param_dtype) if use_bias else None
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        x = x.astype(jnp.float32)
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...].astype(jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(dtype)


class RMSNorm(nnx.Module):
    """x * rsqrt(mean(x^2) + eps) * weight, normalised in f32 then cast back (as Qwen2 does)."""

    def __init__(self, dim: int, *, eps: float = 1e-6, names: Names = ("embed",), param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.scale = param(rngs, nnx.initializers.ones_init(), (dim,), names, param_dtype)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(dtype) * y.astype(dtype)


class Embed(nnx.Module):
    """Token embedding table [vocab, embed]; `attend` gives tied-head logits."""

    def __init__(self, num: int, dim: int, *, names: Names = ("vocab", "embed"), dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs, precision: str | None = None):
        self.embedding = param(rngs, nnx.initializers.normal(0.02), (num, dim), names, param_dtype)
        self.dtype = dtype
        self.precision = as_precision(precision)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        return dense(x.astype(self.dtype), self.embedding[...].astype(self.dtype).T, self.precision)


def gelu_exact(x: jax.Array) -> jax.Array:
    """torch.nn.GELU() default (erf form), not the tanh approximation."""
    return jax.nn.gelu(x, approximate=False)


class KeySequence:
    """Stands in for ``nnx.Rngs`` while a model builds its parameters: ``params()`` returns
    ``fold_in(key, 1), fold_in(key, 2), ...`` from one key drawn from the real Rngs.

    Why: every ``nnx.Rngs.params()`` call updates an RngCount Variable, and under tracing
    (nnx.eval_shape, jit init) flax compares tracer shardings there, which makes jax build an
    error message that scans the whole trace so far: building N parameters costs O(N^2)
    (about 90 s for CosyVoice 2's 1121-tensor flow on 2 CPU cores; 2.5 s with this).
    """

    def __init__(self, rngs: "nnx.Rngs | KeySequence"):
        self.key = rngs.params()
        self.count = 0

    def params(self) -> jax.Array:
        self.count += 1
        return jax.random.fold_in(self.key, self.count)
