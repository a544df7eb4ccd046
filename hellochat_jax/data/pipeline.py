"""The Grain input pipeline: built TFDS ArrayRecord data -> fixed-shape training batches.

    tfds data source (records; unreadable ones become `Skipped`)
      -> this process's part: records [process_index::process_count]
      -> seeded global shuffle, reshuffled every epoch -> repeat
      -> decode (int16 PCM -> float32, labels, context turns, speech tokens from the dataset's
         sidecar cache (speech_tokens.py); invalid records become `Skipped`)
      -> task sampling from the mixture, modality interleaving, chat template + loss masks
      -> skip `Skipped` elements, counting them into the next sample
      -> first-fit packing into rows of fixed shape -> batch (the last one padded) -> finalize
      -> multiprocess prefetch (`DataConfig.workers` processes, each packing its own slice), or
         with workers = 0 a background thread making `prefetch_batches` batches ahead

Every random choice comes from grain's per-element generator, seeded by `DataConfig.seed` and
the element's index, so the same config gives the same batches; the iterator state is
checkpointable with Orbax (`grain.checkpoint.CheckpointSave(iterator)` /
`CheckpointRestore(iterator)` with `grain.checkpoint.CheckpointHandler()`), and a restored run
sees exactly the batches it would have seen.

Batch format: a dict of numpy arrays, the same shapes for every batch of a config
(B = batch_size per process, T = seq_len, A = max_clips, S = max_audio_seconds * 16000;
`batch_shapes(cfg)` lists them):

    input_ids      [B, T] int32    packed chat-template tokens (Qwen format, see tokenizer.py);
                                   padding positions hold the tokenizer's pad id
    targets        [B, T] int32    the token to predict at each position: input_ids[t + 1] of the
                                   same segment (pad id at a segment's last token and on padding)
    loss_mask      [B, T] float32  1 where targets[t] is an assistant token (reply text and its
                                   closing <|im_end|>), else 0. Loss = sum(mask * CE(logits, targets))
    segment_ids    [B, T] int32    0 = padding, 1, 2, ... = the packed samples of a row; attention
                                   must stay within a segment
    positions      [B, T] int32    restart at 0 in each segment
    task_id        [B, T] int32    TASK_IDS of the token's sample (0 = padding), for per-task losses
    audio          [B, A, S] float32  16 kHz clips of the row, in the order of their <|AUDIO|>
                                   runs in input_ids; zero padded
    audio_lengths  [B, A] int32    samples per clip, 0 = no clip. A clip of n samples fills exactly
                                   num_audio_tokens(n) consecutive <|AUDIO|> placeholders
    bad_records    [B] int32       records skipped as unreadable/invalid since the previous sample
    too_long       [B] int32       samples skipped for not fitting T / A / S
    audio_spans, audio_to_text     spoken spans that could become text, and those that did (p)
    text_spans, text_to_audio      [B] int32 text spans that could become audio, and those that did (q)

With tts in the mixture, talker pairs (at most one per row) as well:

    speech_text         [B, Lt] int32  token ids of the text spoken (pad id after the end)
    speech_text_lengths [B] int32
    speech_tokens       [B, Ls] int32  its speech tokens when the record has them, else length 0
                                       (then tokenize speech_audio with the S3 tokenizer)
    speech_token_lengths [B] int32
    speech_audio        [B, S2] float32  the text spoken (16 kHz; the fixed reply voice for the
                                       synthetic corpus), S2 = max_speech_seconds * 16000
    speech_audio_lengths [B] int32
    speech_segment      [B] int32      the segment (segment_ids value) of the row's tts sample, 0 = none

Modality interleaving: a spoken span whose answer does not depend on how it sounds (the user's
question in spoken QA / dialogue) is replaced by its transcript with probability p
(`audio_to_text_p`); a text span that has audio (earlier user turns of a dialogue) is replaced
by that audio with probability q (`text_to_audio_q`). The batch counters measure both rates.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grain
import numpy as np

from hellochat_jax.core.dsp import (
    num_audio_tokens,  # the placeholder count, shared with the model
)
from hellochat_jax.data import builders, speech_tokens
from hellochat_jax.data.synth import DRILL_KIND, EMOTIONS, EVENTS, STYLE_EMOTION, STYLE_FOR_EMOTION, add_event
from hellochat_jax.data.tokenizer import AudioPart, ChatTokens, Message, load_tokenizer, with_style

SAMPLE_RATE = 16000
TASKS = ("asr", "emotion", "events", "caption", "qa", "tts")
TASK_IDS = {task: i + 1 for i, task in enumerate(TASKS)}  # 0 = padding
COUNTERS = ("bad_records", "too_long", "audio_spans", "audio_to_text", "text_spans", "text_to_audio")

INSTRUCTIONS = {
    "asr": ("Transcribe the speech.", "Write down what is said.", "What does the speaker say?"),
    "emotion": ("What emotion does the speaker express?", "How does the speaker sound?"),
    "events": ("Which background sounds can you hear?", "List the sound events in the background."),
    "caption": ("Describe the audio.", "Write a caption for this recording."),
    "tts": ("Say this aloud: ", "Please read out: "),
}


@dataclasses.dataclass
class Mixture:
    """Relative task weights; tasks a record has no labels for are left out for that record."""

    asr: float = 1.0
    emotion: float = 0.5
    events: float = 0.5
    caption: float = 0.5
    qa: float = 1.0
    tts: float = 0.0

    def weights(self) -> dict[str, float]:
        return {t: float(getattr(self, t)) for t in TASKS}


@dataclasses.dataclass
class DataConfig:
    dataset: str = "hellochat_synth"  # "name[/config]" under data_dir, or a built dataset folder
    data_dir: str = ""  # "" = $TFDS_DATA_DIR or ~/tensorflow_datasets
    split: str = "train"
    tokenizer: str = ""  # HF tokenizer folder; "" = the one built with the dataset
    seed: int = 0
    num_epochs: int | None = None  # None = repeat forever
    batch_size: int = 8  # rows per process
    seq_len: int = 256
    max_clips: int = 4  # audio clips per row
    max_audio_seconds: float = 4.5
    max_segments: int = 8  # samples per row
    mixture: Mixture = dataclasses.field(default_factory=Mixture)
    audio_to_text_p: float = 0.25
    text_to_audio_q: float = 0.25
    system_prompt: str = ""
    speech_text_len: int = 64
    speech_token_len: int = 256  # 25 Hz speech tokens: ~10 s
    # the thinker's adapter: encoder outputs per audio token (placeholders per clip follow it;
    # training sets it from model.adapter.subsample, evaluation from the model folder)
    audio_subsample: int = 5
    max_speech_seconds: float = 8.0
    # > 0: each clip also carries the text tokens of what is said in it (its transcript), for
    # an auxiliary CTC loss on the audio encoder; 0 = off
    ctc_label_len: int = 0
    # spoken replies start with the style that fits the speaker's emotion (synth.STYLE_FOR_EMOTION)
    reply_style: bool = True
    # each clip also carries its emotion and background-event labels (synth.EMOTIONS, synth.EVENTS;
    # -1 = unknown), for auxiliary classifiers on the audio encoder
    clip_labels: bool = False
    # probability that an asr sample transcribes the record's spoken reply instead of the
    # utterance: the recogniser then also knows the talker's sentences and voice (the
    # Seed-TTS-Eval style evaluation transcribes replies with the thinker)
    reply_asr_p: float = 0.0
    # probability that an emotion sample asks how the spoken reply sounds (the emotion its style
    # realises, synth.STYLE_EMOTION): the style evaluation asks the thinker exactly that about
    # the talker's speech, and the reply voice is not among the users' voices
    reply_emotion_p: float = 0.0
    # probability that a sample's clip gets one more background event, made afresh
    # (synth.add_event, as the corpus mixes them), its answer and clip labels saying so: on a
    # few thousand clips whose events never change, the encoder's event classifier learnt which
    # clip had which (train split F1 1.00, held-out 0.78; beeps 26 of 28 found on train, 3 of
    # 24 held out) instead of hearing them. Not for caption samples (their answer describes the
    # record's own background); clips with two events (the corpus's most) are left as they are.
    event_mix_p: float = 0.0
    read_threads: int = 2  # threads per process for the per-record stages (decode, tokenize)
    workers: int = 0  # prefetch processes; 0 = everything in the calling process
    worker_buffer_size: int = 2
    prefetch_batches: int = 2  # with workers = 0: batches made ahead in a background thread

    def __post_init__(self):
        for name in ("audio_to_text_p", "text_to_audio_q", "reply_asr_p", "reply_emotion_p", "event_mix_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability, got {getattr(self, name)}")
        weights = self.mixture.weights()
        if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError(f"mixture weights must be >= 0 and not all 0, got {weights}")
        for name in ("batch_size", "seq_len", "max_clips", "max_segments"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")

    @property
    def max_audio_samples(self) -> int:
        return int(round(self.max_audio_seconds * SAMPLE_RATE))

    @property
    def max_speech_samples(self) -> int:
        return int(round(self.max_speech_seconds * SAMPLE_RATE))

    @property
    def talker(self) -> bool:
        return self.mixture.tts > 0


def batch_shapes(cfg: DataConfig) -> dict[str, tuple[tuple[int, ...], type]]:
    """Name -> (shape, dtype) of every array in a batch of this config."""
    B, T, A = cfg.batch_size, cfg.seq_len, cfg.max_clips
    shapes = {name: ((B, T), np.int32) for name in ("input_ids", "targets", "segment_ids", "positions", "task_id")}
    shapes["loss_mask"] = ((B, T), np.float32)
    shapes["audio"] = ((B, A, cfg.max_audio_samples), np.float32)
    shapes["audio_lengths"] = ((B, A), np.int32)
    shapes.update({name: ((B,), np.int32) for name in COUNTERS})
    if cfg.ctc_label_len:
        shapes["ctc_labels"] = ((B, A, cfg.ctc_label_len), np.int32)
        shapes["ctc_label_lengths"] = ((B, A), np.int32)
    if cfg.clip_labels:
        shapes["clip_emotion"] = ((B, A), np.int32)
        shapes["clip_events"] = ((B, A, len(EVENTS)), np.int32)
    if cfg.talker:
        shapes["speech_text"] = ((B, cfg.speech_text_len), np.int32)
        shapes["speech_tokens"] = ((B, cfg.speech_token_len), np.int32)
        shapes["speech_audio"] = ((B, cfg.max_speech_samples), np.float32)
        for name in ("speech_text_lengths", "speech_token_lengths", "speech_audio_lengths", "speech_segment"):
            shapes[name] = ((B,), np.int32)
    return shapes


# --------------------------------------------------------------------------- records


@dataclasses.dataclass(frozen=True)
class Skipped:
    """Stands in for a record or sample that cannot be used; counted, never silently lost."""

    counter: str  # "bad_records" or "too_long"
    reason: str


@dataclasses.dataclass
class Turn:
    role: str
    text: str
    audio: np.ndarray | None  # float32 16 kHz, or None


@dataclasses.dataclass
class Example:
    """A decoded record."""

    id: str
    audio: np.ndarray  # float32, 16 kHz
    transcript: str
    emotion: str
    events: tuple[str, ...]
    caption: str
    reply: str
    reply_audio: np.ndarray
    context: list[Turn]
    speech_tokens: np.ndarray
    reply_speech_tokens: np.ndarray
    kind: str = ""  # question, statement, request, dialogue; synth.DRILL_KIND: the reply answers nothing


class SafeSource:
    """A random-access source whose unreadable records come back as `Skipped`."""

    def __init__(self, source: Any):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> Any:
        try:
            return self.source[index]
        except Exception as e:  # any failure to read or deserialize one record
            return Skipped("bad_records", f"record {index} unreadable: {type(e).__name__}: {e}")

    def __repr__(self) -> str:
        return f"SafeSource({self.source!r})"


def _text(x: Any) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def _pcm(x: Any) -> np.ndarray:
    return np.asarray(x, np.int16).astype(np.float32) / 32768.0


def _pcm16(x: np.ndarray) -> np.ndarray:
    """Back to int16: exact for samples that came from int16 (scaling by 2^15 is exact)."""
    return np.clip(np.round(x * 32768.0), -32768, 32767).astype(np.int16)


def decode(record: Any, sidecar: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None) -> Example | Skipped:
    """A stored record -> `Example`; anything malformed -> `Skipped`. `sidecar` (record id ->
    (tokens, reply tokens), as `speech_tokens.load` gives it) replaces the record's stored
    speech tokens."""
    if isinstance(record, Skipped):
        return record
    try:
        audio = _pcm(record["audio"])
        transcript = _text(record["transcript"]).strip()
        if audio.size == 0:
            raise ValueError("empty audio")
        if not transcript:
            raise ValueError("empty transcript")
        turns = json.loads(_text(record["context"]) or "[]")
        lengths = np.asarray(record["context_audio_lengths"], np.int64)
        context_audio = _pcm(record["context_audio"])
        if lengths.size not in (0, len(turns)) or int(lengths.sum()) != context_audio.size:
            raise ValueError("context audio does not match its turns")
        offsets = np.concatenate([[0], np.cumsum(lengths)]) if lengths.size else np.zeros(len(turns) + 1, np.int64)
        context = []
        for i, turn in enumerate(turns):
            if turn.get("role") not in ("user", "assistant"):
                raise ValueError(f"context turn {i} has role {turn.get('role')!r}")
            clip = context_audio[offsets[i] : offsets[i + 1]]
            context.append(Turn(turn["role"], str(turn.get("text", "")), clip if clip.size else None))
        events = tuple(e.strip() for e in _text(record["events"]).split(",") if e.strip())
        rid = _text(record["id"])
        tokens, reply_tokens = record["speech_tokens"], record["reply_speech_tokens"]
        if sidecar is not None and rid in sidecar:
            tokens, reply_tokens = sidecar[rid]
        return Example(
            id=rid,
            audio=audio,
            transcript=transcript,
            emotion=_text(record["emotion"]).strip(),
            events=events,
            caption=_text(record["caption"]).strip(),
            reply=_text(record["reply"]).strip(),
            reply_audio=_pcm(record["reply_audio"]),
            context=context,
            speech_tokens=np.asarray(tokens, np.int32),
            reply_speech_tokens=np.asarray(reply_tokens, np.int32),
            kind=_text(record["kind"]).strip() if "kind" in record else "",
        )
    except Exception as e:  # a record that deserialized but makes no sense
        rid = record.get("id", b"?") if isinstance(record, dict) else "?"
        return Skipped("bad_records", f"record {_text(rid)!r} invalid: {type(e).__name__}: {e}")


class Decode(grain.transforms.Map):
    """`decode` with the speech tokens of the dataset's current sidecar cache
    (hellochat_jax/data/speech_tokens.py), read on first use in each process so the transform
    pickles cheaply into prefetch workers."""

    def __init__(self, tokens_dir: Path | None, split: str):
        self.tokens_dir = tokens_dir
        self.split = split
        self._read, self._table = False, None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_read": False, "_table": None}

    def map(self, record: Any) -> Example | Skipped:
        # Read once: a cache rebuilt mid-run must not change the tokens under a running job.
        # (Read threads may race to the first read; they read the same file.)
        if not self._read:
            self._table = speech_tokens.load_dir(self.tokens_dir, self.split) if self.tokens_dir is not None else None
            self._read = True
        return decode(record, self._table)


# --------------------------------------------------------------------------- samples


def available_tasks(ex: Example) -> list[str]:
    tasks = ["asr", "tts"]
    if ex.emotion:
        tasks.append("emotion")
    if ex.events:
        tasks.append("events")
    if ex.caption:
        tasks.append("caption")
    if ex.reply and ex.kind != DRILL_KIND:  # a drill's "reply" is other random words
        tasks.append("qa")
    return tasks


def choose_task(ex: Example, mixture: Mixture, rng: np.random.Generator) -> str | None:
    weights = mixture.weights()
    tasks = [t for t in TASKS if t in available_tasks(ex) and weights[t] > 0]
    if not tasks:
        return None
    w = np.asarray([weights[t] for t in tasks])
    return tasks[int(rng.choice(len(tasks), p=w / w.sum()))]


def _clip(samples: np.ndarray, subsample: int) -> AudioPart:
    return AudioPart(samples, num_audio_tokens(len(samples), subsample))


def with_new_event(ex: Example, rng: np.random.Generator) -> Example:
    """`ex` with one more background event (one it does not have) mixed into its audio and
    named in its events (alphabetical, as the corpus lists them); unchanged where it already
    has two or its events are not the corpus's."""
    have = [e for e in ex.events if e != "silence"]
    if len(have) >= 2 or any(e not in EVENTS for e in ex.events) or not ex.audio.size:
        return ex
    candidates = [e for e in EVENTS if e != "silence" and e not in have]
    name = candidates[int(rng.integers(len(candidates)))]
    return dataclasses.replace(ex, audio=add_event(ex.audio, name, rng), events=tuple(sorted([*have, name])))


def build_messages(
    ex: Example, task: str, rng: np.random.Generator, cfg: DataConfig, counts: dict[str, int]
) -> list[Message]:
    """The conversation for one task, with modality interleaving (counted into `counts`)."""
    messages = [Message("system", (cfg.system_prompt,))] if cfg.system_prompt else []

    def pick(options: tuple[str, ...]) -> str:
        return options[int(rng.integers(len(options)))]

    if task == "qa":
        for turn in ex.context:
            if turn.role == "user" and turn.audio is not None:
                counts["text_spans"] += 1
                if rng.random() < cfg.text_to_audio_q:
                    counts["text_to_audio"] += 1
                    messages.append(Message("user", (_clip(turn.audio, cfg.audio_subsample),)))
                    continue
            messages.append(Message(turn.role, (turn.text,)))
        counts["audio_spans"] += 1
        if rng.random() < cfg.audio_to_text_p:
            counts["audio_to_text"] += 1
            question: tuple = (ex.transcript,)
        else:
            question = (_clip(ex.audio, cfg.audio_subsample),)
        style = STYLE_FOR_EMOTION.get(ex.emotion) if cfg.reply_style else None
        return messages + [Message("user", question), Message("assistant", (with_style(ex.reply, style),))]
    if task == "tts":
        text = ex.reply if ex.reply and ex.reply_audio.size else ex.transcript
        return messages + [Message("user", (pick(INSTRUCTIONS["tts"]) + text,)), Message("assistant", (text,))]
    if task == "asr" and ex.reply and ex.reply_audio.size and rng.random() < cfg.reply_asr_p:
        return messages + [
            Message("user", (_clip(ex.reply_audio, cfg.audio_subsample), pick(INSTRUCTIONS["asr"]))),
            Message("assistant", (ex.reply,)),
        ]
    heard_in_reply = reply_emotion(ex) if task == "emotion" and ex.reply_audio.size and cfg.reply_emotion_p > 0 else None
    if heard_in_reply is not None and rng.random() < cfg.reply_emotion_p:
        return messages + [
            Message("user", (_clip(ex.reply_audio, cfg.audio_subsample), pick(INSTRUCTIONS["emotion"]))),
            Message("assistant", (heard_in_reply,)),
        ]
    answer = {
        "asr": ex.transcript,
        "emotion": ex.emotion,
        "events": ", ".join(ex.events),
        "caption": ex.caption,
    }[task]
    return messages + [
        Message("user", (_clip(ex.audio, cfg.audio_subsample), pick(INSTRUCTIONS[task]))),
        Message("assistant", (answer,)),
    ]


_CHAT_LOCK = threading.Lock()


def _chat_tokens(path: str) -> ChatTokens:
    # Read threads start together: loading (and importing transformers) must happen once.
    with _CHAT_LOCK:
        return _load_chat_tokens(path)


@functools.lru_cache(maxsize=4)
def _load_chat_tokens(path: str) -> ChatTokens:
    return ChatTokens(load_tokenizer(path))


def reply_emotion(ex: Example) -> str | None:
    """The emotion the reply's style realises (synth.STYLE_EMOTION), None where it has none."""
    return STYLE_EMOTION.get(STYLE_FOR_EMOTION.get(ex.emotion))


def clip_labels(ex: Example, clips: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Each clip's emotion (index into synth.EMOTIONS) and background events (multi-hot over
    synth.EVENTS); -1 where unknown. Context turns are spoken by the same speaker in the same
    way, without background events."""
    emotion = EMOTIONS.index(ex.emotion) if ex.emotion in EMOTIONS else -1
    events = np.full(len(EVENTS), -1, np.int32)
    if ex.events and all(e in EVENTS for e in ex.events):
        events = np.asarray([int(e in ex.events) for e in EVENTS], np.int32)
    quiet = np.asarray([int(e == "silence") for e in EVENTS], np.int32)
    out_emotion = np.full(len(clips), -1, np.int32)
    out_events = np.full((len(clips), len(EVENTS)), -1, np.int32)
    in_reply = reply_emotion(ex)
    reply_index = EMOTIONS.index(in_reply) if in_reply else -1
    for i, clip in enumerate(clips):
        if clip is ex.audio:
            out_emotion[i], out_events[i] = emotion, events
        elif clip is ex.reply_audio:  # the assistant's voice, in the style it answered with
            out_emotion[i], out_events[i] = reply_index, quiet
        elif any(t.audio is clip for t in ex.context):
            out_emotion[i], out_events[i] = emotion, quiet
    return {"clip_emotion": out_emotion, "clip_events": out_events}


class MakeSample(grain.transforms.RandomMap):
    """Example -> a packable sample dict (or `Skipped`). Loads the tokenizer lazily, once per
    process, so the transform pickles cheaply into prefetch workers."""

    def __init__(self, cfg: DataConfig, tokenizer_path: str):
        self.cfg = cfg
        self.tokenizer_path = tokenizer_path

    def random_map(self, ex: Example | Skipped, rng: np.random.Generator) -> dict[str, Any] | Skipped:
        if isinstance(ex, Skipped):
            return ex
        cfg = self.cfg
        chat = _chat_tokens(self.tokenizer_path)
        task = choose_task(ex, cfg.mixture, rng)
        if task is None:
            return Skipped("bad_records", f"record {ex.id!r} has labels for no task of the mixture")
        if task != "caption" and cfg.event_mix_p > 0 and rng.random() < cfg.event_mix_p:
            ex = with_new_event(ex, rng)
        counts = dict.fromkeys(COUNTERS, 0)
        messages = build_messages(ex, task, rng, cfg, counts)
        enc = chat.encode(messages)
        too_long = []
        if len(enc.ids) > cfg.seq_len:
            too_long.append(f"{len(enc.ids)} tokens > seq_len {cfg.seq_len}")
        if len(enc.clips) > cfg.max_clips:
            too_long.append(f"{len(enc.clips)} clips > max_clips {cfg.max_clips}")
        if any(len(c) > cfg.max_audio_samples for c in enc.clips):
            too_long.append(f"a clip is longer than max_audio_seconds {cfg.max_audio_seconds}")
        if any(num_audio_tokens(len(c), cfg.audio_subsample) == 0 for c in enc.clips):
            return Skipped("bad_records", f"record {ex.id!r}: audio too short for one audio token")

        ids = np.asarray(enc.ids, np.int32)
        assistant = np.asarray(enc.assistant, np.int32)
        sample: dict[str, Any] = {
            "input_ids": ids,
            # Position t predicts token t + 1 of the same sample, so packing never mixes samples.
            "targets": np.append(ids[1:], chat.pad).astype(np.int32),
            "loss_mask": np.append(assistant[1:], 0).astype(np.int32),
            "task_id": np.full(len(ids), TASK_IDS[task], np.int32),
            # int16 until the batch is finished: packing and batching move half the bytes
            "audio": np.zeros((len(enc.clips), cfg.max_audio_samples), np.int16),
            "audio_lengths": np.asarray([len(c) for c in enc.clips], np.int32),
            "counters": np.asarray([[counts[c] for c in COUNTERS]], np.int32),
        }
        for i, clip in enumerate(enc.clips):
            sample["audio"][i, : len(clip)] = _pcm16(clip[: cfg.max_audio_samples])
        if cfg.ctc_label_len:
            sample.update(self._ctc_labels(ex, enc.clips, chat))
        if cfg.clip_labels:
            sample.update(clip_labels(ex, enc.clips))
        if cfg.talker:
            sample.update(self._talker(ex, task, chat, too_long))
        if too_long:
            return Skipped("too_long", f"record {ex.id!r} ({task}): " + "; ".join(too_long))
        return sample

    def _ctc_labels(self, ex: Example, clips: list[np.ndarray], chat: ChatTokens) -> dict[str, np.ndarray]:
        """Each clip's words as text tokens (the utterance's transcript, a context turn's text);
        length 0 for a clip whose words are unknown or too many (no CTC loss on it)."""
        said = [(ex.audio, ex.transcript), (ex.reply_audio, ex.reply)]
        said += [(t.audio, t.text) for t in ex.context if t.audio is not None]
        labels = np.zeros((len(clips), self.cfg.ctc_label_len), np.int32)
        lengths = np.zeros(len(clips), np.int32)
        for i, clip in enumerate(clips):
            text = next((t for audio, t in said if audio is clip), None)
            ids = chat.text(text) if text else ()
            if 0 < len(ids) <= self.cfg.ctc_label_len:
                labels[i, : len(ids)], lengths[i] = ids, len(ids)
        return {"ctc_labels": labels, "ctc_label_lengths": lengths}

    def _talker(self, ex: Example, task: str, chat: ChatTokens, too_long: list[str]) -> dict[str, np.ndarray]:
        cfg = self.cfg
        if task != "tts":
            return {
                "speech_text": np.zeros(0, np.int32),
                "speech_tokens": np.zeros(0, np.int32),
                "speech_audio": np.zeros((0, cfg.max_speech_samples), np.int16),
                "speech_audio_lengths": np.zeros(0, np.int32),
            }
        if ex.reply and ex.reply_audio.size:
            text, audio, tokens = ex.reply, ex.reply_audio, ex.reply_speech_tokens
        else:
            text, audio, tokens = ex.transcript, ex.audio, ex.speech_tokens
        text_ids = np.asarray(chat.text(text), np.int32)
        if len(text_ids) > cfg.speech_text_len:
            too_long.append(f"speech text {len(text_ids)} tokens > speech_text_len {cfg.speech_text_len}")
        if len(tokens) > cfg.speech_token_len:
            too_long.append(f"{len(tokens)} speech tokens > speech_token_len {cfg.speech_token_len}")
        if len(audio) > cfg.max_speech_samples:
            too_long.append(f"speech audio longer than max_speech_seconds {cfg.max_speech_seconds}")
        padded = np.zeros((1, cfg.max_speech_samples), np.int16)
        padded[0, : min(len(audio), cfg.max_speech_samples)] = _pcm16(audio[: cfg.max_speech_samples])
        return {
            "speech_text": text_ids,
            "speech_tokens": np.asarray(tokens, np.int32),
            "speech_audio": padded,
            "speech_audio_lengths": np.asarray([len(audio)], np.int32),
        }


# --------------------------------------------------------------------------- skipping


class _SkipIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, empty: dict[str, Any]):
        super().__init__(parent)
        self._empty = empty

    def __next__(self) -> dict[str, Any]:
        pending = np.zeros(len(COUNTERS), np.int32)
        while True:
            try:
                element = next(self._parent)
            except StopIteration:
                if pending.any():  # the stream ends in skipped records: report them still
                    return {**self._empty, "counters": pending[None, :]}
                raise
            if isinstance(element, Skipped):
                pending[COUNTERS.index(element.counter)] += 1
                continue
            if pending.any():
                element = {**element, "counters": element["counters"] + pending[None, :]}
            return element

    # Skipped elements are consumed within one __next__, so the parent's state is all there is.
    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state)


class SkipAndCount(grain.IterDataset):
    """Drops `Skipped` elements and adds their count to the next sample's counters."""

    def __init__(self, parent: grain.IterDataset, empty: dict[str, Any]):
        super().__init__(parent)
        self._empty = empty

    def __iter__(self) -> grain.DatasetIterator:
        return _SkipIterator(self._parent.__iter__(), self._empty)


def _empty_sample(cfg: DataConfig) -> dict[str, np.ndarray]:
    """A sample with no tokens, only counters (ends a stream that ends in skipped records)."""
    z = np.zeros(0, np.int32)
    out = {
        "input_ids": z, "targets": z, "loss_mask": z, "task_id": z,
        "audio": np.zeros((0, cfg.max_audio_samples), np.int16), "audio_lengths": z,
        "counters": np.zeros((1, len(COUNTERS)), np.int32),
    }  # fmt: skip
    if cfg.ctc_label_len:
        out.update(ctc_labels=np.zeros((0, cfg.ctc_label_len), np.int32), ctc_label_lengths=z)
    if cfg.clip_labels:
        out.update(clip_emotion=z, clip_events=np.zeros((0, len(EVENTS)), np.int32))
    if cfg.talker:
        out.update(
            speech_text=z, speech_tokens=z, speech_audio=np.zeros((0, cfg.max_speech_samples), np.int16),
            speech_audio_lengths=z,
        )  # fmt: skip
    return out


# --------------------------------------------------------------------------- batches


class Finalize(grain.transforms.Map):
    """Packed + batched arrays -> the documented batch format."""

    def __init__(self, cfg: DataConfig, pad_id: int):
        self.cfg = cfg
        self.pad_id = pad_id

    def map(self, b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        segment_ids = b["input_ids_segment_ids"].astype(np.int32)
        padding = segment_ids == 0
        out = {
            "input_ids": np.where(padding, self.pad_id, b["input_ids"]).astype(np.int32),
            "targets": np.where(padding, self.pad_id, b["targets"]).astype(np.int32),
            "loss_mask": np.where(padding, 0, b["loss_mask"]).astype(np.float32),
            "segment_ids": segment_ids,
            "positions": b["input_ids_positions"].astype(np.int32),
            "task_id": np.where(padding, 0, b["task_id"]).astype(np.int32),
            "audio": b["audio"].astype(np.float32) / 32768.0,
            "audio_lengths": b["audio_lengths"].astype(np.int32),
        }
        if self.cfg.ctc_label_len:
            out["ctc_labels"] = b["ctc_labels"].astype(np.int32)
            out["ctc_label_lengths"] = b["ctc_label_lengths"].astype(np.int32)
        if self.cfg.clip_labels:
            # padding clips (batch_and_pad zeros) have length 0: the loss masks them by audio_lengths
            out["clip_emotion"] = b["clip_emotion"].astype(np.int32)
            out["clip_events"] = b["clip_events"].astype(np.int32)
        counters = b["counters"].sum(axis=1)  # [B, max_segments, C] -> [B, C]
        for i, name in enumerate(COUNTERS):
            out[name] = counters[:, i].astype(np.int32)
        if self.cfg.talker:
            text_seg = b["speech_text_segment_ids"]
            out["speech_text"] = np.where(text_seg == 0, self.pad_id, b["speech_text"]).astype(np.int32)
            out["speech_text_lengths"] = (text_seg > 0).sum(axis=1).astype(np.int32)
            out["speech_tokens"] = np.where(b["speech_tokens_segment_ids"] == 0, 0, b["speech_tokens"]).astype(np.int32)
            out["speech_token_lengths"] = (b["speech_tokens_segment_ids"] > 0).sum(axis=1).astype(np.int32)
            out["speech_audio"] = b["speech_audio"][:, 0].astype(np.float32) / 32768.0
            out["speech_audio_lengths"] = b["speech_audio_lengths"][:, 0].astype(np.int32)
            out["speech_segment"] = b["speech_audio_segment_ids"][:, 0].astype(np.int32)
        return out


def _absl_flags_parsed() -> None:
    """Grain's prefetch workers read absl flags; outside an absl app nobody parsed them."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def tokenizer_path(cfg: DataConfig) -> str:
    if cfg.tokenizer:
        return str(Path(cfg.tokenizer).expanduser())
    path = builders.dataset_dir(cfg.dataset, cfg.data_dir or None) / "tokenizer"
    if not path.is_dir():
        raise FileNotFoundError(f"no tokenizer at {path}; set data.tokenizer to a tokenizer folder")
    return str(path)


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return process_index, process_count


def record_dataset(
    cfg: DataConfig, *, process_index: int | None = None, process_count: int | None = None, source: Any = None
) -> grain.MapDataset:
    """This process's records, shuffled, repeated and decoded (`Example` or `Skipped`)."""
    process_index, process_count = _process(process_index, process_count)
    tokens_dir = None  # a given source has no sidecar speech tokens
    if source is None:
        source = builders.open_source(cfg.dataset, cfg.split, cfg.data_dir or None)
        tokens_dir = speech_tokens.cache_dir(cfg.dataset, cfg.data_dir or None)
    ds = grain.MapDataset.source(SafeSource(source))
    # Shard before shuffling: each process always owns the same records, and the shuffle only
    # reorders them (reshuffled every epoch: grain folds the epoch into the seed).
    ds = ds[process_index::process_count]
    if len(ds) == 0:
        raise ValueError(f"process {process_index} of {process_count} gets no records ({len(source)} in all)")
    return ds.shuffle(seed=cfg.seed).repeat(cfg.num_epochs).map(Decode(tokens_dir, cfg.split))


def sample_dataset(cfg: DataConfig, **kwargs: Any) -> grain.IterDataset:
    """Packable samples (task, interleaving, tokens, loss masks); skipped ones counted."""
    tok_path = tokenizer_path(cfg)
    ds = record_dataset(cfg, **kwargs).random_map(MakeSample(cfg, tok_path), seed=cfg.seed)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=8 * cfg.batch_size))
    return SkipAndCount(it, _empty_sample(cfg))


def make_dataset(cfg: DataConfig, **kwargs: Any) -> grain.IterDataset:
    """The whole pipeline as a grain IterDataset of batches; `iter()` it for a checkpointable
    iterator. Keyword arguments: `process_index`, `process_count` (default: JAX's) and `source`
    (anything with len and [i], in place of the TFDS source)."""
    T, A = cfg.seq_len, cfg.max_clips
    lengths = {"input_ids": T, "targets": T, "loss_mask": T, "task_id": T, "audio": A, "audio_lengths": A}
    lengths["counters"] = cfg.max_segments
    if cfg.ctc_label_len:
        lengths.update(ctc_labels=A, ctc_label_lengths=A)  # one label row per clip
    if cfg.clip_labels:
        lengths.update(clip_emotion=A, clip_events=A)
    if cfg.talker:
        lengths.update(speech_text=cfg.speech_text_len, speech_tokens=cfg.speech_token_len)
        lengths.update(speech_audio=1, speech_audio_lengths=1)  # one talker pair per row
    it = grain.experimental.FirstFitPackIterDataset(
        sample_dataset(cfg, **kwargs), length_struct=lengths, num_packing_bins=cfg.batch_size,
        seed=cfg.seed, max_sequences_per_bin=cfg.max_segments,
    )  # fmt: skip
    batch_fn = functools.partial(grain.experimental.batch_and_pad, batch_size=cfg.batch_size)
    it = it.batch(cfg.batch_size, batch_fn=batch_fn)
    it = it.map(Finalize(cfg, _chat_tokens(tokenizer_path(cfg)).pad))
    if cfg.workers > 0:
        _absl_flags_parsed()
        options = grain.MultiprocessingOptions(num_workers=cfg.workers, per_worker_buffer_size=cfg.worker_buffer_size)
        it = it.mp_prefetch(options)
    elif cfg.prefetch_batches > 0:
        # Packing and batching run in a background thread, not in the training loop's next().
        it = grain.experimental.ThreadPrefetchIterDataset(it, prefetch_buffer_size=cfg.prefetch_batches)
    return it


def make_iterator(cfg: DataConfig, **kwargs: Any) -> grain.DatasetIterator:
    """A checkpointable iterator over batches (see the module docstring)."""
    return iter(make_dataset(cfg, **kwargs))
