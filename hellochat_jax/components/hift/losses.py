"""Training losses of the HiFT vocoder (CosyVoice 2's HiFiGan.forward_generator, without the
discriminators): the generator is run as HiFTGenerator.forward runs it in training (F0
predicted from the mel, the source driven by that F0, then decoded), and scored by

    stft   multi-resolution STFT loss: spectral convergence + log-magnitude L1, averaged
           over (n_fft, hop) resolutions (Parallel WaveGAN's auxiliary loss)
    mel    L1 between log-mels (the flow's mel settings, `flow_mel_settings`) of the output and
           the target (CosyVoice's mel_loss, weight 45)
    f0     L1 between the F0 predictor's output and the target F0 in Hz, 0 where unvoiced
           (CosyVoice's loss_f0, weight 1)

As in CosyVoice, no gradient flows from the waveform into the F0 predictor: its sine source
is generated under torch.no_grad (SourceModuleHnNSF), so the predictor learns from the F0 loss
alone, and the decoder learns to use the excitation it will get at inference.

Every loss here is PER ROW ([B]), a mean over the row's valid frames, so a caller sums rows and
divides by a step-wide row count (gradient accumulation then gives the big-batch gradient).
Frames are valid when they start inside the row's `lengths` samples; samples past the length
are zeroed in both signals before any transform.

Adversarial training (multi-period / multi-resolution discriminators, feature matching, TPR)
is not implemented: the reconstruction losses alone train a usable vocoder, less crisp than a
GAN-trained one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hellochat_jax.components.hift.model import flow_mel_settings, log_mel
from hellochat_jax.core import dsp

# (n_fft, hop) pairs of the multi-resolution STFT loss (Parallel WaveGAN's, at 16 kHz)
DEFAULT_RESOLUTIONS: tuple[tuple[int, int], ...] = ((512, 128), (1024, 256), (256, 64))
MAGNITUDE_FLOOR = 1e-7  # power floor: log|X| stays finite on digital silence


@dataclasses.dataclass(frozen=True)
class LossWeights:
    stft: float = 45.0  # as much as the mel loss: both are O(1) spectral distances
    mel: float = 45.0  # CosyVoice's multi_mel_spectral_recon_loss_weight
    f0: float = 1.0  # CosyVoice's weight of loss_f0 (Hz)


def frame_mask(lengths: jax.Array, frames: int, hop: int) -> jax.Array:
    """[B] valid samples -> [B, frames] float32: 1 where frame f starts inside the row
    (f * hop < length)."""
    return (jnp.arange(frames)[None, :] * hop < jnp.asarray(lengths)[:, None]).astype(jnp.float32)


def sample_mask(lengths: jax.Array, samples: int) -> jax.Array:
    return (jnp.arange(samples)[None, :] < jnp.asarray(lengths)[:, None]).astype(jnp.float32)


def _safe_sqrt(x: jax.Array) -> jax.Array:
    """sqrt with a zero (not NaN) gradient at 0: identical signals give a finite gradient."""
    positive = x > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def _magnitude(x: jax.Array, n_fft: int, hop: int) -> jax.Array:
    """|STFT| [B, frames, bins] (centred, zero-padded, periodic Hann), floored for the log."""
    spectrum = dsp.stft(x, n_fft, hop, dsp.hann_window(n_fft), pad=n_fft // 2, pad_mode="constant")
    return jnp.sqrt(jnp.maximum(dsp.power_spectrum(spectrum), MAGNITUDE_FLOOR))


def stft_loss(pred: jax.Array, target: jax.Array, lengths: jax.Array, n_fft: int, hop: int) -> tuple[jax.Array, jax.Array]:
    """One resolution: (spectral convergence [B], log-magnitude L1 [B]) of waveforms [B, S]."""
    keep = sample_mask(lengths, pred.shape[-1])
    p, t = _magnitude(pred * keep, n_fft, hop), _magnitude(target * keep, n_fft, hop)
    mask = frame_mask(lengths, p.shape[1], hop)[..., None]
    convergence = _safe_sqrt(jnp.sum(jnp.square(t - p) * mask, axis=(1, 2))) / _safe_sqrt(jnp.sum(jnp.square(t) * mask, axis=(1, 2)) + 1e-12)
    count = jnp.maximum(jnp.sum(mask, axis=(1, 2)) * p.shape[-1], 1.0)
    log_l1 = jnp.sum(jnp.abs(jnp.log(t) - jnp.log(p)) * mask, axis=(1, 2)) / count
    return convergence, log_l1


def multi_resolution_stft_loss(pred: jax.Array, target: jax.Array, lengths: jax.Array,
                               resolutions: Sequence[tuple[int, int]] = DEFAULT_RESOLUTIONS) -> jax.Array:
    """Spectral convergence + log-magnitude L1, averaged over `resolutions` ((n_fft, hop)
    pairs) -> [B]. pred, target [B, S] waveforms; lengths [B] valid samples."""
    total = jnp.zeros(pred.shape[0], jnp.float32)
    for n_fft, hop in resolutions:
        convergence, log_l1 = stft_loss(pred, target, lengths, int(n_fft), int(hop))
        total = total + convergence + log_l1
    return total / len(resolutions)


def mel_l1_loss(pred: jax.Array, target: jax.Array, lengths: jax.Array, settings: dict[str, Any]) -> jax.Array:
    """Mean |log-mel(pred) - log-mel(target)| over each row's valid frames and bins -> [B].
    `settings`: `flow_mel_settings(cfg)` (log_mel's keyword arguments)."""
    keep = sample_mask(lengths, pred.shape[-1])
    p, t = log_mel(pred * keep, **settings), log_mel(target * keep, **settings)
    mask = frame_mask(lengths, p.shape[1], settings["hop"])[..., None]
    count = jnp.maximum(jnp.sum(mask, axis=(1, 2)) * p.shape[-1], 1.0)
    return jnp.sum(jnp.abs(p - t) * mask, axis=(1, 2)) / count


def f0_l1_loss(pred: jax.Array, target: jax.Array, frame_valid: jax.Array) -> jax.Array:
    """Mean |pred - target| (Hz) over each row's valid frames -> [B]; pred, target, frame_valid [B, T]."""
    frame_valid = frame_valid.astype(jnp.float32)
    return jnp.sum(jnp.abs(pred - target) * frame_valid, axis=1) / jnp.maximum(jnp.sum(frame_valid, axis=1), 1.0)


def vocoder_loss(model: Any, mel: jax.Array, wave: jax.Array, wave_lengths: jax.Array, f0: jax.Array, key: jax.Array,
                 weights: LossWeights = LossWeights(), *, resolutions: Sequence[tuple[int, int]] = DEFAULT_RESOLUTIONS,
                 normalizer: jax.Array | float | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The generator's training loss on one batch.

    model: a HiFTVocoder (weight-norm form, not folded); mel [B, n_mels, T] (the vocoder's
    input layout); wave [B, T * samples_per_frame] the target audio; wave_lengths [B] its valid
    samples (rows of length 0 count nowhere); f0 [B, T] target Hz (0 = unvoiced); key: the
    source noise.

    Returns (loss, stats): loss = sum over rows of the weighted per-row losses / `normalizer`
    (default: the rows with audio); stats hold the per-term SUMS over rows (hift_stft,
    hift_mel_l1, hift_f0_l1) and the row count (hift_rows), to be divided on the host.
    """
    cfg = model.cfg
    per = cfg.samples_per_frame
    if wave.shape[-1] != mel.shape[-1] * per:
        raise ValueError(f"vocoder_loss: wave has {wave.shape[-1]} samples, the mel's {mel.shape[-1]} frames need {mel.shape[-1] * per}")
    wave = wave.astype(jnp.float32)
    rows = (jnp.asarray(wave_lengths) > 0).astype(jnp.float32)
    predicted_f0 = model.f0(mel)
    # CosyVoice makes the sine source under no_grad: the predictor learns from the F0 loss only.
    source = model.source(jax.lax.stop_gradient(predicted_f0), key=key)
    generated = model.decode(mel, source)
    stft = multi_resolution_stft_loss(generated, wave, wave_lengths, resolutions) * rows
    mel_l1 = mel_l1_loss(generated, wave, wave_lengths, flow_mel_settings(cfg)) * rows
    f0_l1 = f0_l1_loss(predicted_f0, f0.astype(jnp.float32), frame_mask(wave_lengths, mel.shape[-1], per)) * rows
    stats = {
        "hift_stft": jnp.sum(stft),
        "hift_mel_l1": jnp.sum(mel_l1),
        "hift_f0_l1": jnp.sum(f0_l1),
        "hift_rows": jnp.sum(rows),
    }
    if normalizer is None:
        normalizer = jnp.maximum(stats["hift_rows"], 1.0)
    total = weights.stft * stats["hift_stft"] + weights.mel * stats["hift_mel_l1"] + weights.f0 * stats["hift_f0_l1"]
    return total / normalizer, stats


# ----------------------------------------------------------------------------- F0 targets (host)


def f0_targets(wave: np.ndarray, hop: int, rate: int, *, fmin: float = 60.0, fmax: float = 500.0,
               silence_db: float = -40.0, periodicity: float = 0.5) -> np.ndarray:
    """F0 in Hz per mel frame of mono audio [samples] (librosa.yin), 0 where unvoiced
    -> float32 [samples // hop] (the frame count of `log_mel`).

    Frame f is centred where the mel's frame f is (sample f * hop + hop / 2). YIN gives a pitch
    for every frame, so a frame counts as voiced only when it is loud enough (RMS within
    `silence_db` of the clip's peak RMS, and above -60 dBFS) and periodic at that pitch (the
    normalised autocorrelation at the YIN period is at least `periodicity`)."""
    import librosa

    wave = np.asarray(wave, np.float32)
    frames = len(wave) // hop
    if frames == 0:
        return np.zeros(0, np.float32)
    # a window that holds 3 periods of fmin (YIN needs 2 in half of it), a power of two
    length = int(2 ** np.ceil(np.log2(3 * rate / fmin)))
    shifted = np.pad(wave[hop // 2 :], (length // 2, length // 2 + hop))  # centre of frame f: f * hop + hop / 2
    windows = librosa.util.frame(shifted, frame_length=length, hop_length=hop, axis=0)[:frames]  # [frames, length]
    f0 = librosa.yin(shifted, fmin=fmin, fmax=fmax, sr=rate, frame_length=length, hop_length=hop, center=False)[:frames]
    rms = np.sqrt(np.mean(np.square(windows[:, length // 4 : 3 * length // 4]), axis=1))
    level = 20 * np.log10(np.maximum(rms, 1e-10))
    loud = (level > max(level.max() + silence_db, -60.0))
    periods = np.clip(np.round(rate / np.maximum(f0, 1e-3)).astype(np.int64), 1, length // 2)
    periodic = np.array([_autocorrelation(w, p) for w, p in zip(windows, periods)]) >= periodicity
    return np.where(loud & periodic, f0, 0.0).astype(np.float32)


def _autocorrelation(window: np.ndarray, lag: int) -> float:
    """Normalised correlation of a window with itself `lag` samples later."""
    a, b = window[:-lag], window[lag:]
    denom = np.sqrt(np.dot(a, a) * np.dot(b, b))
    return float(np.dot(a, b) / denom) if denom > 0 else 0.0
