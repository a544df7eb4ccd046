"""S3Tokenizer v2: 16 kHz speech -> 25 Hz discrete speech tokens (CosyVoice 2's tokenizer).

    waveform --log_mel_128--> 128-bin log-mel, 100 Hz
      --conv1 (stride 2) + GELU, conv2 (stride 2) + GELU--> 25 Hz, width D
      --N x [LayerNorm -> FSMN-memory attention with 64-dim RoPE; LayerNorm -> MLP]-->
      --FSQ: project to 8 dims, tanh, round to {-1, 0, 1}--> token = sum_i (h_i + 1) 3^i

Layouts are channels-last: mel [B, T, n_mels], hidden [B, T', D]. Rows of a batch carry their
own lengths; every step masks the padding the way the reference (the `s3tokenizer` package,
model_v2.py) does, so a row's tokens do not depend on what it is batched with.

`tokenize` is the host-level entry: it applies the reference's rule for audio over 30 s
(overlapping 30 s windows, merged by dropping half of each 4 s overlap).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hellochat_jax.core import dsp
from hellochat_jax.core import sharding as shd
from hellochat_jax.core.layers import (
    LayerNorm,
    Linear,
    Names,
    as_dtype,
    as_precision,
    gelu_exact,
    param,
)
from hellochat_jax.core.sharding import constrain

SAMPLE_RATE = 16000
N_FFT = 400
HOP = 160
N_MELS = 128
ROPE_DIM = 64  # the reference's rotary table is fixed at 64 dims, whatever the head count
ROPE_THETA = 10000.0
FSMN_KERNEL = 31
FSQ_DIM = 8
FSQ_LEVELS = 3
FSQ_SCALE = np.float32(0.999)  # keeps tanh away from +-1 so rounding never reaches +-2

# Long audio (the reference's S3TokenizerV2.quantize): rows over 30 s are cut into 30 s windows
# every 26 s; of each 4 s overlap, 2 s of tokens are dropped from either side.
MAX_FRAMES = 30 * SAMPLE_RATE // HOP  # 3000 mel frames
STRIDE_FRAMES = 26 * SAMPLE_RATE // HOP  # 2600
OVERLAP_DROP_TOKENS = (4 // 2) * 25  # 50 tokens at 25 Hz


@dataclasses.dataclass
class S3TokenizerConfig:
    """The reference's ModelConfig fields (so its config.json reads as is), plus compute settings.

    The released ONNX has no config; its sizes are these defaults.
    """

    n_mels: int = N_MELS
    n_audio_ctx: int = 1500  # unused by v2 (it has no positional table); kept for the reference config
    n_audio_state: int = 1280
    n_audio_head: int = 20
    n_audio_layer: int = 6
    n_codebook_size: int = FSQ_LEVELS**FSQ_DIM
    use_sdpa: bool = False  # a reference-side kernel switch; no effect here
    dtype: str = "float32"
    param_dtype: str = "float32"
    precision: str = "default"  # "highest" for parity on accelerators

    def __post_init__(self):
        if self.n_audio_state % self.n_audio_head:
            raise ValueError(f"n_audio_state ({self.n_audio_state}) is not a multiple of n_audio_head ({self.n_audio_head})")
        if self.head_dim != ROPE_DIM:
            raise ValueError(
                f"S3Tokenizer v2 applies a fixed {ROPE_DIM}-dim RoPE to every head, so n_audio_state / n_audio_head "
                f"must be {ROPE_DIM}; got {self.n_audio_state} / {self.n_audio_head} = {self.head_dim}"
            )
        if self.n_codebook_size != FSQ_LEVELS**FSQ_DIM:
            raise ValueError(f"the v2 FSQ codebook has {FSQ_LEVELS}^{FSQ_DIM} = {FSQ_LEVELS**FSQ_DIM} entries, got n_codebook_size={self.n_codebook_size}")

    @property
    def head_dim(self) -> int:
        return self.n_audio_state // self.n_audio_head

    REFERENCE_FIELDS = ("n_mels", "n_audio_ctx", "n_audio_state", "n_audio_head", "n_audio_layer", "n_codebook_size", "use_sdpa")

    @classmethod
    def from_reference(cls, ref: dict[str, Any], **overrides: Any) -> "S3TokenizerConfig":
        """From the reference ModelConfig as a dict (e.g. a config.json beside the .pt)."""
        unknown = sorted(set(ref) - set(cls.REFERENCE_FIELDS))
        if unknown:
            raise ValueError(f"unknown S3Tokenizer config key(s) {unknown}; known: {list(cls.REFERENCE_FIELDS)}")
        return cls(**{**ref, **overrides})

    def to_reference(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.REFERENCE_FIELDS}


# ----------------------------------------------------------------------------- front end


def log_mel_128(waveforms: jax.Array, lengths: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The package's whisper-style log-mel, computed for a batch of rows with their own lengths.

    waveforms [B, N] float 16 kHz (zero-padded rows), lengths [B] valid samples per row.
    Returns mel [B, N // 160, 128] and mel_lens = lengths // 160; frames past a row's length are 0.

    Each row is computed as if it stood alone: centred STFT (n_fft 400, hop 160, periodic Hann)
    with reflect padding at the row's *own* ends, the last frame dropped, power spectrum,
    Slaney mel filters (librosa's, which the package ships as mel_128), log10 clamped at 1e-10
    and at (that row's max - 8), then (x + 4) / 4.
    Rows need more than 200 samples (the reflect padding); `tokenize` checks that.
    """
    waveforms = jnp.asarray(waveforms, jnp.float32)
    lengths = jnp.asarray(lengths, jnp.int32)
    frames = waveforms.shape[1] // HOP
    spectrum = dsp.stft(waveforms, N_FFT, HOP, dsp.hann_window(N_FFT), pad=N_FFT // 2, lengths=lengths, num_frames=frames)
    mel = dsp.apply_filterbank(dsp.power_spectrum(spectrum), dsp.slaney_mel_filterbank(SAMPLE_RATE, N_FFT, N_MELS))
    log_spec = jnp.log10(jnp.maximum(mel, 1e-10))
    mel_lens = lengths // HOP
    valid = (jnp.arange(frames)[None, :] < mel_lens[:, None])[..., None]
    row_max = jnp.max(jnp.where(valid, log_spec, -jnp.inf), axis=(1, 2), keepdims=True)
    log_spec = dsp.floor_below_peak(log_spec, row_max, 8.0)
    return jnp.where(valid, (log_spec + 4.0) / 4.0, 0.0), mel_lens


# ----------------------------------------------------------------------------- encoder


class Conv1d(nnx.Module):
    """torch.nn.Conv1d on channels-last input; kernel [k, in / groups, out]."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, *, stride: int = 1, padding: tuple[int, int] = (0, 0),
                 groups: int = 1, use_bias: bool = True, names: Names, dtype=jnp.float32, param_dtype=jnp.float32,
                 precision: str | None = None, rngs: nnx.Rngs):
        self.kernel = param(rngs, nnx.initializers.lecun_normal(), (kernel_size, in_ch // groups, out_ch), names, param_dtype)
        self.bias = param(rngs, nnx.initializers.zeros_init(), (out_ch,), names[-1:], param_dtype) if use_bias else None
        self.stride, self.padding, self.groups = stride, padding, groups
        self.dtype, self.precision = dtype, as_precision(precision)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), self.kernel[...].astype(self.dtype), window_strides=(self.stride,),
            padding=[self.padding], dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=self.groups,
            precision=self.precision,
        )
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


def _conv_out_len(n: jax.Array | int) -> jax.Array | int:
    """Output length of a k=3, stride-2, pad-1 convolution (the reference's length rule)."""
    return (n - 1) // 2 + 1


def num_tokens(samples: int) -> int:
    """Tokens of a 16 kHz clip of `samples` samples (100 Hz mel frames, two stride-2 convs)."""
    return _conv_out_len(_conv_out_len(samples // HOP))


def rope_64(x: jax.Array) -> jax.Array:
    """Rotate-half RoPE over the 64 head dims, positions 0..T-1. x [B, T, H, 64]."""
    t = x.shape[1]
    inv_freq = 1.0 / (ROPE_THETA ** (jnp.arange(0, ROPE_DIM, 2, dtype=jnp.float32) / ROPE_DIM))
    angles = jnp.arange(t, dtype=jnp.float32)[:, None] * inv_freq[None, :]  # [T, 32]
    cos = jnp.concatenate([jnp.cos(angles)] * 2, -1)[None, :, None, :].astype(x.dtype)
    sin = jnp.concatenate([jnp.sin(angles)] * 2, -1)[None, :, None, :].astype(x.dtype)
    half = ROPE_DIM // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


class FSMNAttention(nnx.Module):
    """Self-attention with RoPE on q and k (key has no bias), plus an FSMN memory: a depthwise
    31-tap convolution over the (un-rotated) values, added to the attention output."""

    def __init__(self, cfg: S3TokenizerConfig, *, rngs: nnx.Rngs):
        d = cfg.n_audio_state
        common = dict(dtype=as_dtype(cfg.dtype), param_dtype=as_dtype(cfg.param_dtype), precision=cfg.precision, rngs=rngs)
        self.query = Linear(d, d, names=("audio_embed", "heads"), **common)
        self.key = Linear(d, d, names=("audio_embed", "heads"), use_bias=False, **common)
        self.value = Linear(d, d, names=("audio_embed", "heads"), **common)
        self.out = Linear(d, d, names=("heads", "audio_embed"), **common)
        pad = (FSMN_KERNEL - 1) // 2
        self.fsmn = Conv1d(d, d, FSMN_KERNEL, padding=(pad, FSMN_KERNEL - 1 - pad), groups=d, use_bias=False,
                           names=("conv", None, "heads"), **common)
        self.n_head = cfg.n_audio_head
        self.precision = as_precision(cfg.precision)

    def __call__(self, x: jax.Array, valid: jax.Array) -> jax.Array:
        """x [B, T, D]; valid [B, T] bool (key and memory mask)."""
        b, t, d = x.shape
        h = self.n_head
        names = ("batch", "length", "heads", "head_dim")
        q = constrain(rope_64(self.query(x).reshape(b, t, h, ROPE_DIM)), names)
        k = constrain(rope_64(self.key(x).reshape(b, t, h, ROPE_DIM)), names)
        v = self.value(x)
        pad_mask = valid[..., None].astype(v.dtype)
        memory = v * pad_mask
        memory = (self.fsmn(memory) + memory) * pad_mask
        v = constrain(v.reshape(b, t, h, ROPE_DIM), names)
        # The reference scales q and k by head_dim^-1/4 each, and masks keys with an additive -1e10.
        scale = ROPE_DIM**-0.25
        scores = jnp.einsum("bthd,bshd->bhts", q * scale, k * scale, precision=self.precision).astype(jnp.float32)
        scores = scores + jnp.where(valid, 0.0, -1e10)[:, None, None, :]
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhts,bshd->bthd", probs, v, precision=self.precision).reshape(b, t, d)
        return _embed_layout(self.out(out)) + memory


def _embed_layout(y: jax.Array) -> jax.Array:
    """Pins a projection's output back to the activation layout before it is added to anything.

    Needed for correctness, not speed: with XLA in jax 0.10.2 (Shardy and GSPMD alike, seen on
    CPU), `dot(x, w) + m` with x [B, T, D] laid out (batch over data+fsdp, D over tensor), w over
    (tensor, fsdp) and m like x returns wrong rows on a 2x2x2 mesh unless the dot's output
    sharding is pinned.
    """
    return constrain(y, ("batch", "length", "audio_embed"))


class S3Block(nnx.Module):
    """Pre-norm residual block: FSMN attention, then a 4x GELU MLP."""

    def __init__(self, cfg: S3TokenizerConfig, *, rngs: nnx.Rngs):
        d, pdt = cfg.n_audio_state, as_dtype(cfg.param_dtype)
        common = dict(dtype=as_dtype(cfg.dtype), param_dtype=pdt, precision=cfg.precision, rngs=rngs)
        self.attn_ln = LayerNorm(d, eps=1e-5, names=("audio_embed",), param_dtype=pdt, rngs=rngs)
        self.attn = FSMNAttention(cfg, rngs=rngs)
        self.mlp_ln = LayerNorm(d, eps=1e-5, names=("audio_embed",), param_dtype=pdt, rngs=rngs)
        self.mlp_in = Linear(d, 4 * d, names=("audio_embed", "audio_mlp"), **common)
        self.mlp_out = Linear(4 * d, d, names=("audio_mlp", "audio_embed"), **common)

    def __call__(self, x: jax.Array, valid: jax.Array) -> jax.Array:
        x = x + self.attn(self.attn_ln(x), valid)
        h = constrain(gelu_exact(self.mlp_in(self.mlp_ln(x))), ("batch", "length", "audio_mlp"))
        x = x + _embed_layout(self.mlp_out(h))
        return constrain(x, ("batch", "length", "audio_embed"))


class S3Tokenizer(nnx.Module):
    """S3Tokenizer v2 (AudioEncoderV2 + FSQ) on log-mel input.

    `__call__(mel, mel_lens) -> (tokens, token_lens)`; `encode` and `project` expose the
    encoder output and the pre-rounding FSQ projection, `codes` the straight-through FSQ codes
    that training losses are computed on.
    """

    def __init__(self, cfg: S3TokenizerConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d = cfg.n_audio_state
        common = dict(dtype=as_dtype(cfg.dtype), param_dtype=as_dtype(cfg.param_dtype), precision=cfg.precision, rngs=rngs)
        self.conv1 = Conv1d(cfg.n_mels, d, 3, stride=2, padding=(1, 1), names=("conv", None, "audio_embed"), **common)
        self.conv2 = Conv1d(d, d, 3, stride=2, padding=(1, 1), names=("conv", None, "audio_embed"), **common)
        self.blocks = nnx.List([S3Block(cfg, rngs=rngs) for _ in range(cfg.n_audio_layer)])
        self.fsq_proj = Linear(d, FSQ_DIM, names=("audio_embed", None), **common)

    def encode(self, mel: jax.Array, mel_lens: jax.Array) -> tuple[jax.Array, jax.Array]:
        """mel [B, T, n_mels], mel_lens [B] -> hidden [B, T', D] (T' = ceil(ceil(T/2)/2)), token_lens [B].

        Hidden states past a row's token_lens are not meaningful (the reference leaves them too).
        """
        if mel.ndim != 3 or mel.shape[-1] != self.cfg.n_mels:
            raise ValueError(f"mel must be [batch, frames, {self.cfg.n_mels}], got shape {mel.shape}")
        mel_lens = jnp.asarray(mel_lens, jnp.int32)
        x = constrain(mel.astype(as_dtype(self.cfg.dtype)), ("batch", "length", None))
        x = x * _valid(mel_lens, x.shape[1])[..., None].astype(x.dtype)
        x = gelu_exact(self.conv1(x))
        lens1 = _conv_out_len(mel_lens)
        x = x * _valid(lens1, x.shape[1])[..., None].astype(x.dtype)
        x = gelu_exact(self.conv2(x))
        token_lens = _conv_out_len(lens1)
        valid = _valid(token_lens, x.shape[1])
        x = constrain(x, ("batch", "length", "audio_embed"))
        for block in self.blocks:
            x = block(x, valid)
        return x, token_lens

    def project(self, hidden: jax.Array) -> jax.Array:
        """FSQ projection before rounding: [B, T', 8] float32."""
        return self.fsq_proj(hidden).astype(jnp.float32)

    def __call__(self, mel: jax.Array, mel_lens: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Tokens [B, T'] int32 in [0, 6561) (0 past each row's token_lens) and token_lens [B]."""
        hidden, token_lens = self.encode(mel, mel_lens)
        tokens = fsq_tokens(self.project(hidden))
        return jnp.where(_valid(token_lens, tokens.shape[1]), tokens, 0), token_lens


    def codes(self, mel: jax.Array, mel_lens: jax.Array) -> FSQCodes:
        """The training forward: `FSQCodes` (codes, tokens, valid, projection).

        Codes are rounded in the forward pass and pass gradients straight through the rounding
        to 0.999 tanh(projection) (FSQ's straight-through estimator), so a loss on the codes
        trains the encoder. `tokens` equal `__call__`'s; codes and tokens are 0 past each row's
        length.
        """
        hidden, token_lens = self.encode(mel, mel_lens)
        valid = _valid(token_lens, hidden.shape[1])
        proj = self.project(hidden)
        codes = round_straight_through(jnp.tanh(proj) * FSQ_SCALE)
        tokens = codes_to_tokens(jax.lax.stop_gradient(codes))
        return FSQCodes(codes * valid[..., None], jnp.where(valid, tokens, 0), valid, proj)


class FSQCodes(NamedTuple):
    codes: jax.Array  # [B, T', 8] float32 in {-1, 0, 1}, straight-through gradients
    tokens: jax.Array  # [B, T'] int32, as S3Tokenizer.__call__ gives them
    valid: jax.Array  # [B, T'] bool: t < the row's token length
    projection: jax.Array  # [B, T', 8] float32 before tanh (for losses that keep it in tanh's range)


@jax.custom_jvp
def round_straight_through(x: jax.Array) -> jax.Array:
    """Round half to even in the forward pass, identity gradient. (A custom rule rather than
    x + stop_gradient(round(x) - x): that sum can be off the integer by an ulp.)"""
    return jnp.round(x)


@round_straight_through.defjvp
def _round_straight_through_jvp(primals, tangents):
    return round_straight_through(primals[0]), tangents[0]


def codes_to_tokens(codes: jax.Array) -> jax.Array:
    """[..., 8] FSQ codes in {-1, 0, 1} -> int32 token sum_i (code_i + 1) 3^i."""
    powers = jnp.asarray(FSQ_LEVELS ** np.arange(FSQ_DIM), jnp.int32)
    return jnp.sum((codes.astype(jnp.int32) + 1) * powers, axis=-1)


def fsq_tokens(proj: jax.Array) -> jax.Array:
    """[..., 8] projection -> int32 token: digit i = round(0.999 tanh(proj_i)) + 1 (round half to
    even, as torch.round), token = sum_i digit_i 3^i (dim 0 is the least significant digit)."""
    digits = jnp.round(jnp.tanh(proj.astype(jnp.float32)) * FSQ_SCALE).astype(jnp.int32) + 1
    powers = jnp.asarray(FSQ_LEVELS ** np.arange(FSQ_DIM), jnp.int32)
    return jnp.sum(digits * powers, axis=-1)


def _valid(lengths: jax.Array, t: int) -> jax.Array:
    return jnp.arange(t)[None, :] < lengths[:, None]


# ----------------------------------------------------------------------------- host entry


_mel = jax.jit(log_mel_128)


@nnx.jit
def _tokens(model: S3Tokenizer, mel, mel_lens):
    return model(mel, mel_lens)


def tokenize(
    model: S3Tokenizer,
    waveforms: np.ndarray | jax.Array,
    lengths: np.ndarray | jax.Array | None = None,
    *,
    mesh: jax.sharding.Mesh | None = None,
    rules: shd.Rules = shd.DEFAULT_RULES,
    segment_batch: int = 8,
) -> tuple[np.ndarray, np.ndarray]:
    """16 kHz waveforms [B, N] (rows zero-padded; lengths [B], default all N) -> speech tokens.

    Returns tokens [B, L] int32 (0 past each row's length) and token_lens [B] int32, as the
    reference pipeline (per-row log-mel, padding, S3TokenizerV2.quantize) gives them. When any
    row is over 30 s (3000 mel frames), every row is cut into 30 s windows every 26 s (short
    rows are one window), the windows are tokenised in batches of `segment_batch`, and a long
    row's windows are merged by dropping 50 tokens at each inner overlap edge; L is then the
    longest merged row. Inputs are laid out over the batch axes of `mesh` (default: the mesh
    the model's parameters live on).
    """
    waveforms = np.asarray(waveforms, np.float32)
    if waveforms.ndim != 2:
        raise ValueError(f"waveforms must be [batch, samples], got shape {waveforms.shape}")
    b, n = waveforms.shape
    lengths = np.full((b,), n, np.int32) if lengths is None else np.asarray(lengths)
    if lengths.shape != (b,) or lengths.dtype.kind not in "iu":
        raise ValueError(f"lengths must be {b} integers (one per row), got {lengths.dtype} array of shape {lengths.shape}")
    lengths = lengths.astype(np.int32)
    if np.any(lengths > n):
        raise ValueError(f"lengths {lengths.tolist()} exceed the {n} samples per row")
    if np.any(lengths <= N_FFT // 2):
        raise ValueError(
            f"every row needs more than {N_FFT // 2} samples ({(N_FFT // 2 + 1) / SAMPLE_RATE * 1000:.1f} ms at 16 kHz) "
            f"for the log-mel's reflect padding; lengths are {lengths.tolist()}"
        )
    valid = np.arange(n)[None, :] < lengths[:, None]
    if not np.isfinite(np.where(valid, waveforms, 0.0)).all():
        bad = sorted(set(np.nonzero(~np.isfinite(np.where(valid, waveforms, 0.0)))[0].tolist()))
        raise ValueError(f"waveform rows {bad} hold NaN or inf samples")

    mesh = mesh if mesh is not None else _model_mesh(model)
    if mesh is None:
        return _tokenize(model, waveforms, lengths, lambda tree: jax.tree.map(jnp.asarray, tree), segment_batch, 1)
    # The mesh context makes the model's activation constraints (`constrain`) take effect.
    with jax.set_mesh(mesh), shd.use_rules(rules):
        put = lambda tree: shd.put_batch(tree, mesh, rules)  # noqa: E731
        return _tokenize(model, waveforms, lengths, put, segment_batch, _batch_shards(mesh, rules))


def _tokenize(model, waveforms, lengths, put, segment_batch: int, shards: int):
    mel, mel_lens = _mel(*put((waveforms, lengths)))
    mel_lens = np.asarray(mel_lens)
    if mel_lens.max() <= MAX_FRAMES:
        tokens, token_lens = _tokens(model, mel, put(mel_lens))
        return np.asarray(tokens), np.asarray(token_lens)
    return _tokenize_long(model, np.asarray(mel), mel_lens, put, segment_batch, shards)


def _tokenize_long(model, mel: np.ndarray, mel_lens: np.ndarray, put, segment_batch: int, shards: int):
    # (row, start frame, frames) of every window; a row of <= 3000 frames is one window.
    windows = []
    for row, length in enumerate(mel_lens.tolist()):
        if length <= MAX_FRAMES:
            windows.append((row, 0, length))
            continue
        for start in range(0, length, STRIDE_FRAMES):
            windows.append((row, start, min(MAX_FRAMES, length - start)))
    codes: list[np.ndarray] = []
    step = max(1, segment_batch)
    for first in range(0, len(windows), step):
        chunk = windows[first : first + step]
        rows = -(-len(chunk) // shards) * shards  # fill the batch axes; extra rows are empty windows
        seg = np.zeros((rows, MAX_FRAMES, mel.shape[-1]), np.float32)
        seg_lens = np.zeros((rows,), np.int32)
        for j, (row, start, frames) in enumerate(chunk):
            seg[j, :frames] = mel[row, start : start + frames]
            seg_lens[j] = frames
        tokens, token_lens = _tokens(model, *put((seg, seg_lens)))
        tokens, token_lens = np.asarray(tokens), np.asarray(token_lens)
        codes.extend(tokens[j, : token_lens[j]] for j in range(len(chunk)))

    per_row: list[list[np.ndarray]] = [[] for _ in mel_lens]
    for (row, _, _), c in zip(windows, codes):
        per_row[row].append(c)
    merged = [merge_windows(parts) if mel_lens[row] > MAX_FRAMES else parts[0] for row, parts in enumerate(per_row)]
    token_lens = np.asarray([len(m) for m in merged], np.int32)
    out = np.zeros((len(merged), int(token_lens.max())), np.int32)
    for row, m in enumerate(merged):
        out[row, : len(m)] = m
    return out, token_lens


def merge_windows(parts: list[np.ndarray]) -> np.ndarray:
    """The reference's merge_tokenized_segments(overlap=4 s, 25 Hz): keep the first window up to
    50 tokens before its end, inner windows without 50 tokens on both sides, the last from its
    50th token (Python slice semantics, so windows shorter than that contribute nothing)."""
    kept = []
    for i, p in enumerate(parts):
        left = 0 if i == 0 else OVERLAP_DROP_TOKENS
        right = len(p) if i == len(parts) - 1 else -OVERLAP_DROP_TOKENS
        kept.append(np.asarray(p)[left:right])
    return np.concatenate(kept).astype(np.int32)


def _model_mesh(model: nnx.Module) -> jax.sharding.Mesh | None:
    sharding = getattr(jax.tree.leaves(nnx.state(model))[0], "sharding", None)
    return sharding.mesh if isinstance(sharding, jax.sharding.NamedSharding) else None


def _batch_shards(mesh: jax.sharding.Mesh | None, rules: shd.Rules) -> int:
    if mesh is None:
        return 1
    axes = next((a for name, a in rules if name == "batch"), None)
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
