"""Specification of the spectral toolkit (hellochat_jax.core.dsp): every front end's window,
STFT, iSTFT and mel bank is one of these, so each is checked here against its reference
(torch.stft / torch.istft, scipy windows, librosa banks)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hellochat_jax.core import dsp

torch = pytest.importorskip("torch")
scipy_signal = pytest.importorskip("scipy.signal")


def noise(*shape: int, seed: int = 0) -> np.ndarray:
    return (0.3 * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def torch_stft(x: np.ndarray, n_fft: int, hop: int, window: np.ndarray, **kwargs) -> np.ndarray:
    """torch.stft as [..., frames, bins] (ours is time-major)."""
    spec = torch.stft(torch.from_numpy(x), n_fft, hop, win_length=len(window), window=torch.from_numpy(window), return_complex=True, **kwargs)
    return spec.transpose(-1, -2).numpy()


# ----------------------------------------------------------------------------- windows


@pytest.mark.parametrize("length", [1, 16, 400, 512])
@pytest.mark.parametrize("periodic", [True, False])
def test_hann_window_is_scipys_and_torchs(length, periodic):
    ours = dsp.hann_window(length, periodic=periodic)
    assert ours.dtype == np.float32 and ours.shape == (length,)
    np.testing.assert_allclose(ours, scipy_signal.get_window("hann", length, fftbins=periodic), rtol=0, atol=1e-7)
    np.testing.assert_array_equal(ours, torch.hann_window(length, periodic=periodic, dtype=torch.float64).float().numpy())


# ----------------------------------------------------------------------------- STFT


@pytest.mark.parametrize("n_fft, hop, win", [(512, 160, 512), (400, 160, 400), (16, 4, 16), (512, 160, 320)])
def test_centred_stft_is_torchs(n_fft, hop, win):
    x = noise(2, 4000)
    window = dsp.hann_window(win)
    ours = np.asarray(jax.jit(lambda x: dsp.stft(x, n_fft, hop, window, pad=n_fft // 2))(x))
    ref = torch_stft(x, n_fft, hop, window, center=True, pad_mode="reflect")
    assert ours.shape == ref.shape == (2, 1 + 4000 // hop, n_fft // 2 + 1)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4 * np.abs(ref).max())


def test_zero_padded_stft_is_torchs():
    x = noise(3, 1000)
    ours = np.asarray(dsp.stft(x, 64, 16, dsp.hann_window(64), pad=32, pad_mode="constant"))
    ref = torch_stft(x, 64, 16, dsp.hann_window(64), center=True, pad_mode="constant")
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)


def test_stft_frames_read_exactly_their_samples():
    # unpadded frame f covers [f * hop, f * hop + n_fft): its DC bin is the windowed sum there
    x = noise(1, 1000)
    window = dsp.hann_window(100)
    ours = np.asarray(dsp.stft(x, 100, 30, window, num_frames=5))
    assert ours.shape == (1, 5, 51)
    np.testing.assert_allclose(ours[0, :, 0].real, [np.dot(x[0, 30 * f : 30 * f + 100], window) for f in range(5)], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="cannot take 32 frames"):
        dsp.stft(x, 100, 30, window, num_frames=32)


def test_per_row_lengths_reflect_each_row_at_its_own_end():
    """A zero-padded batch with `lengths` gives each row's frames as if it stood alone."""
    rows = [noise(1600, seed=1), noise(1000, seed=2), noise(640, seed=3)]
    batch, lengths = dsp.batch(rows)
    window = dsp.hann_window(400)
    batched = np.asarray(dsp.stft(batch, 400, 160, window, pad=200, lengths=jnp.asarray(lengths), num_frames=1600 // 160))
    for i, row in enumerate(rows):
        alone = np.asarray(dsp.stft(row[None], 400, 160, window, pad=200))[0]
        frames = len(row) // 160  # frames past the row's end are the caller's to mask
        np.testing.assert_allclose(batched[i, :frames], alone[:frames], rtol=0, atol=1e-5)
    # without lengths the short rows' last frames read the zeros after them instead
    plain = np.asarray(dsp.stft(batch, 400, 160, window, pad=200, num_frames=10))
    assert np.abs(plain[2, 3] - batched[2, 3]).max() > 1e-2


def test_reflect_padding_needs_more_samples_than_the_pad():
    with pytest.raises(ValueError, match="200 samples are too few to reflect-pad by 200"):
        dsp.pad_ends(np.zeros((1, 200), np.float32), 200)
    np.testing.assert_array_equal(dsp.pad_ends(np.arange(4.0)[None], 2), [[2, 1, 0, 1, 2, 3, 2, 1]])


# ----------------------------------------------------------------------------- iSTFT


@pytest.mark.parametrize("n_fft, hop", [(16, 4), (64, 16)])
def test_istft_is_torchs_and_inverts_the_stft(n_fft, hop):
    x = noise(2, 40 * hop)
    window = dsp.hann_window(n_fft)
    spectrum = dsp.stft(x, n_fft, hop, window, pad=n_fft // 2)
    back = np.asarray(jax.jit(lambda s: dsp.istft(s, n_fft, hop, window))(spectrum))
    np.testing.assert_allclose(back, x, rtol=0, atol=1e-5)
    # on a spectrum that no signal has (random phases): torch's answer, not just an inverse
    rng = np.random.default_rng(1)
    z = (rng.standard_normal((2, 30, n_fft // 2 + 1)) + 1j * rng.standard_normal((2, 30, n_fft // 2 + 1))).astype(np.complex64)
    ours = np.asarray(dsp.istft(jnp.asarray(z), n_fft, hop, window))
    ref = torch.istft(torch.from_numpy(z).transpose(-1, -2), n_fft, hop, window=torch.from_numpy(window), center=True).numpy()
    assert ours.shape == ref.shape == (2, 29 * hop)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- mel and log


def test_slaney_bank_is_librosas_transposed():
    import librosa

    bank = dsp.slaney_mel_filterbank(24000, 1920, 80, 0.0, 8000.0)
    assert bank.shape == (961, 80) and not bank.flags.writeable  # cached: shared, so read-only
    np.testing.assert_array_equal(bank, librosa.filters.mel(sr=24000, n_fft=1920, n_mels=80, fmin=0.0, fmax=8000.0).astype(np.float32).T)


def test_htk_bank_triangles_peak_at_their_centre_mels():
    bank = dsp.htk_mel_filterbank(16000, 512, 64, 0.0, 8000.0)
    assert bank.shape == (257, 64) and bank.min() == 0.0 and bank.max() <= 1.0
    assert np.all(np.diff(bank.argmax(axis=0)) >= 0)  # centres rise with the mel index
    assert (bank > 0).sum(axis=0).min() >= 1  # every band sees some bin


def test_db_and_peak_floor():
    power = jnp.asarray([1.0, 1e-3, 0.0, 100.0])
    np.testing.assert_allclose(dsp.power_to_db(power), [0.0, -30.0, -100.0, 20.0], atol=1e-5)
    np.testing.assert_allclose(dsp.floor_below_peak(dsp.power_to_db(power), 20.0, 80.0), [0.0, -30.0, -60.0, 20.0], atol=1e-5)
