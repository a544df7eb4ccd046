"""Verify entry for `cosyvoice2-llm` fixtures (CosyVoice 2's Qwen2LM): the decode prompt,
teacher forcing, greedy KV-cached decoding with the min/max length rule, and the training
loss/accuracy of a mixed unistream/bistream batch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hellochat_jax.components.speech_lm import model as slm
from hellochat_jax.components.speech_lm import weights as cosyvoice2_llm
from hellochat_jax.core import sharding as shd
from hellochat_jax.core.decoding import Greedy


@nnx.jit
def _embed(model, ids, kinds):
    return model.embed(ids, kinds)


@nnx.jit
def _forward(model, ids, kinds):
    hidden, _ = model.hidden(ids, kinds)
    return hidden, jax.nn.log_softmax(model.logits(hidden).astype(jnp.float32), axis=-1)


@nnx.jit
def _loss(model, ids, kinds, targets):
    return slm.loss_fn(model, ids, kinds, targets)[1]


def run(case, mesh, rules) -> dict[str, np.ndarray]:
    cfg, model = cosyvoice2_llm.load(case.checkpoint, mesh, rules, precision="highest")
    x = case.inputs
    prompt_text, text = x["prompt_text"][0].tolist(), x["text"][0].tolist()
    prompt_speech, continuation = x["prompt_speech_token"][0].tolist(), x["tf_speech_token"][0].tolist()
    out: dict[str, np.ndarray] = {}

    prompt = slm.inference_layout(text, prompt_text, prompt_speech)
    ids, kinds = shd.put_batch((prompt.ids[None], prompt.kinds[None]), mesh, rules)
    out["lm_input"] = _embed(model, ids, kinds)

    # (a) teacher forcing over the prompt + a continuation; log-probs from the task-id position
    tf_ids = np.concatenate([prompt.ids, np.asarray(continuation, np.int32)])[None]
    tf_kinds = np.concatenate([prompt.kinds, np.full(len(continuation), slm.SPEECH, np.int32)])[None]
    hidden, logp = _forward(model, *shd.put_batch((tf_ids, tf_kinds), mesh, rules))
    task_pos = 1 + len(prompt_text) + len(text)
    out["tf_hidden"], out["tf_logp"] = hidden, logp[:, task_pos:]

    # (b) greedy KV-cached decode with the reference's length rule
    dec = slm.SpeechDecoder.start(
        model, [text], [prompt_text], [prompt_speech],
        min_ratio=float(x["min_token_text_ratio"][0]), max_ratio=float(x["max_token_text_ratio"][0]),
        sampling=Greedy(), record_logp=True, mesh=mesh,
    ).advance()
    tokens, lengths = dec.result()
    steps = int(dec.ds.step)
    out["greedy_tokens"] = tokens[0, : lengths[0]].astype(np.int32)
    out["greedy_logp"] = np.asarray(jax.device_get(dec.ds.logp))[0, :steps]
    lo, hi = slm.length_limits(len(text), float(x["min_token_text_ratio"][0]), float(x["max_token_text_ratio"][0]))
    out["greedy_min_len"], out["greedy_max_len"] = np.asarray([lo], np.int32), np.asarray([hi], np.int32)

    # (c) training loss and accuracy; the recorded uniform draws pick bistream rows
    batch = slm.training_batch(
        x["train_text_token"], x["train_text_token_len"], x["train_speech_token"], x["train_speech_token_len"],
        x["train_mix_u"], speech_token_size=cfg.speech_token_size, mix_ratio=cfg.mix_ratio,
    )
    metrics = _loss(model, *shd.put_batch((batch.ids, batch.kinds, batch.targets), mesh, rules))
    out["train_lm_target"], out["train_lm_input_len"] = batch.targets, batch.lengths
    out["train_loss"], out["train_acc"] = metrics["loss"].reshape(1), metrics["acc"].reshape(1)
    return out
