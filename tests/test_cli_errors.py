"""A user's mistake gets one line, not a traceback: every `hellochat` command reports the
project's own errors (UserError: bad checkpoint, config, audio, manifest, ...) and missing
paths as a single `error: ...` line on stderr and exits 1; `hellochat --debug` shows the
traceback instead."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES
from safetensors.numpy import load_file, save_file

from hellochat_jax import cli

QWEN2 = FIXTURES / "qwen2-tiny" / "checkpoint"


class NotATensor:
    """Pickled into a .pt: torch.load(weights_only=True) must refuse to rebuild it."""


def assert_one_line_error(code: int, err: str, *words: str) -> None:
    assert code == 1, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for word in words:
        assert word in err, err


def run(argv: list[str], capsys) -> tuple[int, str]:
    code = cli.main(argv)
    return code, capsys.readouterr().err


def qwen2_copy(tmp_path: Path, change) -> Path:
    """The qwen2-tiny HF folder with its tensors changed by ``change(dict) -> dict``."""
    folder = tmp_path / "hf"
    shutil.copytree(QWEN2, folder)
    tensors = change(load_file(folder / "model.safetensors"))
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def test_truncated_safetensors(tmp_path, capsys):
    folder = tmp_path / "hf"
    shutil.copytree(QWEN2, folder)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    code, err = run(["convert", "qwen2", "--hf", str(folder), "--out", str(tmp_path / "out")], capsys)
    assert_one_line_error(code, err, "truncated")


def test_pt_holding_a_pickled_object(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    pt = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "config": NotATensor()}, pt)
    code, err = run(["convert", "dasheng", "--pt", str(pt), "--out", str(tmp_path / "out")], capsys)
    assert_one_line_error(code, err, "refused", "weights_only=True")


def test_missing_key(tmp_path, capsys):
    folder = qwen2_copy(tmp_path, lambda t: {k: v for k, v in t.items() if k != "model.norm.weight"})
    code, err = run(["convert", "qwen2", "--hf", str(folder), "--out", str(tmp_path / "out")], capsys)
    assert_one_line_error(code, err, "missing keys (1)", "model.norm.weight")


def test_misshaped_key(tmp_path, capsys):
    folder = qwen2_copy(tmp_path, lambda t: {**t, "model.norm.weight": np.ones(7, np.float32)})
    code, err = run(["convert", "qwen2", "--hf", str(folder), "--out", str(tmp_path / "out")], capsys)
    assert_one_line_error(code, err, "mis-shaped keys (1)", "model.norm.weight")


def test_bad_config_key(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("steps: 3\noptim:\n  learning_rate: 0.1\n")
    code, err = run(["train", "--config", str(config)], capsys)
    assert_one_line_error(code, err, "unknown key(s) ['learning_rate']")


@pytest.mark.parametrize("flag, value, words", [("--drills", "-1", "--drills must be >= 0"), ("--size", "0", "--size must be positive")])
def test_an_impossible_corpus_size(tmp_path, capsys, flag, value, words):
    code, err = run(["data", "build", "synth", flag, value, "--data_dir", str(tmp_path)], capsys)
    assert_one_line_error(code, err, words)
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_corrupt_audio(tmp_path, capsys):
    wav = tmp_path / "broken.wav"
    wav.write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt " + os.urandom(64))
    argv = ["understand", "--checkpoint", str(tmp_path / "never-read"), "--tokenizer", str(tmp_path), "--audio", str(wav), "--prompt", "?"]
    code, err = run(argv, capsys)
    assert_one_line_error(code, err, "broken.wav")


def test_missing_path(tmp_path, capsys):
    code, err = run(["convert", "qwen2-export", "--checkpoint", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")], capsys)
    assert_one_line_error(code, err, "nowhere")


def test_the_installed_command_prints_one_line_and_debug_shows_the_traceback(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(json.dumps({"optim": {"learning_rate": 0.1}}))
    command = [sys.executable, "-m", "hellochat_jax.cli"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    plain = subprocess.run([*command, "train", "--config", str(config)], capture_output=True, text=True, env=env)
    assert_one_line_error(plain.returncode, plain.stderr, "learning_rate")
    debug = subprocess.run([*command, "--debug", "train", "--config", str(config)], capture_output=True, text=True, env=env)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "ConfigError" in debug.stderr
