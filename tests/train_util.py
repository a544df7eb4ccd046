"""Shared pieces of the trainer tests: a tiny config and a way to run `hellochat train` in a
subprocess with a chosen number of simulated devices."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml
from hellochat_jax.train.metrics import read_jsonl

TINY_THINKER = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)


def tiny_config(run_dir: Path, **sections) -> dict:
    cfg = {
        "steps": 8,
        "run_dir": str(run_dir),
        "model": {"thinker": dict(TINY_THINKER)},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "data": {"batch_size": 8, "seq_len": 32},
        "checkpoint": {"every": 4},
        "log": {"progress": False, "tensorboard": False, "plot": False},
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            cfg.setdefault(key, {}).update(value)
        else:
            cfg[key] = value
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def train_command(config: Path, *overrides: str, resume: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "hellochat_jax.cli", "train", "--config", str(config), *overrides]
    return cmd + (["--resume"] if resume else [])


def device_env(devices: int) -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def run_train(config: Path, *overrides: str, devices: int = 1, resume: bool = False, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(train_command(config, *overrides, resume=resume), env=device_env(devices),
                          capture_output=True, text=True, timeout=timeout)


def losses(run_dir: Path) -> dict[int, float]:
    """step -> loss, the last record of each step."""
    return {r["step"]: r["loss"] for r in read_jsonl(Path(run_dir) / "metrics.jsonl") if "loss" in r}
