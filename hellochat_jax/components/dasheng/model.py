"""Dasheng audio encoder: 16 kHz waveform -> log-mel -> ViT over 40 ms patches (25 Hz features).

The computation follows the dasheng 0.0.9 release (see tests/fixtures/dasheng-tiny/fixture.json):

    waveform [B, S]
      -> log-mel [B, T, 64]: reflect-padded STFT (n_fft 512, hop 160, periodic Hann), power,
         HTK mel bank, 10*log10(max(., 1e-10)), floored at max - 120 dB
      -> BatchNorm over the 64 mel bins (stored statistics)
      -> patch embedding: one (64 mel x 4 frame) patch per 40 ms over the whole spectrogram
      -> chunks of 252 patches (10.08 s) encoded independently: + time position (restarting
         in every chunk) + frequency position, pre-norm ViT blocks, final LayerNorm
      -> features [B, N = T // 4, D]

Padding: a key-padding mask from the true lengths (patch n is valid when n < length // 640)
keeps padded patches out of every valid patch's attention. A chunk whose keys are all padded
gets uniform attention (never NaN); its outputs are padding and carry no meaning.

Long audio: ``encode_long`` runs the same computation segment by segment (a few chunks at a
time) so memory stays bounded for hours of audio; its output equals ``__call__``'s.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hellochat_jax.core import dsp
from hellochat_jax.core.layers import (
    LayerNorm,
    Linear,
    as_dtype,
    as_precision,
    gelu_exact,
    param,
)
from hellochat_jax.core.sharding import constrain

AMIN = 1e-10  # power floor before the log: -100 dB
BATCHNORM_EPS = 1e-5
LAYERNORM_EPS = 1e-6
FRAMES_PER_PATCH = 4


@dataclasses.dataclass(frozen=True)
class DashengConfig:
    """Field names follow the release checkpoint's ``config`` dict. Frozen: it is a static
    (hashable) argument of compiled functions."""

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    init_values: float | None = None  # LayerScale init; None = no LayerScale (all releases)
    patch_size: tuple[int, int] = (64, 4)
    patch_stride: tuple[int, int] = (64, 4)
    target_length: int = 1008  # frames per chunk (10.08 s) -> 252 patches
    n_fft: int = 512
    n_mels: int = 64
    hop_size: int = 160
    win_size: int = 512
    f_min: float = 0.0
    f_max: float = 8000.0
    center: bool = True
    sample_rate: int = 16000
    top_db: float | None = 120.0
    # The reference floors at (max over the WHOLE BATCH) - top_db; True floors each row at its
    # own max - top_db, so a row's features do not depend on what it is batched with.
    top_db_per_sample: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"
    precision: str | None = None  # "highest" for parity checks

    def __post_init__(self):
        object.__setattr__(self, "patch_size", tuple(self.patch_size))
        object.__setattr__(self, "patch_stride", tuple(self.patch_stride))
        if self.embed_dim % self.num_heads:
            raise ValueError(f"Dasheng: embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        # The release hard-codes 40 ms patches (length // (hop * 4)) and one patch row over all
        # mel bins; other patch shapes would make its key mask inconsistent, so we refuse them.
        if self.patch_size != self.patch_stride or self.patch_size != (self.n_mels, FRAMES_PER_PATCH):
            raise ValueError(
                f"Dasheng: only non-overlapping ({self.n_mels}, {FRAMES_PER_PATCH}) patches are supported, "
                f"got patch_size {self.patch_size}, patch_stride {self.patch_stride}"
            )
        if self.target_length % FRAMES_PER_PATCH:
            raise ValueError(f"Dasheng: target_length {self.target_length} is not a multiple of {FRAMES_PER_PATCH}")
        if self.win_size > self.n_fft:
            raise ValueError(f"Dasheng: win_size {self.win_size} > n_fft {self.n_fft}")

    @property
    def chunk_patches(self) -> int:
        """Patches per independently encoded chunk (252 = 10.08 s)."""
        return self.target_length // FRAMES_PER_PATCH

    @property
    def samples_per_patch(self) -> int:
        return self.hop_size * FRAMES_PER_PATCH

    @property
    def mlp_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    # ------------------------------------------------------------------ presets and formats

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "DashengConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown Dasheng preset {name!r}; known: {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_release(cls, config: dict[str, Any], **overrides: Any) -> "DashengConfig":
        """From the ``config`` dict of a dasheng release ``.pt``."""
        config = dict(config)
        pooling = config.pop("pooling", "mean")
        if pooling == "token":
            raise ValueError("Dasheng: pooling='token' (a cls token) is not supported; the releases use 'mean'")
        known = {f.name for f in dataclasses.fields(cls)}
        # Training-only knobs of the release class that do not change inference.
        ignored = {"drop_rate", "attn_drop_rate", "time_patch_out", "freq_patch_out", "eval_avg", "block_type",
                   "attention_type", "norm_layer", "act_layer", "group_masking"}
        unknown = sorted(set(config) - known - ignored)
        if unknown:
            raise ValueError(f"Dasheng release config: unknown key(s) {unknown}")
        return cls(**{k: v for k, v in config.items() if k in known}, **overrides)

    def to_release(self) -> dict[str, Any]:
        return {
            "patch_size": list(self.patch_size), "patch_stride": list(self.patch_stride),
            "embed_dim": self.embed_dim, "depth": self.depth, "num_heads": self.num_heads,
            "mlp_ratio": self.mlp_ratio, "qkv_bias": self.qkv_bias, "init_values": self.init_values,
            "target_length": self.target_length, "pooling": "mean", "n_fft": self.n_fft,
            "n_mels": self.n_mels, "hop_size": self.hop_size, "win_size": self.win_size,
            "f_min": self.f_min, "f_max": self.f_max, "center": self.center,
        }

    @classmethod
    def from_hf(cls, config: dict[str, Any], **overrides: Any) -> "DashengConfig":
        """From MiDashengLM's ``audio_encoder_config`` (hop_length/win_length naming)."""
        config = dict(config)
        if config.pop("input_channels", 1) != 1:
            raise ValueError("Dasheng: only input_channels=1 is supported")
        renames = {"hop_length": "hop_size", "win_length": "win_size"}
        config = {renames.get(k, k): v for k, v in config.items()}
        return cls.from_release(config, **overrides)

    def to_hf(self) -> dict[str, Any]:
        return {
            "embed_dim": self.embed_dim, "patch_size": list(self.patch_size),
            "patch_stride": list(self.patch_stride), "input_channels": 1,
            "target_length": self.target_length, "depth": self.depth, "num_heads": self.num_heads,
            "mlp_ratio": self.mlp_ratio, "qkv_bias": self.qkv_bias, "init_values": self.init_values,
            "f_min": self.f_min, "f_max": self.f_max, "center": self.center,
            "win_length": self.win_size, "hop_length": self.hop_size, "sample_rate": self.sample_rate,
            "n_fft": self.n_fft, "n_mels": self.n_mels,
        }


PRESETS: dict[str, dict[str, Any]] = {
    "dasheng-base": dict(embed_dim=768, depth=12, num_heads=12),
    "dasheng-0.6b": dict(embed_dim=1280, depth=32, num_heads=16),
    "dasheng-1.2b": dict(embed_dim=1536, depth=40, num_heads=24),
    "tiny": dict(embed_dim=64, depth=2, num_heads=4),
}


# ============================================================================ front end
# Pure functions of the config on top of core.dsp: the window and mel bank are constants.


def hann_window(cfg: DashengConfig) -> np.ndarray:
    """Periodic Hann window [win_size] (torch.hann_window's default)."""
    return dsp.hann_window(cfg.win_size)


def mel_filterbank(cfg: DashengConfig) -> np.ndarray:
    """torchaudio's HTK mel bank [n_fft // 2 + 1, n_mels] (no normalisation, float32)."""
    return dsp.htk_mel_filterbank(cfg.sample_rate, cfg.n_fft, cfg.n_mels, cfg.f_min, cfg.f_max)


def num_frames(num_samples: int, cfg: DashengConfig) -> int:
    if cfg.center:
        return 1 + num_samples // cfg.hop_size
    return 1 + (num_samples - cfg.n_fft) // cfg.hop_size


def pad_for_stft(waveform: jax.Array | np.ndarray, cfg: DashengConfig):
    """Centre padding: reflect n_fft // 2 samples at both ends (needs more than that many)."""
    return dsp.pad_ends(waveform, cfg.n_fft // 2) if cfg.center else waveform


def power_mel(padded: jax.Array, cfg: DashengConfig, frames: int | None = None) -> jax.Array:
    """Mel power [B, frames, n_mels] of an already padded waveform [B, S']; frame f reads
    samples [f * hop, f * hop + n_fft)."""
    spectrum = dsp.stft(padded, cfg.n_fft, cfg.hop_size, hann_window(cfg), num_frames=frames)
    return dsp.apply_filterbank(dsp.power_spectrum(spectrum), mel_filterbank(cfg))


def to_db(mel: jax.Array) -> jax.Array:
    return dsp.power_to_db(mel, AMIN)


def db_peak(db: jax.Array, cfg: DashengConfig) -> jax.Array:
    """The level top_db is measured from: [B, 1, 1] per sample, or [1, 1, 1] batch-wide."""
    if cfg.top_db_per_sample:
        return db.max(axis=(1, 2), keepdims=True)
    return db.max(keepdims=True)


def floor_db(db: jax.Array, peak: jax.Array, cfg: DashengConfig) -> jax.Array:
    if cfg.top_db is None:
        return db
    return dsp.floor_below_peak(db, peak, cfg.top_db)


def log_mel(waveform: jax.Array, cfg: DashengConfig) -> jax.Array:
    """Waveform [B, S] (16 kHz) -> log-mel [B, frames, n_mels] in dB (time-major)."""
    db = to_db(power_mel(pad_for_stft(waveform, cfg), cfg))
    return floor_db(db, db_peak(db, cfg), cfg)


# ============================================================================ encoder


class MelBatchNorm(nnx.Module):
    """Eval-mode BatchNorm over the mel bins with the stored running statistics."""

    def __init__(self, n_mels: int, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.scale = param(rngs, nnx.initializers.ones_init(), (n_mels,), ("conv",), param_dtype)
        self.bias = param(rngs, nnx.initializers.zeros_init(), (n_mels,), ("conv",), param_dtype)
        # Stored in the checkpoint's dtype (bit-exact export), applied in float32.
        self.mean = nnx.BatchStat(jnp.zeros((n_mels,), param_dtype), out_sharding=("conv",))
        self.var = nnx.BatchStat(jnp.ones((n_mels,), param_dtype), out_sharding=("conv",))
        # Kept only so that export reproduces the release checkpoint bit for bit.
        self.num_batches_tracked = nnx.BatchStat(jnp.zeros((), jnp.int32), out_sharding=())

    def __call__(self, mel_db: jax.Array) -> jax.Array:
        f32 = lambda v: v[...].astype(jnp.float32)
        inv = jax.lax.rsqrt(f32(self.var) + BATCHNORM_EPS) * f32(self.scale)
        return (mel_db - f32(self.mean)) * inv + f32(self.bias)


class Attention(nnx.Module):
    """Multi-head self-attention with a key-padding mask. q, k, v come from one fused
    projection stored as [embed, 3, embed] so the head axis shards cleanly."""

    def __init__(self, cfg: DashengConfig, *, rngs: nnx.Rngs):
        d, pd = cfg.embed_dim, as_dtype(cfg.param_dtype)
        self.num_heads = cfg.num_heads
        self.qkv_kernel = param(rngs, nnx.initializers.lecun_normal(), (d, 3, d), ("audio_embed", None, "audio_mlp"), pd)
        self.qkv_bias = param(rngs, nnx.initializers.zeros_init(), (3, d), (None, "audio_mlp"), pd) if cfg.qkv_bias else None
        self.proj = Linear(d, d, names=("audio_mlp", "audio_embed"), dtype=as_dtype(cfg.dtype), param_dtype=pd,
                           precision=cfg.precision, rngs=rngs)
        self.dtype = as_dtype(cfg.dtype)
        self.precision = as_precision(cfg.precision)

    def __call__(self, x: jax.Array, key_valid: jax.Array) -> jax.Array:
        b, n, d = x.shape
        head_dim = d // self.num_heads
        qkv = jnp.einsum("bnd,dte->tbne", x.astype(self.dtype), self.qkv_kernel[...].astype(self.dtype), precision=self.precision)
        if self.qkv_bias is not None:
            qkv = qkv + self.qkv_bias[...].astype(self.dtype)[:, None, None, :]
        q, k, v = (t.reshape(b, n, self.num_heads, head_dim) for t in qkv)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=self.precision).astype(jnp.float32) * head_dim**-0.5
        # finfo.min rather than -inf: a row whose keys are all padded becomes uniform, not NaN.
        scores = jnp.where(key_valid[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v, precision=self.precision).reshape(b, n, d)
        return self.proj(out)


class Mlp(nnx.Module):
    def __init__(self, cfg: DashengConfig, *, rngs: nnx.Rngs):
        kw = dict(dtype=as_dtype(cfg.dtype), param_dtype=as_dtype(cfg.param_dtype), precision=cfg.precision, rngs=rngs)
        self.fc1 = Linear(cfg.embed_dim, cfg.mlp_dim, names=("audio_embed", "audio_mlp"), **kw)
        self.fc2 = Linear(cfg.mlp_dim, cfg.embed_dim, names=("audio_mlp", "audio_embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(gelu_exact(self.fc1(x)))


class LayerScale(nnx.Module):
    def __init__(self, dim: int, init_values: float, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.gamma = param(rngs, nnx.initializers.constant(init_values), (dim,), ("audio_embed",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x * self.gamma[...].astype(x.dtype)


class Block(nnx.Module):
    """Pre-norm ViT block: x += attn(LN(x)); x += mlp(LN(x)) (optionally LayerScale'd)."""

    def __init__(self, cfg: DashengConfig, *, rngs: nnx.Rngs):
        pd = as_dtype(cfg.param_dtype)
        self.norm1 = LayerNorm(cfg.embed_dim, eps=LAYERNORM_EPS, names=("audio_embed",), param_dtype=pd, rngs=rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.norm2 = LayerNorm(cfg.embed_dim, eps=LAYERNORM_EPS, names=("audio_embed",), param_dtype=pd, rngs=rngs)
        self.mlp = Mlp(cfg, rngs=rngs)
        if cfg.init_values:
            self.ls1 = LayerScale(cfg.embed_dim, cfg.init_values, param_dtype=pd, rngs=rngs)
            self.ls2 = LayerScale(cfg.embed_dim, cfg.init_values, param_dtype=pd, rngs=rngs)
        else:
            self.ls1 = self.ls2 = None

    def __call__(self, x: jax.Array, key_valid: jax.Array) -> jax.Array:
        h = self.attn(self.norm1(x), key_valid)
        x = x + (self.ls1(h) if self.ls1 is not None else h)
        h = self.mlp(self.norm2(x))
        x = x + (self.ls2(h) if self.ls2 is not None else h)
        return constrain(x, ("batch", "length", "audio_embed"))


class DashengEncoder(nnx.Module):
    """Waveform [B, S] at 16 kHz -> features [B, N, embed_dim] at 25 Hz, plus their validity."""

    def __init__(self, cfg: DashengConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, pd = cfg.embed_dim, as_dtype(cfg.param_dtype)
        self.init_bn = MelBatchNorm(cfg.n_mels, param_dtype=pd, rngs=rngs)
        # Patch embedding = a (n_mels x 4) stride-(n_mels x 4) Conv2d, stored HWIO like any conv.
        self.patch_kernel = param(rngs, nnx.initializers.lecun_normal(in_axis=(0, 1, 2), out_axis=3),
                                  (cfg.n_mels, FRAMES_PER_PATCH, 1, d), ("conv", "conv", None, "audio_embed"), pd)
        self.patch_bias = param(rngs, nnx.initializers.zeros_init(), (d,), ("audio_embed",), pd)
        self.time_pos_embed = param(rngs, nnx.initializers.normal(0.02), (cfg.chunk_patches, d), (None, "audio_embed"), pd)
        self.freq_pos_embed = param(rngs, nnx.initializers.normal(0.02), (1, d), (None, "audio_embed"), pd)
        self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.depth)])
        self.norm = LayerNorm(d, eps=LAYERNORM_EPS, names=("audio_embed",), param_dtype=pd, rngs=rngs)

    # ---------------------------------------------------------------- pieces

    def num_patches(self, num_samples: int) -> int:
        return num_frames(num_samples, self.cfg) // FRAMES_PER_PATCH

    def valid_patches(self, lengths: jax.Array | None, batch: int, patches: int) -> jax.Array:
        """[B] number of valid patches: length // (hop * 4), the release's 40 ms rule
        (integer division; the release divides in float32 and truncates, the same up to ~17 min)."""
        if lengths is None:
            return jnp.full((batch,), patches, jnp.int32)
        return jnp.minimum(jnp.asarray(lengths, jnp.int32) // self.cfg.samples_per_patch, patches)

    def embed_patches(self, mel_db: jax.Array) -> jax.Array:
        """Normalised log-mel [B, T, n_mels] -> patch embeddings [B, T // 4, D]."""
        b, t, m = mel_db.shape
        patches = t // FRAMES_PER_PATCH  # trailing frames that do not fill a patch are dropped
        if patches == 0:
            raise ValueError(f"Dasheng: {t} mel frames are fewer than one {FRAMES_PER_PATCH}-frame patch")
        x = self.init_bn(mel_db[:, : patches * FRAMES_PER_PATCH])
        # [B, t, 4 frames, M] -> one row per patch; the kernel is reordered (frame, mel) to match.
        x = x.reshape(b, patches, FRAMES_PER_PATCH * m)
        dtype = as_dtype(self.cfg.dtype)
        kernel = self.patch_kernel[...].transpose(1, 0, 2, 3).reshape(FRAMES_PER_PATCH * m, -1).astype(dtype)
        x = jnp.dot(x.astype(dtype), kernel, precision=as_precision(self.cfg.precision))
        return x + self.patch_bias[...].astype(dtype)

    def encode_patches(self, x: jax.Array, valid: jax.Array) -> jax.Array:
        """Patch embeddings [B, N, D] -> features [B, N, D], chunk by chunk of 252 patches.

        ``valid`` [B] counts each row's valid patches; later patches are masked as keys.
        Chunks are folded into the batch axis: they never attend to each other.
        """
        b, n, d = x.shape
        c = min(self.cfg.chunk_patches, n)  # audio shorter than a chunk is not padded to one
        chunks = -(-n // c)
        x = jnp.pad(x, ((0, 0), (0, chunks * c - n), (0, 0)))
        key_valid = jnp.arange(chunks * c)[None, :] < valid[:, None]
        x = x.reshape(b, chunks, c, d) + (self.time_pos_embed[:c] + self.freq_pos_embed[...]).astype(x.dtype)
        x = constrain(x.reshape(b * chunks, c, d), ("batch", "length", "audio_embed"))
        key_valid = key_valid.reshape(b * chunks, c)
        for block in self.blocks:
            x = block(x, key_valid)
        x = self.norm(x)
        return x.reshape(b, chunks * c, d)[:, :n]

    # ---------------------------------------------------------------- entry points

    def __call__(self, waveform: jax.Array, lengths: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """Waveform [B, S] (rows zero-padded past ``lengths``) -> (features [B, N, D],
        valid [B, N] bool). N = (1 + S // 160) // 4."""
        return self.encode_mel(log_mel(waveform, self.cfg), lengths)

    def encode_mel(self, mel_db: jax.Array, lengths: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        x = self.embed_patches(mel_db)
        b, n, _ = x.shape
        valid = self.valid_patches(lengths, b, n)
        features = self.encode_patches(x, valid)
        return features, jnp.arange(n)[None, :] < valid[:, None]


# ============================================================================ long audio


@nnx.jit(static_argnames=("cfg", "frames"))
def _segment_peak(padded_segment: jax.Array, frames_left: jax.Array, *, cfg: DashengConfig, frames: int) -> jax.Array:
    db = to_db(power_mel(padded_segment, cfg, frames))
    db = jnp.where(jnp.arange(frames)[None, :, None] < frames_left, db, -jnp.inf)
    return db.max(axis=(1, 2))


@nnx.jit(static_argnames=("frames",))
def _segment_features(model: DashengEncoder, padded_segment: jax.Array, peak: jax.Array, valid: jax.Array, *, frames: int) -> jax.Array:
    cfg = model.cfg
    db = floor_db(to_db(power_mel(padded_segment, cfg, frames)), peak[:, None, None], cfg)
    return model.encode_patches(model.embed_patches(db), valid)


def encode_long(
    model: DashengEncoder,
    waveform: np.ndarray,
    lengths: np.ndarray | None = None,
    *,
    chunks_per_step: int = 6,
) -> tuple[np.ndarray, np.ndarray]:
    """``model(waveform, lengths)`` for audio of any length with bounded device memory.

    Two passes over segments of ``chunks_per_step`` encoder chunks (each 10.08 s): the first
    finds the dB peak the top_db floor is measured from (it spans the whole input), the second
    computes the features. Each segment's STFT reads exactly the samples the one-shot
    computation would, so the result equals ``__call__`` (up to float rounding) while memory
    grows with ``chunks_per_step``, not with the audio length. Returns host arrays.
    """
    cfg = model.cfg
    waveform = np.asarray(waveform, np.float32)
    b, s = waveform.shape
    total_frames = num_frames(s, cfg)
    total_patches = total_frames // FRAMES_PER_PATCH
    if total_patches == 0:
        raise ValueError(f"Dasheng: {s} samples are fewer than one 40 ms patch")
    lengths = np.full((b,), s, np.int64) if lengths is None else np.asarray(lengths, np.int64)
    valid = np.minimum(lengths // cfg.samples_per_patch, total_patches).astype(np.int32)

    step_patches = chunks_per_step * cfg.chunk_patches
    step_frames = step_patches * FRAMES_PER_PATCH
    steps = -(-total_frames // step_frames)
    padded = pad_for_stft(waveform, cfg)
    # Zeros past the end only feed frames beyond total_frames, which are dropped or masked.
    need = (steps * step_frames - 1) * cfg.hop_size + cfg.n_fft
    padded = np.pad(padded, ((0, 0), (0, max(0, need - padded.shape[1]))))
    seg_samples = (step_frames - 1) * cfg.hop_size + cfg.n_fft

    def segment(i: int) -> jax.Array:
        start = i * step_frames * cfg.hop_size
        return jnp.asarray(padded[:, start : start + seg_samples])

    peak = np.full((b,), -np.inf, np.float32)
    for i in range(steps):
        left = jnp.int32(total_frames - i * step_frames)
        peak = np.maximum(peak, np.asarray(_segment_peak(segment(i), left, cfg=cfg, frames=step_frames)))
    if not cfg.top_db_per_sample:
        peak = np.full_like(peak, peak.max())

    out = np.zeros((b, total_patches, cfg.embed_dim), np.float32)
    for i in range(steps):
        first = i * step_patches
        seg_valid = np.clip(valid - first, 0, step_patches).astype(np.int32)
        feats = _segment_features(model, segment(i), jnp.asarray(peak), jnp.asarray(seg_valid), frames=step_frames)
        keep = min(step_patches, total_patches - first)
        out[:, first : first + keep] = np.asarray(feats[:, :keep], np.float32)
    return out, np.arange(total_patches)[None, :] < valid[:, None]
