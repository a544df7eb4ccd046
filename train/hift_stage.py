"""The `hift` stage: the HiFT vocoder trained from scratch on the corpus speech.

Rows are random fixed-length segments (`segment_frames` mel frames) of each record's reply
audio (and, with `use_user_audio`, of the user's utterance), resampled to the vocoder's rate:
the target waveform, its mel in the flow's settings (`flow_mel_settings`: what the flow will
hand the vocoder) and its F0 (librosa YIN, 0 where unvoiced), all computed on the host per row.
As in CosyVoice's GAN data pipeline, the mel is computed from the segment itself (truncate,
then compute_fbank). Clips shorter than a segment are zero-padded; `wave_length` masks the
padding out of every loss.

The loss is `hift.losses.vocoder_loss`: multi-resolution STFT + mel L1 + F0 L1, each a per-row
mean, summed over rows and divided by the step's rows that hold audio. `options.mel_noise`
perturbs the input mel (not the targets) so the vocoder learns to read imperfect flow samples.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
from hellochat_jax.train import stages
from hellochat_jax.train.stages import Stage

from hellochat_jax.components.hift import losses
from hellochat_jax.components.hift.model import HiFTConfig, flow_mel_settings, log_mel
from hellochat_jax.core import dsp

CORPUS_RATE = dsp.SAMPLE_RATE  # the corpus stores 16 kHz int16 PCM


@dataclasses.dataclass
class HiFTOptions:
    segment_frames: int = 48  # mel frames per training segment (0.96 s at 50 Hz)
    use_user_audio: bool = True  # also train on the user utterances, not only the replies
    stft_weight: float = 45.0
    mel_weight: float = 45.0  # CosyVoice's multi_mel_spectral_recon_loss_weight
    f0_weight: float = 1.0
    resolutions: tuple[tuple[int, int], ...] = losses.DEFAULT_RESOLUTIONS  # (n_fft, hop) of the STFT loss
    adversarial: bool = False  # discriminators: not implemented (the reconstruction losses only)
    # Gaussian noise on the input mel, its std drawn per row from U[0, mel_noise): the vocoder
    # reads the flow's samples, not true mels, and a few-hundred-step flow leaves speckle in
    # them that a vocoder trained on clean mels turns into noise (0 = the reference's clean input).
    mel_noise: float = 0.0


def hift_config(cfg: Any) -> HiFTConfig:
    from hellochat_jax.train.model import part_config

    stages.require(cfg.model.hift is not None, "stage hift: the config has no model.hift section")
    return part_config(cfg.model, "hift")


def segment_row(wav: np.ndarray, hift: HiFTConfig, segment_frames: int, rng: np.random.Generator) -> dict[str, np.ndarray] | None:
    """One training row from mono float32 audio at the vocoder's rate: a random segment of
    `segment_frames` frames (zero-padded if shorter) -> mel [frames, n_mels], wave
    [frames * samples_per_frame], wave_length, f0 [frames]. None for audio under one frame."""
    per = hift.samples_per_frame
    segment = segment_frames * per
    if len(wav) < per:
        return None
    if len(wav) > segment:
        start = int(rng.integers(0, len(wav) - segment + 1))
        wav = wav[start : start + segment]
    wave = stages.pad_to(np.asarray(wav, np.float32), segment)
    # Rows are made in the loader's threads: keep their small transforms off the accelerator.
    with jax.default_device(jax.devices("cpu")[0]):
        mel = np.asarray(log_mel(jnp.asarray(wave), **flow_mel_settings(hift)), np.float32)
    return {
        "mel": mel,
        "wave": wave,
        "wave_length": np.int32(len(wav)),
        "f0": losses.f0_targets(wave, per, hift.sampling_rate),
    }


class HiFTData:
    task_names = ("hift",)

    def __init__(self, cfg: Any, process_index: int = 0, process_count: int = 1):
        self.cfg = cfg
        self.options: HiFTOptions = stages.options(cfg, STAGE)
        self.hift = hift_config(cfg)
        o = self.options
        stages.require(not o.adversarial, "stage hift: options.adversarial is not implemented (train with the reconstruction losses: adversarial: false)")
        stages.require(o.segment_frames >= 1, f"stage hift: options.segment_frames={o.segment_frames} must be >= 1")
        stages.require(o.mel_noise >= 0, f"stage hift: options.mel_noise={o.mel_noise} must be >= 0 (the largest std of the noise on the input mel)")
        stages.require(bool(o.resolutions) and all(n >= h >= 1 for n, h in o.resolutions),
                       f"stage hift: options.resolutions {o.resolutions} must be (n_fft, hop) pairs with n_fft >= hop >= 1")
        stages.require(o.segment_frames * self.hift.samples_per_frame > max(n for n, _ in o.resolutions) // 2,
                       "stage hift: options.segment_frames is too short for the largest STFT resolution")
        self.process_index, self.process_count = process_index, process_count
        self.rows = cfg.data.batch_size // process_count

    def make_row(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray] | None:
        clips = [record["reply_audio"]] + ([record["audio"]] if self.options.use_user_audio else [])
        clips = [c for c in clips if len(c)]
        if not clips:
            return None
        wav = stages.pcm(clips[int(rng.integers(len(clips)))])
        wav = dsp.resample(wav, CORPUS_RATE, self.hift.sampling_rate)
        return segment_row(wav, self.hift, self.options.segment_frames, rng)

    def iterator(self) -> grain.DatasetIterator:
        return stages.corpus_records(self.cfg, self.make_row, self.process_index, self.process_count)

    def local_spec(self) -> dict[str, jax.ShapeDtypeStruct]:
        frames = self.options.segment_frames
        f32, i32 = np.dtype(np.float32), np.dtype(np.int32)
        return {
            "mel": jax.ShapeDtypeStruct((self.rows, frames, self.hift.in_channels), f32),
            "wave": jax.ShapeDtypeStruct((self.rows, frames * self.hift.samples_per_frame), f32),
            "wave_length": jax.ShapeDtypeStruct((self.rows,), i32),
            "f0": jax.ShapeDtypeStruct((self.rows, frames), f32),
        }


class HiFTObjective:
    def __init__(self, cfg: Any, data: HiFTData):
        o = data.options
        self.weights = losses.LossWeights(stft=o.stft_weight, mel=o.mel_weight, f0=o.f0_weight)
        self.resolutions = tuple(tuple(r) for r in o.resolutions)
        self.mel_noise = o.mel_noise

    def normalizers(self, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """The step's rows that hold audio (batch: [accum, rows, ...])."""
        return {"hift_rows": jnp.maximum(jnp.sum(batch["wave_length"] > 0).astype(jnp.float32), 1.0)}

    def __call__(self, model: Any, micro: dict[str, jax.Array], key: jax.Array,
                 norms: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
        mel = jnp.swapaxes(micro["mel"], 1, 2)  # rows hold the flow's [frames, n_mels]; HiFT reads [n_mels, frames]
        if self.mel_noise:
            key, k_std, k_noise = jax.random.split(key, 3)
            std = jax.random.uniform(k_std, (mel.shape[0], 1, 1), maxval=self.mel_noise)
            mel = mel + std * jax.random.normal(k_noise, mel.shape, mel.dtype)
        return losses.vocoder_loss(model.hift, mel, micro["wave"], micro["wave_length"], micro["f0"], key, self.weights,
                                   resolutions=self.resolutions, normalizer=norms["hift_rows"])

    def record(self, stats: dict[str, np.ndarray]) -> dict[str, float]:
        rows = max(float(stats["hift_rows"]), 1.0)
        return {name: float(stats[name]) / rows for name in ("hift_stft", "hift_mel_l1", "hift_f0_l1")}


STAGE = Stage("hift", ("hift",), HiFTData, HiFTObjective, HiFTOptions)
