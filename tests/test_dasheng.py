"""Specification of the Dasheng encoder: the `dasheng` 0.0.9 package (torch, torchaudio stubbed
by hellochat_jax/testing/torch_dasheng.py) and the dasheng-tiny fixture are the references."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import single_device_mesh
from flax import nnx

from hellochat_jax.checkpoint.io import CheckpointError
from hellochat_jax.components.dasheng import model as dasheng
from hellochat_jax.components.dasheng import weights as convert_dasheng
from hellochat_jax.components.dasheng.model import (
    DashengConfig,
    DashengEncoder,
    encode_long,
    log_mel,
)

torch = pytest.importorskip("torch")

FIXTURE = Path(__file__).parent / "fixtures" / "dasheng-tiny"
TOL = dict(rtol=2e-4, atol=5e-4)  # the fixture's
CHUNK_SAMPLES = 1008 * 160  # one 252-patch chunk


def noisy_audio(lengths: list[int], seed: int = 0, loud: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """Zero-padded batch of int16-grid sine + noise, one level per row."""
    rng = np.random.default_rng(seed)
    wav = np.zeros((len(lengths), max(lengths)), np.float32)
    for i, n in enumerate(lengths):
        t = np.arange(n) / 16000
        x = loud / (i + 1) * np.sin(2 * np.pi * (220 + 110 * i) * t) + 0.05 * rng.standard_normal(n)
        wav[i, :n] = np.round(np.clip(x, -1, 1) * 32767) / 32768
    return wav, np.asarray(lengths, np.int32)


def random_encoder(cfg: DashengConfig, seed: int = 0) -> DashengEncoder:
    """Random weights where every one matters: biases, norms, BatchNorm statistics too."""
    model = DashengEncoder(cfg, rngs=nnx.Rngs(seed))
    key = jax.random.key(seed + 1)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        key, sub = jax.random.split(key)
        if path[-1] in ("bias", "scale", "gamma"):
            var.set_value(var.get_value() + 0.1 * jax.random.normal(sub, var.shape))
    model.init_bn.mean.set_value(jax.random.uniform(key, (cfg.n_mels,), minval=-60.0, maxval=-20.0))
    model.init_bn.var.set_value(jax.random.uniform(sub, (cfg.n_mels,), minval=100.0, maxval=600.0))
    model.init_bn.num_batches_tracked.set_value(jnp.int32(1234))
    return model


def make_release(tmp_path: Path, overrides: dict, seed: int = 0):
    """A random Dasheng saved as a release .pt, and the torch reference loaded from that file."""
    from hellochat_jax.testing.torch_dasheng import load_reference

    cfg = DashengConfig.from_release({**DashengConfig.preset("tiny").to_release(), **overrides})
    path = convert_dasheng.export(random_encoder(cfg, seed), cfg, tmp_path / "dasheng.pt")
    reference, _ = load_reference(path)
    return path, reference


@nnx.jit
def forward(model, waveform, lengths):
    mel = log_mel(waveform, model.cfg)
    features, valid = model.encode_mel(mel, lengths)
    return mel, features, valid


# ------------------------------------------------------------------------------- parity


# The fixture itself passes on 1 and 8 devices: tests/test_verify.py (every fixture).


REFERENCE_CASES = {
    # name: (config overrides, row lengths in samples)
    "shorter-than-one-chunk": (dict(embed_dim=32, depth=1, num_heads=2), [40_000, 23_456]),
    "exactly-one-chunk": (dict(embed_dim=48, depth=2, num_heads=3, init_values=0.1, qkv_bias=False), [CHUNK_SAMPLES - 160, 100_000]),
    "chunks-plus-remainder": (
        dict(embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0, n_mels=32, patch_size=[32, 4], patch_stride=[32, 4],
             f_max=7000, win_size=400),
        [3 * CHUNK_SAMPLES + 17 * 640 + 100, 200_000],
    ),
}


@pytest.mark.parametrize("name", list(REFERENCE_CASES))
def test_matches_reference(tmp_path, name):
    overrides, lengths = REFERENCE_CASES[name]
    path, reference = make_release(tmp_path, overrides)
    wav, lengths = noisy_audio(lengths)
    with torch.no_grad():
        ref_mel = reference.front_end(torch.from_numpy(wav)).numpy()
        ref = reference(torch.from_numpy(wav), x_length=torch.from_numpy(lengths)).numpy()

    cfg, model = convert_dasheng.load(path, single_device_mesh(), precision="highest")
    mel, features, valid = forward(model, jnp.asarray(wav), jnp.asarray(lengths))
    n = ref.shape[1]
    assert features.shape == ref.shape and n == (1 + wav.shape[1] // 160) // 4
    expected_valid = np.arange(n)[None, :] < (lengths // 640)[:, None]
    np.testing.assert_array_equal(np.asarray(valid), expected_valid)
    np.testing.assert_allclose(np.asarray(mel).transpose(0, 2, 1), ref_mel, **TOL)
    np.testing.assert_allclose(np.asarray(features)[expected_valid], ref[expected_valid], **TOL)


def test_exactly_one_chunk_has_one_chunk():
    cfg = DashengConfig.preset("tiny")
    assert dasheng.num_frames(CHUNK_SAMPLES - 160, cfg) // 4 == cfg.chunk_patches == 252


# ------------------------------------------------------------------------------- front end


def test_top_db_is_batch_wide_by_default_and_per_sample_on_request():
    loud = np.random.default_rng(0).uniform(-1, 1, 32_000).astype(np.float32)
    loud[16_000:] = 0.0  # silence (-100 dB) lies more than 120 dB below the loud row's peak
    quiet = (loud * 1e-3).astype(np.float32)
    wav = np.stack([loud, quiet])
    cfg = DashengConfig.preset("tiny")
    raw = np.asarray(dasheng.to_db(dasheng.power_mel(dasheng.pad_for_stft(jnp.asarray(wav), cfg), cfg)))

    batch_wide = np.asarray(log_mel(jnp.asarray(wav), cfg))
    np.testing.assert_allclose(batch_wide, np.maximum(raw, raw.max() - 120), rtol=1e-6, atol=1e-5)

    per_sample_cfg = DashengConfig.preset("tiny", top_db_per_sample=True)
    per_sample = np.asarray(log_mel(jnp.asarray(wav), per_sample_cfg))
    floors = raw.max(axis=(1, 2), keepdims=True) - 120
    np.testing.assert_allclose(per_sample, np.maximum(raw, floors), rtol=1e-6, atol=1e-5)
    assert not np.allclose(per_sample[1], batch_wide[1])  # the quiet row's floor really differs


def test_front_end_is_jittable_and_batched():
    cfg = DashengConfig.preset("tiny")
    wav, _ = noisy_audio([16_000, 16_000, 16_000])
    one_by_one = np.concatenate([np.asarray(log_mel(jnp.asarray(wav[i : i + 1]), DashengConfig.preset("tiny", top_db_per_sample=True))) for i in range(3)])
    batched = np.asarray(jax.jit(log_mel, static_argnums=1)(jnp.asarray(wav), DashengConfig.preset("tiny", top_db_per_sample=True)))
    np.testing.assert_allclose(batched, one_by_one, rtol=1e-6, atol=1e-5)
    assert batched.shape == (3, 1 + 16_000 // 160, cfg.n_mels)


def test_mel_filterbank_matches_torchaudio_table():
    cfg = DashengConfig.preset("tiny")
    window, fb = convert_dasheng.torchaudio_buffers(cfg)
    np.testing.assert_allclose(dasheng.mel_filterbank(cfg), fb.numpy(), rtol=0, atol=5e-6)
    np.testing.assert_allclose(dasheng.hann_window(cfg), window.numpy(), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------- padding, long audio


def tiny_model(seed: int = 0, **overrides) -> DashengEncoder:
    model = DashengEncoder(DashengConfig.preset("tiny", precision="highest", **overrides), rngs=nnx.Rngs(seed))
    model.init_bn.mean[...] = jnp.full((64,), -40.0)
    model.init_bn.var[...] = jnp.full((64,), 400.0)
    return model


def test_fully_padded_chunk_gives_no_nan():
    model = tiny_model()
    wav, lengths = noisy_audio([2 * CHUNK_SAMPLES, 20_000])  # row 1: chunk 2 is all padding
    features, valid = nnx.jit(lambda m, w, l: m(w, l))(model, jnp.asarray(wav), jnp.asarray(lengths))
    assert np.isfinite(np.asarray(features)).all()
    assert np.asarray(valid).sum(axis=1).tolist() == [2 * 252, 20_000 // 640]


def test_silence_is_valid_input():
    model = tiny_model()
    silence = jnp.zeros((1, 48_000), jnp.float32)
    mel = np.asarray(log_mel(silence, model.cfg))
    np.testing.assert_array_equal(mel, -100.0)  # the 1e-10 power floor
    features, valid = nnx.jit(lambda m, w: m(w))(model, silence)
    assert np.isfinite(np.asarray(features)).all() and np.asarray(valid).all()


def test_encode_long_equals_one_shot():
    model = tiny_model()
    wav, lengths = noisy_audio([3 * CHUNK_SAMPLES + 5 * 640 + 37, 2 * CHUNK_SAMPLES + 1000])
    one_shot, valid = nnx.jit(lambda m, w, l: m(w, l))(model, jnp.asarray(wav), jnp.asarray(lengths))
    for per_step in (1, 6):
        long, long_valid = encode_long(model, wav, lengths, chunks_per_step=per_step)
        np.testing.assert_array_equal(long_valid, np.asarray(valid))
        np.testing.assert_allclose(long[long_valid], np.asarray(one_shot)[long_valid], rtol=1e-5, atol=1e-5)


def _run_long(monkeypatch, seconds: int):
    """encode_long on `seconds` of audio, recording the shapes the device ever sees."""
    model = tiny_model()
    seen = set()
    inner = dasheng._segment_features

    def spy(model, segment, peak, valid, *, frames):
        seen.add(segment.shape)
        return inner(model, segment, peak, valid, frames=frames)

    monkeypatch.setattr(dasheng, "_segment_features", spy)
    wav = (0.1 * np.sin(np.arange(seconds * 16_000, dtype=np.float32) * 0.05))[None, :]
    features, valid = encode_long(model, wav, chunks_per_step=4)
    assert features.shape == (1, (1 + seconds * 16_000 // 160) // 4, 64) and valid.all()
    assert np.isfinite(features).all()
    return seen


def test_long_audio_is_processed_in_bounded_segments(monkeypatch):
    # Device work happens in fixed-size segments: one shape, whatever the length.
    short = _run_long(monkeypatch, 50)
    longer = _run_long(monkeypatch, 200)
    assert short == longer and len(short) == 1


@pytest.mark.slow
def test_hours_of_audio(monkeypatch):
    assert len(_run_long(monkeypatch, 2 * 3600)) == 1


# ------------------------------------------------------------------------------- converter


def test_export_round_trip_is_bit_exact(tmp_path):
    cfg, model = convert_dasheng.load(FIXTURE / "checkpoint" / "dasheng.pt", single_device_mesh())
    out = convert_dasheng.export(model, cfg, tmp_path / "again.pt")
    original = torch.load(FIXTURE / "checkpoint" / "dasheng.pt", weights_only=True)
    again = torch.load(out, weights_only=True)
    assert again["config"] == original["config"]
    assert list(again["model"]) == list(original["model"])  # same keys, same order
    for key, value in original["model"].items():
        assert again["model"][key].dtype == value.dtype, key
        assert torch.equal(again["model"][key], value), key


def test_small_reference_reproduces_the_fixture():
    """The plain-torch fallback reference (used when `dasheng` is not installed) is exact."""
    from hellochat_jax.testing.torch_dasheng import _small_dasheng_class

    dump = torch.load(FIXTURE / "checkpoint" / "dasheng.pt", weights_only=True)
    reference = _small_dasheng_class()(dump["config"], dump["model"])
    inputs, outputs = np.load(FIXTURE / "inputs.npz"), np.load(FIXTURE / "outputs.npz")
    with torch.no_grad():
        wav = torch.from_numpy(inputs["waveform"])
        mel = reference.front_end(wav).numpy()
        features = reference(wav, x_length=torch.from_numpy(inputs["lengths"])).numpy()
    np.testing.assert_array_equal(mel, outputs["mel_db"])
    # The ViT's matmuls go through torch's CPU GEMM, whose blocking (and so float32 rounding)
    # depends on the processor's vector width: exact where the fixture was made, ULPs elsewhere.
    np.testing.assert_allclose(features[outputs["valid"]], outputs["features"][outputs["valid"]], rtol=0, atol=1e-5)


def _edited_release(tmp_path, edit) -> Path:
    dump = torch.load(FIXTURE / "checkpoint" / "dasheng.pt", weights_only=True)
    edit(dump["model"])
    path = tmp_path / "edited.pt"
    torch.save(dump, path)
    return path


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda sd: sd.pop("blocks.1.mlp.fc2.weight"), "missing keys (1): blocks.1.mlp.fc2.weight"),
        (lambda sd: sd.__setitem__("blocks.0.attn.q_norm.weight", torch.ones(16)), "unexpected keys (1): blocks.0.attn.q_norm.weight"),
        (lambda sd: sd.__setitem__("norm.bias", torch.zeros(65)), "norm.bias: checkpoint (65,)"),
        (lambda sd: sd["front_end.0.mel_scale.fb"].mul_(2), "front_end.0.mel_scale.fb"),
        (lambda sd: sd["blocks.0.norm1.weight"].__setitem__(3, float("nan")), "NaN"),
    ],
    ids=["missing", "unexpected", "misshaped", "front-end", "nan"],
)
def test_bad_checkpoints_are_refused_by_name(tmp_path, edit, message):
    with pytest.raises(CheckpointError) as err:
        convert_dasheng.load(_edited_release(tmp_path, edit), single_device_mesh())
    assert message in str(err.value)


def test_not_a_release_file(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError, match="'model'"):
        convert_dasheng.load(path, single_device_mesh())


def test_presets():
    shapes = {name: (c.embed_dim, c.depth, c.num_heads) for name in dasheng.PRESETS for c in [DashengConfig.preset(name)]}
    assert shapes["dasheng-base"] == (768, 12, 12)
    assert shapes["dasheng-0.6b"] == (1280, 32, 16)
    assert shapes["dasheng-1.2b"] == (1536, 40, 24)
    abstract = nnx.eval_shape(lambda: DashengEncoder(DashengConfig.preset("dasheng-base"), rngs=nnx.Rngs(0)))
    params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert 85e6 < params < 87e6  # dasheng-base: ~86 M


def test_cli_convert_and_export_round_trip(tmp_path):
    from hellochat_jax.cli import main as hellochat

    release = FIXTURE / "checkpoint" / "dasheng.pt"
    assert hellochat(["convert", "dasheng", "--pt", str(release), "--out", str(tmp_path / "ckpt")]) == 0
    assert hellochat(["convert", "dasheng-export", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "back.pt")]) == 0
    original, again = torch.load(release, weights_only=True), torch.load(tmp_path / "back.pt", weights_only=True)
    assert again["config"] == original["config"]
    assert all(torch.equal(again["model"][k], v) for k, v in original["model"].items())
