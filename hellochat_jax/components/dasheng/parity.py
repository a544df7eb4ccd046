"""Verify entry for `dasheng` fixtures: the log-mel front end and the encoder features."""

from __future__ import annotations

import numpy as np
from flax import nnx

from hellochat_jax.components.dasheng import weights as convert_dasheng
from hellochat_jax.components.dasheng.model import DashengEncoder, log_mel
from hellochat_jax.core import sharding as shd


@nnx.jit
def _forward(model: DashengEncoder, waveform, lengths):
    mel_db = log_mel(waveform, model.cfg)
    features, valid = model.encode_mel(mel_db, lengths)
    return mel_db, features, valid


def run(case, mesh, rules) -> dict[str, np.ndarray]:
    cfg, model = convert_dasheng.load(case.checkpoint / "dasheng.pt" if case.checkpoint.is_dir() else case.checkpoint,
                                      mesh, rules, precision="highest")
    inputs = shd.put_batch({"waveform": case.inputs["waveform"].astype(np.float32),
                            "lengths": case.inputs["lengths"].astype(np.int32)}, mesh, rules)
    mel_db, features, valid = _forward(model, inputs["waveform"], inputs["lengths"])
    valid = np.asarray(valid)
    # Our front end is time-major [B, T, mels]; the reference reports [B, mels, T].
    return {"mel_db": np.asarray(mel_db).transpose(0, 2, 1), "features": features,
            "valid": valid, "padding_mask": ~valid}
