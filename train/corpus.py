"""The data pipeline (hellochat_jax/data/pipeline.py) as the trainer's data source, and the
held-out evaluation on its validation split.

`data.corpus` holds the pipeline's own DataConfig fields (dataset, tokenizer, mixture, clip
limits, ...) except `batch_size` and `seq_len`, which come from `data` (the trainer's batch is
global; the pipeline's is per process).

Evaluation (hellochat_jax/pipelines/evaluate.py, the code `hellochat eval understand` runs)
decodes greedily from prompts built exactly as in training (same chat template, same
instructions, no modality swaps) for three tasks of the validation split and scores:
    asr      WER and CER (jiwer) on lower-cased, punctuation-free text
    emotion  accuracy of the predicted label
    events   micro-F1 of the predicted comma-separated event set
with the scores a constant guess would get (`*_chance`: the most frequent label / event set)
for comparison.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from hellochat_jax.train.config import TrainConfig
from hellochat_jax.train.model import adapter_subsample

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
    # placeholders per clip follow the model's adapter (the model splices exactly that many rows)
    if "audio_subsample" in fields:
        raise ConfigError("data.corpus.audio_subsample: set model.adapter.subsample instead (the data follows the model)")
    fields["audio_subsample"] = adapter_subsample(cfg.model)
    return from_dict(pipeline.DataConfig, {**fields, "batch_size": cfg.data.batch_size // process_count,
                                           "seq_len": cfg.data.seq_len}, where="data.corpus")


class CorpusData:
    def __init__(self, cfg: TrainConfig, process_index: int = 0, process_count: int = 1):
        from hellochat_jax.data import pipeline

        self.cfg = cfg
        self.pipeline_cfg = pipeline_config(cfg, process_count)
        self.process = (process_index, process_count)
        self.task_names = ("none",) + tuple(pipeline.TASKS)  # task_id 0 = padding
        self.talker = None
        # The talker trains here only when it has no stage of its own (train/thinker_stage.py).
        if cfg.model.talker is not None and "talker" not in cfg.stages:
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

    def event_token_ids(self) -> tuple[int, ...]:
        """For each synth.EVENTS entry, the text token that starts its name in an events answer
        (which lists them as the corpus names them, "knock, music"); -1 for "silence", the
        absence of events, which no one row holds (and whose first token is a bare "s")."""
        from hellochat_jax.data import pipeline
        from hellochat_jax.data.synth import EVENTS

        tok = pipeline._chat_tokens(pipeline.tokenizer_path(self.pipeline_cfg))
        ids = tuple(-1 if name == "silence" else tok.text(name)[0] for name in EVENTS)
        if len({i for i in ids if i >= 0}) < sum(i >= 0 for i in ids):
            raise ConfigError(f"options.adapter_event_weight: two event names start with the same token ({dict(zip(EVENTS, ids))})")
        return ids

    @staticmethod
    def keys_for(cfg: TrainConfig) -> tuple[str, ...]:
        keys = USED_KEYS + (AUDIO_KEYS if cfg.model.encoder is not None else ())
        if cfg.model.encoder is not None and cfg.data.corpus.get("ctc_label_len"):
            keys += ("ctc_labels", "ctc_label_lengths")
        if cfg.model.encoder is not None and cfg.data.corpus.get("clip_labels"):
            keys += ("clip_emotion", "clip_events")
        return keys

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


class Evaluator:
    """The held-out evaluation (hellochat_jax/pipelines/evaluate.py, shared with `hellochat eval
    understand`) on the first `num_examples` validation records, with the corpus's tokenizer and
    the run's system prompt; `*_chance` scores of a constant guess and one example per task."""

    def __init__(self, trainer, pipeline_cfg, num_examples: int, batch_size: int, max_new_tokens: int):
        from hellochat_jax.data import pipeline
        from hellochat_jax.pipelines import evaluate

        self.trainer = trainer
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.chat = pipeline._chat_tokens(pipeline.tokenizer_path(pipeline_cfg))
        records = evaluate.load_records(pipeline_cfg.dataset, "validation", num_examples, pipeline_cfg.data_dir or None)
        self.prompts = evaluate.understanding_prompts(records, evaluate.EVAL_TASKS, self.chat, pipeline_cfg)
        # One prompt length and one audio length for every batch: one compilation.
        self.shape = evaluate.prompt_shape([p for rows in self.prompts.values() for p in rows])
        self.chance = {f"eval/{k}": v for k, v in evaluate.chance_scores(self.prompts).items()}

    def __call__(self, model) -> dict[str, float]:
        from hellochat_jax.pipelines import evaluate

        scores, preds = evaluate.evaluate_understanding(
            model.thinker, self.chat, self.prompts, batch_size=self.batch_size, max_new_tokens=self.max_new_tokens,
            mesh=self.trainer.mesh, shape=self.shape,
        )
        out: dict[str, Any] = {**self.chance, **{f"eval/{k}": v for k, v in scores.items()}}
        for task, rows in self.prompts.items():
            if rows:
                out[f"eval/example_{task}"] = f"{preds[task][0]!r} (want {rows[0].answer!r})"
        return out
