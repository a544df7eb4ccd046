"""Verify entry for `cosyvoice2-flow` fixtures: the flow decoder's intermediates, inference
(non-streaming, streaming, streaming with look-ahead context) and the flow-matching loss.

The fixture is channels-first ([B, 80, T]) where the reference is; our flow is channels-last,
so noise and mel-shaped outputs are transposed here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hellochat_jax.components.flow import weights as cosyvoice2_flow
from hellochat_jax.components.flow.model import (
    FlowDecoder,
    FlowLossDraws,
    flow_matching_loss,
    jit_inference,
)
from hellochat_jax.core import sharding as shd


@nnx.jit
def _encode(model: FlowDecoder, inputs: dict, streaming):
    """spk_cond, encoder_out and mu of the concatenated prompt + tokens."""
    tokens = jnp.concatenate([inputs["prompt_token"], inputs["token"]], axis=1)
    lengths = inputs["prompt_token_len"] + inputs["token_len"]
    spks = model.speaker_condition(inputs["embedding"])
    encoder_out, _ = model.encoder(model.input_embedding(tokens), lengths, streaming=streaming)
    return spks, encoder_out, model.encoder_proj(encoder_out)


@nnx.jit
def _first_estimate(model: FlowDecoder, spks, mu, prompt_feat, noise):
    """The estimator's first call (t = 0, x = noise) on [conditional; unconditional] rows."""
    n_mel = mu.shape[1]
    cond = jnp.pad(prompt_feat, ((0, 0), (0, n_mel - prompt_feat.shape[1]), (0, 0)))
    x0 = noise[:, :n_mel]
    return model.estimator(
        jnp.concatenate([x0, x0]), jnp.ones((2, n_mel), jnp.float32), jnp.concatenate([mu, jnp.zeros_like(mu)]),
        jnp.zeros((2,), jnp.float32), jnp.concatenate([spks, jnp.zeros_like(spks)]), jnp.concatenate([cond, jnp.zeros_like(cond)]),
    )


@nnx.jit
def _loss(model: FlowDecoder, batch: dict, draws: FlowLossDraws):
    return flow_matching_loss(
        model, batch["speech_token"], batch["speech_token_len"], batch["speech_feat"], batch["embedding"], draws=draws
    )


def run(case, mesh, rules) -> dict[str, np.ndarray]:
    _, model = cosyvoice2_flow.load(case.checkpoint, mesh, rules, precision="highest")
    i = case.inputs
    names = ("token", "token_len", "prompt_token", "prompt_token_len", "prompt_feat", "prompt_feat_len", "embedding")
    inputs = shd.put_batch({k: i[k] for k in names}, mesh, rules)
    noise = shd.put_batch(np.ascontiguousarray(i["noise"].transpose(0, 2, 1)), mesh, rules)

    out: dict[str, np.ndarray] = {}
    flag = lambda value: shd.put_batch(np.asarray(value), mesh, rules)  # noqa: E731
    out["spk_cond"], out["encoder_out"], out["mu"] = _encode(model, inputs, flag(False))
    out["mu_stream"] = _encode(model, inputs, flag(True))[2]
    v0 = _first_estimate(model, out["spk_cond"], out["mu"], inputs["prompt_feat"], noise)
    out["est_step0"] = np.asarray(v0).transpose(0, 2, 1)

    inference = jit_inference(model)  # one compiled program for the three modes
    for name, streaming, finalize in (("mel", False, True), ("mel_stream", True, True), ("mel_stream_ctx", True, False)):
        mel, mel_len = inference(**inputs, noise=noise, streaming=flag(streaming), finalize=flag(finalize))
        n = int(np.asarray(mel_len)[0])
        out[name] = np.asarray(mel)[:, :n].transpose(0, 2, 1)

    batch = shd.put_batch(
        {
            "speech_token": i["loss_speech_token"],
            "speech_token_len": i["loss_speech_token_len"],
            "speech_feat": i["loss_speech_feat"],
            "embedding": i["loss_embedding"],
        },
        mesh,
        rules,
    )
    for suffix, streaming in (("", False), ("_stream", True)):
        draws = FlowLossDraws(
            t=i["loss_t"].astype(np.float32),
            z=np.ascontiguousarray(i["loss_z"].transpose(0, 2, 1)),
            cfg_keep=i["loss_cfg_keep"].astype(bool),
            cond_len=i["loss_cond_len"].astype(np.int32),
            streaming=np.asarray(streaming),
        )
        loss, aux = _loss(model, batch, shd.put_batch(draws, mesh, rules))
        out["loss" + suffix] = np.asarray(loss).reshape(1)
        out["loss_pred" + suffix] = np.asarray(aux["pred"]).transpose(0, 2, 1)
        if not suffix:
            out["loss_mu"] = aux["mu"]
            out["loss_valid"] = np.asarray(aux["mask"]) > 0
    return {k: np.asarray(jax.device_get(v)) for k, v in out.items()}
