"""Specification of the HiFT vocoder (CosyVoice 2's HiFTGenerator) and its hift.pt converter.

The parity reference is the cosyvoice2-hift-tiny fixture (recorded source noise as an input).
Set COSYVOICE_SRC to a CosyVoice checkout to also compare random configs with the PyTorch
module itself.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FIXTURES, full_mesh, single_device_mesh
from flax import nnx

from hellochat_jax.checkpoint.io import CheckpointError
from hellochat_jax.checkpoint.load import save_checkpoint
from hellochat_jax.components.hift import weights as cosyvoice2_hift
from hellochat_jax.components.hift.model import (
    HiFTConfig,
    HiFTVocoder,
    StreamCache,
    fade_in_out,
    fade_window,
    sin_cos,
    stream_step,
    synthesize,
)
from hellochat_jax.core import parity as verify
from hellochat_jax.core import sharding as shd
from hellochat_jax.testing.state_dicts import assert_same_state_dict

torch = pytest.importorskip("torch")

FIXTURE = FIXTURES / "cosyvoice2-hift-tiny"

# Two upsampling stages, odd widths, 32 samples per frame: nothing like the fixture's sizes.
TINY = dict(
    in_channels=12, base_channels=24, nb_harmonics=3, upsample_rates=(4, 2), upsample_kernel_sizes=(8, 4),
    resblock_kernel_sizes=(3, 5), resblock_dilation_sizes=((1, 3), (1, 2)),
    source_resblock_kernel_sizes=(5, 3), source_resblock_dilation_sizes=((1, 3), (1,)), f0_cond_channels=10,
)


def unit_gains(model: HiFTVocoder) -> HiFTVocoder:
    """Weight-norm gains 1 (kernels ~1/sqrt(fan_in)), so activations are O(1) as in a trained model."""
    for path, var in nnx.iter_graph(model):
        if path and path[-1] == "g" and isinstance(var, nnx.Param):
            var[...] = jnp.ones_like(var[...])
    return model


def tiny_model(seed: int = 0, **overrides) -> HiFTVocoder:
    return unit_gains(HiFTVocoder(HiFTConfig(**{**TINY, **overrides}), rngs=nnx.Rngs(seed)))


def random_mel(batch: int, frames: int, channels: int = 12, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((batch, channels, frames)) - 4.0).astype(np.float32)


@nnx.jit
def forward(model, mel, noise):
    f0 = model.f0(mel)
    source = model.source(f0, noise=noise)
    return f0, source, model.decode(mel, source)


@nnx.jit
def decode(model, mel, source):
    return model.decode(mel, source)


def noise_for(cfg: HiFTConfig, batch: int, frames: int, seed: int = 1) -> np.ndarray:
    shape = (batch, frames * cfg.samples_per_frame, cfg.harmonics)
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ----------------------------------------------------------------------------- fixture parity


# The fixture itself passes on 1 and 8 devices: tests/test_verify.py (every fixture).


def test_decoder_alone_matches_on_the_recorded_source():
    """Steps 3-5 of the fixture (STFT, decoder, iSTFT) fed the reference's own source: the
    float32 phase drift of the sine source is out of the picture, so this is tight."""
    case = verify.Case.load(FIXTURE)
    _, model = cosyvoice2_hift.load(case.checkpoint, single_device_mesh(), precision="highest")
    waveform = decode(model, jnp.asarray(case.inputs["speech_feat"]), jnp.asarray(case.outputs["source"][:, 0]))
    np.testing.assert_allclose(np.asarray(waveform), case.outputs["waveform"], atol=1e-4)


def test_source_from_the_recorded_f0():
    case = verify.Case.load(FIXTURE)
    _, model = cosyvoice2_hift.load(case.checkpoint, single_device_mesh(), precision="highest")
    source = nnx.jit(lambda m, f0, noise: m.source(f0, noise=noise))(model, jnp.asarray(case.outputs["f0"]), jnp.asarray(case.inputs["sine_noise"]))
    np.testing.assert_allclose(np.asarray(source), case.outputs["source"][:, 0], atol=2e-4)


# ----------------------------------------------------------------------------- behaviour


def test_shapes_and_range():
    model = tiny_model()
    cfg = model.cfg
    mel = random_mel(2, 6)
    waveform, source = synthesize(model, mel, key=jax.random.key(0))
    assert cfg.samples_per_frame == 32
    assert waveform.shape == source.shape == (2, 6 * 32)
    assert np.isfinite(np.asarray(waveform)).all()
    assert np.abs(np.asarray(waveform)).max() <= cfg.audio_limit
    assert np.abs(np.asarray(source)).max() <= 1.0  # tanh


def test_one_frame_and_three_stages():
    model = tiny_model(upsample_rates=(2, 3, 2), upsample_kernel_sizes=(4, 5, 4), source_resblock_kernel_sizes=(3, 3, 5),
                       source_resblock_dilation_sizes=((1,), (1, 2), (1,)), base_channels=16)
    waveform, _ = synthesize(model, random_mel(1, 1), key=jax.random.key(0))
    assert waveform.shape == (1, 12 * 4)


def test_batch_rows_are_independent():
    model = tiny_model()
    mel = random_mel(3, 6)
    noise = noise_for(model.cfg, 3, 6)
    _, source, waveform = forward(model, jnp.asarray(mel), jnp.asarray(noise))
    _, source1, waveform1 = forward(model, jnp.asarray(mel[1:2]), jnp.asarray(noise[1:2]))
    np.testing.assert_allclose(np.asarray(waveform)[1:2], np.asarray(waveform1), atol=1e-5)
    np.testing.assert_allclose(np.asarray(source)[1:2], np.asarray(source1), atol=1e-6)


def test_sharded_equals_unsharded():
    model = tiny_model(base_channels=32)
    mel = random_mel(4, 5)
    noise = noise_for(model.cfg, 4, 5)
    want = [np.asarray(x) for x in forward(model, jnp.asarray(mel), jnp.asarray(noise))]
    mesh = full_mesh()
    with jax.set_mesh(mesh):
        sharded = shd.shard_model(nnx.clone(model), mesh)
        inputs = shd.put_batch({"mel": mel, "noise": noise, "source": want[1]}, mesh)
        got = [np.asarray(x) for x in forward(sharded, inputs["mel"], inputs["noise"])]
        decoded = np.asarray(decode(sharded, inputs["mel"], inputs["source"]))
    # f0 (Hz) is |linear| of the last conv: near-zero values of a random model differ in the last
    # bits between reduction orders, so an absolute floor beside the relative tolerance
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6)
    # the sine phase amplifies f0's last-bit differences (other reduction order): looser
    np.testing.assert_allclose(got[1], want[1], atol=2e-4)
    np.testing.assert_allclose(got[2], want[2], atol=2e-3)
    np.testing.assert_allclose(decoded, want[2], atol=1e-4)  # the decoder on the same source


def test_noise_comes_from_the_key():
    model = tiny_model()
    mel = random_mel(2, 6)
    a, _ = synthesize(model, mel, key=jax.random.key(1))
    b, _ = synthesize(model, mel, key=jax.random.key(1))
    c, _ = synthesize(model, mel, key=jax.random.key(2))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(a), np.asarray(c))


def test_cache_source_replaces_the_first_samples():
    model = tiny_model()
    cache = np.linspace(-0.5, 0.5, 80, dtype=np.float32).reshape(2, 40)
    _, source = synthesize(model, random_mel(2, 6), key=jax.random.key(0), cache_source=cache)
    np.testing.assert_array_equal(np.asarray(source)[:, :40], cache)


def test_folded_weight_norm_gives_the_same_audio_and_refuses_export(tmp_path):
    model = tiny_model()
    folded = model.fold_weight_norm()
    assert folded.is_folded and not model.is_folded
    mel = jnp.asarray(random_mel(2, 6))
    source = jnp.asarray(np.tanh(np.random.default_rng(2).standard_normal((2, 6 * 32))).astype(np.float32))
    np.testing.assert_allclose(np.asarray(decode(folded, mel, source)), np.asarray(decode(model, mel, source)), atol=1e-4)  # fold rounding, amplified
    with pytest.raises(CheckpointError, match="folded"):
        cosyvoice2_hift.export(folded, folded.cfg, tmp_path)


def test_sin_cos_accuracy():
    z = np.concatenate([np.linspace(-10, 10, 10001), np.random.default_rng(0).uniform(-9e4, 9e4, 100000)]).astype(np.float32)
    sin, cos = jax.jit(sin_cos)(z)
    np.testing.assert_allclose(np.asarray(sin), np.sin(z.astype(np.float64)), atol=3e-7)
    np.testing.assert_allclose(np.asarray(cos), np.cos(z.astype(np.float64)), atol=3e-7)


# ----------------------------------------------------------------------------- bad input


def test_nan_in_mel_is_refused():
    model = tiny_model()
    mel = random_mel(2, 5)
    mel[1, 3, 2] = np.nan
    with pytest.raises(ValueError, match=r"NaN/inf.*batch row 1, frame 2"):
        synthesize(model, mel, key=jax.random.key(0))
    mel[1, 3, 2] = np.inf
    with pytest.raises(ValueError, match="NaN/inf"):
        model(jnp.asarray(mel), key=jax.random.key(0))  # eager calls check too


def test_malformed_mel_and_missing_randomness_are_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"mel must be \[batch, 12, frames\]"):
        synthesize(model, random_mel(1, 5, channels=80), key=jax.random.key(0))
    with pytest.raises(ValueError, match="no frames"):
        synthesize(model, np.zeros((1, 12, 0), np.float32), key=jax.random.key(0))
    with pytest.raises(ValueError, match="PRNG key"):
        model(jnp.asarray(random_mel(1, 3)))
    with pytest.raises(ValueError, match="noise has shape"):
        model(jnp.asarray(random_mel(1, 3)), noise=jnp.zeros((1, 10, 4)))


def test_unsupported_configs_are_refused():
    with pytest.raises(ValueError, match="22050"):
        HiFTConfig(sampling_rate=22050)
    with pytest.raises(ValueError, match="CausalHiFTGenerator"):
        from hellochat_jax.checkpoint.cosyvoice_yaml import Tagged

        HiFTConfig.from_yaml(Tagged("new", "cosyvoice.hifigan.generator.CausalHiFTGenerator", {}))


# ----------------------------------------------------------------------------- converter


def test_config_from_the_release_yaml():
    case = verify.Case.load(FIXTURE)
    cfg = cosyvoice2_hift.config_from_yaml(FIXTURE / "checkpoint" / "cosyvoice2.yaml")
    want = case.config["hift"]
    assert cfg.base_channels == want["base_channels"] and cfg.sampling_rate == want["sampling_rate"]
    assert list(cfg.upsample_rates) == want["upsample_rates"]
    assert [list(d) for d in cfg.source_resblock_dilation_sizes] == want["source_resblock_dilation_sizes"]
    assert (cfg.n_fft, cfg.hop_len) == (want["istft_params"]["n_fft"], want["istft_params"]["hop_len"])
    assert cfg.f0_cond_channels == want["f0_predictor"]["cond_channels"]
    assert HiFTConfig.from_yaml(cfg.to_yaml()) == cfg


def test_round_trip_is_bit_exact(tmp_path):
    cfg, model = cosyvoice2_hift.load(FIXTURE / "checkpoint", single_device_mesh())
    assert (cfg.checkpoint_naming, cfg.checkpoint_prefix) == ("parametrizations", "")
    out = cosyvoice2_hift.export(model, cfg, tmp_path)
    assert_same_state_dict(torch.load(FIXTURE / "checkpoint" / "hift.pt", weights_only=True), torch.load(out, weights_only=True))


def test_locally_made_release_folder_round_trips(tmp_path):
    """A random model written as a release folder (hift.pt + cosyvoice2.yaml `hift:` section)
    loads back to the same config and weights, and exports to the same file."""
    from hellochat_jax.checkpoint.cosyvoice_yaml import dump_cosyvoice_yaml

    model = tiny_model(seed=7)
    folder = tmp_path / "release"
    cosyvoice2_hift.export(model, model.cfg, folder)
    (folder / "cosyvoice2.yaml").write_text(dump_cosyvoice_yaml({"sample_rate": 24000, "hift": model.cfg.to_yaml()}))
    cfg, loaded = cosyvoice2_hift.load(folder, single_device_mesh())
    assert cfg == model.cfg
    out = cosyvoice2_hift.export(loaded, cfg, tmp_path / "again.pt")
    assert_same_state_dict(torch.load(folder / "hift.pt", weights_only=True), torch.load(out, weights_only=True))


def _legacy_release(tmp_path: Path) -> Path:
    """The fixture rewritten as older releases store it: weight_g/weight_v, 'generator.' prefix."""
    sd = torch.load(FIXTURE / "checkpoint" / "hift.pt", weights_only=True)
    legacy = {}
    for k, v in sd.items():
        k = k.replace(".parametrizations.weight.original0", ".weight_g").replace(".parametrizations.weight.original1", ".weight_v")
        legacy["generator." + k] = v
    folder = tmp_path / "legacy"
    folder.mkdir()
    torch.save(legacy, folder / "hift.pt")
    shutil.copy(FIXTURE / "checkpoint" / "cosyvoice2.yaml", folder / "cosyvoice2.yaml")
    return folder


def test_legacy_weight_norm_naming_and_prefix(tmp_path):
    folder = _legacy_release(tmp_path)
    cfg, model = cosyvoice2_hift.load(folder, single_device_mesh())
    assert (cfg.checkpoint_naming, cfg.checkpoint_prefix) == ("legacy", "generator.")
    # same weights as the current naming
    _, current = cosyvoice2_hift.load(FIXTURE / "checkpoint", single_device_mesh())
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(current))):
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(path))
    out = cosyvoice2_hift.export(model, cfg, tmp_path / "out.pt")
    assert_same_state_dict(torch.load(folder / "hift.pt", weights_only=True), torch.load(out, weights_only=True))


def test_converted_orbax_folder_round_trip(tmp_path):
    cfg, model = cosyvoice2_hift.load(FIXTURE / "checkpoint", single_device_mesh())
    save_checkpoint(model, cfg, tmp_path / "converted", cosyvoice2_hift.COMPONENT)
    cfg2, model2 = cosyvoice2_hift.load(tmp_path / "converted", single_device_mesh())
    assert cfg2 == cfg
    out = cosyvoice2_hift.export(model2, cfg2, tmp_path / "hift.pt")
    assert_same_state_dict(torch.load(FIXTURE / "checkpoint" / "hift.pt", weights_only=True), torch.load(out, weights_only=True))


def _edited_release(tmp_path: Path, edit) -> Path:
    sd = torch.load(FIXTURE / "checkpoint" / "hift.pt", weights_only=True)
    edit(sd)
    folder = tmp_path / "edited"
    folder.mkdir(exist_ok=True)
    torch.save(sd, folder / "hift.pt")
    shutil.copy(FIXTURE / "checkpoint" / "cosyvoice2.yaml", folder / "cosyvoice2.yaml")
    return folder


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda sd: sd.pop("resblocks.4.convs2.1.parametrizations.weight.original1"), r"missing keys \(1\): resblocks\.4\.convs2\.1\.parametrizations\.weight\.original1"),
        (lambda sd: sd.__setitem__("resblocks.9.convs1.0.bias", torch.zeros(4)), r"unexpected keys \(1\): resblocks\.9\.convs1\.0\.bias"),
        (lambda sd: sd.__setitem__("m_source.extra", torch.zeros(1)), r"unexpected keys \(1\): m_source\.extra"),
        (lambda sd: sd.__setitem__("ups.1.parametrizations.weight.original1", torch.zeros(16, 8, 9)), r"mis-shaped keys \(1\): ups\.1\.parametrizations\.weight\.original1"),
        (lambda sd: sd.__setitem__("conv_post.weight_g", sd.pop("conv_post.parametrizations.weight.original0")), r"mixes weight-norm namings"),
    ],
    ids=["missing", "unexpected-index", "unexpected-name", "mis-shaped", "mixed-naming"],
)
def test_bad_checkpoints_are_refused_by_name(tmp_path, edit, message):
    with pytest.raises(CheckpointError, match=message):
        cosyvoice2_hift.load(_edited_release(tmp_path, edit), single_device_mesh())


def test_missing_yaml_is_named(tmp_path):
    shutil.copy(FIXTURE / "checkpoint" / "hift.pt", tmp_path / "hift.pt")
    with pytest.raises(CheckpointError, match="no cosyvoice2.yaml"):
        cosyvoice2_hift.load(tmp_path / "hift.pt", single_device_mesh())


# ----------------------------------------------------------------------------- streaming


def test_fade_in_out_is_the_reference_formula():
    window = fade_window(4)
    fade_in = np.arange(10, dtype=np.float32)[None]
    fade_out = -np.arange(6, dtype=np.float32)[None]
    got = np.asarray(fade_in_out(jnp.asarray(fade_in), jnp.asarray(fade_out), window))
    want = fade_in.copy()
    want[:, :4] = fade_in[:, :4] * np.hamming(8)[:4] + fade_out[:, -4:] * np.hamming(8)[4:]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_streaming_chunks_follow_the_reference_schedule():
    """Chunks of 6 frames with a 2-frame cache: every chunk but the last holds back 2 frames of
    audio; the next chunk re-vocodes those frames with the cached source and fades them in."""
    model = tiny_model()
    per_frame = model.cfg.samples_per_frame
    mel = random_mel(2, 15)
    cache = None
    pieces = []
    chunks = [(0, 6), (6, 12), (12, 15)]
    for n, (a, b) in enumerate(chunks):
        key = jax.random.key(n)
        last = n == len(chunks) - 1
        audio, new_cache = stream_step(model, mel[:, :, a:b], cache, key=key, finalize=last, cache_frames=2)
        # what the step must have computed
        full_mel = mel[:, :, a:b] if cache is None else np.concatenate([np.asarray(cache.mel), mel[:, :, a:b]], axis=2)
        want, source = synthesize(model, full_mel, key=key, cache_source=None if cache is None else cache.source)
        want = np.asarray(want)
        if cache is not None:
            want = np.asarray(fade_in_out(jnp.asarray(want), cache.speech, fade_window(2 * per_frame)))
            np.testing.assert_array_equal(np.asarray(source)[:, : 2 * per_frame], np.asarray(cache.source))
        if last:
            assert new_cache is None
            np.testing.assert_allclose(np.asarray(audio), want, atol=1e-6)
        else:
            assert isinstance(new_cache, StreamCache)
            np.testing.assert_allclose(np.asarray(audio), want[:, : -2 * per_frame], atol=1e-6)
            np.testing.assert_allclose(np.asarray(new_cache.speech), want[:, -2 * per_frame :], atol=1e-6)
            np.testing.assert_array_equal(np.asarray(new_cache.mel), full_mel[:, :, -2:])
        pieces.append(np.asarray(audio))
        cache = new_cache
    assert sum(p.shape[1] for p in pieces) == 15 * per_frame


# ----------------------------------------------------------------------------- PyTorch reference (optional)


def _reference_generator(cfg: HiFTConfig):
    src = os.environ.get("COSYVOICE_SRC")
    if not src:
        pytest.skip("set COSYVOICE_SRC to a CosyVoice checkout to compare with the PyTorch module")
    sys.path.insert(0, src)
    from cosyvoice.hifigan.f0_predictor import ConvRNNF0Predictor
    from cosyvoice.hifigan.generator import HiFTGenerator

    y = cfg.to_yaml().value
    f0 = y.pop("f0_predictor").value
    return HiFTGenerator(**y, f0_predictor=ConvRNNF0Predictor(**f0)).eval()


def test_decoder_matches_the_pytorch_module_on_a_random_config():
    model = tiny_model(seed=3)
    ref = _reference_generator(model.cfg)
    ref.load_state_dict(cosyvoice2_hift.export_state_dict(model, model.cfg), strict=True)
    mel = random_mel(2, 9, seed=4)
    source = np.tanh(np.random.default_rng(5).standard_normal((2, 9 * model.cfg.samples_per_frame))).astype(np.float32)
    with torch.inference_mode():
        want = ref.decode(x=torch.from_numpy(mel), s=torch.from_numpy(source)[:, None]).numpy()
        f0_want = ref.f0_predictor(torch.from_numpy(mel)).numpy()
    np.testing.assert_allclose(np.asarray(decode(model, jnp.asarray(mel), jnp.asarray(source))), want, atol=1e-4)
    np.testing.assert_allclose(np.asarray(nnx.jit(lambda m, x: m.f0(x))(model, jnp.asarray(mel))), f0_want, rtol=1e-4, atol=1e-4)
