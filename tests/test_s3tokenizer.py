"""S3Tokenizer v2: speech -> 25 Hz tokens, its converter and the long-audio rule."""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import full_mesh, single_device_mesh
from flax import nnx

from hellochat_jax.checkpoint.io import CheckpointError
from hellochat_jax.components.s3tokenizer import weights as convert
from hellochat_jax.components.s3tokenizer.model import (
    MAX_FRAMES,
    S3Tokenizer,
    S3TokenizerConfig,
    log_mel_128,
    merge_windows,
    tokenize,
)
from hellochat_jax.core import sharding as shd
from hellochat_jax.testing.state_dicts import assert_same_state_dict

CASE = "s3tokenizer-v2-tiny"


@pytest.fixture(scope="module")
def case_dir(fixtures_dir):
    return fixtures_dir / CASE


@pytest.fixture(scope="module")
def case_pt(case_dir):
    return case_dir / json.loads((case_dir / "fixture.json").read_text())["checkpoint"]


def random_model(cfg: S3TokenizerConfig, seed: int = 0) -> S3Tokenizer:
    """Random weights from numpy (no compile): kernels ~ N(0, 1/fan_in), biases and norms perturbed."""
    rng = np.random.default_rng(seed)
    graphdef, state = nnx.split(shd.abstract_model(lambda: S3Tokenizer(cfg, rngs=nnx.Rngs(0))))

    def fill(path, var):
        noise = rng.standard_normal(var.shape).astype(np.float32)
        value = {"kernel": noise / np.sqrt(np.prod(var.shape[:-1])), "scale": 1 + 0.1 * noise, "bias": 0.1 * noise}[path[-1]]
        return var.replace(jnp.asarray(value))

    return nnx.merge(graphdef, nnx.from_flat_state([(p, fill(p, v)) for p, v in nnx.to_flat_state(state)]))


def tiny_cfg(**kw) -> S3TokenizerConfig:
    return S3TokenizerConfig(**{"n_audio_state": 64, "n_audio_head": 1, "n_audio_layer": 2, "precision": "highest", **kw})


def speechlike(rng: np.random.Generator, seconds: float) -> np.ndarray:
    n = int(seconds * 16000)
    t = np.arange(n) / 16000
    f0 = 120 + 40 * np.sin(2 * np.pi * 0.5 * t)
    return (0.3 * np.sin(2 * np.pi * np.cumsum(f0) / 16000) + 0.05 * rng.standard_normal(n)).astype(np.float32)


_log_mel = jax.jit(log_mel_128)


@nnx.jit
def _run(model, mel, mel_lens):
    hidden, token_lens = model.encode(mel, mel_lens)
    tokens, _ = model(mel, mel_lens)
    return hidden, model.project(hidden), tokens, token_lens


# ----------------------------------------------------------------------------- parity


# The fixture itself passes on 1 and 8 devices: tests/test_verify.py (every fixture).


def test_tokenize_reproduces_fixture_tokens(case_dir, case_pt):
    _, model = convert.load(case_pt, full_mesh(), precision="highest")
    with np.load(case_dir / "inputs.npz") as f:
        waveform, lengths = f["waveform"], f["lengths"]
    with np.load(case_dir / "outputs.npz") as f:
        want, want_lens, valid = f["tokens"], f["token_lens"], f["token_valid"]
    tokens, token_lens = tokenize(model, waveform, lengths)  # on the model's mesh
    np.testing.assert_array_equal(token_lens, want_lens)
    np.testing.assert_array_equal(tokens[valid], want[valid])
    assert (tokens[~valid] == 0).all(), "tokens past a row's length are 0"


# ----------------------------------------------------------------------------- the module


@pytest.mark.parametrize("frames", [1, 7, 301])
def test_shapes_and_lengths(frames):
    cfg = tiny_cfg(n_audio_state=128, n_audio_head=2, n_audio_layer=1)
    model = random_model(cfg)
    mel = jnp.asarray(np.random.default_rng(0).standard_normal((2, frames, 128)), jnp.float32)
    mel_lens = jnp.asarray([frames, max(1, frames // 3)], jnp.int32)
    hidden, proj, tokens, token_lens = _run(model, mel, mel_lens)
    t2 = -(-(-(-frames // 2)) // 2)  # ceil(ceil(T / 2) / 2)
    assert hidden.shape == (2, t2, 128) and proj.shape == (2, t2, 8) and tokens.shape == (2, t2)
    assert tokens.dtype == jnp.int32 and int(tokens.min()) >= 0 and int(tokens.max()) < 3**8
    want_lens = [((((n - 1) // 2 + 1) - 1) // 2 + 1) for n in np.asarray(mel_lens)]
    np.testing.assert_array_equal(token_lens, want_lens)


def test_a_row_does_not_depend_on_its_batch():
    """Padding (filled with garbage here) changes neither the log-mel nor the tokens of a row."""
    rng = np.random.default_rng(1)
    model = random_model(tiny_cfg())
    short, long = speechlike(rng, 1.3), speechlike(rng, 2.0)
    batch = np.stack([np.concatenate([short, 9 * rng.standard_normal(long.size - short.size).astype(np.float32)]), long])
    lengths = np.array([short.size, long.size], np.int32)
    mel, mel_lens = _log_mel(batch, lengths)
    alone, alone_lens = _log_mel(short[None], np.array([short.size], np.int32))
    n = int(alone_lens[0])
    assert int(mel_lens[0]) == n == short.size // 160
    np.testing.assert_allclose(mel[0, :n], alone[0], rtol=1e-6, atol=1e-6)
    assert (np.asarray(mel[0, n:]) == 0).all()

    garbage = mel.at[0, n:].set(5.0)  # the encoder must mask it too
    hidden, _, tokens, token_lens = _run(model, garbage, mel_lens)
    hidden1, _, tokens1, lens1 = _run(model, alone, alone_lens)
    k = int(lens1[0])
    assert int(token_lens[0]) == k
    np.testing.assert_allclose(hidden[0, :k], hidden1[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(tokens[0, :k], tokens1[0])
    assert (np.asarray(tokens[0, k:]) == 0).all()


def test_sharded_equals_unsharded():
    cfg = tiny_cfg(n_audio_state=128, n_audio_head=2)
    model = random_model(cfg, seed=3)
    rng = np.random.default_rng(3)
    mel = rng.standard_normal((4, 120, 128)).astype(np.float32)
    mel_lens = np.array([120, 77, 5, 101], np.int32)
    want = _run(model, jnp.asarray(mel), jnp.asarray(mel_lens))

    mesh = full_mesh()
    shd.shard_model(model, mesh)
    assert any(len(v.sharding.device_set) > 1 for v in jax.tree.leaves(nnx.state(model)))
    with jax.set_mesh(mesh):
        got = _run(model, *shd.put_batch((mel, mel_lens), mesh))
    for w, g in zip(want[:2], got[:2]):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got[2], want[2])
    np.testing.assert_array_equal(got[3], want[3])


def test_config_refuses_non_64_head_dim_and_other_codebooks():
    with pytest.raises(ValueError, match="64"):
        S3TokenizerConfig(n_audio_state=128, n_audio_head=4)
    with pytest.raises(ValueError, match="6561"):
        S3TokenizerConfig(n_audio_state=64, n_audio_head=1, n_codebook_size=4096)
    with pytest.raises(ValueError, match="unknown"):
        S3TokenizerConfig.from_reference({"n_audio_state": 64, "n_audio_head": 1, "n_text_ctx": 3})


def test_tokenize_refuses_bad_input():
    model = random_model(tiny_cfg(n_audio_layer=0))
    wave = np.zeros((2, 4000), np.float32)
    with pytest.raises(ValueError, match=r"\[batch, samples\]"):
        tokenize(model, wave[0])
    with pytest.raises(ValueError, match="more than 200 samples"):
        tokenize(model, wave, np.array([4000, 150]))
    with pytest.raises(ValueError, match="exceed"):
        tokenize(model, wave, np.array([4000, 4001]))
    with pytest.raises(ValueError, match="one per row"):
        tokenize(model, wave, np.array([4000.0, 4000.0]))
    bad = wave.copy()
    bad[1, 10] = np.nan
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        tokenize(model, bad)
    bad[1, 10], bad[1, 3999] = 0, np.nan  # NaN in the padding is fine
    tokenize(model, bad, np.array([4000, 3000]))


# ----------------------------------------------------------------------------- audio over 30 s


def test_merge_windows_follows_python_slicing():
    a, b, c = np.arange(750), np.arange(1000, 1650), np.arange(2000, 2030)
    np.testing.assert_array_equal(merge_windows([a, b]), np.concatenate([a[:700], b[50:]]))
    # an inner window keeps [50:-50]; a last window of <= 50 tokens contributes nothing
    np.testing.assert_array_equal(merge_windows([a, b, c]), np.concatenate([a[:700], b[50:600]]))


def test_long_audio_goes_through_windows_and_merge():
    """A 61 s row: windows of 3000 frames every 2600, each tokenised alone, merged; the short
    row of the same batch gets what it gets on its own."""
    rng = np.random.default_rng(5)
    model = random_model(tiny_cfg(n_audio_layer=1), seed=5)
    long, short = speechlike(rng, 61.0), speechlike(rng, 3.0)
    batch = np.zeros((2, long.size), np.float32)
    batch[0], batch[1, : short.size] = long, short
    lengths = np.array([long.size, short.size], np.int32)
    tokens, token_lens = tokenize(model, batch, lengths, segment_batch=2)

    mel, mel_lens = (np.asarray(a) for a in _log_mel(batch, lengths))
    assert mel_lens[0] == 6100 > MAX_FRAMES

    def alone(m):
        t, n = _run(model, jnp.asarray(m[None]), jnp.asarray([m.shape[0]], jnp.int32))[2:]
        return np.asarray(t)[0, : int(n[0])]

    w0, w1, w2 = (alone(mel[0, s : min(s + 3000, 6100)]) for s in (0, 2600, 5200))
    assert (w0.size, w1.size, w2.size) == (750, 750, 225)
    want_long = np.concatenate([w0[:-50], w1[50:-50], w2[50:]])
    want_short = alone(mel[1, : mel_lens[1]])
    np.testing.assert_array_equal(token_lens, [want_long.size, want_short.size])
    np.testing.assert_array_equal(tokens[0, : want_long.size], want_long)
    np.testing.assert_array_equal(tokens[1, : want_short.size], want_short)
    assert tokens.shape == (2, want_long.size) and (tokens[1, want_short.size :] == 0).all()


def _reference_package(monkeypatch):
    """The `s3tokenizer` package, with its import-time-only dependencies stubbed when absent."""
    if importlib.util.find_spec("s3tokenizer") is None:
        pytest.skip("the s3tokenizer package is not installed")
    for name in ("torchaudio", "onnx"):
        if importlib.util.find_spec(name) is None and name not in sys.modules:
            monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    import s3tokenizer
    from s3tokenizer.model_v2 import ModelConfig, S3TokenizerV2

    return s3tokenizer, ModelConfig, S3TokenizerV2


def test_long_audio_matches_reference_package(tmp_path, monkeypatch):
    s3tokenizer, ModelConfig, S3TokenizerV2 = _reference_package(monkeypatch)
    torch.manual_seed(0)
    ref_cfg = dict(n_mels=128, n_audio_ctx=1500, n_audio_state=64, n_audio_head=1, n_audio_layer=1, n_codebook_size=6561, use_sdpa=False)
    ref = S3TokenizerV2("speech_tokenizer_v2_25hz", config=ModelConfig(**ref_cfg)).eval()
    torch.save(ref.state_dict(), tmp_path / "s3.pt")
    (tmp_path / "config.json").write_text(json.dumps(ref_cfg))

    rng = np.random.default_rng(7)
    rows = [speechlike(rng, 57.3), speechlike(rng, 4.0), speechlike(rng, 31.0)]
    mels = [s3tokenizer.log_mel_spectrogram(torch.from_numpy(r)) for r in rows]
    mel, mel_lens = s3tokenizer.padding(mels)
    with torch.no_grad():
        want, want_lens = ref.quantize(mel, mel_lens)

    _, model = convert.load(tmp_path / "s3.pt", single_device_mesh(), precision="highest")
    batch = np.zeros((3, max(r.size for r in rows)), np.float32)
    for i, r in enumerate(rows):
        batch[i, : r.size] = r
    tokens, token_lens = tokenize(model, batch, np.array([r.size for r in rows]))
    np.testing.assert_array_equal(token_lens, want_lens.numpy())
    valid = np.arange(tokens.shape[1])[None, :] < token_lens[:, None]
    mismatch = np.mean(tokens[valid] != want.numpy()[valid])
    assert mismatch <= 0.01, f"{mismatch:.2%} of tokens differ from the reference"


# ----------------------------------------------------------------------------- converter


def test_export_round_trip_is_bit_exact(case_pt, tmp_path):
    cfg, model = convert.load(case_pt, full_mesh())
    pt = convert.export(model, cfg, tmp_path)
    assert_same_state_dict(torch.load(pt, weights_only=True), torch.load(case_pt, weights_only=True))
    assert json.loads((tmp_path / "config.json").read_text()) == json.loads((case_pt.parent / "config.json").read_text())


def test_sizes_are_read_off_the_tensors_without_config_json(case_pt, tmp_path):
    """A .pt alone (as exported into a release folder) loads with the sizes its shapes give."""
    want, model = convert.load(case_pt, single_device_mesh())
    pt = convert.export(model, want, tmp_path / "speech_tokenizer_v2_25hz.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == [pt.name]
    cfg, _ = convert.load(tmp_path, single_device_mesh())
    assert cfg == want


def test_mismatched_checkpoints_are_refused_by_name(case_pt, tmp_path):
    sd = torch.load(case_pt, weights_only=True)
    del sd["encoder.blocks.0.attn.key.weight"]
    sd["encoder.blocks.0.attn.key.bias"] = torch.zeros(128)
    sd["encoder.conv2.bias"] = torch.zeros(64)
    torch.save(sd, tmp_path / "bad.pt")
    shutil.copy(case_pt.parent / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError) as e:
        convert.load(tmp_path / "bad.pt", single_device_mesh())
    msg = str(e.value)
    assert "missing keys" in msg and "encoder.blocks.0.attn.key.weight" in msg
    assert "unexpected keys" in msg and "encoder.blocks.0.attn.key.bias" in msg
    assert "mis-shaped" in msg and "encoder.conv2.bias" in msg


def test_release_onnx_goes_through_the_package_reader(case_pt, tmp_path, monkeypatch):
    onnx_file = tmp_path / "speech_tokenizer_v2.onnx"
    onnx_file.write_bytes(b"not parsed by us")
    calls = []

    def onnx2torch(path, torch_path=None, verbose=False):
        calls.append(path)
        return torch.load(case_pt, weights_only=True)

    package = types.ModuleType("s3tokenizer")
    utils = types.ModuleType("s3tokenizer.utils")
    utils.onnx2torch = onnx2torch
    monkeypatch.setitem(sys.modules, "s3tokenizer", package)
    monkeypatch.setitem(sys.modules, "s3tokenizer.utils", utils)
    cfg, model = convert.load(tmp_path, single_device_mesh())
    assert calls == [str(onnx_file)]
    assert (cfg.n_audio_state, cfg.n_audio_head, cfg.n_audio_layer) == (128, 2, 1)
    _, want = convert.load(case_pt, single_device_mesh())
    np.testing.assert_array_equal(model.blocks[0].attn.fsmn.kernel[...], want.blocks[0].attn.fsmn.kernel[...])

    monkeypatch.setitem(sys.modules, "s3tokenizer", None)  # not installed
    monkeypatch.delitem(sys.modules, "s3tokenizer.utils")
    with pytest.raises(CheckpointError, match=r"hellochat-jax\[onnx\]"):
        convert.load(onnx_file, single_device_mesh())


def test_cli_converts_to_orbax_and_exports_back(case_pt, tmp_path):
    from hellochat_jax.convert import s3tokenizer as convert_cli

    parser = argparse.ArgumentParser()
    convert_cli.register_cli(parser.add_subparsers())
    out = tmp_path / "orbax"
    args = parser.parse_args(["s3tokenizer", "--checkpoint", str(case_pt), "--out", str(out)])
    assert args.convert_fn(args) == 0
    cfg, model = convert.load(out, single_device_mesh())
    assert cfg.n_audio_state == 128
    args = parser.parse_args(["s3tokenizer", "--checkpoint", str(out), "--out", str(tmp_path / "pt"), "--export"])
    assert args.convert_fn(args) == 0
    assert_same_state_dict(torch.load(tmp_path / "pt" / convert.PT_NAME, weights_only=True), torch.load(case_pt, weights_only=True))
