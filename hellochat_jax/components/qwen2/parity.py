"""Verify entry for `qwen2` fixtures: logits of a (left-padded) batch and greedy KV-cached decoding."""

from __future__ import annotations

import numpy as np

from hellochat_jax.components.qwen2 import weights as hf_qwen2
from hellochat_jax.core import sharding as shd
from hellochat_jax.core.decoding import Greedy, generate


def run(case, mesh, rules) -> dict[str, np.ndarray]:
    cfg, model = hf_qwen2.load(case.checkpoint, mesh, rules, precision="highest")
    inputs = shd.put_batch(
        {k: case.inputs[k].astype(np.int32) for k in ("input_ids", "attention_mask", "position_ids")}, mesh, rules
    )
    logits, _ = _forward(model, inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"])
    out = {"logits": logits}  # compared where the fixture's own `valid` mask says
    n_new = int(case.spec["outputs"]["greedy_tokens"]["shape"][0])
    prompt = case.inputs["input_ids"][0:1].astype(np.int32)
    tokens, _ = generate(model, prompt, np.ones_like(prompt), max_new_tokens=n_new, sampling=Greedy(), mesh=mesh)
    out["greedy_tokens"] = np.asarray(tokens)[0]
    return out


def _forward(model, input_ids, attention_mask, positions):
    from flax import nnx

    @nnx.jit
    def f(model, ids, mask, pos):
        return model(ids, attention_mask=mask, positions=pos)

    return f(model, input_ids, attention_mask, positions)
