"""The talker stage: CosyVoice 2's speech LM (text -> 25 Hz speech tokens) on the shared Qwen2
decoder, trained from scratch on the corpus replies.

A row is one reply: its text, prefixed in CosyVoice 2's instruct layout by the style it is
spoken in (``gentle<|endofprompt|>I am sorry...``; the chat pipeline prompts the same way),
and its speech tokens from the corpus's speech-token cache (`hellochat data tokens`). Rows
are laid out unistream or bistream (5 text / 15 speech tokens, fill tokens), drawn per row as
the reference does (train/corpus.py `talker_batch`). The loss is the speech LM's verified
terms (label smoothing, length normalisation per its config: train/losses.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hellochat_jax.train import stages
from hellochat_jax.train.stages import Stage, pad_to, require, text


@dataclasses.dataclass
class TalkerOptions:
    max_text_tokens: int = 48  # style instruction + reply text, in talker tokenizer ids
    max_speech_tokens: int = 200  # 8 s at 25 Hz; longer replies are left out
    instruct: bool = True  # prefix the reply's style as instruction text (False: plain text -> speech)


def talker_tokenizer(cfg) -> Any:
    """The talker's text tokenizer: the corpus tokenizer plus CosyVoice 2's special tokens."""
    from hellochat_jax.data import builders
    from hellochat_jax.pipelines.talker import load_tokenizer

    dataset = cfg.data.corpus.get("dataset", "hellochat_synth")
    folder = cfg.data.corpus.get("tokenizer") or builders.dataset_dir(dataset, cfg.data.corpus.get("data_dir") or None) / "tokenizer"
    return load_tokenizer(folder)


def instruct_ids(tokenizer, style: str | None, reply: str) -> list[int]:
    """Instruct layout: ``style<|endofprompt|>reply`` (no style: the reply alone)."""
    from hellochat_jax.pipelines.talker import END_OF_PROMPT

    ids = list(tokenizer([reply])["input_ids"][0])
    if not style:
        return ids
    eop = int(tokenizer.convert_tokens_to_ids(END_OF_PROMPT))
    return list(tokenizer([style])["input_ids"][0]) + [eop] + ids


def reply_tokens_source(cfg, split: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Record id -> (speech tokens, reply speech tokens) from the corpus's current cache."""
    from hellochat_jax.data import speech_tokens

    dataset = cfg.data.corpus.get("dataset", "hellochat_synth")
    tokens = speech_tokens.load(dataset, split, cfg.data.corpus.get("data_dir") or None)
    require(tokens is not None, f"dataset {dataset!r} has no speech tokens for split {split!r}: run "
                                "`hellochat data tokens --model DIR` with a model folder that has a speech tokenizer")
    return tokens


class TalkerData:
    task_names = ("tts",)

    def __init__(self, cfg, process_index: int = 0, process_count: int = 1):
        from hellochat_jax.train.model import talker_config

        self.cfg = cfg
        self.opts = stages.options(cfg, STAGE) or TalkerOptions()
        self.talker = talker_config(cfg.model)
        self.process = (process_index, process_count)
        self.rows = cfg.data.batch_size // process_count
        self.length = self.opts.max_text_tokens + self.opts.max_speech_tokens + 3
        self.tokenizer = talker_tokenizer(cfg)
        vocab = self.talker.qwen2.vocab_size
        require(len(self.tokenizer) <= vocab, f"the talker tokenizer has {len(self.tokenizer)} tokens but "
                                              f"model.talker.qwen2.vocab_size is {vocab}")
        self.tokens = reply_tokens_source(cfg, "train")

    def row(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray] | None:
        rid = text(record["id"])
        if rid not in self.tokens:
            return None
        speech = np.asarray(self.tokens[rid][1], np.int32)
        reply = text(record["reply"]).strip()
        if not reply or speech.size == 0 or speech.size > self.opts.max_speech_tokens:
            return None
        style = stages.reply_style(record) if self.opts.instruct else None
        ids = np.asarray(instruct_ids(self.tokenizer, style, reply), np.int32)
        if ids.size > self.opts.max_text_tokens:
            return None
        return {
            "speech_text": pad_to(ids, self.opts.max_text_tokens), "speech_text_lengths": np.int32(ids.size),
            "speech_tokens": pad_to(speech, self.opts.max_speech_tokens), "speech_token_lengths": np.int32(speech.size),
        }

    def iterator(self):
        return stages.corpus_records(self.cfg, self.row, *self.process)

    def prepare(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from hellochat_jax.train.corpus import talker_batch

        return talker_batch(batch, self.talker, self.length)

    def local_spec(self) -> dict[str, jax.ShapeDtypeStruct]:
        return {k: jax.ShapeDtypeStruct((self.rows, self.length), np.dtype(np.int32))
                for k in ("speech_ids", "speech_kinds", "speech_targets")}


class TalkerObjective:
    """The speech LM's loss (train/losses.py `Objective.talker_loss`)."""

    def __init__(self, cfg, data):
        from hellochat_jax.train.losses import Objective

        self.loss = Objective(data.task_names, remat=cfg.model.remat != "none")

    def normalizers(self, batch):
        speech = batch["speech_targets"] != -1
        return {"talker": jnp.maximum(jnp.sum(speech).astype(jnp.float32), 1.0),
                "talker_rows": jnp.maximum(jnp.sum(jnp.any(speech, axis=-1)).astype(jnp.float32), 1.0)}

    def __call__(self, model, micro, key, norms):
        del key
        loss, stats = self.loss.talker_loss(model.talker, micro, norms)
        stats["input_tokens"] = jnp.sum(micro["speech_kinds"] > 0).astype(jnp.float32)
        return loss, stats

    def record(self, stats) -> dict[str, float]:
        n = max(float(stats["talker_tokens"]), 1.0)
        return {"talker_loss": float(stats["talker_ce"]) / n, "talker_accuracy": float(stats["talker_correct"]) / n}


STAGE = Stage("talker", ("talker",), TalkerData, TalkerObjective, TalkerOptions)
