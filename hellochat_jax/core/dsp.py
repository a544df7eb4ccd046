"""The audio toolkit: one of each of audio loading, windows, STFT/iSTFT, mel filterbanks and
log-mel helpers. Every component's front end (Dasheng, S3Tokenizer, the flow's prompt mel, HiFT)
is built from these; only the parameters differ.

Audio in: any file soundfile can read (wav, flac, ogg, mp3, ...), any sample rate, any channel
count. ``load`` gives validated 16 kHz mono float32, the only input the Dasheng front end
takes; the talker reads a voice prompt with ``read`` + ``to_mono`` and resamples it itself
(to 16 kHz for its tokenizer and 24 kHz for its mel).

Documented results rather than errors:
- multichannel audio is averaged to mono;
- any sample rate is resampled (librosa/soxr, high quality);
- silence is valid input (the log-mel floor is -100 dB; the model simply hears nothing);
- very long audio is fine here: the encoder processes it chunk by chunk (see
  ``DashengEncoder.encode_long``).
Errors (``AudioError``, naming the file and the problem): missing or empty file, a file that
is not audio or is corrupt, no samples, NaN/inf samples, audio too short to yield one audio
token (the minimum is stated).

Spectra: windows and filterbanks are host-side float32 constants (numpy); the transforms are
jnp, so they trace into jitted, sharded programs. Filterbanks are [bins, n_mels], applied as
``spectrum @ bank``. We frame and ``jnp.fft.rfft`` ourselves rather than call
``jax.scipy.signal.stft``: that one scales by 1 / sum(window) (scipy's convention, not torch's),
pads only zeros or odd/even extensions of the whole batch, and puts time last; undoing each
costs the references' exact values (the front ends match torch to ~1e-6).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from hellochat_jax.core.errors import UserError

SAMPLE_RATE = 16_000
HOP = 160  # samples per mel frame (10 ms)
FRAMES_PER_PATCH = 4  # one encoder output per 40 ms
PATCHES_PER_TOKEN = 5  # the release's adapter stacks 5 encoder outputs into one thinker token (5 Hz)


class AudioError(UserError):
    """Audio that cannot be used: says which file and why."""


# ============================================================================ audio in


def num_audio_tokens(num_samples: int, subsample: int = PATCHES_PER_TOKEN) -> int:
    """Thinker tokens for ``num_samples`` of 16 kHz audio: mel frames (centre-padded STFT)
    -> 40 ms patches -> groups of ``subsample`` (the adapter's; 5 in the release). Matches the
    audio_valid rows of the reference. Prompts must be built with the model's own subsample:
    the model splices exactly this many audio rows over the placeholders."""
    return ((1 + int(num_samples) // HOP) // FRAMES_PER_PATCH) // subsample


def min_samples(subsample: int = PATCHES_PER_TOKEN) -> int:
    """The fewest 16 kHz samples that yield one audio token (3040 = 0.19 s at subsample 5)."""
    # 1 + n // 160 >= 4 * 5  <=>  n >= 19 * 160
    return (FRAMES_PER_PATCH * subsample - 1) * HOP


def _where(source: str | os.PathLike | None) -> str:
    return f"{source}: " if source is not None else ""


def _check_finite(wav: np.ndarray, sample_rate: int, source: str | os.PathLike | None) -> None:
    finite = np.isfinite(wav)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise AudioError(
            f"{_where(source)}{bad.size} sample(s) are NaN or inf (first at {bad[0] / sample_rate:.3f} s); "
            "the audio is corrupt or was produced by a failed computation"
        )


def validate(wav: np.ndarray, source: str | os.PathLike | None = None, subsample: int = PATCHES_PER_TOKEN) -> np.ndarray:
    """Checks a 16 kHz mono waveform for the thinker (whose adapter stacks `subsample` encoder
    frames per token); returns it as contiguous float32."""
    wav = np.asarray(wav)
    if wav.ndim != 1:
        raise AudioError(f"{_where(source)}expected a mono waveform [samples], got shape {wav.shape}")
    wav = to_mono(wav, SAMPLE_RATE, source)  # samples, float dtype, finite: what any audio must pass
    if wav.size < min_samples(subsample):
        raise AudioError(
            f"{_where(source)}audio too short: {wav.size} samples ({wav.size / SAMPLE_RATE:.3f} s at 16 kHz) "
            f"yield no audio token; the minimum is {min_samples(subsample)} samples ({min_samples(subsample) / SAMPLE_RATE:.2f} s)"
        )
    return np.ascontiguousarray(wav, dtype=np.float32)


def to_mono(samples: np.ndarray, sample_rate: int, source: str | os.PathLike | None = None) -> np.ndarray:
    """[samples] or [samples, channels] float audio at ``sample_rate`` -> finite mono float32
    [samples] (channels averaged)."""
    samples = np.asarray(samples)
    if samples.ndim == 2:
        if samples.shape[1] == 0:
            raise AudioError(f"{_where(source)}the audio has no channels")
        samples = samples.mean(axis=1)
    elif samples.ndim != 1:
        raise AudioError(f"{_where(source)}expected [samples] or [samples, channels], got shape {samples.shape}")
    if samples.size == 0:
        raise AudioError(f"{_where(source)}the audio has no samples")
    if not np.issubdtype(samples.dtype, np.floating):
        raise AudioError(f"{_where(source)}expected float samples in [-1, 1], got dtype {samples.dtype}")
    if sample_rate <= 0:
        raise AudioError(f"{_where(source)}invalid sample rate {sample_rate}")
    _check_finite(samples, sample_rate, source)  # before resampling smears one bad sample over many
    return samples.astype(np.float32, copy=False)


def resample(wav: np.ndarray, sample_rate: int, target_rate: int) -> np.ndarray:
    """Mono float32 audio from ``sample_rate`` to ``target_rate`` (soxr, high quality)."""
    wav = np.asarray(wav, np.float32)
    if sample_rate == target_rate:
        return wav
    import librosa

    return librosa.resample(wav, orig_sr=sample_rate, target_sr=target_rate, res_type="soxr_hq").astype(np.float32, copy=False)


def to_mono_16k(samples: np.ndarray, sample_rate: int, source: str | os.PathLike | None = None,
                subsample: int = PATCHES_PER_TOKEN) -> np.ndarray:
    """[samples] or [samples, channels] at any rate -> validated 16 kHz mono float32."""
    return validate(resample(to_mono(samples, sample_rate, source), sample_rate, SAMPLE_RATE), source, subsample)


def read(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """Reads an audio file as it is -> (samples [samples, channels] float32, sample rate);
    integer PCM is scaled to [-1, 1]."""
    import soundfile as sf

    path = Path(path)
    if not path.exists():
        raise AudioError(f"{path}: file not found")
    if path.is_dir():
        raise AudioError(f"{path}: is a directory, not an audio file")
    if path.stat().st_size == 0:
        raise AudioError(f"{path}: empty file (0 bytes)")
    try:
        samples, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # libsndfile's errors: unknown format, truncated header, ...
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise AudioError(f"{path}: not a readable audio file (corrupt, or not audio): {reason}") from None
    return samples, int(rate)


def load(path: str | os.PathLike, subsample: int = PATCHES_PER_TOKEN) -> np.ndarray:
    """Reads an audio file into validated 16 kHz mono float32 (`subsample`: see validate)."""
    samples, rate = read(path)
    return to_mono_16k(samples, rate, path, subsample)


def load_many(paths: Sequence[str | os.PathLike]) -> list[np.ndarray]:
    return [load(p) for p in paths]


def batch(waveforms: Sequence[np.ndarray], *, pad_to_multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Zero-pads waveforms to one length -> (waveform [B, S] float32, lengths [B] int32).

    ``pad_to_multiple`` rounds S up so that batches of similar length share one compiled shape.
    """
    if not waveforms:
        raise AudioError("no audio to batch")
    lengths = np.array([len(w) for w in waveforms], dtype=np.int32)
    longest = int(lengths.max())
    longest = -(-longest // pad_to_multiple) * pad_to_multiple
    out = np.zeros((len(waveforms), longest), np.float32)
    for i, w in enumerate(waveforms):
        out[i, : len(w)] = w
    return out, lengths


# ============================================================================ windows


def hann_window(length: int, *, periodic: bool = True) -> np.ndarray:
    """Hann window [length] in float32, evaluated in float64 and rounded once (torch.hann_window,
    scipy.signal.get_window('hann')). Periodic is the STFT window (period ``length``); symmetric
    (``periodic=False``) ends on zero at both sides, as for filter design."""
    if length == 1:
        return np.ones(1, np.float32)
    n = np.arange(length, dtype=np.float64)
    period = length if periodic else length - 1
    return (0.5 - 0.5 * np.cos(2.0 * np.pi * n / period)).astype(np.float32)


# ============================================================================ STFT


def pad_ends(x, amount: int, *, mode: str = "reflect", lengths: jax.Array | None = None):
    """Pads the last axis by ``amount`` samples at both ends: "reflect" mirrors about the end
    samples without repeating them (torch.stft's centre padding, np.pad's "reflect"), "constant"
    pads zeros. numpy in, numpy out (host-side segmenting of long audio); jax in, jax out.

    ``lengths`` [B] (rows [B, S], reflect only): row b is its first lengths[b] samples and its
    right padding mirrors about sample lengths[b] - 1, as if the row stood alone, so rows of a
    batch need not share a length. Samples past a row's own padding are meaningless (clamped
    indices); callers mask the frames that read them."""
    if mode not in ("reflect", "constant"):
        raise ValueError(f"pad_ends: unknown mode {mode!r} (reflect or constant)")
    n = x.shape[-1]
    if mode == "reflect" and n <= amount:
        raise ValueError(f"{n} samples are too few to reflect-pad by {amount}")
    if lengths is None:
        xp = jnp if isinstance(x, jax.Array) else np
        return xp.pad(x, [(0, 0)] * (x.ndim - 1) + [(amount, amount)], mode=mode)
    if mode != "reflect" or x.ndim != 2:
        raise ValueError("pad_ends: per-row lengths need reflect padding of [batch, samples] rows")
    source = jnp.abs(jnp.arange(n + 2 * amount) - amount)[None, :]  # mirrored about sample 0
    last = jnp.asarray(lengths, jnp.int32)[:, None] - 1
    source = jnp.where(source > last, 2 * last - source, source)  # ... and about the row's last
    return jnp.take_along_axis(x, jnp.clip(source, 0, n - 1), axis=-1)


def frame(x, frame_length: int, hop: int, num_frames: int | None = None):
    """[..., S] -> [..., F, frame_length]: frame f is x[..., f * hop : f * hop + frame_length].
    F defaults to every whole frame, 1 + (S - frame_length) // hop."""
    available = 1 + (x.shape[-1] - frame_length) // hop
    num_frames = available if num_frames is None else num_frames
    if not 1 <= num_frames <= available:
        raise ValueError(f"cannot take {num_frames} frames of {frame_length} (hop {hop}) from {x.shape[-1]} samples")
    index = np.arange(num_frames)[:, None] * hop + np.arange(frame_length)[None, :]
    return x[..., index]


def stft(
    x,
    n_fft: int,
    hop: int,
    window: np.ndarray,
    *,
    pad: int = 0,
    pad_mode: str = "reflect",
    lengths: jax.Array | None = None,
    num_frames: int | None = None,
) -> jax.Array:
    """One-sided, unnormalised STFT (as torch.stft) of [..., S] -> complex [..., F, n_fft // 2 + 1].

    The signal is first padded by ``pad`` samples at both ends (``pad_ends``; pad = n_fft // 2
    is torch's center=True), then cut into frames every ``hop`` samples (``frame``), windowed
    and transformed. A window shorter than n_fft is centred with zeros, as torch.stft does."""
    if pad:
        x = pad_ends(x, pad, mode=pad_mode, lengths=lengths)
    left = (n_fft - len(window)) // 2
    window = np.pad(np.asarray(window, np.float32), (left, n_fft - len(window) - left))
    frames = frame(jnp.asarray(x).astype(jnp.float32), n_fft, hop, num_frames)
    return jnp.fft.rfft(frames * window, n=n_fft, axis=-1)


def power_spectrum(spectrum: jax.Array) -> jax.Array:
    """|X|^2 as re^2 + im^2."""
    return jnp.square(spectrum.real) + jnp.square(spectrum.imag)


def _overlap_add(frames: jax.Array, hop: int) -> jax.Array:
    """[..., M, n] frames at ``hop`` spacing (n % hop == 0) -> [..., (M - 1) * hop + n]."""
    *lead, m, n = frames.shape
    q = n // hop
    parts = frames.reshape(*lead, m, q, hop)
    keep = [(0, 0)] * len(lead)
    out = sum(jnp.pad(parts[..., j, :], keep + [(j, q - 1 - j), (0, 0)]) for j in range(q))
    return out.reshape(*lead, (m + q - 1) * hop)


def _window_envelope(window: np.ndarray, frames: int, hop: int) -> np.ndarray:
    """sum_m w[n - hop m]^2 over the frames that exist (torch.istft's normaliser)."""
    squared = np.square(window)
    envelope = np.zeros((frames - 1) * hop + len(window), np.float32)
    for m in range(frames):
        envelope[m * hop : m * hop + len(window)] += squared
    return envelope


def istft(spectrum: jax.Array, n_fft: int, hop: int, window: np.ndarray) -> jax.Array:
    """torch.istft(center=True, length=None) of a one-sided spectrum [..., M, n_fft // 2 + 1]
    -> [..., (M - 1) * hop]: inverse real FFT of each frame (the imaginary parts of DC and
    Nyquist drop out, as in any C2R transform), windowed, overlap-added, divided by the summed
    squared window, the centre padding cut from both ends. Needs n_fft % hop == 0."""
    if n_fft % hop or len(window) != n_fft:
        raise ValueError(f"istft: needs n_fft ({n_fft}) a multiple of hop ({hop}) and a window of n_fft samples (got {len(window)})")
    frames = jnp.fft.irfft(spectrum, n=n_fft, axis=-1) * np.asarray(window, np.float32)
    m = frames.shape[-2]
    start, length = n_fft // 2, (m - 1) * hop
    envelope = _window_envelope(np.asarray(window, np.float32), m, hop)[start : start + length]
    return _overlap_add(frames, hop)[..., start : start + length] / envelope


# ============================================================================ mel


def _linspace_f32(start: float, stop: float, num: int) -> np.ndarray:
    """torch.linspace in float32: the first half counts up from start, the second half down
    from stop (each with one rounding), which differs from numpy's in the last bit."""
    start32, stop32 = np.float32(start), np.float32(stop)
    step = np.float32((np.float64(stop32) - np.float64(start32)) / (num - 1))
    i = np.arange(num, dtype=np.float64)
    up = (np.float64(start32) + np.float64(step) * i).astype(np.float32)
    down = (np.float64(stop32) - np.float64(step) * (num - 1 - i)).astype(np.float32)
    return np.where(i < num // 2, up, down)


@functools.cache
def htk_mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, f_min: float, f_max: float) -> np.ndarray:
    """HTK triangular mel bank [n_fft // 2 + 1, n_mels], no normalisation, evaluated in float32
    the way torchaudio.functional.melscale_fbanks does (matches its table to ~2e-6). Read-only."""
    hz_to_mel = lambda f: 2595.0 * math.log10(1.0 + f / 700.0)
    freqs = _linspace_f32(0, sample_rate // 2, n_fft // 2 + 1)
    mels = _linspace_f32(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2)
    pow10 = np.power(10.0, (mels / np.float32(2595.0)).astype(np.float64)).astype(np.float32)
    edges = np.float32(700.0) * (pow10 - np.float32(1.0))
    widths = edges[1:] - edges[:-1]
    slopes = edges[None, :] - freqs[:, None]
    down = -slopes[:, :-2] / widths[:-1]
    up = slopes[:, 2:] / widths[1:]
    bank = np.maximum(np.float32(0.0), np.minimum(down, up)).astype(np.float32)
    bank.setflags(write=False)  # shared by every caller (cached)
    return bank


@functools.cache
def slaney_mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, f_min: float = 0.0, f_max: float | None = None) -> np.ndarray:
    """librosa.filters.mel (Slaney scale, Slaney area normalisation: whisper's and matcha's
    banks) as float32 [n_fft // 2 + 1, n_mels]. Read-only."""
    import librosa

    bank = librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=n_mels, fmin=f_min, fmax=f_max).astype(np.float32)
    bank = np.ascontiguousarray(bank.T)
    bank.setflags(write=False)  # shared by every caller (cached)
    return bank


def apply_filterbank(spectrum: jax.Array, bank: np.ndarray) -> jax.Array:
    """[..., bins] @ bank [bins, n_mels]. Full float32 precision: an accelerator's default
    matmul precision would round the power spectrum to bfloat16 first."""
    return jnp.dot(spectrum, bank, precision=jax.lax.Precision.HIGHEST)


def power_to_db(power: jax.Array, amin: float = 1e-10) -> jax.Array:
    """10 log10(max(power, amin)) (torchaudio's AmplitudeToDB(stype="power"), reference 1)."""
    return 10.0 * jnp.log10(jnp.maximum(power, amin))


def floor_below_peak(x: jax.Array, peak: jax.Array, dynamic_range: float) -> jax.Array:
    """max(x, peak - dynamic_range): the top_db floor of a dB spectrogram, whisper's max - 8 of
    a log10 one."""
    return jnp.maximum(x, peak - dynamic_range)
