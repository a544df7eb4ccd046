"""The hift stage: the vocoder's training losses, F0 targets, the 16 kHz configuration and the
stage's rows and objective (hellochat_jax/components/hift/losses.py, train/hift_stage.py)."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from data_corpus import tiny_corpus  # noqa: F401  (the session's tiny corpus fixture)
from flax import nnx
from hellochat_jax.testing.stages import first_batch_matching_spec, stage_config
from hellochat_jax.train import hift_stage
from hellochat_jax.train.config import ModelConfig, load

from hellochat_jax.components.hift import losses
from hellochat_jax.components.hift.model import (
    HiFTConfig,
    HiFTVocoder,
    flow_mel_settings,
    log_mel,
)

RATE = 16000
PER = 320  # samples per mel frame at 16 kHz

# configs/tiny.yaml's 16 kHz vocoder (the one the main job trains), and a narrower one with
# fewer resblocks so that tests compile quickly.
TINY_16K_HIFT = load("tiny").model.hift
SMALL = dict(
    TINY_16K_HIFT, base_channels=16, f0_cond_channels=16, nb_harmonics=2,
    resblock_kernel_sizes=(3,), resblock_dilation_sizes=((1,),),
    source_resblock_kernel_sizes=(3,), source_resblock_dilation_sizes=((1,),),
)


@pytest.fixture(scope="module")
def vocoder() -> HiFTVocoder:
    """A small 16 kHz vocoder with numpy-drawn weights: the module's own initialisation runs
    one eager op per parameter, which on a loaded 2-core CPU takes longer than the tests.
    Weight-norm gains are 1 (unit-norm kernels), plain kernels U(+-1/sqrt(fan_in))."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: HiFTVocoder(HiFTConfig(**SMALL), rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)

    def draw(path, x):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "v":
            return jnp.asarray(rng.normal(0.0, 0.01, x.shape), jnp.float32)
        if name in ("g", "alpha"):
            return jnp.ones(x.shape, jnp.float32)
        if name == "bias":
            return jnp.zeros(x.shape, jnp.float32)
        bound = 1.0 / np.sqrt(np.prod(x.shape[:-1]))
        return jnp.asarray(rng.uniform(-bound, bound, x.shape), jnp.float32)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(draw, state))


def sine(freq: float, samples: int, amplitude: float = 0.3) -> np.ndarray:
    return (amplitude * np.sin(2 * np.pi * freq * np.arange(samples) / RATE)).astype(np.float32)


# ----------------------------------------------------------------------------- configuration


def test_the_mel_settings_follow_the_vocoder():
    assert flow_mel_settings(HiFTConfig()) == dict(rate=24000, n_fft=1920, hop=480, n_mels=80, fmin=0.0, fmax=8000.0)
    cfg = HiFTConfig(**TINY_16K_HIFT)
    assert cfg.samples_per_frame == PER
    assert flow_mel_settings(cfg) == dict(rate=16000, n_fft=1280, hop=320, n_mels=80, fmin=0.0, fmax=8000.0)
    assert flow_mel_settings(HiFTConfig(**{**SMALL, "sampling_rate": 8000}))["fmax"] == 4000.0
    assert log_mel(np.zeros(10 * PER, np.float32), **flow_mel_settings(cfg)).shape == (10, 80)


def test_the_16k_vocoder_gives_320_samples_per_frame(vocoder):
    mel = jnp.zeros((2, 80, 7), jnp.float32)
    speech, source = jax.eval_shape(lambda m: vocoder(m, key=jax.random.key(0)), mel)  # shapes only: no compile
    assert speech.shape == source.shape == (2, 7 * PER)


# ----------------------------------------------------------------------------- losses


def test_losses_vanish_on_identical_signals_and_not_otherwise():
    rng = np.random.default_rng(0)
    target = jnp.asarray(rng.normal(0, 0.1, (2, 10 * PER)), jnp.float32)
    other = jnp.asarray(rng.normal(0, 0.1, (2, 10 * PER)), jnp.float32)
    lengths = jnp.asarray([10 * PER, 6 * PER], jnp.int32)
    settings = flow_mel_settings(HiFTConfig(**SMALL))
    # jitted: one compile each instead of one per eager op
    stft_loss = jax.jit(losses.multi_resolution_stft_loss)
    mel_l1 = jax.jit(lambda p, t, n: losses.mel_l1_loss(p, t, n, settings))

    np.testing.assert_allclose(stft_loss(target, target, lengths), 0.0, atol=1e-6)
    np.testing.assert_allclose(mel_l1(target, target, lengths), 0.0, atol=1e-6)
    assert np.all(np.asarray(stft_loss(other, target, lengths)) > 0.5)
    assert np.all(np.asarray(mel_l1(other, target, lengths)) > 0.1)

    # what lies past a row's length does not count
    past = target.at[1, 6 * PER :].set(other[1, 6 * PER :])
    np.testing.assert_allclose(stft_loss(past, target, lengths), 0.0, atol=1e-6)
    np.testing.assert_allclose(mel_l1(past, target, lengths), 0.0, atol=1e-6)

    f0 = jnp.asarray([[0.0, 100.0, 200.0], [150.0, 0.0, 0.0]])
    valid = jnp.asarray([[1, 1, 1], [1, 0, 0]])
    np.testing.assert_allclose(losses.f0_l1_loss(f0, f0, valid), 0.0)
    np.testing.assert_allclose(losses.f0_l1_loss(f0 + 10.0, f0, valid), 10.0)

    # identical signals still give finite gradients (no sqrt(0) in the backward pass)
    grad = jax.jit(jax.grad(lambda p: jnp.sum(losses.multi_resolution_stft_loss(p, target, lengths))))(target)
    assert np.all(np.isfinite(np.asarray(grad)))


def test_f0_targets_find_the_pitch_and_silence():
    wave = np.concatenate([sine(200.0, 20 * PER), np.zeros(20 * PER, np.float32)])
    f0 = losses.f0_targets(wave, PER, RATE)
    assert f0.shape == (40,) and f0.dtype == np.float32
    np.testing.assert_allclose(f0[2:18], 200.0, rtol=0.02)
    assert np.all(f0[22:] == 0.0)
    noise = np.random.default_rng(0).normal(0, 0.3, 20 * PER).astype(np.float32)
    assert np.mean(losses.f0_targets(noise, PER, RATE) == 0.0) > 0.9  # noise is unvoiced
    assert np.all(losses.f0_targets(np.zeros(20 * PER, np.float32), PER, RATE) == 0.0)


def test_a_few_adam_steps_reduce_the_vocoder_loss(vocoder):
    model = nnx.clone(vocoder)  # trained in place
    cfg = model.cfg
    frames = 8
    wave = np.stack([sine(150.0, frames * PER), sine(220.0, frames * PER)])
    lengths = np.asarray([frames * PER, frames * PER - 500], np.int32)
    wave[1, lengths[1] :] = 0.0
    mel = jnp.swapaxes(log_mel(wave, **flow_mel_settings(cfg)), 1, 2)
    f0 = np.stack([losses.f0_targets(w, PER, RATE) for w in wave])
    assert np.all(f0[0, 1:-1] > 100.0)
    optimizer = nnx.Optimizer(model, optax.adam(2e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, key):
        loss_fn = lambda m: losses.vocoder_loss(m, mel, jnp.asarray(wave), jnp.asarray(lengths), jnp.asarray(f0), key)
        (loss, stats), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        optimizer.update(model, grads)
        return loss, stats

    key = jax.random.key(0)  # the same source noise every step: a fixed batch
    history = [step(model, optimizer, key) for _ in range(30)]
    (first, first_stats), (last, last_stats) = history[0], history[-1]
    assert np.isfinite(float(last)) and float(first_stats["hift_rows"]) == 2.0
    assert float(last) < 0.8 * float(first)
    for name in ("hift_stft", "hift_mel_l1", "hift_f0_l1"):
        assert float(last_stats[name]) < float(first_stats[name]), name


# ----------------------------------------------------------------------------- the stage


def _cfg(corpus, batch_size: int = 2, **options) -> types.SimpleNamespace:
    return stage_config("hift", corpus, batch_size, options, model=ModelConfig(hift=dict(SMALL)))


def test_options_are_checked():
    with pytest.raises(Exception, match="adversarial"):
        hift_stage.HiFTData(_cfg("unused", adversarial=True))
    with pytest.raises(Exception, match="segment_frames"):
        hift_stage.HiFTData(_cfg("unused", segment_frames=0))
    with pytest.raises(Exception, match="mel_noise"):
        hift_stage.HiFTData(_cfg("unused", mel_noise=-1.0))


@pytest.mark.slow
def test_stage_rows_follow_the_local_spec_and_train(tiny_corpus, vocoder):  # noqa: F811
    data = hift_stage.HiFTData(_cfg(tiny_corpus, segment_frames=8, resolutions=[[256, 64], [512, 128]]))
    batch = first_batch_matching_spec(data)
    assert np.all(batch["wave_length"] > 0) and np.any(batch["f0"] > 0)
    # the mel is the flow's mel of the wave
    np.testing.assert_allclose(batch["mel"], log_mel(batch["wave"], **flow_mel_settings(data.hift)), atol=1e-4)

    objective = hift_stage.HiFTObjective(data.cfg, data)
    assert data.hift == vocoder.cfg
    model = types.SimpleNamespace(hift=vocoder)  # a HelloChat's hift part
    step_batch = jax.tree.map(lambda x: jnp.asarray(x)[None], batch)  # [accum = 1, rows, ...]
    norms = objective.normalizers(step_batch)
    loss, stats = objective(model, jax.tree.map(lambda x: x[0], step_batch), jax.random.key(0), norms)
    record = objective.record(jax.device_get(stats))
    assert np.isfinite(float(loss)) and set(record) == {"hift_stft", "hift_mel_l1", "hift_f0_l1"}
    expected = (45.0 * stats["hift_stft"] + 45.0 * stats["hift_mel_l1"] + stats["hift_f0_l1"]) / norms["hift_rows"]
    np.testing.assert_allclose(float(loss), float(expected), rtol=1e-5)


@pytest.mark.parametrize("mel_noise", [0.0, 2.0])
def test_mel_noise_perturbs_the_vocoders_input_by_a_per_row_std_below_it(monkeypatch, mel_noise):
    """options.mel_noise: the vocoder reads the row's mel plus N(0, s^2), s ~ U[0, mel_noise)
    per row and drawn from the step's key; 0 leaves the input exactly the true mel."""
    seen = []

    def vocoder_loss(hift, mel, *args, **kwargs):  # what the vocoder would read
        seen.append(np.asarray(mel))
        return jnp.zeros(()), {}

    monkeypatch.setattr(hift_stage.losses, "vocoder_loss", vocoder_loss)
    data = types.SimpleNamespace(options=hift_stage.HiFTOptions(mel_noise=mel_noise))
    objective = hift_stage.HiFTObjective(None, data)
    mel = np.random.default_rng(0).normal(-4, 2, (4, 48, 80)).astype(np.float32)
    micro = {"mel": jnp.asarray(mel), "wave": None, "wave_length": None, "f0": None}
    objective(types.SimpleNamespace(hift=None), micro, jax.random.key(0), {"hift_rows": 4.0})
    objective(types.SimpleNamespace(hift=None), micro, jax.random.key(1), {"hift_rows": 4.0})
    true = mel.transpose(0, 2, 1)
    if mel_noise == 0:
        np.testing.assert_array_equal(seen[0], true)
        return
    stds = (seen[0] - true).reshape(4, -1).std(axis=1)
    assert np.all(stds < mel_noise) and np.ptp(stds) > 0.05  # each row its own level, all below the bound
    assert not np.allclose(seen[0], seen[1])  # a new draw per step key
