"""CosyVoice 2's flow decoder (CausalMaskedDiffWithXvec): speech tokens -> 80-bin mel at 50 Hz.

    tokens (prompt + target, 25 Hz) -> embedding -> UpsampleConformerEncoder (x2) -> Linear -> mu
    x-vector -> L2-normalise -> Linear -> speaker condition
    noise --(conditional flow matching: causal U-Net estimator, cosine time schedule, Euler
             steps, classifier-free guidance run as one batch of conditional + unconditional
             rows)--> mel

Layout is channels-last throughout: mel and mu are [batch, frames, 80] (the reference uses
[batch, 80, frames]). Randomness (inference noise, the loss's t / noise / CFG dropout / prompt
prefix / streaming coin) comes only from explicit PRNG keys or from arrays the caller passes.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hellochat_jax.components.flow.conformer import (
    Conv1d,
    Numerics,
    Streaming,
    UpsampleConformerEncoder,
    UpsampleEncoderConfig,
    chunk_attention_mask,
)
from hellochat_jax.core.layers import (
    Embed,
    KeySequence,
    LayerNorm,
    Linear,
    as_dtype,
    as_precision,
    gelu_exact,
)
from hellochat_jax.core.sharding import constrain

ACTIVATIONS = {"gelu": gelu_exact, "gelu-approximate": lambda x: jax.nn.gelu(x, approximate=True)}


@dataclasses.dataclass(frozen=True)
class EstimatorConfig:
    """CausalConditionalDecoder: the U-Net that predicts the flow's velocity."""

    in_channels: int = 320  # x, mu, speaker and prompt condition, 80 each
    out_channels: int = 80
    channels: tuple[int, ...] = (256,)
    attention_head_dim: int = 64
    n_blocks: int = 4  # transformer blocks per U-Net stage
    num_mid_blocks: int = 12
    num_heads: int = 8
    act_fn: str = "gelu"
    static_chunk_size: int = 50  # streaming chunk, in mel frames

    def __post_init__(self):
        if not self.channels:
            raise ValueError("estimator channels must list at least one width")
        if self.act_fn not in ACTIVATIONS:
            raise ValueError(f"estimator act_fn {self.act_fn!r} is not supported (supported: {sorted(ACTIVATIONS)})")
        if self.in_channels % 2:
            raise ValueError(f"estimator in_channels {self.in_channels} must be even (sinusoidal time embedding)")


@dataclasses.dataclass(frozen=True)
class FlowConfig:
    """CausalMaskedDiffWithXvec with its encoder, CFM and estimator settings (cosyvoice2.yaml `flow:`)."""

    input_size: int = 512
    output_size: int = 80  # mel bins
    spk_embed_dim: int = 192
    vocab_size: int = 6561
    token_mel_ratio: int = 2
    pre_lookahead_len: int = 3
    encoder: UpsampleEncoderConfig = UpsampleEncoderConfig()
    estimator: EstimatorConfig = EstimatorConfig()
    sigma_min: float = 1e-6
    t_scheduler: str = "cosine"
    training_cfg_rate: float = 0.2
    inference_cfg_rate: float = 0.7
    n_timesteps: int = 10  # hard-coded in the reference's inference
    # scale of the start noise (the reference CFM's `temperature`, 1.0 in its inference)
    noise_temperature: float = 1.0
    # Styles the flow hears as speakers: without a voice prompt, a reply spoken in the i-th
    # style gets the one-hot x-vector e_i (zeros for any other instruction). CosyVoice 2 tells
    # the flow who speaks only by x-vector and prompt mel; one voice in several styles is then
    # several speakers, and the speech tokens carry too little pitch and loudness to tell them
    # apart. Empty (the release): the all-zero x-vector.
    style_speakers: tuple[str, ...] = ()
    dtype: str = "float32"
    param_dtype: str = "float32"
    precision: str | None = None

    def __post_init__(self):
        enc, est = self.encoder, self.estimator
        problems = []
        if enc.input_size != self.input_size:
            problems.append(f"encoder input_size {enc.input_size} != flow input_size {self.input_size}")
        if enc.upsample_stride != self.token_mel_ratio:
            problems.append(f"encoder upsampling x{enc.upsample_stride} != token_mel_ratio {self.token_mel_ratio}")
        if enc.pre_lookahead_len != self.pre_lookahead_len:
            problems.append(f"encoder pre_lookahead_len {enc.pre_lookahead_len} != flow pre_lookahead_len {self.pre_lookahead_len}")
        if est.in_channels != 4 * self.output_size:
            problems.append(f"estimator in_channels {est.in_channels} != 4 x {self.output_size} (x, mu, speaker, prompt)")
        if est.out_channels != self.output_size:
            problems.append(f"estimator out_channels {est.out_channels} != output_size {self.output_size}")
        if isinstance(self.style_speakers, str) or not all(isinstance(s, str) and s.strip() for s in self.style_speakers):
            problems.append(f"style_speakers must be a list of style names, got {self.style_speakers!r}")
        elif len(self.style_speakers) > self.spk_embed_dim or len(set(self.style_speakers)) < len(self.style_speakers):
            problems.append(f"style_speakers {list(self.style_speakers)} must be distinct and at most spk_embed_dim ({self.spk_embed_dim})")
        if self.t_scheduler not in ("cosine", "linear"):
            problems.append(f"t_scheduler {self.t_scheduler!r} is not supported (cosine, linear)")
        if problems:
            raise ValueError("inconsistent flow config: " + "; ".join(problems))

    @property
    def numerics(self) -> Numerics:
        return Numerics(self.dtype, self.param_dtype, self.precision)

    def style_xvectors(self, styles: Sequence[str | None]) -> np.ndarray:
        """[len(styles), spk_embed_dim] x-vectors of replies spoken in these styles (see
        `style_speakers`; None or an unknown style -> zeros)."""
        out = np.zeros((len(styles), self.spk_embed_dim), np.float32)
        for row, style in enumerate(styles):
            name = style.strip() if style is not None else None
            if name in self.style_speakers:
                out[row, self.style_speakers.index(name)] = 1.0
        return out


# ----------------------------------------------------------------------------- estimator layers


def mish(x: jax.Array) -> jax.Array:
    return x * jnp.tanh(jax.nn.softplus(x))


def timestep_embedding(t: jax.Array, dim: int, scale: float = 1000.0) -> jax.Array:
    """matcha SinusoidalPosEmb: [sin(scale t f_j), cos(scale t f_j)], f_j = 10000^(-j / (dim/2 - 1))."""
    half = dim // 2
    freqs = np.exp((np.arange(half, dtype=np.float32) * np.float32(-math.log(10000) / (half - 1))).astype(np.float64))
    angle = (scale * t.astype(jnp.float32))[:, None] * jnp.asarray(freqs, jnp.float32)[None, :]
    return jnp.concatenate([jnp.sin(angle), jnp.cos(angle)], axis=-1)


def attention_bias(mask: jax.Array, chunk_size: int, streaming: Streaming) -> jax.Array:
    """Additive [B, T, T] bias of the estimator's attention: 0 where allowed, -1e10 where not
    (cosyvoice mask_to_bias). Keys past a row's length are hidden; streaming adds chunk masks."""
    lengths = jnp.sum(mask.astype(jnp.int32), axis=-1)
    allowed = chunk_attention_mask(lengths, mask.shape[-1], chunk_size, streaming)
    return jnp.where(allowed, 0.0, -1.0e10).astype(jnp.float32)


class CausalBlock(nnx.Module):
    """CausalBlock1D: mask -> causal conv (k=3) -> LayerNorm over channels -> Mish -> mask."""

    def __init__(self, dim: int, dim_out: int, num: Numerics, *, rngs: nnx.Rngs):
        self.conv = Conv1d(dim, dim_out, 3, **num.layer_kwargs(rngs))
        self.norm = LayerNorm(dim_out, eps=1e-5, names=("audio_mlp",), param_dtype=as_dtype(num.param_dtype), rngs=rngs)

    def __call__(self, x: jax.Array, m: jax.Array) -> jax.Array:
        return mish(self.norm(self.conv(x * m, padding=(2, 0)))) * m


class CausalResnetBlock(nnx.Module):
    """CausalResnetBlock1D: two causal blocks with the time embedding added between, plus a 1x1 skip."""

    def __init__(self, dim: int, dim_out: int, time_dim: int, num: Numerics, *, rngs: nnx.Rngs):
        self.block1 = CausalBlock(dim, dim_out, num, rngs=rngs)
        self.mlp = Linear(time_dim, dim_out, names=("audio_embed", "audio_mlp"), **num.layer_kwargs(rngs))
        self.block2 = CausalBlock(dim_out, dim_out, num, rngs=rngs)
        self.res_conv = Conv1d(dim, dim_out, 1, **num.layer_kwargs(rngs))

    def __call__(self, x: jax.Array, m: jax.Array, temb: jax.Array) -> jax.Array:
        h = self.block1(x, m) + self.mlp(mish(temb))[:, None, :]
        h = self.block2(h, m)
        return h + self.res_conv(x * m)


class SelfAttention(nnx.Module):
    """diffusers Attention as matcha's BasicTransformerBlock uses it: bias-free q/k/v, biased
    output projection, softmax(q k^T / sqrt(head_dim) + bias). q, k and v run as one matmul."""

    def __init__(self, dim: int, heads: int, head_dim: int, num: Numerics, *, rngs: nnx.Rngs):
        kw = num.layer_kwargs(rngs)
        inner = heads * head_dim
        self.to_q = Linear(dim, inner, names=("audio_embed", "heads"), use_bias=False, **kw)
        self.to_k = Linear(dim, inner, names=("audio_embed", "heads"), use_bias=False, **kw)
        self.to_v = Linear(dim, inner, names=("audio_embed", "heads"), use_bias=False, **kw)
        self.to_out = Linear(inner, dim, names=("heads", "audio_embed"), **kw)
        self.heads, self.head_dim = heads, head_dim
        self.dtype = as_dtype(num.dtype)
        self.precision = as_precision(num.precision)

    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        b, t, _ = x.shape
        h, d = self.heads, self.head_dim
        qkv_kernel = jnp.concatenate([self.to_q.kernel[...], self.to_k.kernel[...], self.to_v.kernel[...]], axis=1)
        qkv = jnp.dot(x.astype(self.dtype), qkv_kernel.astype(self.dtype), precision=self.precision)
        # Head-major [3, B, H, T, d] once, so both attention products are plain batched matmuls
        # (on CPU this beats letting the dots read the [B, T, H, d] layout).
        q, k, v = qkv.reshape(b, t, 3, h, d).transpose(2, 0, 3, 1, 4)
        scores = jnp.einsum("bhqd,bhkd->bhqk", q, k, precision=self.precision).astype(jnp.float32)
        weights = jax.nn.softmax(scores * (1.0 / math.sqrt(d)) + bias[:, None], axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bhkd->bhqd", weights, v, precision=self.precision)
        return self.to_out(out.transpose(0, 2, 1, 3).reshape(b, t, h * d))


class FeedForward(nnx.Module):
    """diffusers FeedForward: Linear(C, 4C) -> GELU -> Linear(4C, C)."""

    def __init__(self, dim: int, act_fn: str, num: Numerics, *, rngs: nnx.Rngs):
        kw = num.layer_kwargs(rngs)
        self.proj = Linear(dim, 4 * dim, names=("audio_embed", "audio_mlp"), **kw)
        self.out = Linear(4 * dim, dim, names=("audio_mlp", "audio_embed"), **kw)
        self.act_fn = act_fn

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(ACTIVATIONS[self.act_fn](self.proj(x)))


class TransformerBlock(nnx.Module):
    """matcha BasicTransformerBlock (layer_norm, self-attention only, no cross-attention)."""

    def __init__(self, dim: int, cfg: EstimatorConfig, num: Numerics, *, rngs: nnx.Rngs):
        pdt = as_dtype(num.param_dtype)
        self.norm1 = LayerNorm(dim, eps=1e-5, names=("audio_embed",), param_dtype=pdt, rngs=rngs)
        self.attn1 = SelfAttention(dim, cfg.num_heads, cfg.attention_head_dim, num, rngs=rngs)
        self.norm3 = LayerNorm(dim, eps=1e-5, names=("audio_embed",), param_dtype=pdt, rngs=rngs)
        self.ff = FeedForward(dim, cfg.act_fn, num, rngs=rngs)

    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        x = x + self.attn1(self.norm1(x), bias)
        x = x + self.ff(self.norm3(x))
        return constrain(x, ("batch", "length", "audio_embed"))


class Downsample(nnx.Module):
    """matcha Downsample1D: Conv1d(k=3, stride 2, padding 1) (only between U-Net levels)."""

    def __init__(self, dim: int, num: Numerics, *, rngs: nnx.Rngs):
        self.conv = Conv1d(dim, dim, 3, **num.layer_kwargs(rngs))

    def __call__(self, x: jax.Array) -> jax.Array:
        conv = self.conv
        y = jax.lax.conv_general_dilated(
            x.astype(conv.dtype), conv.kernel[...].astype(conv.dtype), (2,), [(1, 1)],
            dimension_numbers=("NWC", "WIO", "NWC"), precision=conv.precision,
        )
        return y + conv.bias[...].astype(conv.dtype)


class Upsample(nnx.Module):
    """matcha Upsample1D: ConvTranspose1d(k=4, stride 2, padding 1) (only between U-Net levels).
    The kernel is stored [k, in, out] like a Conv1d's; the transpose conv is a stride-1 conv
    of the 2x-dilated input with the flipped kernel."""

    def __init__(self, dim: int, num: Numerics, *, rngs: nnx.Rngs):
        self.conv = Conv1d(dim, dim, 4, **num.layer_kwargs(rngs))

    def __call__(self, x: jax.Array) -> jax.Array:
        conv = self.conv
        y = jax.lax.conv_general_dilated(
            x.astype(conv.dtype), conv.kernel[...][::-1].astype(conv.dtype), (1,), [(2, 2)], lhs_dilation=(2,),
            dimension_numbers=("NWC", "WIO", "NWC"), precision=conv.precision,
        )
        return y + conv.bias[...].astype(conv.dtype)


class DownLevel(nnx.Module):
    def __init__(self, dim: int, dim_out: int, is_last: bool, time_dim: int, cfg: EstimatorConfig, num: Numerics, *, rngs: nnx.Rngs):
        self.resnet = CausalResnetBlock(dim, dim_out, time_dim, num, rngs=rngs)
        self.transformer_blocks = nnx.List([TransformerBlock(dim_out, cfg, num, rngs=rngs) for _ in range(cfg.n_blocks)])
        # The deepest level keeps its resolution: a causal conv instead of a downsample.
        self.downsample = Conv1d(dim_out, dim_out, 3, **num.layer_kwargs(rngs)) if is_last else Downsample(dim_out, num, rngs=rngs)
        self.is_last = is_last


class MidLevel(nnx.Module):
    def __init__(self, dim: int, time_dim: int, cfg: EstimatorConfig, num: Numerics, *, rngs: nnx.Rngs):
        self.resnet = CausalResnetBlock(dim, dim, time_dim, num, rngs=rngs)
        self.transformer_blocks = nnx.List([TransformerBlock(dim, cfg, num, rngs=rngs) for _ in range(cfg.n_blocks)])


class UpLevel(nnx.Module):
    def __init__(self, dim: int, dim_out: int, is_last: bool, time_dim: int, cfg: EstimatorConfig, num: Numerics, *, rngs: nnx.Rngs):
        self.resnet = CausalResnetBlock(dim, dim_out, time_dim, num, rngs=rngs)
        self.transformer_blocks = nnx.List([TransformerBlock(dim_out, cfg, num, rngs=rngs) for _ in range(cfg.n_blocks)])
        self.upsample = Conv1d(dim_out, dim_out, 3, **num.layer_kwargs(rngs)) if is_last else Upsample(dim_out, num, rngs=rngs)
        self.is_last = is_last


class TimestepMLP(nnx.Module):
    def __init__(self, dim: int, time_dim: int, num: Numerics, *, rngs: nnx.Rngs):
        self.linear_1 = Linear(dim, time_dim, names=("audio_embed", "audio_mlp"), **num.layer_kwargs(rngs))
        self.linear_2 = Linear(time_dim, time_dim, names=("audio_mlp", "audio_embed"), **num.layer_kwargs(rngs))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


class Estimator(nnx.Module):
    """CausalConditionalDecoder: predicts the velocity v(x, t | mu, speaker, prompt)."""

    def __init__(self, cfg: EstimatorConfig, num: Numerics = Numerics(), *, rngs: nnx.Rngs):
        self.cfg = cfg
        ch = tuple(cfg.channels)
        time_dim = 4 * ch[0]
        self.time_mlp = TimestepMLP(cfg.in_channels, time_dim, num, rngs=rngs)
        dims_in = (cfg.in_channels,) + ch[:-1]
        self.down_blocks = nnx.List(
            [DownLevel(d_in, d_out, i == len(ch) - 1, time_dim, cfg, num, rngs=rngs) for i, (d_in, d_out) in enumerate(zip(dims_in, ch))]
        )
        self.mid_blocks = nnx.List([MidLevel(ch[-1], time_dim, cfg, num, rngs=rngs) for _ in range(cfg.num_mid_blocks)])
        up = ch[::-1] + (ch[0],)
        self.up_blocks = nnx.List(
            [UpLevel(2 * up[i], up[i + 1], i == len(ch) - 1, time_dim, cfg, num, rngs=rngs) for i in range(len(ch))]
        )
        self.final_block = CausalBlock(up[-1], up[-1], num, rngs=rngs)
        self.final_proj = Conv1d(up[-1], cfg.out_channels, 1, **num.layer_kwargs(rngs))
        self.dtype = as_dtype(num.dtype)

    def __call__(
        self,
        x: jax.Array,
        mask: jax.Array,
        mu: jax.Array,
        t: jax.Array,
        spks: jax.Array,
        cond: jax.Array,
        *,
        streaming: Streaming = False,
    ) -> jax.Array:
        """x, mu, cond [B, T, 80]; mask [B, T] (1 = frame); t [B]; spks [B, 80] -> v [B, T, 80]."""
        cfg = self.cfg
        temb = self.time_mlp(timestep_embedding(t, cfg.in_channels).astype(self.dtype))
        b, n, _ = x.shape
        h = jnp.concatenate([x, mu, jnp.broadcast_to(spks[:, None, :], (b, n, spks.shape[-1])), cond], axis=-1).astype(self.dtype)
        h = constrain(h, ("batch", "length", None))
        masks = [mask.astype(self.dtype)]
        skips = []
        for level in self.down_blocks:
            m = masks[-1]
            h = level.resnet(h, m[..., None], temb)
            bias = attention_bias(m, cfg.static_chunk_size, streaming)
            for block in level.transformer_blocks:
                h = block(h, bias)
            skips.append(h)
            h = level.downsample(h * m[..., None], padding=(2, 0)) if level.is_last else level.downsample(h * m[..., None])
            masks.append(m[:, ::2])
        masks.pop()  # the deepest level keeps its resolution
        m = masks[-1]
        bias = attention_bias(m, cfg.static_chunk_size, streaming)
        for level in self.mid_blocks:
            h = level.resnet(h, m[..., None], temb)
            for block in level.transformer_blocks:
                h = block(h, bias)
        for level in self.up_blocks:
            m = masks.pop()
            skip = skips.pop()
            h = jnp.concatenate([h[:, : skip.shape[1]], skip], axis=-1)
            h = level.resnet(h, m[..., None], temb)
            bias = attention_bias(m, cfg.static_chunk_size, streaming)
            for block in level.transformer_blocks:
                h = block(h, bias)
            h = level.upsample(h * m[..., None], padding=(2, 0)) if level.is_last else level.upsample(h * m[..., None])
        h = self.final_block(h, m[..., None])
        out = self.final_proj(h * m[..., None])
        return out * mask.astype(out.dtype)[..., None]


# ----------------------------------------------------------------------------- the flow decoder


def time_schedule(n_timesteps: int, scheduler: str) -> np.ndarray:
    """The Euler grid t_0 = 0 < ... < t_n = 1 in float32 as the reference builds it
    (torch.linspace, then 1 - cos(t pi / 2) for the cosine schedule)."""
    n = n_timesteps + 1
    step = np.float32(1.0) / np.float32(n_timesteps)
    i = np.arange(n)
    # torch.linspace fills the first half from the start and the second half from the end.
    t = np.where(i < n // 2, i.astype(np.float32) * step, np.float32(1.0) - (n - 1 - i).astype(np.float32) * step).astype(np.float32)
    if scheduler == "cosine":
        angle = (t * np.float32(0.5)).astype(np.float32) * np.float32(np.pi)
        t = (np.float32(1.0) - np.cos(angle.astype(np.float32).astype(np.float64)).astype(np.float32)).astype(np.float32)
    return t


class FlowDecoder(nnx.Module):
    """CausalMaskedDiffWithXvec. Parameters mirror flow.pt (see convert/cosyvoice2_flow.py)."""

    def __init__(self, cfg: FlowConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        rngs = KeySequence(rngs)  # O(N) parameter creation under tracing, see KeySequence
        num = cfg.numerics
        kw = num.layer_kwargs(rngs)
        self.input_embedding = Embed(cfg.vocab_size, cfg.input_size, names=("vocab", "audio_embed"), dtype=as_dtype(num.dtype), param_dtype=as_dtype(num.param_dtype), rngs=rngs)
        self.spk_embed_affine_layer = Linear(cfg.spk_embed_dim, cfg.output_size, names=("audio_embed", None), **kw)
        self.encoder = UpsampleConformerEncoder(cfg.encoder, num, rngs=rngs)
        self.encoder_proj = Linear(cfg.encoder.output_size, cfg.output_size, names=("audio_embed", None), **kw)
        self.estimator = Estimator(cfg.estimator, num, rngs=rngs)

    def speaker_condition(self, embedding: jax.Array) -> jax.Array:
        """x-vector [B, spk_embed_dim] -> [B, output_size]: L2-normalise, then the affine layer."""
        e = embedding.astype(jnp.float32)
        e = e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-12)
        return self.spk_embed_affine_layer(e)

    def encode(
        self,
        tokens: jax.Array,
        lengths: jax.Array,
        *,
        streaming: Streaming = False,
        lookahead_lengths: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """Speech tokens [B, L] -> (mu [B, ratio * L, output_size], mel lengths ratio * lengths).
        ``lookahead_lengths``: see UpsampleConformerEncoder (inference zeroes padding and keeps
        the look-ahead context there)."""
        valid_len = lengths if lookahead_lengths is None else lookahead_lengths
        valid = (jnp.arange(tokens.shape[1])[None, :] < valid_len[:, None])[..., None]
        x = self.input_embedding(jnp.maximum(tokens, 0)) * valid.astype(self.input_embedding.dtype)
        h, mel_lengths = self.encoder(x, lengths, streaming=streaming, lookahead_lengths=lookahead_lengths)
        return self.encoder_proj(h), mel_lengths

    def solve(
        self,
        noise: jax.Array,
        mu: jax.Array,
        mask: jax.Array,
        spks: jax.Array,
        cond: jax.Array,
        *,
        streaming: Streaming = False,
        n_timesteps: int | None = None,
    ) -> jax.Array:
        """Euler integration of the guided velocity from t = 0 (noise) to t = 1 (mel).

        Each step runs the estimator once on [conditional rows; unconditional rows] (mu,
        speaker and prompt zeroed) and mixes v = (1 + w) v_cond - w v_uncond. The loop is a
        lax.fori_loop, so the whole solve compiles to one program.
        """
        cfg = self.cfg
        n = cfg.n_timesteps if n_timesteps is None else n_timesteps
        t_span = jnp.asarray(np.append(time_schedule(n, cfg.t_scheduler), np.float32(1.0)))  # padded: no OOB read
        w = cfg.inference_cfg_rate
        b = noise.shape[0]
        dtype = as_dtype(cfg.dtype)
        mask_in = jnp.concatenate([mask, mask], axis=0)
        mu_in = jnp.concatenate([mu, jnp.zeros_like(mu)], axis=0).astype(dtype)
        spks_in = jnp.concatenate([spks, jnp.zeros_like(spks)], axis=0).astype(dtype)
        cond_in = jnp.concatenate([cond, jnp.zeros_like(cond)], axis=0).astype(dtype)
        graphdef, state = nnx.split(self.estimator)

        def step(i, carry):
            x, t, dt = carry
            estimator = nnx.merge(graphdef, state)
            x_in = jnp.concatenate([x, x], axis=0)
            v = estimator(x_in, mask_in, mu_in, jnp.full((2 * b,), t), spks_in, cond_in, streaming=streaming).astype(jnp.float32)
            v = (1.0 + w) * v[:b] - w * v[b:]
            x = x + dt * v
            t = t + dt
            dt = t_span[i + 2] - t
            return x, t, dt

        x0 = noise.astype(jnp.float32)
        x, _, _ = jax.lax.fori_loop(0, n, step, (x0, t_span[0], t_span[1] - t_span[0]))
        return x

    def inference(
        self,
        token: jax.Array,
        token_len: jax.Array,
        prompt_token: jax.Array,
        prompt_token_len: jax.Array,
        prompt_feat: jax.Array,
        prompt_feat_len: jax.Array,
        embedding: jax.Array,
        *,
        noise: jax.Array | None = None,
        key: jax.Array | None = None,
        streaming: Streaming = False,
        finalize: bool | jax.Array = True,
        n_timesteps: int | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """Mel for ``token`` in the voice of the prompt (CausalMaskedDiffWithXvec.inference, batched).

        token [B, N] / token_len [B]; prompt_token [B, P] / prompt_token_len [B] (P may be 0);
        prompt_feat [B, F, 80] / prompt_feat_len [B] (the prompt's mel, 2 frames per prompt
        token as the release frontend trims it); embedding [B, spk_embed_dim].
        Noise: ``noise`` [B or 1, >= 2 (P + N), 80] (its first frames are used, as the
        reference uses its fixed buffer), else drawn from ``key``.
        ``finalize=False`` (streaming): the last pre_lookahead_len tokens of each row are only
        look-ahead context and produce no mel yet. ``streaming`` and ``finalize`` may be traced
        booleans, so one compiled program serves every mode.

        Returns (mel [B, 2 (P + N) - F, 80], mel_len [B]): row b's new frames start at 0 and
        frames from mel_len[b] on are zero.
        """
        cfg = self.cfg
        if noise is None and key is None:
            raise ValueError("inference needs the start noise: pass noise=... or key=...")
        b, n_prompt = prompt_token.shape
        if token.ndim != 2 or token.shape[0] != b:
            raise ValueError(f"token must be [batch, tokens] with the prompt's batch {b}, got {token.shape}")
        n_total = n_prompt + token.shape[1]
        n_mel = cfg.token_mel_ratio * n_total
        n_feat = prompt_feat.shape[1]
        if n_feat > n_mel:
            raise ValueError(f"prompt_feat has {n_feat} frames, more than the {n_mel} mel frames of prompt + tokens")
        if noise is not None and (noise.ndim != 3 or noise.shape[1] < n_mel or noise.shape[2] != cfg.output_size or noise.shape[0] not in (1, b)):
            raise ValueError(f"noise must be [{b} or 1, >= {n_mel}, {cfg.output_size}], got {noise.shape}")
        total = (prompt_token_len + token_len).astype(jnp.int32)
        if n_prompt:
            pos = jnp.arange(n_total)[None, :]
            from_prompt = pos < prompt_token_len[:, None]
            tok_idx = jnp.clip(pos - prompt_token_len[:, None], 0, token.shape[1] - 1)
            prompt_idx = jnp.clip(pos, 0, n_prompt - 1)
            tokens = jnp.where(
                from_prompt,
                jnp.take_along_axis(prompt_token, jnp.broadcast_to(prompt_idx, (b, n_total)), axis=1),
                jnp.take_along_axis(token, tok_idx, axis=1),
            )
        else:
            tokens = token
        lengths = jnp.where(finalize, total, jnp.maximum(total - cfg.pre_lookahead_len, 0))
        spks = self.speaker_condition(embedding)
        mu, mel_lengths = self.encode(tokens, lengths, streaming=streaming, lookahead_lengths=total)
        frames = jnp.arange(n_mel)[None, :]
        mask = (frames < mel_lengths[:, None]).astype(mu.dtype)

        feat_valid = (jnp.arange(n_feat)[None, :] < prompt_feat_len[:, None])[..., None]
        cond = jnp.pad(prompt_feat * feat_valid, ((0, 0), (0, n_mel - n_feat), (0, 0))).astype(mu.dtype)

        if noise is None:
            noise = jax.random.normal(key, (b, n_mel, cfg.output_size), jnp.float32)
        else:
            noise = jnp.broadcast_to(noise[:, :n_mel], (b, n_mel, cfg.output_size))
        noise = noise * cfg.noise_temperature
        mel = self.solve(noise, mu, mask, spks, cond, streaming=streaming, n_timesteps=n_timesteps)

        width = n_mel - n_feat
        out_len = jnp.clip(mel_lengths - prompt_feat_len, 0, width)
        idx = jnp.clip(prompt_feat_len[:, None] + jnp.arange(width)[None, :], 0, n_mel - 1)
        out = jnp.take_along_axis(mel, idx[..., None], axis=1)
        out = out * (jnp.arange(width)[None, :] < out_len[:, None])[..., None]
        return out, out_len


def jit_inference(model: FlowDecoder) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """``model.inference`` compiled, with the per-call cost of a plain jax.jit (a few ms).

    nnx.jit walks the module graph on every call, which for the release flow's 1121 tensors
    costs 0.1-0.3 s per call on this CPU, too much for streaming chunks. Here the module is
    split once; the returned function holds that snapshot of the weights (call again after
    changing them). ``streaming`` and ``finalize`` are traced, so switching modes does not
    recompile; a new input shape or ``n_timesteps`` does.
    """
    graphdef, state = nnx.split(model)

    @functools.partial(jax.jit, static_argnames=("n_timesteps",))
    def run(state, args, noise, key, streaming, finalize, n_timesteps):
        return nnx.merge(graphdef, state).inference(
            *args, noise=noise, key=key, streaming=streaming, finalize=finalize, n_timesteps=n_timesteps
        )

    def inference(token, token_len, prompt_token, prompt_token_len, prompt_feat, prompt_feat_len, embedding, *,
                  noise=None, key=None, streaming=False, finalize=True, n_timesteps=None):
        if noise is None and key is None:
            raise ValueError("inference needs the start noise: pass noise=... or key=...")
        args = (token, token_len, prompt_token, prompt_token_len, prompt_feat, prompt_feat_len, embedding)
        return run(state, args, noise, key, jnp.asarray(streaming), jnp.asarray(finalize), n_timesteps)

    return inference


# ----------------------------------------------------------------------------- training loss


class FlowLossDraws(NamedTuple):
    """Every random choice of one flow-matching loss evaluation (a pytree)."""

    t: jax.Array  # [B] flow time in [0, 1)
    z: jax.Array  # [B, T, 80] source noise
    cfg_keep: jax.Array  # [B] bool; False drops mu, speaker and prompt for that row (CFG training)
    cond_len: jax.Array  # [B] int32 prompt-prefix frames given as condition (0 = none)
    streaming: jax.Array  # [] bool: chunk masks in encoder and estimator


def draw_loss_randomness(key: jax.Array, feat_len: jax.Array, num_frames: int, cfg: FlowConfig) -> FlowLossDraws:
    """The reference's draws: t ~ U[0, 1); z ~ N(0, 1); keep the condition with probability
    1 - training_cfg_rate; with probability 1/2 a prompt prefix of randint(0, int(0.3 len))
    frames (inclusive); streaming with probability 1/2."""
    b = feat_len.shape[0]
    k_t, k_z, k_cfg, k_prompt, k_len, k_stream = jax.random.split(key, 6)
    t = jax.random.uniform(k_t, (b,), jnp.float32)
    z = jax.random.normal(k_z, (b, num_frames, cfg.output_size), jnp.float32)
    cfg_keep = jax.random.uniform(k_cfg, (b,)) > cfg.training_cfg_rate
    use_prompt = jax.random.uniform(k_prompt, (b,)) >= 0.5
    max_len = jnp.floor(0.3 * feat_len.astype(jnp.float32)).astype(jnp.int32)
    prefix = jax.random.randint(k_len, (b,), 0, max_len + 1)
    cond_len = jnp.where(use_prompt, prefix, 0).astype(jnp.int32)
    streaming = jax.random.uniform(k_stream, ()) < 0.5
    return FlowLossDraws(t, z, cfg_keep, cond_len, streaming)


def flow_matching_loss(
    model: FlowDecoder,
    speech_token: jax.Array,
    speech_token_len: jax.Array,
    speech_feat: jax.Array,
    embedding: jax.Array,
    *,
    key: jax.Array | None = None,
    draws: FlowLossDraws | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Conditional flow-matching loss (CausalMaskedDiffWithXvec.forward + compute_loss).

    speech_token [B, L] right-padded with lengths [B]; speech_feat [B, ratio L, 80] target
    mel (zero-padded); embedding [B, spk_embed_dim]. Randomness from ``key`` or fixed
    ``draws``. Returns (loss, {"mu", "pred", "mask"}); loss = masked MSE of the predicted
    velocity against x1 - (1 - sigma_min) z, averaged over valid frames and mel bins.
    """
    cfg = model.cfg
    b, n_frames, bins = speech_feat.shape
    if n_frames != cfg.token_mel_ratio * speech_token.shape[1]:
        raise ValueError(
            f"speech_feat has {n_frames} frames; the flow needs {cfg.token_mel_ratio} per token slot "
            f"({cfg.token_mel_ratio} x {speech_token.shape[1]})"
        )
    if draws is None:
        if key is None:
            raise ValueError("flow_matching_loss needs key=... or draws=...")
        draws = draw_loss_randomness(key, cfg.token_mel_ratio * speech_token_len, n_frames, cfg)
    spks = model.speaker_condition(embedding)
    mu, mel_lengths = model.encode(speech_token, speech_token_len, streaming=draws.streaming)
    frames = jnp.arange(n_frames)[None, :]
    mask = (frames < mel_lengths[:, None]).astype(jnp.float32)
    x1 = speech_feat.astype(jnp.float32)
    cond = x1 * (frames < draws.cond_len[:, None])[..., None]

    t = draws.t.astype(jnp.float32)[:, None, None]
    z = draws.z.astype(jnp.float32)
    y = (1 - (1 - cfg.sigma_min) * t) * z + t * x1
    u = x1 - (1 - cfg.sigma_min) * z
    keep = draws.cfg_keep.astype(jnp.float32)
    pred = model.estimator(
        y, mask, mu * keep[:, None, None], draws.t.astype(jnp.float32), spks * keep[:, None], cond * keep[:, None, None],
        streaming=draws.streaming,
    ).astype(jnp.float32)
    m = mask[..., None]
    loss = jnp.sum(jnp.square(pred * m - u * m)) / (jnp.sum(mask) * bins)
    return loss, {"mu": mu, "pred": pred, "mask": mask}
