"""CosyVoice 2's UpsampleConformerEncoder: the flow decoder's text-to-mel-rate encoder.

Tokens (25 Hz) -> linear embed + espnet relative positions -> pre-lookahead conv (3 tokens of
look-ahead) -> conformer blocks (relative-position self-attention + SiLU FFN) -> nearest x2
upsampling with a causal conv -> a second embed and conformer stack at 50 Hz -> LayerNorm.

Everything is channels-last ([batch, time, channels]). Streaming uses static chunk masks: a
frame sees every frame of its own chunk and of all earlier chunks.

The reference hard-codes 512 channels in the pre-lookahead layer and the upsampling conv (the
release's width); here both are sized from ``output_size`` so other widths load and run.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hellochat_jax.core.layers import (
    LayerNorm,
    Linear,
    Names,
    as_dtype,
    as_precision,
    param,
)
from hellochat_jax.core.sharding import constrain

Streaming = bool | jax.Array  # a Python bool, or a traced scalar bool (training draws it)


@dataclasses.dataclass(frozen=True)
class UpsampleEncoderConfig:
    """Hyper-parameters of UpsampleConformerEncoder (names as in cosyvoice2.yaml)."""

    input_size: int = 512
    output_size: int = 512
    attention_heads: int = 8
    linear_units: int = 2048
    num_blocks: int = 6
    num_up_blocks: int = 4  # hard-coded 4 in the reference, whatever num_blocks is
    pre_lookahead_len: int = 3  # hard-coded 3 in the reference
    upsample_stride: int = 2  # hard-coded 2 in the reference
    static_chunk_size: int = 25  # streaming chunk, in 25 Hz frames (x stride after upsampling)

    def __post_init__(self):
        if self.input_size != self.output_size:
            # up_embed is Linear(input_size, output_size) applied to output_size channels.
            raise ValueError(
                f"UpsampleConformerEncoder needs input_size == output_size (got {self.input_size} and {self.output_size})"
            )
        if self.output_size % self.attention_heads:
            raise ValueError(f"output_size {self.output_size} is not divisible by attention_heads {self.attention_heads}")
        if self.pre_lookahead_len < 0 or self.upsample_stride < 1:
            raise ValueError("pre_lookahead_len must be >= 0 and upsample_stride >= 1")


@dataclasses.dataclass(frozen=True)
class Numerics:
    """Compute dtype, parameter dtype and matmul precision shared by every layer of a model."""

    dtype: str = "float32"
    param_dtype: str = "float32"
    precision: str | None = None

    def layer_kwargs(self, rngs: nnx.Rngs) -> dict[str, Any]:
        return dict(dtype=as_dtype(self.dtype), param_dtype=as_dtype(self.param_dtype), precision=self.precision, rngs=rngs)


# ----------------------------------------------------------------------------- shared pieces


class Conv1d(nnx.Module):
    """torch Conv1d with stride 1 on channels-last input; kernel [k, in, out] (torch's
    [out, in, k] transposed). Padding is explicit zeros (left, right) so causal and
    look-ahead layouts read as what they are."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        names: Names = ("conv", "audio_embed", "audio_mlp"),
        use_bias: bool = True,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        precision: str | None = None,
        rngs: nnx.Rngs,
    ):
        self.kernel = param(rngs, nnx.initializers.lecun_normal(in_axis=(0, 1), out_axis=2), (kernel_size, in_channels, out_channels), names, param_dtype)
        self.bias = param(rngs, nnx.initializers.zeros_init(), (out_channels,), names[-1:], param_dtype) if use_bias else None
        self.kernel_size = kernel_size
        self.dtype = dtype
        self.precision = as_precision(precision)

    def __call__(self, x: jax.Array, padding: tuple[int, int] = (0, 0)) -> jax.Array:
        kernel = self.kernel[...].astype(self.dtype)
        x = x.astype(self.dtype)
        if self.kernel_size == 1 and padding == (0, 0):
            y = jnp.dot(x, kernel[0], precision=self.precision)
        else:
            y = jax.lax.conv_general_dilated(
                x, kernel, window_strides=(1,), padding=[padding],
                dimension_numbers=("NWC", "WIO", "NWC"), precision=self.precision,
            )
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


def chunk_attention_mask(lengths: jax.Array, size: int, chunk_size: int, streaming: Streaming) -> jax.Array:
    """[B, T, T] bool: query i may attend key j.

    Keys past a row's length are hidden. When streaming, key j is also hidden from query i
    unless j < (i // chunk_size + 1) * chunk_size (static chunks counted from frame 0, all
    left chunks visible). A row that would see nothing sees everything, as the reference's
    add_optional_chunk_mask forces (only a zero-length row can hit this).
    """
    pos = jnp.arange(size)
    valid = pos[None, :] < lengths[:, None]  # [B, T] keys
    allowed = jnp.broadcast_to(valid[:, None, :], (lengths.shape[0], size, size))
    if chunk_size > 0:
        chunk_end = (pos // chunk_size + 1) * chunk_size
        in_chunk = pos[None, :] < chunk_end[:, None]  # [T, T]
        allowed = allowed & jnp.logical_or(jnp.logical_not(streaming), in_chunk)[None]
    return allowed | ~jnp.any(allowed, axis=-1, keepdims=True)


def espnet_rel_positions(size: int, dim: int) -> np.ndarray:
    """The espnet relative-position table [2T-1, D]: row r encodes relative distance T-1-r
    (so row T-1-i+j is distance i-j). PE(p)[2m] = sin(p w_m), PE(p)[2m+1] = cos(p w_m),
    w_m = exp(-2m ln(10000) / D); arguments formed in float32 as the reference does."""
    w = np.exp(np.arange(0, dim, 2, dtype=np.float32) * np.float32(-(math.log(10000.0) / dim))).astype(np.float32)
    distance = np.arange(size - 1, -size, -1, dtype=np.float32)  # T-1 ... -(T-1)
    angle = (np.abs(distance)[:, None] * w[None, :]).astype(np.float32) * np.sign(distance)[:, None]
    table = np.zeros((2 * size - 1, dim), np.float32)
    table[:, 0::2] = np.sin(angle.astype(np.float64))
    table[:, 1::2] = np.cos(angle.astype(np.float64))
    return table


def rel_shift(scores: jax.Array) -> jax.Array:
    """[..., T, 2T-1] scores against the position table -> [..., T, T] with
    out[..., i, j] = scores[..., i, T-1-i+j] (pad-and-reshape, no gather)."""
    *lead, t, r = scores.shape
    padded = jnp.pad(scores, [(0, 0)] * len(lead) + [(0, 0), (1, 0)])
    shifted = padded.reshape(*lead, r + 1, t)[..., 1:, :].reshape(*lead, t, r)
    return shifted[..., :t]


# ----------------------------------------------------------------------------- layers


class LinearEmbed(nnx.Module):
    """LinearNoSubsampling + EspnetRelPositionalEncoding: LayerNorm(Linear(x)) * sqrt(D).
    The positional table is returned separately (relative attention consumes it)."""

    def __init__(self, cfg: UpsampleEncoderConfig, num: Numerics, *, rngs: nnx.Rngs):
        self.linear = Linear(cfg.input_size, cfg.output_size, names=("audio_embed", "audio_mlp"), **num.layer_kwargs(rngs))
        self.norm = LayerNorm(cfg.output_size, eps=1e-5, names=("audio_embed",), param_dtype=as_dtype(num.param_dtype), rngs=rngs)
        self.scale = math.sqrt(cfg.output_size)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.norm(self.linear(x)) * self.scale


class RelPositionAttention(nnx.Module):
    """RelPositionMultiHeadedAttention (Transformer-XL style, espnet rel_shift)."""

    def __init__(self, cfg: UpsampleEncoderConfig, num: Numerics, *, rngs: nnx.Rngs):
        d, h = cfg.output_size, cfg.attention_heads
        pdt = as_dtype(num.param_dtype)
        kw = num.layer_kwargs(rngs)
        self.linear_q = Linear(d, d, names=("audio_embed", "heads"), **kw)
        self.linear_k = Linear(d, d, names=("audio_embed", "heads"), **kw)
        self.linear_v = Linear(d, d, names=("audio_embed", "heads"), **kw)
        self.linear_out = Linear(d, d, names=("heads", "audio_embed"), **kw)
        self.linear_pos = Linear(d, d, names=("audio_embed", "heads"), use_bias=False, **kw)
        init = nnx.initializers.xavier_uniform()
        self.pos_bias_u = param(rngs, init, (h, d // h), ("heads", "head_dim"), pdt)
        self.pos_bias_v = param(rngs, init, (h, d // h), ("heads", "head_dim"), pdt)
        self.heads, self.head_dim = h, d // h
        self.precision = as_precision(num.precision)

    def __call__(self, x: jax.Array, positions: jax.Array, allowed: jax.Array) -> jax.Array:
        b, t, d = x.shape
        h, dk = self.heads, self.head_dim
        q = self.linear_q(x).reshape(b, t, h, dk)
        k = self.linear_k(x).reshape(b, t, h, dk)
        v = self.linear_v(x).reshape(b, t, h, dk)
        p = self.linear_pos(positions).reshape(2 * t - 1, h, dk)
        content = jnp.einsum("bihd,bjhd->bhij", q + self.pos_bias_u[...], k, precision=self.precision)
        position = rel_shift(jnp.einsum("bihd,rhd->bhir", q + self.pos_bias_v[...], p, precision=self.precision))
        scores = (content + position).astype(jnp.float32) / math.sqrt(dk)
        allowed = allowed[:, None]
        scores = jnp.where(allowed, scores, -jnp.inf)
        weights = jnp.where(allowed, jax.nn.softmax(scores, axis=-1), 0.0).astype(v.dtype)
        out = jnp.einsum("bhij,bjhd->bihd", weights, v, precision=self.precision).reshape(b, t, d)
        return self.linear_out(out)


class FeedForward(nnx.Module):
    """PositionwiseFeedForward with SiLU ('swish')."""

    def __init__(self, cfg: UpsampleEncoderConfig, num: Numerics, *, rngs: nnx.Rngs):
        kw = num.layer_kwargs(rngs)
        self.w_1 = Linear(cfg.output_size, cfg.linear_units, names=("audio_embed", "audio_mlp"), **kw)
        self.w_2 = Linear(cfg.linear_units, cfg.output_size, names=("audio_mlp", "audio_embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.w_2(jax.nn.silu(self.w_1(x)))


class ConformerLayer(nnx.Module):
    """ConformerEncoderLayer with normalize_before, no macaron FFN and no conv module."""

    def __init__(self, cfg: UpsampleEncoderConfig, num: Numerics, *, rngs: nnx.Rngs):
        pdt = as_dtype(num.param_dtype)
        self.norm_mha = LayerNorm(cfg.output_size, eps=1e-12, names=("audio_embed",), param_dtype=pdt, rngs=rngs)
        self.self_attn = RelPositionAttention(cfg, num, rngs=rngs)
        self.norm_ff = LayerNorm(cfg.output_size, eps=1e-12, names=("audio_embed",), param_dtype=pdt, rngs=rngs)
        self.feed_forward = FeedForward(cfg, num, rngs=rngs)

    def __call__(self, x: jax.Array, positions: jax.Array, allowed: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.norm_mha(x), positions, allowed)
        x = x + self.feed_forward(self.norm_ff(x))
        return constrain(x, ("batch", "length", "audio_embed"))


class PreLookaheadLayer(nnx.Module):
    """Residual conv pair that lets frame t read frames t-2 .. t+pre_lookahead_len."""

    def __init__(self, cfg: UpsampleEncoderConfig, num: Numerics, *, rngs: nnx.Rngs):
        d = cfg.output_size
        kw = num.layer_kwargs(rngs)
        self.conv1 = Conv1d(d, d, cfg.pre_lookahead_len + 1, **kw)
        self.conv2 = Conv1d(d, d, 3, **kw)
        self.lookahead = cfg.pre_lookahead_len

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.nn.leaky_relu(self.conv1(x, padding=(0, self.lookahead)), 0.01)
        return x + self.conv2(y, padding=(2, 0))


class Upsample(nnx.Module):
    """Nearest-neighbour upsampling by `stride`, then a causal conv of width 2*stride+1."""

    def __init__(self, cfg: UpsampleEncoderConfig, num: Numerics, *, rngs: nnx.Rngs):
        d, s = cfg.output_size, cfg.upsample_stride
        kw = num.layer_kwargs(rngs)
        self.conv = Conv1d(d, d, 2 * s + 1, **kw)
        self.stride = s

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(jnp.repeat(x, self.stride, axis=1), padding=(2 * self.stride, 0))


# ----------------------------------------------------------------------------- encoder


class UpsampleConformerEncoder(nnx.Module):
    def __init__(self, cfg: UpsampleEncoderConfig, num: Numerics = Numerics(), *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = LinearEmbed(cfg, num, rngs=rngs)
        self.pre_lookahead_layer = PreLookaheadLayer(cfg, num, rngs=rngs)
        self.encoders = nnx.List([ConformerLayer(cfg, num, rngs=rngs) for _ in range(cfg.num_blocks)])
        self.up_layer = Upsample(cfg, num, rngs=rngs)
        self.up_embed = LinearEmbed(cfg, num, rngs=rngs)
        self.up_encoders = nnx.List([ConformerLayer(cfg, num, rngs=rngs) for _ in range(cfg.num_up_blocks)])
        self.after_norm = LayerNorm(cfg.output_size, eps=1e-5, names=("audio_embed",), param_dtype=as_dtype(num.param_dtype), rngs=rngs)

    def __call__(
        self,
        x: jax.Array,
        lengths: jax.Array,
        *,
        streaming: Streaming = False,
        lookahead_lengths: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """x: token embeddings [B, L, input_size]; lengths [B]: tokens to encode.

        Returns (h [B, stride * L, output_size], stride * lengths).

        ``lookahead_lengths=None`` is the reference's forward: frames past a row's length are
        not zeroed (after the embed they hold LN(bias) * sqrt(D)), so the pre-lookahead conv of
        a padded row's last frames reads them, exactly as in training. Inference passes
        ``lookahead_lengths`` instead: frames at or past it are zeroed before the look-ahead
        conv (what a batch of one sees), and frames in [lengths, lookahead_lengths) are the
        look-ahead context (the reference's ``finalize=False`` ``context``), read by the conv
        but not encoded themselves.
        """
        cfg = self.cfg
        b, n, _ = x.shape
        x = constrain(x, ("batch", "length", "audio_embed"))
        x = self.embed(x)
        if lookahead_lengths is not None:
            x = x * (jnp.arange(n)[None, :, None] < lookahead_lengths[:, None, None]).astype(x.dtype)
        x = self.pre_lookahead_layer(x)
        positions = jnp.asarray(espnet_rel_positions(n, cfg.output_size), x.dtype)
        allowed = chunk_attention_mask(lengths, n, cfg.static_chunk_size, streaming)
        for layer in self.encoders:
            x = layer(x, positions, allowed)

        x = self.up_layer(x)
        lengths = lengths * cfg.upsample_stride
        n = n * cfg.upsample_stride
        x = self.up_embed(x)
        positions = jnp.asarray(espnet_rel_positions(n, cfg.output_size), x.dtype)
        allowed = chunk_attention_mask(lengths, n, cfg.static_chunk_size * cfg.upsample_stride, streaming)
        for layer in self.up_encoders:
            x = layer(x, positions, allowed)
        return self.after_norm(x), lengths
