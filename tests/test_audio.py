"""Specification of audio loading: anything soundfile reads becomes validated 16 kHz mono float32;
bad input is refused with an error that names the file and the problem."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from hellochat_jax.core import dsp as audio
from hellochat_jax.core.dsp import AudioError


def tone(seconds: float, rate: int, freq: float = 440.0, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    x = 0.5 * np.sin(2 * np.pi * freq * t).astype(np.float32)
    return x if channels == 1 else np.stack([x * (c + 1) / channels for c in range(channels)], axis=1)


def dominant_hz(wav: np.ndarray, rate: int = 16_000) -> float:
    spectrum = np.abs(np.fft.rfft(wav))
    return float(np.argmax(spectrum) * rate / len(wav))


# ------------------------------------------------------------------------------ token counts


def test_num_audio_tokens_is_five_per_second():
    assert audio.num_audio_tokens(64_000) == 20
    assert audio.num_audio_tokens(176_000) == 55
    assert audio.num_audio_tokens(16_000) == 5


def test_minimum_length_yields_exactly_one_token():
    n = audio.min_samples()
    assert n == 3040
    assert audio.num_audio_tokens(n) == 1 and audio.num_audio_tokens(n - 1) == 0


# ------------------------------------------------------------------------------ good input


def test_16k_mono_wav_round_trips(tmp_path):
    x = tone(1.0, 16_000)
    sf.write(tmp_path / "a.wav", x, 16_000, subtype="FLOAT")
    y = audio.load(tmp_path / "a.wav")
    assert y.dtype == np.float32 and y.shape == x.shape
    np.testing.assert_array_equal(y, x)


@pytest.mark.parametrize("rate", [8_000, 11_025, 22_050, 44_100, 48_000, 96_000])
def test_unusual_sample_rates_are_resampled_to_16k(tmp_path, rate):
    sf.write(tmp_path / "a.flac", tone(1.0, rate), rate)
    y = audio.load(tmp_path / "a.flac")
    assert abs(len(y) - 16_000) <= 1
    assert abs(dominant_hz(y) - 440.0) < 2.0  # the pitch survives resampling


def test_multichannel_is_averaged_to_mono(tmp_path):
    x = tone(0.5, 16_000, channels=3)  # channel c = tone * (c + 1) / 3
    sf.write(tmp_path / "a.wav", x, 16_000, subtype="FLOAT")
    y = audio.load(tmp_path / "a.wav")
    assert y.ndim == 1
    np.testing.assert_allclose(y, x.mean(axis=1), atol=1e-6)


def test_integer_pcm_is_scaled_to_unit_range(tmp_path):
    sf.write(tmp_path / "a.wav", tone(0.5, 16_000), 16_000, subtype="PCM_16")
    y = audio.load(tmp_path / "a.wav")
    assert 0.49 < np.abs(y).max() <= 0.5


def test_silence_is_loaded_as_zeros(tmp_path):
    sf.write(tmp_path / "quiet.wav", np.zeros(16_000, np.float32), 16_000)
    y = audio.load(tmp_path / "quiet.wav")
    assert y.shape == (16_000,) and not y.any()


def test_batch_pads_with_zeros_and_reports_lengths():
    waves, lengths = audio.batch([np.ones(5000, np.float32), np.ones(3200, np.float32)])
    assert waves.shape == (2, 5000) and lengths.tolist() == [5000, 3200]
    assert not waves[1, 3200:].any()
    waves, _ = audio.batch([np.ones(5000, np.float32)], pad_to_multiple=3200)
    assert waves.shape == (1, 6400)


# ------------------------------------------------------------------------------ bad input


def test_missing_file(tmp_path):
    with pytest.raises(AudioError, match="file not found"):
        audio.load(tmp_path / "nope.wav")


def test_empty_file(tmp_path):
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(AudioError, match=r"empty\.wav: empty file \(0 bytes\)"):
        audio.load(tmp_path / "empty.wav")


def test_audio_file_without_samples(tmp_path):
    sf.write(tmp_path / "none.wav", np.zeros(0, np.float32), 16_000)
    with pytest.raises(AudioError, match="no samples"):
        audio.load(tmp_path / "none.wav")


@pytest.mark.parametrize(
    "name, payload",
    [
        ("noise.wav", np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()),
        ("notes.wav", b"this is a text file, not audio\n" * 20),
        ("truncated.wav", b"RIFF\x24\x08\x00\x00WAVEfmt "),
    ],
    ids=["random-bytes", "text", "truncated-header"],
)
def test_corrupt_or_non_audio_file(tmp_path, name, payload):
    (tmp_path / name).write_bytes(payload)
    with pytest.raises(AudioError, match="not a readable audio file"):
        audio.load(tmp_path / name)


def test_directory_is_not_audio(tmp_path):
    with pytest.raises(AudioError, match="is a directory"):
        audio.load(tmp_path)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_samples(tmp_path, bad):
    x = tone(1.0, 16_000)
    x[8000] = bad
    sf.write(tmp_path / "bad.wav", x, 16_000, subtype="FLOAT")
    with pytest.raises(AudioError, match=r"1 sample\(s\) are NaN or inf \(first at 0\.500 s\)"):
        audio.load(tmp_path / "bad.wav")


def test_nan_at_another_rate_is_caught_before_resampling(tmp_path):
    x = tone(1.0, 44_100)
    x[100] = np.nan
    sf.write(tmp_path / "bad.wav", x, 44_100, subtype="FLOAT")
    with pytest.raises(AudioError, match=r"NaN or inf \(first at 0\.002 s\)"):  # 100 / 44100, the file's own rate
        audio.load(tmp_path / "bad.wav")


def test_too_short_says_what_the_minimum_is(tmp_path):
    sf.write(tmp_path / "blip.wav", tone(0.1, 16_000), 16_000)
    with pytest.raises(AudioError, match=r"too short: 1600 samples .* the minimum is 3040 samples \(0\.19 s\)"):
        audio.load(tmp_path / "blip.wav")


def test_validate_checks_arrays_too():
    with pytest.raises(AudioError, match="mono waveform"):
        audio.validate(np.zeros((2, 4000), np.float32))
    with pytest.raises(AudioError, match="float samples"):
        audio.validate(np.zeros(4000, np.int16))
    assert audio.validate(np.zeros(4000, np.float64)).dtype == np.float32
