"""Tiny Hello-Chat model folders with random weights, for the chat and serve tests.

`make_tiny_chat_folders(root)` writes under `root`: `thinker/` (tiny MiDashengLM), `release/`
(tiny CosyVoice 2 release), `model/` (the two composed by `hellochat convert hellochat`),
`text_model/` (the thinker alone, no talker) and two 16 kHz clips, `q1.wav` (2 s of noise) and
`q2.wav` (1.5 s of silence). The replies of random models are noise; the pipeline around them is
what the tests check.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def noise(seconds: float, seed: int = 0, amplitude: float = 0.1) -> np.ndarray:
    """Gaussian noise at 16 kHz."""
    return (amplitude * np.random.default_rng(seed).standard_normal(int(seconds * 16000))).astype(np.float32)


def make_tiny_chat_folders(root: str | os.PathLike) -> Path:
    import soundfile as sf

    from hellochat_jax.cli import main as cli
    from hellochat_jax.convert.hellochat import compose
    from hellochat_jax.testing.midashenglm import make_tiny_midashenglm
    from hellochat_jax.testing.talker import make_tiny_release

    root = Path(root)
    make_tiny_midashenglm(root / "thinker")
    make_tiny_release(root / "release")
    code = cli(["convert", "hellochat", "--thinker", str(root / "thinker"), "--talker", str(root / "release"), "--out", str(root / "model")])
    if code != 0:
        raise RuntimeError(f"hellochat convert hellochat exited with {code}")
    compose(root / "thinker", None, root / "text_model")
    sf.write(str(root / "q1.wav"), noise(2.0), 16000)
    sf.write(str(root / "q2.wav"), np.zeros(24000, np.float32), 16000)
    return root
