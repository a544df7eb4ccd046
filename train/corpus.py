"""The data pipeline (hellochat_jax/data/pipeline.py) as the trainer's data source, and the
held-out evaluation on its validation split.

`data.corpus` holds the pipeline's own DataConfig fields (dataset, tokenizer, mixture, clip
limits, ...) except `batch_size` and `seq_len`, which come from `data` (the trainer's batch is
global; the pipeline's is per process).

Evaluation decodes greedily from prompts built exactly as in training (same chat template,
same instructions, no modality swaps) for three tasks of the validation split and scores:
    asr      WER and CER (jiwer) on lower-cased, punctuation-free text
    emotion  accuracy of the predicted label
    events   micro-F1 of the predicted comma-separated event set
with the scores a constant guess would get (`*_chance`: the most frequent label / event set)
for comparison.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections import Counter
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from hellochat_jax.train.config import TrainConfig

from hellochat_jax.core.config import ConfigError, from_dict

USED_KEYS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions", "task_id", "bad_records", "too_long")
AUDIO_KEYS = ("audio", "audio_lengths")


def pipeline_config(cfg: TrainConfig, process_count: int = 1):
    """The pipeline's DataConfig for this process, type-checked (unknown keys are errors)."""
    from hellochat_jax.data import pipeline

    fields = dict(cfg.data.corpus)
    for key in ("batch_size", "seq_len"):
        if key in fields:
            raise ConfigError(f"data.corpus.{key}: set data.{key} instead (data.batch_size is the global batch)")
    fields.setdefault("seed", cfg.seed)
    try:
        return from_dict(pipeline.DataConfig, {**fields, "batch_size": cfg.data.batch_size // process_count,
                                               "seq_len": cfg.data.seq_len}, where="data.corpus")
    except ValueError as e:
        raise ConfigError(str(e)) from None


class CorpusData:
    def __init__(self, cfg: TrainConfig, process_index: int = 0, process_count: int = 1):
        from hellochat_jax.data import pipeline

        self.cfg = cfg
        self.pipeline_cfg = pipeline_config(cfg, process_count)
        self.process = (process_index, process_count)
        self.task_names = ("none",) + tuple(pipeline.TASKS)  # task_id 0 = padding
        self.talker = None
        if cfg.model.talker is not None:
            if not self.pipeline_cfg.talker:
                raise ConfigError("model.talker is set but data.corpus.mixture.tts is 0: the talker would get no pairs")
            from hellochat_jax.train.model import talker_config

            self.talker = talker_config(cfg.model)
            self.speech_len = self.pipeline_cfg.speech_text_len + self.pipeline_cfg.speech_token_len + 2
        self.keys = self.keys_for(cfg)
        tok = pipeline._chat_tokens(pipeline.tokenizer_path(self.pipeline_cfg))
        if len(tok) > cfg.model.thinker.vocab_size:
            raise ConfigError(f"the tokenizer has {len(tok)} tokens but model.thinker.vocab_size is {cfg.model.thinker.vocab_size}")
        if cfg.model.encoder is not None and cfg.model.audio_token_id != tok.audio:
            raise ConfigError(f"model.audio_token_id={cfg.model.audio_token_id} but the tokenizer's <|AUDIO|> id is {tok.audio}")

    @staticmethod
    def keys_for(cfg: TrainConfig) -> tuple[str, ...]:
        return USED_KEYS + (AUDIO_KEYS if cfg.model.encoder is not None else ())

    def iterator(self):
        from hellochat_jax.data import pipeline

        index, count = self.process
        return pipeline.make_iterator(self.pipeline_cfg, process_index=index, process_count=count)

    def local_spec(self) -> dict[str, jax.ShapeDtypeStruct]:
        from hellochat_jax.data import pipeline

        shapes = pipeline.batch_shapes(self.pipeline_cfg)
        spec = {k: jax.ShapeDtypeStruct(shapes[k][0], np.dtype(shapes[k][1])) for k in self.keys}
        if self.talker is not None:
            rows = self.pipeline_cfg.batch_size
            for k in ("speech_ids", "speech_kinds", "speech_targets"):
                spec[k] = jax.ShapeDtypeStruct((rows, self.speech_len), np.dtype(np.int32))
        return spec

    def prepare(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Host-side additions to a pipeline batch: the talker's input layout."""
        if self.talker is None:
            return batch
        return {**batch, **talker_batch(batch, self.talker, self.speech_len)}

    def evaluator(self, trainer):
        e = self.cfg.eval
        return Evaluator(trainer, self.pipeline_cfg, e.num_examples, e.batch_size, e.max_new_tokens)


def talker_batch(batch: dict[str, np.ndarray], talker_cfg, length: int) -> dict[str, np.ndarray]:
    """The pipeline's text -> speech-token pairs as CosyVoice 2 training rows (uni- or bistream,
    drawn per row as the reference does, from a generator seeded by the batch itself so a
    resumed run draws the same). Rows without a pair, or whose record has no speech tokens,
    get no targets."""
    import zlib

    from hellochat_jax.components.speech_lm import model as speech_lm

    text, n_text = batch["speech_text"], batch["speech_text_lengths"]
    speech, n_speech = batch["speech_tokens"], batch["speech_token_lengths"]
    draws = np.random.default_rng(zlib.crc32(speech.tobytes() + text.tobytes())).random(len(text))
    rows = []
    for i in range(len(text)):
        if n_text[i] == 0 or n_speech[i] == 0:
            rows.append(speech_lm.Layout(np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.int32)))
            continue
        t, sp = text[i, : n_text[i]], speech[i, : n_speech[i]]
        bistream = speech_lm.use_bistream(float(draws[i]), len(t), len(sp), talker_cfg.mix_ratio)
        rows.append(speech_lm.training_layout(t, sp, bistream=bistream, speech_token_size=talker_cfg.speech_token_size,
                                              mix_ratio=talker_cfg.mix_ratio))
    padded = speech_lm.pad_batch(rows, left=False, length=length)
    return {"speech_ids": padded.ids, "speech_kinds": padded.kinds, "speech_targets": padded.targets}


# ----------------------------------------------------------------------------- evaluation

EVAL_TASKS = ("asr", "emotion", "events")


def normalize(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s']", " ", text.lower()).split())


def event_set(text: str) -> set[str]:
    return {normalize(x) for x in text.split(",") if normalize(x)}


def f1(pred: list[set[str]], gold: list[set[str]]) -> float:
    tp = sum(len(p & g) for p, g in zip(pred, gold))
    n_pred, n_gold = sum(len(p) for p in pred), sum(len(g) for g in gold)
    return 2 * tp / (n_pred + n_gold) if n_pred + n_gold else 1.0


@functools.partial(jax.jit, static_argnums=0)
def _embed(graphdef, state, ids, audio, lengths):
    model = nnx.merge(graphdef, state)
    return model.thinker.embed_rows(ids, audio, lengths)


class Evaluator:
    def __init__(self, trainer, pipeline_cfg, num_examples: int, batch_size: int, max_new_tokens: int):
        from hellochat_jax.data import builders, pipeline

        self.trainer = trainer
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        cfg = dataclasses.replace(pipeline_cfg, split="validation", audio_to_text_p=0.0, text_to_audio_q=0.0)
        self.chat = pipeline._chat_tokens(pipeline.tokenizer_path(cfg))
        source = builders.open_source(cfg.dataset, "validation", cfg.data_dir or None)
        examples = [pipeline.decode(source[i]) for i in range(min(num_examples, len(source)))]
        examples = [ex for ex in examples if not isinstance(ex, pipeline.Skipped)]
        rng = np.random.default_rng(0)
        header = (self.chat.im_start, *self.chat.text("assistant\n"))
        self.prompts: dict[str, list[dict[str, Any]]] = {}
        for task in EVAL_TASKS:
            rows = []
            for ex in examples:
                if task not in pipeline.available_tasks(ex):
                    continue
                messages = pipeline.build_messages(ex, task, rng, cfg, dict.fromkeys(pipeline.COUNTERS, 0))
                enc = self.chat.encode(messages[:-1])  # everything up to the answer
                answer = {"asr": ex.transcript, "emotion": ex.emotion, "events": ", ".join(ex.events)}[task]
                clip = np.asarray(enc.clips[0], np.float32)[: cfg.max_audio_samples]
                rows.append({"ids": list(enc.ids) + list(header), "clip": clip, "answer": answer})
            self.prompts[task] = rows
        # One prompt length and one audio length for every batch: one compilation.
        self.prompt_len = max(len(r["ids"]) for rows in self.prompts.values() for r in rows)
        self.audio_len = cfg.max_audio_samples
        self.chance = self._chance()

    def _chance(self) -> dict[str, float]:
        out = {}
        emotions = [r["answer"] for r in self.prompts.get("emotion", [])]
        if emotions:
            out["eval/emotion_accuracy_chance"] = Counter(emotions).most_common(1)[0][1] / len(emotions)
        events = [event_set(r["answer"]) for r in self.prompts.get("events", [])]
        if events:
            guess = Counter(e for s in events for e in s).most_common(1)[0][0]
            out["eval/events_f1_chance"] = f1([{guess}] * len(events), events)
        return out

    def _generate(self, model, rows: list[dict[str, Any]]) -> list[str]:
        from hellochat_jax.core import decoding as gen

        b, t = self.batch_size, self.prompt_len
        pad = self.chat.pad
        texts = []
        graphdef, state = nnx.split(model)
        for start in range(0, len(rows), b):
            chunk = rows[start : start + b]
            chunk = chunk + [chunk[-1]] * (b - len(chunk))  # fixed batch shape
            ids = np.full((b, t), pad, np.int32)
            mask = np.zeros((b, t), np.int32)
            audio = np.zeros((b, 1, self.audio_len), np.float32)
            lengths = np.zeros((b, 1), np.int32)
            for i, r in enumerate(chunk):
                n = len(r["ids"])
                ids[i, t - n :], mask[i, t - n :] = r["ids"], 1
                audio[i, 0, : len(r["clip"])] = r["clip"]
                lengths[i, 0] = len(r["clip"])
            embeds = _embed(graphdef, state, jnp.asarray(ids), jnp.asarray(audio), jnp.asarray(lengths))
            tokens, lens = gen.generate(
                model.thinker.decoder, ids, mask, inputs_embeds=embeds, max_new_tokens=self.max_new_tokens,
                stop_tokens=(self.chat.im_end, self.chat.endoftext), pad_id=pad, mesh=self.trainer.mesh,
            )
            for i in range(min(b, len(rows) - start)):
                texts.append(self.chat.tokenizer.decode(tokens[i, : lens[i]].tolist(), skip_special_tokens=True))
        return texts

    def __call__(self, model) -> dict[str, float]:
        import jiwer

        out: dict[str, Any] = dict(self.chance)
        for task, rows in self.prompts.items():
            if not rows:
                continue
            preds = self._generate(model, rows)
            answers = [r["answer"] for r in rows]
            if task == "asr":
                refs = [normalize(a) or "-" for a in answers]
                hyps = [normalize(p) for p in preds]
                out["eval/wer"] = float(jiwer.wer(refs, hyps))
                out["eval/cer"] = float(jiwer.cer(refs, hyps))
            elif task == "emotion":
                out["eval/emotion_accuracy"] = float(np.mean([normalize(p) == normalize(a) for p, a in zip(preds, answers)]))
            else:
                out["eval/events_f1"] = f1([event_set(p) for p in preds], [event_set(a) for a in answers])
            out[f"eval/example_{task}"] = f"{preds[0]!r} (want {answers[0]!r})"
        return out
