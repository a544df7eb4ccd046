"""The flow stage: CosyVoice 2's flow decoder (25 Hz speech tokens -> 50 Hz mel) trained from
scratch with the conditional flow-matching loss (components/flow/model.py
`flow_matching_loss`: the reference's draws of t, noise, CFG dropout, a random prompt-mel
prefix as condition, chunk-causal masks half the time), plus optionally Grad-TTS's prior loss
on the encoder's output (`options.prior_weight`).

A row is a random window of `max_tokens` speech tokens of a corpus reply and the mel frames
they cover (2 per token), computed with the vocoder's mel settings (hift/model.py
`flow_mel_settings`, so the flow's output is what the vocoder reads). The corpus replies have
one voice in several styles; the speaker embedding is the x-vector of the reply's style
(`model.flow.style_speakers`: one-hot, the same the talker gives the flow when it speaks that
style), or the all-zero x-vector the talker uses without a voice prompt or style.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hellochat_jax.train import stages
from hellochat_jax.train.stages import Stage, pad_to, pcm, text


@dataclasses.dataclass
class FlowOptions:
    max_tokens: int = 100  # window of speech tokens per row (4 s at 25 Hz)
    # Grad-TTS / Matcha-TTS's prior loss: MSE of the encoder's projection `mu` against the target
    # mel, beside the flow-matching loss. Not in CosyVoice 2's recipe (its encoder learns only
    # through the estimator, over hundreds of thousands of steps); from scratch in a few hundred
    # steps `mu` otherwise stays nearly constant and the estimator hears little of the tokens.
    prior_weight: float = 0.0


class FlowData:
    task_names = ("flow",)

    def __init__(self, cfg, process_index: int = 0, process_count: int = 1):
        from hellochat_jax.components.hift.model import flow_mel_settings
        from hellochat_jax.train.model import part_config
        from hellochat_jax.train.talker_stage import reply_tokens_source

        self.cfg = cfg
        self.opts = stages.options(cfg, STAGE) or FlowOptions()
        stages.require(self.opts.prior_weight >= 0, f"stage flow: options.prior_weight={self.opts.prior_weight} must be >= 0")
        self.flow = part_config(cfg.model, "flow")
        stages.require(cfg.model.hift is not None, "the flow stage needs model.hift: its mel settings are the flow's targets")
        self.mel = flow_mel_settings(part_config(cfg.model, "hift"))
        stages.require(self.mel["n_mels"] == self.flow.output_size,
                       f"model.flow.output_size {self.flow.output_size} != the vocoder's {self.mel['n_mels']} mel bins")
        self.process = (process_index, process_count)
        self.rows = cfg.data.batch_size // process_count
        self.tokens = reply_tokens_source(cfg, "train")

    def row(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray] | None:
        rid = text(record["id"])
        if rid not in self.tokens:
            return None
        tokens = np.asarray(self.tokens[rid][1], np.int32)
        wav = pcm(record["reply_audio"])
        if self.mel["rate"] != 16000:
            from hellochat_jax.core import dsp

            wav = np.asarray(dsp.resample(wav, 16000, self.mel["rate"]))
        # The 16 kHz tokens and this rate's mel both cover the clip: `ratio` mel frames per token.
        per_token = self.flow.token_mel_ratio * self.mel["hop"]
        n = min(tokens.size, wav.size // per_token)
        if n < 4:
            return None
        window = min(self.opts.max_tokens, n)
        start = int(rng.integers(0, n - window + 1))
        return {
            "token": pad_to(tokens[start : start + window], self.opts.max_tokens), "token_len": np.int32(window),
            "xvector": self.flow.style_xvectors([stages.reply_style(record)])[0],
            # the mel is computed in the step (one compiled shape), not per row on the host
            "wave": pad_to(wav[start * per_token : (start + window) * per_token], self.opts.max_tokens * per_token),
        }

    def iterator(self):
        return stages.corpus_records(self.cfg, self.row, *self.process)

    def local_spec(self) -> dict[str, jax.ShapeDtypeStruct]:
        t = self.opts.max_tokens
        return {
            "token": jax.ShapeDtypeStruct((self.rows, t), np.dtype(np.int32)),
            "token_len": jax.ShapeDtypeStruct((self.rows,), np.dtype(np.int32)),
            "xvector": jax.ShapeDtypeStruct((self.rows, self.flow.spk_embed_dim), np.dtype(np.float32)),
            "wave": jax.ShapeDtypeStruct((self.rows, t * self.flow.token_mel_ratio * self.mel["hop"]), np.dtype(np.float32)),
        }


class FlowObjective:
    """flow_matching_loss is a mean over the micro-batch's valid frames and bins; here it is
    turned back into a sum over them divided by the step's count, so accumulation is exact."""

    def __init__(self, cfg, data):
        self.prior_weight = data.opts.prior_weight
        self.ratio = data.flow.token_mel_ratio
        self.bins = data.flow.output_size
        self.mel = data.mel

    def normalizers(self, batch):
        return {"frames": jnp.maximum(jnp.sum(batch["token_len"]).astype(jnp.float32) * self.ratio * self.bins, 1.0)}

    def __call__(self, model, micro, key, norms):
        from hellochat_jax.components.flow.model import flow_matching_loss

        from hellochat_jax.components.hift.model import log_mel

        flow = model.flow
        feat = log_mel(micro["wave"], **self.mel)
        mean, aux = flow_matching_loss(flow, micro["token"], micro["token_len"], feat, micro["xvector"], key=key)
        count = jnp.sum(aux["mask"]) * self.bins
        total = mean * count
        frames = aux["mask"][..., None]
        prior = jnp.sum(jnp.square(aux["mu"].astype(jnp.float32) - feat) * frames)
        stats = {"flow_mse_sum": total, "prior_mse_sum": prior, "flow_count": count,
                 "input_tokens": jnp.sum(micro["token_len"]).astype(jnp.float32)}
        return (total + self.prior_weight * prior) / norms["frames"], stats

    def record(self, stats) -> dict[str, float]:
        count = max(float(stats["flow_count"]), 1.0)
        return {"flow_mse": float(stats["flow_mse_sum"]) / count, "prior_mse": float(stats["prior_mse_sum"]) / count}


STAGE = Stage("flow", ("flow",), FlowData, FlowObjective, FlowOptions)
