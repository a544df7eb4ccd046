"""Audio in: any file soundfile can read (wav, flac, ogg, mp3, ...), any sample rate, any channel
count -> validated 16 kHz mono float32, the only input the Dasheng front end takes.

Documented results rather than errors:
- multichannel audio is averaged to mono;
- any sample rate is resampled to 16 kHz (librosa/soxr, high quality);
- silence is valid input (the log-mel floor is -100 dB; the model simply hears nothing);
- very long audio is fine here: the encoder processes it chunk by chunk (see
  ``DashengEncoder.encode_long``).
Errors (``AudioError``, naming the file and the problem): missing or empty file, a file that
is not audio or is corrupt, no samples, NaN/inf samples, audio too short to yield one audio
token (the minimum is stated).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16_000
HOP = 160  # samples per mel frame (10 ms)
FRAMES_PER_PATCH = 4  # one encoder output per 40 ms
PATCHES_PER_TOKEN = 5  # the adapter stacks 5 encoder outputs into one thinker token (5 Hz)


class AudioError(ValueError):
    """Audio that cannot be used: says which file and why."""


def num_audio_tokens(num_samples: int) -> int:
    """Thinker tokens for ``num_samples`` of 16 kHz audio: mel frames (centre-padded STFT)
    -> 40 ms patches -> groups of 5. Matches the audio_valid rows of the reference."""
    return ((1 + int(num_samples) // HOP) // FRAMES_PER_PATCH) // PATCHES_PER_TOKEN


def min_samples() -> int:
    """The fewest 16 kHz samples that yield one audio token (3040 = 0.19 s)."""
    # 1 + n // 160 >= 4 * 5  <=>  n >= 19 * 160
    return (FRAMES_PER_PATCH * PATCHES_PER_TOKEN - 1) * HOP


def _where(source: str | os.PathLike | None) -> str:
    return f"{source}: " if source is not None else ""


def validate(wav: np.ndarray, source: str | os.PathLike | None = None) -> np.ndarray:
    """Checks a 16 kHz mono waveform; returns it as contiguous float32."""
    wav = np.asarray(wav)
    if wav.ndim != 1:
        raise AudioError(f"{_where(source)}expected a mono waveform [samples], got shape {wav.shape}")
    if wav.size == 0:
        raise AudioError(f"{_where(source)}the audio has no samples")
    if not np.issubdtype(wav.dtype, np.floating):
        raise AudioError(f"{_where(source)}expected float samples in [-1, 1], got dtype {wav.dtype}")
    finite = np.isfinite(wav)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise AudioError(
            f"{_where(source)}{bad.size} sample(s) are NaN or inf (first at {bad[0] / SAMPLE_RATE:.3f} s); "
            "the audio is corrupt or was produced by a failed computation"
        )
    if wav.size < min_samples():
        raise AudioError(
            f"{_where(source)}audio too short: {wav.size} samples ({wav.size / SAMPLE_RATE:.3f} s at 16 kHz) "
            f"yield no audio token; the minimum is {min_samples()} samples ({min_samples() / SAMPLE_RATE:.2f} s)"
        )
    return np.ascontiguousarray(wav, dtype=np.float32)


def to_mono_16k(samples: np.ndarray, sample_rate: int, source: str | os.PathLike | None = None) -> np.ndarray:
    """[samples] or [samples, channels] at any rate -> validated 16 kHz mono float32."""
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
        raise AudioError(f"{_where(source)}expected float samples, got dtype {samples.dtype}")
    samples = samples.astype(np.float32, copy=False)
    if sample_rate <= 0:
        raise AudioError(f"{_where(source)}invalid sample rate {sample_rate}")
    if not np.isfinite(samples).all():
        validate(samples, source)  # raises with the details
    if sample_rate != SAMPLE_RATE:
        import librosa

        samples = librosa.resample(samples, orig_sr=sample_rate, target_sr=SAMPLE_RATE, res_type="soxr_hq")
    return validate(samples, source)


def load(path: str | os.PathLike) -> np.ndarray:
    """Reads an audio file into validated 16 kHz mono float32."""
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
    return to_mono_16k(samples, int(rate), path)


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
