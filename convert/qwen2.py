"""`hellochat convert qwen2` (HF folder -> Orbax) and `hellochat convert qwen2-export` (Orbax -> HF)."""

from __future__ import annotations

import argparse

from hellochat_jax.components.qwen2 import weights
from hellochat_jax.convert.cli import register_hf_format


def register_cli(sub: argparse._SubParsersAction) -> None:
    register_hf_format(sub, "qwen2", weights, "Qwen2/Qwen2.5")
