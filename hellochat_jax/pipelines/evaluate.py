"""Held-out evaluation of a Hello-Chat model on a corpus split, Seed-TTS-Eval style: the one
implementation behind `hellochat eval` and the trainer's held-out evaluation (train/corpus.py).

Understanding (the thinker). Prompts are built exactly as training builds them
(`pipeline.build_messages`: the same chat template, instructions and system prompt, with no
modality swaps) and decoded greedily:
    asr      wer, cer (jiwer) on lower-cased, punctuation-free text
    emotion  emotion_accuracy of the predicted label
    events   events_f1: micro-F1 of the predicted comma-separated event set
    qa       the spoken utterance (after its dialogue context) -> the reply, with any leading
             style tag stripped before scoring:
               reply_word_accuracy        1 - WER, records of kind request / statement / dialogue
                                          (the reply follows from what was said)
               reply_word_accuracy_facts  1 - WER, records of kind question (facts and sums)
               reply_style_accuracy       fraction of replies whose style tag is
                                          synth.STYLE_FOR_EMOTION[emotion] (when synth has it)
    (1 - WER is below 0 when the replies insert more words than the references hold.)

Speech (the talker). The held-out reply texts are spoken by the talker, in the style
synth.STYLE_FOR_EMOTION gives the record's emotion (as CosyVoice 2 instruct text, the way chat
speaks a style tag), resampled to 16 kHz and transcribed by a recogniser thinker with the corpus's
ASR instruction:
    tts_wer, tts_cer  the recogniser on the talker's speech
    tts_wer_floor     the recogniser on the corpus's own recording of the reply (reply_audio)
    tts_wer_noise     the recogniser on white noise of that recording's length and loudness
    style_accuracy    the recogniser's emotion (the corpus's emotion instruction) on the talker's
                      speech against synth.STYLE_EMOTION[style] (when synth has both tables)
    style_accuracy_floor  the same on the corpus's own recordings of those replies

Batches have a fixed row count (the last one padded with copies); a batch's prompt length and
audio length are bucketed (16 tokens, 1 s), or fixed by the caller for one compilation.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hellochat_jax.core import dsp
from hellochat_jax.core.errors import UserError
from hellochat_jax.data import pipeline
from hellochat_jax.data.tokenizer import ChatTokens, Message
from hellochat_jax.pipelines.chat import split_style

EVAL_TASKS = ("asr", "emotion", "events")  # what the trainer evaluates
UNDERSTAND_TASKS = EVAL_TASKS + ("qa",)  # what `hellochat eval understand` evaluates
REPLY_KINDS = ("request", "statement", "dialogue")
FACT_KINDS = ("question",)
PROMPT_BUCKET = 16
AUDIO_BUCKET = dsp.SAMPLE_RATE

Progress = Callable[[int], None]  # called with the number of rows just finished


class EvalError(UserError):
    """A model folder or corpus the evaluation cannot use; the message says which."""


# ----------------------------------------------------------------------------- scoring


def normalize(text: str) -> str:
    """Lower case, punctuation (but apostrophes) to spaces, single spaces."""
    return " ".join(re.sub(r"[^\w\s']", " ", text.lower()).split())


def event_set(text: str) -> set[str]:
    return {normalize(x) for x in text.split(",") if normalize(x)}


def f1(pred: Sequence[set[str]], gold: Sequence[set[str]]) -> float:
    """Micro-F1 of predicted sets against gold sets (1 when both are empty everywhere)."""
    tp = sum(len(p & g) for p, g in zip(pred, gold))
    n_pred, n_gold = sum(len(p) for p in pred), sum(len(g) for g in gold)
    return 2 * tp / (n_pred + n_gold) if n_pred + n_gold else 1.0


def wer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Corpus WER (jiwer) of normalized texts; an empty reference counts as one word."""
    import jiwer

    return float(jiwer.wer([normalize(r) or "-" for r in refs], [normalize(h) for h in hyps]))


def cer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    import jiwer

    return float(jiwer.cer([normalize(r) or "-" for r in refs], [normalize(h) for h in hyps]))


def reply_text(text: str) -> tuple[str | None, str]:
    """(style, text) of a reply: the leading style tag split off as chat splits it."""
    style, body, _ = split_style(text)
    return style, body


def style_for_emotion(emotion: str) -> str | None:
    """The style the corpus's replies take for a user's emotion (synth.STYLE_FOR_EMOTION; None
    when the corpus has no such table or the emotion is not in it)."""
    from hellochat_jax.data import synth

    return getattr(synth, "STYLE_FOR_EMOTION", {}).get(emotion) if emotion else None


def style_emotion() -> dict[str, str] | None:
    """Style -> the emotion class its prosody realises (synth.STYLE_EMOTION), None if absent."""
    from hellochat_jax.data import synth

    return getattr(synth, "STYLE_EMOTION", None)


# ----------------------------------------------------------------------------- records and prompts


@dataclasses.dataclass
class Record:
    example: pipeline.Example
    kind: str  # question / statement / request / dialogue / ""


@dataclasses.dataclass
class Prompt:
    ids: list[int]  # the chat up to and including the assistant header
    clips: list[np.ndarray]  # 16 kHz float32, in placeholder order
    answer: str = ""
    record: Record | None = None


def load_records(dataset: str, split: str, num: int | None = None, data_dir: str | None = None) -> list[Record]:
    """The first `num` records of a split (None: all), decoded; unusable records are left out."""
    from hellochat_jax.data import builders

    try:
        source = pipeline.SafeSource(builders.open_source(dataset, split, data_dir))
    except ValueError as e:  # no such split
        raise EvalError(str(e)) from None
    out = []
    for i in range(len(source) if num is None else min(num, len(source))):
        raw = source[i]
        ex = pipeline.decode(raw)
        if not isinstance(ex, pipeline.Skipped):
            out.append(Record(ex, pipeline._text(raw.get("kind", "")).strip()))
    return out


def _prompt(chat: ChatTokens, messages: Sequence[Message], answer: str = "", record: Record | None = None) -> Prompt:
    enc = chat.encode(messages)
    ids = list(enc.ids) + [chat.im_start, *chat.text("assistant\n")]
    return Prompt(ids, [np.asarray(c, np.float32) for c in enc.clips], answer, record)


def understanding_prompts(records: Sequence[Record], tasks: Sequence[str], chat: ChatTokens, cfg: pipeline.DataConfig) -> dict[str, list[Prompt]]:
    """Task -> a prompt for each record that has the task's labels, built as training builds
    them (cfg's system prompt; instructions drawn from one generator seeded 0, task by task),
    without modality swaps: spoken turns stay audio, context turns stay text."""
    cfg = dataclasses.replace(cfg, audio_to_text_p=0.0, text_to_audio_q=0.0)
    rng = np.random.default_rng(0)
    out = {}
    for task in tasks:
        rows = []
        for r in records:
            if task in pipeline.available_tasks(r.example):
                messages = pipeline.build_messages(r.example, task, rng, cfg, dict.fromkeys(pipeline.COUNTERS, 0))
                rows.append(_prompt(chat, messages[:-1], messages[-1].parts[0], r))
        out[task] = rows
    return out


def audio_prompt(chat: ChatTokens, clip: np.ndarray, instruction: str, system: str = "", *, subsample: int) -> Prompt:
    """One clip and an instruction, laid out as `build_messages` lays out the asr / emotion /
    events tasks (clip first, then the instruction); `subsample` is the thinker's adapter's."""
    messages = [Message("system", (system,))] if system else []
    messages.append(Message("user", (pipeline._clip(np.asarray(clip, np.float32), subsample), instruction)))
    return _prompt(chat, messages)


# ----------------------------------------------------------------------------- decoding


def _bucket(n: int, multiple: int) -> int:
    return -(-max(n, 1) // multiple) * multiple


def prompt_shape(prompts: Sequence[Prompt]) -> tuple[int, int, int]:
    """(prompt tokens, clips, audio samples) that hold every prompt, bucketed."""
    t = max((len(p.ids) for p in prompts), default=1)
    a = max((len(p.clips) for p in prompts), default=1)
    s = max((len(c) for p in prompts for c in p.clips), default=1)
    return _bucket(t, PROMPT_BUCKET), max(a, 1), _bucket(s, AUDIO_BUCKET)


@functools.partial(jax.jit, static_argnums=0)
def _embed(graphdef, state, ids, audio, lengths):
    return nnx.merge(graphdef, state).embed_rows(ids, audio, lengths)


def decode(
    thinker,
    chat: ChatTokens,
    prompts: Sequence[Prompt],
    *,
    batch_size: int,
    max_new_tokens: int,
    mesh: jax.sharding.Mesh | None = None,
    shape: tuple[int, int, int] | None = None,
    progress: Progress | None = None,
) -> list[str]:
    """The thinker's greedy reply to each prompt (special tokens dropped). `shape`: (prompt
    tokens, clips, audio samples) of every batch (default: each batch's own, bucketed)."""
    from hellochat_jax.core import decoding

    graphdef, state = nnx.split(thinker)
    texts: list[str] = []
    b = batch_size
    for start in range(0, len(prompts), b):
        chunk = list(prompts[start : start + b])
        n = len(chunk)
        t, a, s = shape or prompt_shape(chunk)
        chunk += [chunk[-1]] * (b - n)  # a fixed batch shape
        ids = np.full((b, t), chat.pad, np.int32)
        mask = np.zeros((b, t), np.int32)
        audio = np.zeros((b, a, s), np.float32)
        lengths = np.zeros((b, a), np.int32)
        for i, p in enumerate(chunk):
            ids[i, t - len(p.ids) :], mask[i, t - len(p.ids) :] = p.ids, 1
            for j, clip in enumerate(p.clips):
                audio[i, j, : len(clip)], lengths[i, j] = clip, len(clip)
        embeds = _embed(graphdef, state, jnp.asarray(ids), jnp.asarray(audio), jnp.asarray(lengths))
        tokens, lens = decoding.generate(
            thinker.decoder, ids, mask, inputs_embeds=embeds, max_new_tokens=max_new_tokens,
            stop_tokens=(chat.im_end, chat.endoftext), pad_id=chat.pad, mesh=mesh,
        )
        texts += [chat.tokenizer.decode(tokens[i, : lens[i]].tolist(), skip_special_tokens=True) for i in range(n)]
        if progress is not None:
            progress(n)
    return texts


# ----------------------------------------------------------------------------- understanding


def score(task: str, preds: Sequence[str], prompts: Sequence[Prompt]) -> dict[str, float]:
    """The metrics of one task (see the module docstring) from its predictions."""
    answers = [p.answer for p in prompts]
    if task == "asr":
        return {"wer": wer(answers, preds), "cer": cer(answers, preds)}
    if task == "emotion":
        return {"emotion_accuracy": float(np.mean([normalize(p) == normalize(a) for p, a in zip(preds, answers)]))}
    if task == "events":
        return {"events_f1": f1([event_set(p) for p in preds], [event_set(a) for a in answers])}
    if task == "qa":
        return reply_scores(preds, answers, [p.record for p in prompts])
    raise ValueError(f"no scoring for task {task!r}")


def reply_scores(preds: Sequence[str], answers: Sequence[str], records: Sequence[Record]) -> dict[str, float]:
    """reply_word_accuracy(_facts) and reply_style_accuracy (see the module docstring)."""
    out = {}
    for name, kinds in (("reply_word_accuracy", REPLY_KINDS), ("reply_word_accuracy_facts", FACT_KINDS)):
        rows = [i for i, r in enumerate(records) if r.kind in kinds]
        if rows:
            out[name] = 1.0 - wer([reply_text(answers[i])[1] for i in rows], [reply_text(preds[i])[1] for i in rows])
    wanted = [(i, style_for_emotion(r.example.emotion)) for i, r in enumerate(records)]
    wanted = [(i, s) for i, s in wanted if s]
    if wanted:
        out["reply_style_accuracy"] = float(np.mean([reply_text(preds[i])[0] == s.strip() for i, s in wanted]))
    return out


def chance_scores(prompts: dict[str, list[Prompt]]) -> dict[str, float]:
    """What a constant guess scores: the most frequent emotion, the most frequent event."""
    out = {}
    emotions = [p.answer for p in prompts.get("emotion", [])]
    if emotions:
        out["emotion_accuracy_chance"] = Counter(emotions).most_common(1)[0][1] / len(emotions)
    events = [event_set(p.answer) for p in prompts.get("events", [])]
    if any(events):
        guess = Counter(e for s in events for e in s).most_common(1)[0][0]
        out["events_f1_chance"] = f1([{guess}] * len(events), events)
    return out


def evaluate_understanding(
    thinker, chat: ChatTokens, prompts: dict[str, list[Prompt]], *, batch_size: int, max_new_tokens: int,
    mesh: jax.sharding.Mesh | None = None, shape: tuple[int, int, int] | None = None, progress: Progress | None = None,
) -> tuple[dict[str, float], dict[str, list[str]]]:
    """(metrics, predictions per task) of every task with prompts."""
    metrics, preds = {}, {}
    for task, rows in prompts.items():
        if rows:
            preds[task] = decode(thinker, chat, rows, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                 mesh=mesh, shape=shape, progress=progress)
            metrics.update(score(task, preds[task], rows))
    return metrics, preds


# ----------------------------------------------------------------------------- speech


def speech_records(records: Sequence[Record]) -> list[Record]:
    """The records whose reply has text and a recording."""
    return [r for r in records if reply_text(r.example.reply)[1].strip() and r.example.reply_audio.size]


def synthesize(talker, texts: Sequence[str], styles: Sequence[str | None], *, batch_size: int, key: jax.Array,
               max_ratio: float = 20.0, progress: Progress | None = None) -> list[np.ndarray]:
    """The talker's speech for each text (16 kHz float32), batch by batch; a style is spoken as
    CosyVoice 2 instruct text, as chat speaks a reply's style tag."""
    out = []
    for k, start in enumerate(range(0, len(texts), batch_size)):
        part = slice(start, start + batch_size)
        waves = talker.speak(list(texts[part]), key=jax.random.fold_in(key, k), instructions=list(styles[part]), max_ratio=max_ratio)
        out += [dsp.resample(np.asarray(w, np.float32), talker.sample_rate, dsp.SAMPLE_RATE) if w.size else np.zeros(0, np.float32)
                for w in waves]
        if progress is not None:
            progress(len(waves))
    return out


def noise_like(clips: Sequence[np.ndarray], seed: int = 0) -> list[np.ndarray]:
    """White noise of each clip's length and RMS loudness."""
    rng = np.random.default_rng(seed)
    rms = [float(np.sqrt(np.mean(np.square(c)))) if len(c) else 0.0 for c in clips]
    return [(rng.standard_normal(len(c)) * r).astype(np.float32) for c, r in zip(clips, rms)]


def recognize(thinker, chat: ChatTokens, clips: Sequence[np.ndarray], instruction: str, *, system: str = "", batch_size: int,
              max_new_tokens: int, mesh: jax.sharding.Mesh | None = None, progress: Progress | None = None) -> list[str]:
    """The thinker's answer to `instruction` about each clip ("" for an empty clip). Clips are
    batched shortest first, so a batch pads little."""
    order = sorted((i for i, c in enumerate(clips) if len(c)), key=lambda i: len(clips[i]))
    prompts = [audio_prompt(chat, clips[i], instruction, system, subsample=thinker.cfg.subsample_factor) for i in order]
    texts = decode(thinker, chat, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens, mesh=mesh, progress=progress)
    out = [""] * len(clips)
    for i, text in zip(order, texts):
        out[i] = text
    return out


def evaluate_speech(
    talker, recognizer, chat: ChatTokens, records: Sequence[Record], *, system: str = "", batch_size: int = 8,
    max_new_tokens: int = 64, mesh: jax.sharding.Mesh | None = None, key: jax.Array | None = None,
    speech_max_ratio: float = 20.0, progress: bool = False,
) -> dict[str, float]:
    """The speech metrics (see the module docstring) of the talker on `records`' replies.
    `recognizer`: a thinker with an audio encoder; `chat`: its tokenizer; `system`: its prompt;
    `speech_max_ratio`: the most speech tokens the talker says per text token."""
    from tqdm import tqdm

    records = speech_records(records)
    if not records:
        raise EvalError("no record of the split has a reply with its recording (reply_audio): nothing to compare with")
    texts = [reply_text(r.example.reply)[1] for r in records]
    styles = [style_for_emotion(r.example.emotion) for r in records]
    truth = [r.example.reply_audio for r in records]
    to_style = style_emotion()
    styled = [i for i, s in enumerate(styles) if s and to_style and s in to_style]
    n_recognize = 3 * len(records) + 2 * len(styled)
    options = {"system": system, "batch_size": batch_size, "max_new_tokens": max_new_tokens, "mesh": mesh}
    asr = pipeline.INSTRUCTIONS["asr"][0]
    with tqdm(total=len(records), desc="speaking", unit="reply", disable=not progress) as bar:
        speech = synthesize(talker, texts, styles, batch_size=batch_size, key=jax.random.key(0) if key is None else key,
                            max_ratio=speech_max_ratio, progress=bar.update)
    with tqdm(total=n_recognize, desc="recognising", unit="clip", disable=not progress) as bar:
        hyps = recognize(recognizer, chat, speech, asr, progress=bar.update, **options)
        out = {"tts_wer": wer(texts, hyps), "tts_cer": cer(texts, hyps)}
        out["tts_wer_floor"] = wer(texts, recognize(recognizer, chat, truth, asr, progress=bar.update, **options))
        out["tts_wer_noise"] = wer(texts, recognize(recognizer, chat, noise_like(truth), asr, progress=bar.update, **options))
        if styled:
            def style_heard(clips: list[np.ndarray]) -> float:
                heard = recognize(recognizer, chat, clips, pipeline.INSTRUCTIONS["emotion"][0], progress=bar.update, **options)
                return float(np.mean([normalize(h) == normalize(to_style[styles[i]]) for h, i in zip(heard, styled)]))

            out["style_accuracy"] = style_heard([speech[i] for i in styled])
            # the corpus's own recordings of those replies: what this recogniser can hear at all
            out["style_accuracy_floor"] = style_heard([truth[i] for i in styled])
    return out


# ----------------------------------------------------------------------------- model folders


@dataclasses.dataclass
class Thinker:
    """A model folder's thinker as the evaluation uses it."""

    model: Any  # MiDashengLM
    chat: ChatTokens
    system: str  # the system prompt it was trained with ("" = none)


def thinker_from_folder(bundle) -> Thinker:
    """The audio thinker of a loaded model folder, its tokenizer and system prompt."""
    from hellochat_jax.components.midashenglm import model as midashenglm
    from hellochat_jax.pipelines.thinker import DEFAULT_SYSTEM

    thinker = getattr(bundle.model, "thinker", None)
    if bundle.component != "hellochat" or thinker is None:
        raise EvalError(f"{bundle.folder}: holds a {bundle.component} checkpoint, not a Hello-Chat model folder")
    if thinker.audio_encoder is None:
        raise EvalError(f"{bundle.folder}: the thinker has no audio encoder: it cannot hear the corpus")
    if bundle.thinker_tokenizer is None:
        raise EvalError(f"{bundle.folder}: the model folder has no thinker tokenizer")
    try:
        chat = ChatTokens(bundle.thinker_tokenizer)
    except ValueError as e:
        raise EvalError(f"{bundle.folder}: {e}") from None
    # An answer must not depend on its batch-mates' loudness (as in chat).
    midashenglm.with_encoder_options(thinker, top_db_per_sample=True)
    system = next(s for s in (bundle.system_prompt, DEFAULT_SYSTEM) if s is not None)
    return Thinker(thinker, chat, system)


def understand_folder(folder: str, *, dataset: str = "hellochat_synth", split: str = "test", num: int | None = None,
                      data_dir: str | None = None, batch_size: int = 8, max_new_tokens: int = 64,
                      mesh: jax.sharding.Mesh | None = None, progress: bool = False) -> tuple[dict[str, float], dict[str, Any]]:
    """(metrics, details) of `hellochat eval understand` on a model folder; details: the number
    of prompts per task, what a constant guess scores and the first prediction of each task."""
    from tqdm import tqdm

    from hellochat_jax.checkpoint.folder import load_model_folder
    from hellochat_jax.core import sharding as shd

    mesh = mesh if mesh is not None else shd.make_mesh()
    thinker = thinker_from_folder(load_model_folder(folder, mesh))
    records = load_records(dataset, split, num, data_dir)
    cfg = pipeline.DataConfig(dataset=dataset, split=split, system_prompt=thinker.system,
                              audio_subsample=thinker.model.cfg.subsample_factor)
    prompts = understanding_prompts(records, UNDERSTAND_TASKS, thinker.chat, cfg)
    total = sum(len(rows) for rows in prompts.values())
    if not total:
        raise EvalError(f"{dataset} {split}: no usable records")
    with tqdm(total=total, desc="decoding", unit="prompt", disable=not progress) as bar:
        metrics, preds = evaluate_understanding(thinker.model, thinker.chat, prompts, batch_size=batch_size,
                                                max_new_tokens=max_new_tokens, mesh=mesh, progress=bar.update)
    details = {"counts": {task: len(rows) for task, rows in prompts.items()}, "chance": chance_scores(prompts),
               "examples": {task: {"predicted": preds[task][0], "wanted": rows[0].answer} for task, rows in prompts.items() if rows}}
    return metrics, details


def tts_folder(folder: str, *, recognizer: str | None = None, dataset: str = "hellochat_synth", split: str = "test",
               num: int | None = None, data_dir: str | None = None, batch_size: int = 8, max_new_tokens: int = 64,
               seed: int = 0, speech_max_ratio: float = 20.0, mesh: jax.sharding.Mesh | None = None,
               progress: bool = False) -> tuple[dict[str, float], dict[str, Any]]:
    """(metrics, details) of `hellochat eval tts`: the folder's talker, recognised by the thinker
    of `recognizer` (default: the same folder's)."""
    from hellochat_jax.checkpoint.folder import load_model_folder
    from hellochat_jax.core import sharding as shd
    from hellochat_jax.pipelines.chat import talker_from_folder

    mesh = mesh if mesh is not None else shd.make_mesh()
    bundle = load_model_folder(folder, mesh)
    talker = talker_from_folder(bundle, mesh) if bundle.component == "hellochat" else None
    if talker is None:
        raise EvalError(f"{folder}: the model folder has no talker: nothing to speak (eval tts needs one)")
    thinker = thinker_from_folder(bundle if recognizer is None else load_model_folder(recognizer, mesh))
    records = load_records(dataset, split, num, data_dir)
    metrics = evaluate_speech(talker, thinker.model, thinker.chat, records, system=thinker.system, batch_size=batch_size,
                              max_new_tokens=max_new_tokens, mesh=mesh, key=jax.random.key(seed),
                              speech_max_ratio=speech_max_ratio, progress=progress)
    return metrics, {"counts": {"replies": len(speech_records(records))}}
