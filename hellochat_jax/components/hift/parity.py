"""Verify entry for `cosyvoice2-hift` fixtures: HiFTGenerator.inference with recorded source noise.

The reference draws two random tensors in SineGen2: `sine_noise` (randn, [B, L, harmonics]),
which we take as our source noise, and `sine_rand_ini` (initial harmonic phases), which only
touches the first waveform sample before the per-frame averaging and so never reaches the
outputs (see HarmonicSource); it is accepted and unused.
"""

from __future__ import annotations

import numpy as np
from flax import nnx

from hellochat_jax.components.hift import weights as cosyvoice2_hift
from hellochat_jax.core import sharding as shd


def run(case, mesh, rules) -> dict[str, np.ndarray]:
    cfg, model = cosyvoice2_hift.load(case.checkpoint, mesh, rules, precision="highest")
    inputs = shd.put_batch({"mel": case.inputs["speech_feat"], "noise": case.inputs["sine_noise"]}, mesh, rules)
    f0, source, waveform = _forward(model, inputs["mel"], inputs["noise"])
    return {
        "f0": f0,
        "voiced": np.asarray(f0) > cfg.nsf_voiced_threshold,
        "source": source[:, None, :],
        "waveform": waveform,
    }


@nnx.jit
def _forward(model, mel, noise):
    f0 = model.f0(mel)
    source = model.source(f0, noise=noise)
    return f0, source, model.decode(mel, source)
