"""HiFT vocoder, CosyVoice 2's `HiFTGenerator`: 80-bin log-mel (50 Hz) -> 24 kHz waveform.

    mel [B, 80, T] --F0Predictor--> f0 [B, T] Hz
    f0 --HarmonicSource (sine harmonics + voiced/unvoiced noise, PRNG key)--> source [B, L]
    mel, STFT(source) --iSTFTNet decoder (upsampling, Snake resblocks, source fusion)--> magnitude, phase
    --iSTFT (n_fft 16, hop 4)--> waveform [B, L], clamped to +-audio_limit;  L = T * prod(upsample_rates) * hop

Inside, activations are channels-last [B, length, channels]. Weight-normalised convolutions keep
the release's (g, v) pair as parameters and fold W = g * v / ||v|| inside the forward (see
`WeightNormConv1d`): that keeps export to hift.pt bit-exact and fine-tuning in the same
parametrisation the reference trains with; under jit the fold is a few cheap reductions.

Streaming (the reference's `CosyVoice2Model.token2wav` vocoder part) is `stream_step`: each
chunk's mel is prefixed with the previous chunk's last 8 frames, the first samples of the
source are overwritten by the previous source (`cache_source`, no phase glitch) and the first
samples of audio are cross-faded (Hamming) with the audio held back from the previous chunk.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hellochat_jax.core import dsp
from hellochat_jax.core import sharding as shd
from hellochat_jax.core.layers import Linear, as_dtype, as_precision

# Logical axis names: conv kernels are [taps, in, out].
KERNEL = ("conv", "audio_embed", "audio_mlp")
OUT_CHANNELS = ("audio_mlp",)
IN_CHANNELS = ("audio_embed",)
ACTIVATION = ("batch", "length", None)

SNAKE_EPS = 1e-9  # cosyvoice.transformer.activation.Snake.no_div_by_zero


# ----------------------------------------------------------------------------- config


@dataclasses.dataclass
class HiFTConfig:
    """The `hift:` section of cosyvoice2.yaml (defaults: the CosyVoice2-0.5B release)."""

    in_channels: int = 80
    base_channels: int = 512
    nb_harmonics: int = 8
    sampling_rate: int = 24000
    nsf_alpha: float = 0.1  # sine amplitude
    nsf_sigma: float = 0.003  # noise std in voiced frames
    nsf_voiced_threshold: float = 10.0  # Hz
    upsample_rates: tuple[int, ...] = (8, 5, 3)
    upsample_kernel_sizes: tuple[int, ...] = (16, 11, 7)
    n_fft: int = 16
    hop_len: int = 4
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    source_resblock_kernel_sizes: tuple[int, ...] = (7, 7, 11)
    source_resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    lrelu_slope: float = 0.1
    audio_limit: float = 0.99
    f0_cond_channels: int = 512
    dtype: str = "float32"  # decoder compute; the F0 predictor, source and iSTFT always run in float32
    param_dtype: str = "float32"
    precision: str = "default"  # "highest" for parity on accelerators
    # How hift.pt names weight norm ("parametrizations": torch.nn.utils.parametrizations,
    # "legacy": weight_g/weight_v) and whether its keys carry "generator."; export writes the same.
    checkpoint_naming: str = "parametrizations"
    checkpoint_prefix: str = ""

    def __post_init__(self):
        for name in ("nsf_alpha", "nsf_sigma", "nsf_voiced_threshold", "lrelu_slope", "audio_limit"):
            setattr(self, name, float(getattr(self, name)))
        self.upsample_rates = tuple(int(r) for r in self.upsample_rates)
        self.upsample_kernel_sizes = tuple(int(k) for k in self.upsample_kernel_sizes)
        self.resblock_kernel_sizes = tuple(int(k) for k in self.resblock_kernel_sizes)
        self.source_resblock_kernel_sizes = tuple(int(k) for k in self.source_resblock_kernel_sizes)
        self.resblock_dilation_sizes = tuple(tuple(int(d) for d in ds) for ds in self.resblock_dilation_sizes)
        self.source_resblock_dilation_sizes = tuple(tuple(int(d) for d in ds) for ds in self.source_resblock_dilation_sizes)
        problems = []
        if self.sampling_rate == 22050:
            problems.append("sampling_rate 22050 selects CosyVoice 1's SineGen, which is not implemented (CosyVoice 2 runs at 24000)")
        if len(self.upsample_rates) != len(self.upsample_kernel_sizes):
            problems.append(f"upsample_rates {self.upsample_rates} and upsample_kernel_sizes {self.upsample_kernel_sizes} differ in length")
        if len(self.source_resblock_kernel_sizes) != len(self.upsample_rates) or len(self.source_resblock_dilation_sizes) != len(self.upsample_rates):
            problems.append("one source resblock per upsampling stage is needed (source_resblock_kernel_sizes / _dilation_sizes)")
        if len(self.resblock_kernel_sizes) != len(self.resblock_dilation_sizes):
            problems.append("resblock_kernel_sizes and resblock_dilation_sizes differ in length")
        if self.base_channels % (2 ** len(self.upsample_rates)):
            problems.append(f"base_channels {self.base_channels} must halve {len(self.upsample_rates)} times")
        if self.n_fft % self.hop_len:
            problems.append(f"n_fft {self.n_fft} must be a multiple of hop_len {self.hop_len}")
        for k, ds in [*zip(self.resblock_kernel_sizes, self.resblock_dilation_sizes), *zip(self.source_resblock_kernel_sizes, self.source_resblock_dilation_sizes)]:
            if k % 2 == 0:
                problems.append(f"resblock kernel {k} must be odd ('same' padding)")
        if math.prod(self.upsample_rates) * self.hop_len < 3:
            problems.append("fewer than 3 samples per frame: the reference's random initial phase would reach the output (not modelled)")
        if self.checkpoint_naming not in ("parametrizations", "legacy"):
            problems.append(f"checkpoint_naming {self.checkpoint_naming!r}: use 'parametrizations' or 'legacy'")
        if problems:
            raise ValueError("HiFTConfig: " + "; ".join(problems))

    @property
    def harmonics(self) -> int:
        """Sine components: the fundamental and nb_harmonics overtones."""
        return self.nb_harmonics + 1

    @property
    def samples_per_frame(self) -> int:
        """Waveform samples per mel frame (480 at 24 kHz / 50 Hz)."""
        return math.prod(self.upsample_rates) * self.hop_len

    def stage_channels(self, i: int) -> int:
        return self.base_channels // 2 ** (i + 1)

    @classmethod
    def from_yaml(cls, hift: Any, **overrides: Any) -> "HiFTConfig":
        """From the parsed `hift:` node of cosyvoice2.yaml (a `Tagged` from
        `convert.cosyvoice2_yaml.load_cosyvoice_yaml`, or its kwargs as a dict). Arguments the
        yaml omits take HiFTGenerator's constructor defaults, as hyperpyyaml would."""
        target = getattr(hift, "target", "cosyvoice.hifigan.generator.HiFTGenerator")
        if target.rsplit(".", 1)[-1] != "HiFTGenerator":
            raise ValueError(f"hift: {target} is not supported (CosyVoice 2's cosyvoice.hifigan.generator.HiFTGenerator is)")
        kwargs = dict(getattr(hift, "value", hift))
        unknown = sorted(set(kwargs) - set(_GENERATOR_DEFAULTS))
        if unknown:
            raise ValueError(f"hift: unknown HiFTGenerator argument(s) {unknown}")
        args = {**_GENERATOR_DEFAULTS, **kwargs}
        f0 = args.pop("f0_predictor")
        f0_target = getattr(f0, "target", "cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor")
        if f0 is None or f0_target.rsplit(".", 1)[-1] != "ConvRNNF0Predictor":
            raise ValueError(f"hift.f0_predictor: {f0_target if f0 is not None else None} is not supported (ConvRNNF0Predictor is)")
        f0_args = {"num_class": 1, "in_channels": 80, "cond_channels": 512, **dict(getattr(f0, "value", f0))}
        if set(f0_args) - {"num_class", "in_channels", "cond_channels"}:
            raise ValueError(f"hift.f0_predictor: unknown argument(s) {sorted(set(f0_args) - {'num_class', 'in_channels', 'cond_channels'})}")
        if f0_args["num_class"] != 1:
            raise ValueError(f"hift.f0_predictor.num_class must be 1 (one f0 per frame), got {f0_args['num_class']}")
        if f0_args["in_channels"] != args["in_channels"]:
            raise ValueError(f"hift.f0_predictor.in_channels {f0_args['in_channels']} != hift.in_channels {args['in_channels']} (both read the mel)")
        istft = args.pop("istft_params")
        fields = dict(
            args,
            n_fft=int(istft["n_fft"]),
            hop_len=int(istft["hop_len"]),
            f0_cond_channels=int(f0_args["cond_channels"]),
        )
        return cls(**{**fields, **overrides})

    def to_yaml(self) -> Any:
        """The `hift:` node as `Tagged` data (for `dump_cosyvoice_yaml`)."""
        from hellochat_jax.checkpoint.cosyvoice_yaml import Tagged

        return Tagged("new", "cosyvoice.hifigan.generator.HiFTGenerator", {
            "in_channels": self.in_channels,
            "base_channels": self.base_channels,
            "nb_harmonics": self.nb_harmonics,
            "sampling_rate": self.sampling_rate,
            "nsf_alpha": self.nsf_alpha,
            "nsf_sigma": self.nsf_sigma,
            "nsf_voiced_threshold": self.nsf_voiced_threshold,
            "upsample_rates": list(self.upsample_rates),
            "upsample_kernel_sizes": list(self.upsample_kernel_sizes),
            "istft_params": {"n_fft": self.n_fft, "hop_len": self.hop_len},
            "resblock_kernel_sizes": list(self.resblock_kernel_sizes),
            "resblock_dilation_sizes": [list(d) for d in self.resblock_dilation_sizes],
            "source_resblock_kernel_sizes": list(self.source_resblock_kernel_sizes),
            "source_resblock_dilation_sizes": [list(d) for d in self.source_resblock_dilation_sizes],
            "lrelu_slope": self.lrelu_slope,
            "audio_limit": self.audio_limit,
            "f0_predictor": Tagged("new", "cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor", {
                "num_class": 1, "in_channels": self.in_channels, "cond_channels": self.f0_cond_channels,
            }),
        })


# HiFTGenerator.__init__ defaults (cosyvoice/hifigan/generator.py), used for arguments a yaml omits.
_GENERATOR_DEFAULTS: dict[str, Any] = {
    "in_channels": 80,
    "base_channels": 512,
    "nb_harmonics": 8,
    "sampling_rate": 22050,
    "nsf_alpha": 0.1,
    "nsf_sigma": 0.003,
    "nsf_voiced_threshold": 10,
    "upsample_rates": [8, 8],
    "upsample_kernel_sizes": [16, 16],
    "istft_params": {"n_fft": 16, "hop_len": 4},
    "resblock_kernel_sizes": [3, 7, 11],
    "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]],
    "source_resblock_kernel_sizes": [7, 11],
    "source_resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5]],
    "lrelu_slope": 0.1,
    "audio_limit": 0.99,
    "f0_predictor": None,
}


# ----------------------------------------------------------------------------- mel features


def flow_mel_settings(cfg: HiFTConfig) -> dict[str, Any]:
    """The mel features a vocoder of this config reads (the flow's output and prompt mel, and
    the vocoder's training input) at any sample rate: one frame per `samples_per_frame`, a
    window of 4 frames, `in_channels` Slaney bins over 0 to min(8 kHz, Nyquist). At 24 kHz this is
    CosyVoice 2's feat_extractor: rate 24000, n_fft 1920, hop 480, 80 mels, fmin 0, fmax 8000.
    The keys are `log_mel`'s (and `pipelines.talker.flow_mel`'s) keyword arguments."""
    hop = cfg.samples_per_frame
    return dict(rate=cfg.sampling_rate, n_fft=4 * hop, hop=hop, n_mels=cfg.in_channels, fmin=0.0, fmax=min(8000.0, cfg.sampling_rate / 2))


def log_mel(wav: Any, *, rate: int, n_fft: int, hop: int, n_mels: int, fmin: float, fmax: float) -> jax.Array:
    """The flow's mel features [..., frames, n_mels] of audio [..., samples] at `rate`
    (matcha.utils.audio.mel_spectrogram, center=False): reflect-pad (n_fft - hop) / 2 at both
    ends, periodic Hann STFT, magnitude sqrt(re^2 + im^2 + 1e-9), Slaney mel filters,
    log(max(x, 1e-5)). samples // hop frames; needs more than (n_fft - hop) / 2 samples.
    Traceable (the vocoder's mel loss runs it under jit)."""
    spectrum = dsp.stft(wav, n_fft, hop, dsp.hann_window(n_fft), pad=(n_fft - hop) // 2)
    magnitude = jnp.sqrt(dsp.power_spectrum(spectrum) + 1e-9)
    mel = dsp.apply_filterbank(magnitude, dsp.slaney_mel_filterbank(rate, n_fft, n_mels, fmin, fmax))
    return jnp.log(jnp.maximum(mel, 1e-5))


# ----------------------------------------------------------------------------- layers


def _conv(x: jax.Array, kernel: jax.Array, *, stride: int = 1, dilation: int = 1, padding: tuple[int, int] = (0, 0), precision=None) -> jax.Array:
    """torch Conv1d (cross-correlation, zero padding) on [B, length, in] with a [taps, in, out] kernel.

    Run as a 2-D convolution over a [1, length] image: XLA's CPU backend is up to 30% faster
    in that form than with a 1-D convolution (measured at this model's shapes)."""
    y = jax.lax.conv_general_dilated(
        x[:, None], kernel[None], (1, stride), [(0, 0), padding], rhs_dilation=(1, dilation),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision,
    )
    return y[:, 0]


def sin_cos(z: jax.Array) -> tuple[jax.Array, jax.Array]:
    """sin(z), cos(z) to ~1e-7 absolute for |z| < 1e5, in plain vectorisable arithmetic.

    XLA's CPU backend lowers jnp.sin to scalar libm calls, which made the Snake activations
    (a sine per element of every resblock activation) cost as much as the convolutions around
    them. This is the classic single-precision scheme (cephes sinf/cosf): reduce by multiples
    of pi/2 with a three-part Cody-Waite constant, then minimax polynomials on |r| <= pi/4.
    """
    f32 = np.float32
    dtype = z.dtype
    z = z.astype(jnp.float32)
    quadrant = jnp.round(z * f32(2 / np.pi))
    r = ((z - quadrant * f32(1.5703125)) - quadrant * f32(4.837512969970703125e-4)) - quadrant * f32(7.549789948768648e-8)
    r2 = r * r
    sin_r = r + r * r2 * (f32(-1.6666654611e-1) + r2 * (f32(8.3321608736e-3) + r2 * f32(-1.9515295891e-4)))
    cos_r = f32(1) - f32(0.5) * r2 + r2 * r2 * (f32(4.166664568298827e-2) + r2 * (f32(-1.388731625493765e-3) + r2 * f32(2.443315711809948e-5)))
    q = quadrant.astype(jnp.int32) & 3
    sin = jnp.where(q == 0, sin_r, jnp.where(q == 1, cos_r, jnp.where(q == 2, -sin_r, -cos_r)))
    cos = jnp.where(q == 0, cos_r, jnp.where(q == 1, -sin_r, jnp.where(q == 2, -cos_r, sin_r)))
    return sin.astype(dtype), cos.astype(dtype)


def standard_normal(key: jax.Array, shape: Sequence[int]) -> jax.Array:
    """N(0, 1) float32 samples by the Box-Muller transform of one uniform draw; on CPU this is
    ~5x faster than jax.random.normal's inverse-erf transform (the source needs L * 9 samples)."""
    n = math.prod(shape)
    half = -(-n // 2)
    u = jax.random.uniform(key, (2, half), jnp.float32)
    radius = jnp.sqrt(np.float32(-2) * jnp.log1p(-u[0]))  # 1 - u is in (0, 1]: no log(0)
    sin, cos = sin_cos(np.float32(2 * np.pi) * u[1])
    return jnp.concatenate([radius * cos, radius * sin])[:n].reshape(tuple(shape))


def _init_direction(rngs: nnx.Rngs, shape: Sequence[int], dtype, torch_default: bool = False) -> jax.Array:
    if torch_default:
        # torch's Conv1d default, U(+-1/sqrt(fan_in)): the reference applies init_weights to the
        # upsampling and resblock convs only, so conv_pre and the F0 predictor keep this one
        # (with N(0, 0.01) there a from-scratch F0 predictor learns several times slower).
        bound = 1.0 / math.sqrt(shape[0] * shape[1])
        return jax.random.uniform(rngs.params(), tuple(shape), dtype, -bound, bound)
    # cosyvoice.utils.common.init_weights: N(0, 0.01)
    return 0.01 * jax.random.normal(rngs.params(), tuple(shape), dtype)


def _direction_norm(v: jax.Array, axes: tuple[int, int]) -> jax.Array:
    """||v|| over `axes` (every axis but torch's weight-norm dim 0), kept as size-1 axes."""
    return jnp.sqrt(jnp.sum(jnp.square(v), axis=axes, keepdims=True))


def _weight_norm_kernel(g: nnx.Param | None, v: nnx.Param, axes: tuple[int, int]) -> jax.Array:
    """torch weight norm's W = g * v / ||v|| (norm over `axes`), in float32; once folded
    (HiFTVocoder.fold_weight_norm sets g to None) v holds W itself."""
    if g is None:
        return v[...]
    v = v[...].astype(jnp.float32)
    return v * (jnp.expand_dims(g[...].astype(jnp.float32), axes) / _direction_norm(v, axes))


class Conv1d(nnx.Module):
    """Plain torch Conv1d: kernel [taps, in, out] (torch's [out, in, taps] transposed) and bias."""

    def __init__(self, cin: int, cout: int, taps: int, *, stride: int = 1, padding: int = 0, dtype: Any, param_dtype: Any, precision: Any, rngs: nnx.Rngs):
        bound = 1.0 / math.sqrt(cin * taps)
        self.kernel = nnx.Param(jax.random.uniform(rngs.params(), (taps, cin, cout), param_dtype, -bound, bound), out_sharding=KERNEL)
        self.bias = nnx.Param(jnp.zeros((cout,), param_dtype), out_sharding=OUT_CHANNELS)
        self.stride, self.padding = stride, padding
        self.dtype, self.precision = dtype, precision

    def __call__(self, x: jax.Array) -> jax.Array:
        y = _conv(x.astype(self.dtype), self.kernel[...].astype(self.dtype), stride=self.stride, padding=(self.padding, self.padding), precision=self.precision)
        return y + self.bias[...].astype(self.dtype)


class WeightNormConv1d(nnx.Module):
    """torch `weight_norm(Conv1d)` (dim=0): the kernel is W = g * v / ||v||, with ||v|| the L2 norm
    over everything but the output channel. g [out] and v [taps, in, out] are the parameters."""

    def __init__(self, cin: int, cout: int, taps: int, *, dilation: int = 1, padding: int = 0, dtype: Any, param_dtype: Any, precision: Any, rngs: nnx.Rngs,
                 torch_default_init: bool = False):
        v = _init_direction(rngs, (taps, cin, cout), param_dtype, torch_default_init)
        self.g = nnx.Param(_direction_norm(v, (0, 1)).reshape(cout), out_sharding=OUT_CHANNELS)
        self.v = nnx.Param(v, out_sharding=KERNEL)
        self.bias = nnx.Param(jnp.zeros((cout,), param_dtype), out_sharding=OUT_CHANNELS)
        self.dilation, self.padding = dilation, padding
        self.dtype, self.precision = dtype, precision

    def kernel(self) -> jax.Array:
        return _weight_norm_kernel(self.g, self.v, (0, 1))

    def __call__(self, x: jax.Array) -> jax.Array:
        y = _conv(x.astype(self.dtype), self.kernel().astype(self.dtype), dilation=self.dilation, padding=(self.padding, self.padding), precision=self.precision)
        return y + self.bias[...].astype(self.dtype)


class WeightNormConvTranspose1d(nnx.Module):
    """torch `weight_norm(ConvTranspose1d)` (dim=0 is the INPUT channel for a transposed conv's
    [in, out, taps] weight, so g [in] and the norm run per input channel); v [taps, in, out].

    Run as the gradient of a convolution (input dilated by the stride, flipped kernel), which
    XLA lowers without spending work on the inserted zeros."""

    def __init__(self, cin: int, cout: int, taps: int, stride: int, *, padding: int, dtype: Any, param_dtype: Any, precision: Any, rngs: nnx.Rngs):
        v = _init_direction(rngs, (taps, cin, cout), param_dtype)
        self.g = nnx.Param(_direction_norm(v, (0, 2)).reshape(cin), out_sharding=IN_CHANNELS)
        self.v = nnx.Param(v, out_sharding=KERNEL)
        self.bias = nnx.Param(jnp.zeros((cout,), param_dtype), out_sharding=OUT_CHANNELS)
        self.taps, self.stride, self.padding = taps, stride, padding
        self.dtype, self.precision = dtype, precision

    def kernel(self) -> jax.Array:
        return _weight_norm_kernel(self.g, self.v, (0, 2))

    def __call__(self, x: jax.Array) -> jax.Array:
        k, s = self.taps, self.stride
        w = self.kernel().astype(self.dtype)
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype)[:, None], w[::-1][None], (1, 1), [(0, 0), (k - 1 - self.padding, k - 1 - self.padding)],
            lhs_dilation=(1, s), dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=self.precision,
        )
        return y[:, 0] + self.bias[...].astype(self.dtype)


class Snake(nnx.Module):
    """x + 1/(alpha + 1e-9) * sin(alpha * x)^2 with a per-channel alpha used as stored
    (CosyVoice's Snake with alpha_logscale=False)."""

    def __init__(self, channels: int, *, param_dtype: Any):
        self.alpha = nnx.Param(jnp.ones((channels,), param_dtype), out_sharding=IN_CHANNELS)

    def __call__(self, x: jax.Array) -> jax.Array:
        alpha = self.alpha[...].astype(x.dtype)
        return x + (1.0 / (alpha + SNAKE_EPS)) * jnp.square(sin_cos(x * alpha)[0])


class ResBlock(nnx.Module):
    """HiFi-GAN ResBlock1 with Snake: for each dilation d,
    x = x + conv2(snake2(conv1_d(snake1(x)))), both convs 'same'-padded."""

    def __init__(self, channels: int, taps: int, dilations: Sequence[int], *, dtype: Any, param_dtype: Any, precision: Any, rngs: nnx.Rngs):
        conv = dict(dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
        self.convs1 = nnx.List([WeightNormConv1d(channels, channels, taps, dilation=d, padding=d * (taps - 1) // 2, **conv) for d in dilations])
        self.convs2 = nnx.List([WeightNormConv1d(channels, channels, taps, padding=(taps - 1) // 2, **conv) for _ in dilations])
        self.activations1 = nnx.List([Snake(channels, param_dtype=param_dtype) for _ in dilations])
        self.activations2 = nnx.List([Snake(channels, param_dtype=param_dtype) for _ in dilations])

    def __call__(self, x: jax.Array) -> jax.Array:
        for conv1, conv2, act1, act2 in zip(self.convs1, self.convs2, self.activations1, self.activations2):
            x = x + conv2(act2(conv1(act1(x))))
        return x


# ----------------------------------------------------------------------------- F0 and source


class F0Predictor(nnx.Module):
    """ConvRNNF0Predictor: 5 x [Conv1d(k=3, 'same') -> ELU], then |Linear(., 1)| per frame (Hz).

    Always float32 at full matmul precision: the sine phase integrates f0 over the whole
    utterance, so f0 errors grow into phase drift (and it is ~1% of the vocoder's work)."""

    def __init__(self, cfg: HiFTConfig, *, rngs: nnx.Rngs):
        conv = dict(param_dtype=as_dtype(cfg.param_dtype), dtype=jnp.float32, precision=jax.lax.Precision.HIGHEST, rngs=rngs)
        widths = [cfg.in_channels] + [cfg.f0_cond_channels] * 5
        self.convs = nnx.List([WeightNormConv1d(cin, cout, 3, padding=1, torch_default_init=True, **conv) for cin, cout in zip(widths[:-1], widths[1:])])
        self.classifier = Linear(cfg.f0_cond_channels, 1, names=("audio_embed", None), param_dtype=as_dtype(cfg.param_dtype), precision="highest", rngs=rngs)

    def __call__(self, mel: jax.Array) -> jax.Array:
        """mel [B, n_mels, T] -> f0 [B, T] in Hz (float32)."""
        x = mel.astype(jnp.float32).transpose(0, 2, 1)
        for conv in self.convs:
            x = jax.nn.elu(conv(x))
        return jnp.abs(self.classifier(x)[..., 0])


class HarmonicSource(nnx.Module):
    """SourceModuleHnNSF with SineGen2: harmonics f0 * [1..H] sampled at the waveform rate, with
    the reference's float32 phase arithmetic, voiced/unvoiced noise, merged by tanh(Linear(H, 1))."""

    def __init__(self, cfg: HiFTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.l_linear = Linear(cfg.harmonics, 1, names=(None, None), param_dtype=as_dtype(cfg.param_dtype), precision="highest", rngs=rngs)

    def __call__(self, f0: jax.Array, noise: jax.Array) -> jax.Array:
        """f0 [B, T] Hz, noise [B, T * samples_per_frame, harmonics] ~ N(0, 1) -> source [B, L]."""
        cfg = self.cfg
        f32 = np.float32
        b, t = f0.shape
        per_frame = cfg.samples_per_frame
        f0 = f0.astype(jnp.float32)
        # Per-frame phase increment in cycles per sample, per harmonic. The reference computes
        # it per sample and averages it back to frames with linear interpolation at frame
        # centres, which returns exactly these per-frame values (and drops its random initial
        # phase, which only touched sample 0).
        cycles = jnp.mod(f0[:, :, None] * jnp.arange(1, cfg.harmonics + 1, dtype=jnp.float32) / f32(cfg.sampling_rate), 1.0)
        frame_phase = jnp.cumsum(cycles, axis=1) * f32(2) * f32(np.pi) * f32(per_frame)  # [B, T, H] radians
        # Linear upsampling by `per_frame` (align_corners=False), with torch's float32 indexing.
        i0, i1, lam = _linear_upsample_taps(t, per_frame)
        phase = frame_phase[:, i0] * (f32(1) - lam)[:, None] + frame_phase[:, i1] * lam[:, None]
        sines = jnp.sin(phase) * f32(cfg.nsf_alpha)
        voiced = jnp.repeat((f0 > cfg.nsf_voiced_threshold).astype(jnp.float32), per_frame, axis=1)[:, :, None]
        noise_amp = voiced * f32(cfg.nsf_sigma) + (f32(1) - voiced) * f32(cfg.nsf_alpha) / f32(3)
        sine_waves = sines * voiced + noise_amp * noise.astype(jnp.float32)
        return jnp.tanh(self.l_linear(sine_waves)[..., 0])


def _linear_upsample_taps(frames: int, factor: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices and weights of torch's linear interpolation by `factor` (align_corners=False):
    source position max(0, (n + 0.5) * float32(1/factor) - 0.5), computed in float32 as torch does."""
    f32 = np.float32
    n = np.arange(frames * factor, dtype=f32)
    src = np.maximum(f32(1.0 / factor) * (n + f32(0.5)) - f32(0.5), f32(0))
    i0 = np.minimum(np.floor(src).astype(np.int32), frames - 1)
    lam = np.clip(src - i0.astype(f32), f32(0), f32(1)).astype(f32)
    i1 = np.minimum(i0 + 1, frames - 1)
    return i0, i1, lam


# ----------------------------------------------------------------------------- STFT


def stft(x: jax.Array, n_fft: int, hop: int) -> jax.Array:
    """torch.stft(center=True, reflect pad, periodic Hann, onesided) of [B, L] as
    [B, L // hop + 1, 2 * (n_fft // 2 + 1)] = [Re bins, Im bins] (channels-last)."""
    spectrum = dsp.stft(x, n_fft, hop, dsp.hann_window(n_fft), pad=n_fft // 2)
    return jnp.concatenate([spectrum.real, spectrum.imag], axis=-1)


def istft(magnitude: jax.Array, phase: jax.Array, n_fft: int, hop: int) -> jax.Array:
    """torch.istft(center=True, periodic Hann, length=None) of magnitude * exp(i phase)
    [B, M, bins] -> [B, (M - 1) * hop]."""
    sin, cos = sin_cos(phase)
    return dsp.istft(jax.lax.complex(magnitude * cos, magnitude * sin), n_fft, hop, dsp.hann_window(n_fft))


# ----------------------------------------------------------------------------- the vocoder


class HiFTVocoder(nnx.Module):
    """CosyVoice 2's HiFTGenerator. Submodule names follow the release's hift.pt."""

    def __init__(self, cfg: HiFTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dtype, param_dtype, precision = as_dtype(cfg.dtype), as_dtype(cfg.param_dtype), as_precision(cfg.precision)
        conv = dict(dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
        self.f0_predictor = F0Predictor(cfg, rngs=rngs)
        self.m_source = HarmonicSource(cfg, rngs=rngs)
        self.conv_pre = WeightNormConv1d(cfg.in_channels, cfg.base_channels, 7, padding=3, torch_default_init=True, **conv)
        self.ups = nnx.List([
            WeightNormConvTranspose1d(cfg.base_channels // 2**i, cfg.stage_channels(i), k, u, padding=(k - u) // 2, **conv)
            for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes))
        ])
        spec_channels = cfg.n_fft + 2
        self.source_downs = nnx.List()
        for i in range(len(cfg.upsample_rates)):
            # the STFT frame rate is the last stage's rate; stage i is prod(rates[i+1:]) slower
            d = math.prod(cfg.upsample_rates[i + 1 :])
            if d == 1:
                self.source_downs.append(Conv1d(spec_channels, cfg.stage_channels(i), 1, **conv))
            else:
                self.source_downs.append(Conv1d(spec_channels, cfg.stage_channels(i), 2 * d, stride=d, padding=d // 2, **conv))
        self.source_resblocks = nnx.List([
            ResBlock(cfg.stage_channels(i), k, ds, **conv)
            for i, (k, ds) in enumerate(zip(cfg.source_resblock_kernel_sizes, cfg.source_resblock_dilation_sizes))
        ])
        self.resblocks = nnx.List([
            ResBlock(cfg.stage_channels(i), k, ds, **conv)
            for i in range(len(cfg.upsample_rates))
            for k, ds in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes)
        ])
        self.conv_post = WeightNormConv1d(cfg.stage_channels(len(cfg.upsample_rates) - 1), spec_channels, 7, padding=3, **conv)

    def fold_weight_norm(self) -> "HiFTVocoder":
        """An inference copy with every kernel W = g * v / ||v|| computed once (g dropped, v
        holding W), so calls skip the fold. It cannot be exported to hift.pt (g and v are gone)
        or fine-tuned in the weight-norm parametrisation; keep the original for that."""
        folded = nnx.clone(self)
        convs = [m for _, m in nnx.iter_graph(folded) if isinstance(m, (WeightNormConv1d, WeightNormConvTranspose1d))]
        for conv in convs:
            if conv.g is not None:
                conv.v = nnx.Param(conv.kernel().astype(conv.v.dtype), out_sharding=KERNEL)
                conv.g = None
        return folded

    @property
    def is_folded(self) -> bool:
        return any(isinstance(m, (WeightNormConv1d, WeightNormConvTranspose1d)) and m.g is None for _, m in nnx.iter_graph(self))

    # -- the three parts, usable on their own (tests feed recorded intermediates)

    def f0(self, mel: jax.Array) -> jax.Array:
        """mel [B, n_mels, T] -> f0 [B, T] Hz."""
        return self.f0_predictor(mel)

    def source(self, f0: jax.Array, *, key: jax.Array | None = None, noise: jax.Array | None = None) -> jax.Array:
        """f0 [B, T] -> harmonic-plus-noise excitation [B, T * samples_per_frame]. The noise is
        drawn from `key` ([B, L, harmonics] standard normal) unless given as `noise`."""
        b, t = f0.shape
        shape = (b, t * self.cfg.samples_per_frame, self.cfg.harmonics)
        if noise is None:
            if key is None:
                raise ValueError("HiFTVocoder: the source noise needs a PRNG key (key=...) or recorded noise (noise=...)")
            noise = standard_normal(key, shape)
        elif tuple(noise.shape) != shape:
            raise ValueError(f"HiFTVocoder: noise has shape {tuple(noise.shape)}, expected {shape} [B, L, harmonics]")
        return self.m_source(f0, noise)

    def decode(self, mel: jax.Array, source: jax.Array) -> jax.Array:
        """mel [B, n_mels, T] and source [B, L] -> waveform [B, L], clamped to +-audio_limit."""
        cfg = self.cfg
        dtype = as_dtype(cfg.dtype)
        spec = shd.constrain(stft(source, cfg.n_fft, cfg.hop_len), ACTIVATION).astype(dtype)
        x = self.conv_pre(mel.astype(dtype).transpose(0, 2, 1))
        kernels = len(cfg.resblock_kernel_sizes)
        stages = len(cfg.upsample_rates)
        for i in range(stages):
            x = self.ups[i](jax.nn.leaky_relu(x, cfg.lrelu_slope))
            if i == stages - 1:
                x = jnp.concatenate([x[:, 1:2], x], axis=1)  # ReflectionPad1d((1, 0))
            fused = self.source_resblocks[i](self.source_downs[i](spec))
            if fused.shape[1] != x.shape[1]:
                raise ValueError(f"HiFT stage {i}: source branch has {fused.shape[1]} steps, the decoder {x.shape[1]} (config mismatch)")
            x = shd.constrain(x + fused, ACTIVATION)
            total = self.resblocks[i * kernels](x)
            for j in range(1, kernels):
                total = total + self.resblocks[i * kernels + j](x)
            x = shd.constrain(total / kernels, ACTIVATION)
        x = self.conv_post(jax.nn.leaky_relu(x, 0.01)).astype(jnp.float32)  # torch default slope here
        bins = cfg.n_fft // 2 + 1
        magnitude = jnp.minimum(jnp.exp(x[..., :bins]), 100.0)
        phase = sin_cos(x[..., bins:])[0]  # the reference's phase angle is sin(raw channel)
        waveform = istft(magnitude, phase, cfg.n_fft, cfg.hop_len)
        return jnp.clip(waveform, -cfg.audio_limit, cfg.audio_limit)

    def __call__(
        self,
        mel: jax.Array,
        *,
        key: jax.Array | None = None,
        noise: jax.Array | None = None,
        cache_source: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """HiFTGenerator.inference: mel [B, n_mels, T] (natural-log mel, the flow's output
        layout) -> (waveform [B, L], source [B, L]), L = T * samples_per_frame.

        `cache_source` [B, C] (streaming) replaces the first C source samples, so a chunk that
        starts with the previous chunk's last frames continues its excitation seamlessly.
        NaN checks need concrete values: call `synthesize` (or `check_mel`) outside jit."""
        check_mel(mel, self.cfg)
        mel = shd.constrain(mel, ("batch", None, "length"))
        f0 = self.f0(mel)
        source = self.source(f0, key=key, noise=noise)
        if cache_source is not None and cache_source.shape[-1]:
            if cache_source.shape[0] != source.shape[0] or cache_source.shape[-1] > source.shape[-1]:
                raise ValueError(f"cache_source {tuple(cache_source.shape)} does not fit a source of shape {tuple(source.shape)}")
            source = source.at[:, : cache_source.shape[-1]].set(cache_source.astype(source.dtype))
        return self.decode(mel, source), source


def check_mel(mel: Any, cfg: HiFTConfig) -> None:
    """Refuses a mel the vocoder cannot use, naming the problem. Values (NaN/inf) are checked
    only when `mel` is concrete (not inside jit)."""
    shape = tuple(np.shape(mel))
    if len(shape) != 3 or shape[1] != cfg.in_channels:
        raise ValueError(f"HiFT: mel must be [batch, {cfg.in_channels}, frames], got shape {shape}")
    if shape[2] < 1:
        raise ValueError("HiFT: mel has no frames")
    if isinstance(mel, jax.core.Tracer):
        return
    finite = np.isfinite(np.asarray(jax.device_get(mel), dtype=np.float32))
    if not finite.all():
        b, _, t = np.argwhere(~finite)[0]
        raise ValueError(f"HiFT: mel holds {int((~finite).sum())} NaN/inf value(s) (first at batch row {b}, frame {t}); the flow decoder output is broken")


# ----------------------------------------------------------------------------- running


@nnx.jit
def _synthesize(vocoder: HiFTVocoder, mel: jax.Array, key: jax.Array, cache_source: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    return vocoder(mel, key=key, cache_source=cache_source)


def synthesize(vocoder: HiFTVocoder, mel: Any, *, key: jax.Array, cache_source: Any = None) -> tuple[jax.Array, jax.Array]:
    """Checked, jit-compiled `vocoder(mel, key=key, cache_source=...)` (one compile per shape)."""
    check_mel(mel, vocoder.cfg)
    if cache_source is not None and np.shape(cache_source)[-1] == 0:
        cache_source = None
    return _synthesize(vocoder, jnp.asarray(mel), key, None if cache_source is None else jnp.asarray(cache_source))


# ----------------------------------------------------------------------------- streaming


MEL_CACHE_FRAMES = 8  # CosyVoice2Model.mel_cache_len


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class StreamCache:
    """What one streamed chunk hands the next (CosyVoice2Model.hift_cache_dict)."""

    mel: jax.Array  # [B, n_mels, MEL_CACHE_FRAMES]: the last frames, vocoded again with the next chunk
    source: jax.Array  # [B, S]: their excitation, reused so the phase runs on (S = frames * samples_per_frame)
    speech: jax.Array  # [B, S]: audio held back, cross-faded into the next chunk's start


def fade_window(samples: int) -> np.ndarray:
    """np.hamming(2 * samples): the first half fades in, the second half fades out."""
    return np.hamming(2 * samples).astype(np.float32)


def fade_in_out(fade_in: Any, fade_out: Any, window: np.ndarray) -> np.ndarray:
    """cosyvoice.utils.common.fade_in_out: the first n = len(window) / 2 samples of `fade_in`
    become fade_in[:n] * window[:n] + fade_out[-n:] * window[n:]; the rest is unchanged."""
    # On the host: chunk lengths vary, and an eager jnp op would compile once per length.
    fade_in, fade_out = np.asarray(fade_in), np.asarray(fade_out)
    n = window.shape[0] // 2
    head = fade_in[..., :n] * window[:n] + fade_out[..., -n:] * window[n:]
    return np.concatenate([head, fade_in[..., n:]], axis=-1).astype(fade_in.dtype)


def stream_step(
    vocoder: HiFTVocoder,
    mel: Any,
    cache: StreamCache | None,
    *,
    key: jax.Array,
    finalize: bool,
    cache_frames: int = MEL_CACHE_FRAMES,
    pad_to: int | None = None,
    pad_value: float = 0.0,
) -> tuple[np.ndarray, StreamCache | None]:
    """Vocodes one chunk of a stream, as CosyVoice2Model.token2wav does after the flow.

    mel [B, n_mels, T_chunk] is the new mel (frames not vocoded before); `cache` is None for the
    first chunk. Returns (audio [B, n], cache for the next chunk, or None once `finalize`).
    Unless finalizing, the last cache_frames * samples_per_frame samples are held back and
    faded into the next chunk; concatenating every returned chunk gives the whole utterance.
    Use a fresh `key` per chunk.

    `pad_to`: the chunk (cached frames included) is padded with `pad_value` frames up to this
    many frames and the padding's audio cut off, so chunks of different lengths share one
    compiled vocoder (streaming callers pad to a few fixed buckets). Everything but the
    vocoder itself runs on the host (numpy), so no chunk length compiles anything else."""
    cfg = vocoder.cfg
    per = cfg.samples_per_frame
    held = cache_frames * per
    mel = np.asarray(jax.device_get(mel))
    if cache is not None:
        mel = np.concatenate([np.asarray(cache.mel, mel.dtype), mel], axis=2)
    frames = mel.shape[2]
    padded = mel
    if pad_to is not None and pad_to > frames:
        padded = np.pad(mel, ((0, 0), (0, 0), (0, pad_to - frames)), constant_values=pad_value)
    speech, source = synthesize(vocoder, padded, key=key, cache_source=None if cache is None else cache.source)
    speech = np.asarray(jax.device_get(speech))[:, : frames * per]
    source = np.asarray(jax.device_get(source))[:, : frames * per]
    if cache is not None:
        speech = fade_in_out(speech, cache.speech, fade_window(held))
    if finalize:
        return speech, None
    if speech.shape[1] <= held:
        raise ValueError(f"stream_step: a chunk must be longer than the {cache_frames} cached frames (got {frames} frames in all)")
    new_cache = StreamCache(mel=mel[:, :, -cache_frames:], source=source[:, -held:], speech=speech[:, -held:])
    return speech[:, :-held], new_cache
