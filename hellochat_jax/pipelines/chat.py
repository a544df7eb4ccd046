"""Hello-Chat end to end: speech in, speech out (`hellochat chat`, `hellochat serve`).

    pipeline = ChatPipeline.load("model/")                         # or ChatPipeline(thinker, tokenizer, talker)
    [reply] = pipeline.respond([Conversation().add_user(audio=wav)], stream=True,
                               on_text=lambda row, piece: ..., on_audio=lambda row, chunk: ...)

One `respond` call answers a batch of conversations:

  thinker   each conversation renders to a chat prompt (earlier turns included; earlier audio
            turns stay audio) -> left-padded ids (16-token buckets) + clips zero-padded to a
            1 s bucket -> Dasheng + adapter spliced over the <|AUDIO|> placeholders -> one
            Qwen2 prefill -> the resumable decode loop one token per call for the whole batch,
            each row's new text handed out (`on_text`) as soon as it is decoded.
  talker    per conversation (the speech LM's bistream decoder is batch 1): the reply text goes
            into `BistreamDecoder` word by word as it arrives (5 text tokens : 15 speech tokens,
            fill tokens); with stream=True its speech tokens go through `SpeechStream` (flow on
            fixed-size token buckets with chunk masks, HiFT with its source cache) and audio
            chunks come out (`on_audio`) while the thinker is still writing. With stream=False
            the whole reply text is pushed once the thinker is done and the speech tokens of all
            rows go through one batched flow + vocoder call (no chunk masks).

Style (the one place the format is defined): a reply that STARTS with ``<style>...</style>``
carries how to say it. The tag is stripped from the reply text (printed, stored, spoken) and its
content is the CosyVoice 2 instruction: the speech LM's prompt text becomes
``instruction<|endofprompt|>`` (CosyVoice2.inference_instruct2: no prompt speech in the LM; a
voice prompt still conditions the flow). E.g. ``<style>Speak calmly and slowly.</style>Sure.``.
A ``<style>`` left open for more than 200 characters is not a tag (printed as text).

Problems with one conversation (unreadable audio, a prompt longer than the thinker's context)
become that reply's `error`; the other conversations are still answered. Conditions that are
not errors become `notes` (empty thinker reply: no talker call; no speech tokens: no audio).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hellochat_jax.core import decoding
from hellochat_jax.core import dsp as audio_io
from hellochat_jax.core import sharding as shd
from hellochat_jax.core.errors import UserError
from hellochat_jax.data.tokenizer import STYLE_CLOSE, STYLE_OPEN, with_style
from hellochat_jax.pipelines.thinker import DEFAULT_SYSTEM, MiDashengLMProcessor

MAX_STYLE_CHARS = 200
CONVERSATION_FILE = "conversation.json"
CONVERSATION_FORMAT = 1
AUDIO_BUCKET = audio_io.SAMPLE_RATE  # clips pad to whole seconds: one encoder compile per second of length
PROMPT_BUCKET = 16
CUT_AFTER = set(",.!?;:\n，。！？；：、")  # reply text goes to the speech LM in pieces ending here
FORCE_CUT_CHARS = 8
CACHE_BUCKET = 64


class ChatError(UserError):
    """A conversation or input the chat cannot use; the message says what to fix."""


# ----------------------------------------------------------------------------- style tags


def split_style(text: str, final: bool = True) -> tuple[str | None, str, bool]:
    """(style, reply text without the tag, decided) for a reply so far. While the start could
    still become a tag (and `final` is False) nothing is decided and no text is released."""
    body = text.lstrip()
    if body.startswith(STYLE_OPEN):
        end = body.find(STYLE_CLOSE)
        if end >= 0:
            style = body[len(STYLE_OPEN) : end].strip()
            return style or None, body[end + len(STYLE_CLOSE) :].lstrip(), True
        if not final and len(body) <= MAX_STYLE_CHARS:
            return None, "", False
        return None, text, True
    if not final and body and STYLE_OPEN.startswith(body):
        return None, "", False
    if not final and not body:
        return None, "", False
    return None, text, True




# ----------------------------------------------------------------------------- conversations


@dataclasses.dataclass
class Turn:
    role: str  # "user" or "assistant"
    text: str | None = None
    audio: np.ndarray | None = None  # 16 kHz mono float32 (user turns)
    style: str | None = None  # assistant turns: the style tag the reply carried


@dataclasses.dataclass
class Conversation:
    """The turns so far. A folder keeps it between calls: conversation.json (turn texts, styles,
    audio file names) + one 16 kHz float WAV per audio turn."""

    turns: list[Turn] = dataclasses.field(default_factory=list)
    system: str | None = None

    def add_user(self, *, audio: np.ndarray | None = None, text: str | None = None) -> Conversation:
        if audio is None and not (text and text.strip()):
            raise ChatError("a user turn needs audio or text")
        self.turns.append(Turn("user", text=text, audio=None if audio is None else audio_io.validate(audio)))
        return self

    def add_assistant(self, text: str, style: str | None = None) -> Conversation:
        self.turns.append(Turn("assistant", text=text, style=style))
        return self

    def messages(self) -> list[dict[str, Any]]:
        """The turns in MiDashengLMProcessor's format (audio before the text of a turn)."""
        out = [{"role": "system", "content": self.system}] if self.system else []
        for turn in self.turns:
            if turn.role == "assistant":
                out.append({"role": "assistant", "content": with_style(turn.text or "", turn.style)})
                continue
            parts = [{"type": "audio", "audio": turn.audio}] if turn.audio is not None else []
            if turn.text:
                parts.append({"type": "text", "text": turn.text})
            out.append({"role": "user", "content": parts})
        return out

    def save(self, folder: str | os.PathLike) -> Path:
        import soundfile as sf

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        turns = []
        for i, turn in enumerate(self.turns):
            entry = {"role": turn.role, "text": turn.text}
            if turn.style:
                entry["style"] = turn.style
            if turn.audio is not None:
                name = f"turn_{i:03d}_{turn.role}.wav"
                if not (folder / name).exists():
                    sf.write(str(folder / name), turn.audio, audio_io.SAMPLE_RATE, subtype="FLOAT")
                entry["audio"] = name
            turns.append(entry)
        meta = {"format": CONVERSATION_FORMAT, "system": self.system, "turns": turns}
        tmp = folder / (CONVERSATION_FILE + ".tmp")
        tmp.write_text(json.dumps(meta, indent=2, ensure_ascii=False))
        tmp.replace(folder / CONVERSATION_FILE)  # a crash never leaves half a file
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike, *, create: bool = True) -> Conversation:
        """The conversation kept in `folder`; a folder that does not exist yet (or is empty)
        starts a new one when `create`. Anything else that is not a whole conversation folder
        is a ChatError naming the problem."""
        folder = Path(folder)
        path = folder / CONVERSATION_FILE
        if folder.exists() and not folder.is_dir():
            raise ChatError(f"{folder}: not a folder (a conversation is kept in a folder)")
        if not path.exists():
            if create and (not folder.exists() or not any(folder.iterdir())):
                return cls()
            raise ChatError(f"{folder}: no {CONVERSATION_FILE}; not a conversation folder" if folder.exists() else f"{folder}: no such conversation folder")
        try:
            meta = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ChatError(f"{path}: unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        if not isinstance(meta, dict) or meta.get("format") != CONVERSATION_FORMAT or not isinstance(meta.get("turns"), list):
            raise ChatError(f"{path}: not a conversation file (want {{'format': {CONVERSATION_FORMAT}, 'turns': [...]}})")
        conv = cls(system=meta.get("system"))
        for i, entry in enumerate(meta["turns"]):
            if not isinstance(entry, dict) or entry.get("role") not in ("user", "assistant"):
                raise ChatError(f"{path}: turn {i} is not {{'role': 'user' | 'assistant', ...}}")
            audio = None
            if entry.get("audio"):
                wav = folder / str(entry["audio"])
                if wav.resolve().parent != folder.resolve():
                    raise ChatError(f"{path}: turn {i} names audio outside the folder ({entry['audio']!r})")
                try:
                    audio = audio_io.load(wav)
                except audio_io.AudioError as e:
                    raise ChatError(f"{path}: turn {i}: {e}") from None
            text = entry.get("text")
            if text is not None and not isinstance(text, str):
                raise ChatError(f"{path}: turn {i} text must be a string")
            if audio is None and not text and entry["role"] == "user":
                raise ChatError(f"{path}: turn {i} has neither audio nor text")
            conv.turns.append(Turn(entry["role"], text=text, audio=audio, style=entry.get("style")))
        return conv


# ----------------------------------------------------------------------------- replies


@dataclasses.dataclass
class Reply:
    text: str = ""  # without the style tag
    style: str | None = None
    audio: list[np.ndarray] = dataclasses.field(default_factory=list)  # chunks, in order
    thinker_tokens: list[int] = dataclasses.field(default_factory=list)
    speech_tokens: list[int] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    error: str | None = None
    first_text_s: float | None = None  # seconds from the start of `respond`
    first_audio_s: float | None = None

    @property
    def waveform(self) -> np.ndarray:
        return np.concatenate(self.audio) if self.audio else np.zeros(0, np.float32)


@dataclasses.dataclass
class _ReplyText:
    raw: str = ""  # decoded reply so far, tag included
    shown: int = 0  # characters of the visible text handed out
    decided: bool = False  # whether the style tag question is settled


class _Speaker:
    """One conversation's talker side: reply text in (as it comes), speech tokens and audio out."""

    def __init__(self, pipeline: ChatPipeline, reply: Reply, key: jax.Array, stream: bool, emit: Callable[[np.ndarray], None]):
        self.pipeline, self.reply, self.key, self.stream, self.emit = pipeline, reply, key, stream, emit
        self.decoder = None
        self.audio = None
        self.pushed = 0  # characters of the reply text given to the speech LM
        self.failed = False

    def _start(self) -> None:
        from hellochat_jax.components.speech_lm.model import BistreamDecoder

        talker, voice = self.pipeline.talker, self.pipeline.voice
        if self.reply.style:
            # CosyVoice 2 instruct: the instruction replaces the voice prompt in the LM.
            prompt_text, prompt_speech = talker.instruct_text(self.reply.style), []
        elif voice is not None:
            prompt_text, prompt_speech = voice.text_tokens, voice.speech_tokens.tolist()
        else:
            prompt_text, prompt_speech = [], []
        k_lm = jax.random.split(self.key, 3)[0]
        self.decoder = BistreamDecoder(talker.llm, prompt_text, prompt_speech, sampling=self.pipeline.speech_sampling, key=k_lm,
                                       max_ratio=self.pipeline.speech_max_ratio, mesh=talker.mesh)
        if self.stream:
            self.audio = talker.stream(voice, key=self.key, style=self.reply.style)

    def _speak(self, ids: list[int], final: bool) -> None:
        if self.failed:
            return
        try:
            self._speak_checked(ids, final)
        except UserError as e:  # e.g. reply text the talker's tokenizer cannot encode
            self.failed = True
            self.reply.notes.append(f"the talker could not speak this reply: {e}")

    def _speak_checked(self, ids: list[int], final: bool) -> None:
        if self.decoder is None:
            self._start()
        got = self.decoder.push_text(ids) if ids else []
        if final:
            got += self.decoder.finish()
        self.reply.speech_tokens += got
        if self.audio is not None:
            chunks = self.audio.push(got) + (self.audio.finish() if final else [])
            for chunk in chunks:
                self.emit(chunk)

    def push(self, text: str) -> None:
        """The reply text so far (tag stripped): what the speech LM has not had yet goes in,
        cut before a space that follows a word or after punctuation, so the pieces tokenise
        as the whole text would; a run of FORCE_CUT_CHARS without either goes in as it is
        (latency first: the first audio needs 10 text tokens)."""
        cut = max((i for i in range(self.pushed + 1, len(text)) if (text[i] == " " and not text[i - 1].isspace()) or text[i - 1] in CUT_AFTER), default=-1)
        if cut <= self.pushed and len(text) - self.pushed >= FORCE_CUT_CHARS:
            cut = len(text)
        if cut > self.pushed:
            self._speak(self._ids(text[self.pushed : cut]), final=False)
            self.pushed = cut

    def finish(self, text: str) -> None:
        if not text.strip() and self.decoder is None:
            self.reply.notes.append("the thinker's reply is empty: nothing to speak (talker not called)")
            return
        self._speak(self._ids(text[self.pushed :]), final=True)
        self.pushed = len(text)
        if not self.reply.speech_tokens and not self.failed:
            self.reply.notes.append("the talker produced no speech tokens: the reply has no audio")

    def _ids(self, piece: str) -> list[int]:
        if not piece.strip() or self.failed:
            return []
        try:
            return self.pipeline.talker.encode_text(piece, "reply text")
        except UserError as e:
            self.failed = True
            self.reply.notes.append(f"the talker could not speak this reply: {e}")
            return []


# ----------------------------------------------------------------------------- the pipeline


class ChatPipeline:
    def __init__(
        self,
        thinker,
        tokenizer,
        talker=None,
        *,
        mesh: jax.sharding.Mesh | None = None,
        system: str | None = DEFAULT_SYSTEM,
        max_new_tokens: int = 128,
        sampling: decoding.SamplingMethod | None = None,
        stop_ids: Sequence[int] | None = None,
        max_context: int | None = None,
        speech_sampling=None,
        speech_max_ratio: float = 20.0,
        voice=None,
        notes: Sequence[str] = (),
    ):
        """thinker: a MiDashengLM (or text-only thinker); tokenizer: its HF tokenizer; talker: a
        `Talker` or None (text-only replies). `voice`: a VoicePrompt (talker.make_prompt) or None
        for the default speaker. `max_context` caps prompt + reply tokens (default: the thinker's
        positions)."""
        from hellochat_jax.components.midashenglm import model as midashenglm

        if max_new_tokens < 1:
            raise ChatError("max_new_tokens must be at least 1")
        self.thinker, self.tokenizer, self.talker = thinker, tokenizer, talker
        self.mesh = mesh if mesh is not None else shd.make_mesh()
        self.system = system
        self.max_new_tokens = max_new_tokens
        self.sampling = sampling if sampling is not None else decoding.Greedy()
        self.has_audio = thinker.audio_encoder is not None
        if self.has_audio:
            # A conversation's answer must not depend on its batch-mates' loudness.
            midashenglm.with_encoder_options(thinker, top_db_per_sample=True)
        self.processor = MiDashengLMProcessor(tokenizer, audio_token_id=thinker.cfg.audio_token_id, system=None,
                                              subsample=thinker.cfg.subsample_factor) if self.has_audio else None
        self.stop_ids = tuple(sorted(set(stop_ids if stop_ids is not None else _default_stop_ids(tokenizer))))
        self.max_context = int(max_context or thinker.cfg.text.max_position_embeddings)
        self.speech_sampling, self.speech_max_ratio = speech_sampling, speech_max_ratio
        self.voice = voice
        self.notes = list(notes)  # said once per session (e.g. no talker)
        if talker is None:
            self.notes.append("this model has no talker: replies are text only")

    @classmethod
    def load(cls, folder: str | os.PathLike, mesh: jax.sharding.Mesh | None = None, **kwargs: Any) -> ChatPipeline:
        """A model folder (`hellochat convert hellochat`, `hellochat export`): the thinker with its
        tokenizer and, if the folder has one, the talker (speech LM + flow + HiFT + its text
        tokenizer; voice prompts when the folder's voice/ holds a speech tokenizer and campplus)."""
        from hellochat_jax.checkpoint.folder import load_model_folder

        mesh = mesh if mesh is not None else shd.make_mesh()
        bundle = load_model_folder(folder, mesh)
        model = bundle.model
        if bundle.component != "hellochat" or not hasattr(model, "thinker"):
            raise ChatError(f"{folder}: holds a {bundle.component} checkpoint, not a Hello-Chat model folder")
        if bundle.thinker_tokenizer is None:
            raise ChatError(f"{folder}: the model folder has no thinker tokenizer")
        talker = talker_from_folder(bundle, mesh)
        if bundle.system_prompt is not None and "system" not in kwargs:
            kwargs["system"] = bundle.system_prompt or None
        return cls(model.thinker, bundle.thinker_tokenizer, talker, mesh=mesh, **kwargs)

    # -- prompts

    def _encode(self, conversation: Conversation) -> tuple[list[int], list[np.ndarray]]:
        conv = dataclasses.replace(conversation, system=conversation.system or self.system)
        if self.processor is not None:
            ids, clips = self.processor.encode(conv.messages())
        else:
            if any(t.audio is not None for t in conv.turns):
                raise ChatError("this thinker has no audio encoder: type the turn (--text) instead")
            ids = _chat_ids(self.tokenizer, conv.messages())
            clips = []
        seconds = sum(len(c) for c in clips) / audio_io.SAMPLE_RATE
        if len(ids) + self.max_new_tokens > self.max_context:
            raise ChatError(
                f"conversation too long for the thinker: a prompt of {len(ids)} tokens ({seconds:.1f} s of audio, 5 tokens "
                f"per second) + {self.max_new_tokens} reply tokens exceeds its "
                f"context of {self.max_context} tokens; shorten the audio or start a new conversation"
            )
        return ids, clips

    def _prefill(self, rows: list[tuple[list[int], list[np.ndarray]]], key: jax.Array):
        from hellochat_jax.components.midashenglm import model as midashenglm

        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids, mask = decoding.left_pad([r[0] for r in rows], pad_id=pad, multiple=PROMPT_BUCKET)
        clips = [c for r in rows for c in r[1]]
        b, t = ids.shape
        decoder = self.thinker.decoder
        vocab = decoder.cfg.vocab_size
        seen = np.zeros((b, vocab), bool)
        for i, (row, _) in enumerate(rows):
            seen[i, row] = True
        graphdef, state = nnx.split(decoder)
        with jax.set_mesh(self.mesh), shd.use_rules(shd.DEFAULT_RULES):
            ids_d, mask_d, seen_d = shd.put_batch((ids, mask, seen), self.mesh, shd.current_rules())
            if clips:
                waveform, lengths = audio_io.batch(clips, pad_to_multiple=AUDIO_BUCKET)
                inputs = {"inputs_embeds": midashenglm.prompt_embeddings(self.thinker, ids, waveform, lengths), "attention_mask": mask_d}
            else:
                inputs = {"input_ids": ids_d, "attention_mask": mask_d}
            cache_len = -(-(t + self.max_new_tokens) // CACHE_BUCKET) * CACHE_BUCKET
            scores, cache = decoding.prefill(graphdef, state, inputs, prompt=decoding.thinker_prompt, cache_len=cache_len)
            ds = decoding.initial_state(scores, cache, key, max_steps=self.max_new_tokens, sampler=self.sampling, seen=seen_d, pad_id=pad)
        rules = decoding.StepRules(decoding.thinker_feed, stop_ids=self.stop_ids, pad_id=pad)
        return graphdef, state, ds, rules, decoding.row_limits(b)

    # -- answering

    def respond(
        self,
        conversations: Sequence[Conversation],
        *,
        stream: bool = False,
        speak: bool = True,
        key: jax.Array | None = None,
        on_text: Callable[[int, str], None] | None = None,
        on_audio: Callable[[int, np.ndarray], None] | None = None,
    ) -> list[Reply]:
        """Replies to each conversation (not added to them: see `Conversation.add_assistant`).
        on_text(row, piece) gets the reply text as it is decoded (style tag stripped);
        on_audio(row, chunk) gets audio chunks (talker.sample_rate Hz) as they are ready."""
        start = time.perf_counter()
        key = jax.random.key(0) if key is None else key
        k_think, k_talk = jax.random.split(key)
        replies = [Reply() for _ in conversations]
        rows, index = [], []
        for i, conv in enumerate(conversations):
            try:
                rows.append(self._encode(conv))
                index.append(i)
            except (ValueError, OSError) as e:  # AudioError, ChatError, a bad turn
                replies[i].error = str(e)
        if not rows:
            return replies
        speak = speak and self.talker is not None

        def audio_sink(i: int) -> Callable[[np.ndarray], None]:
            def emit(chunk: np.ndarray) -> None:
                if replies[i].first_audio_s is None:
                    replies[i].first_audio_s = time.perf_counter() - start
                replies[i].audio.append(chunk)
                if on_audio is not None:
                    on_audio(i, chunk)
            return emit

        speakers = {i: _Speaker(self, replies[i], jax.random.fold_in(k_talk, i), stream, audio_sink(i)) for i in index} if speak else {}
        rows_text = {i: _ReplyText() for i in index}

        def close(i: int) -> None:
            reply = replies[i]
            self._release(i, rows_text[i], reply, speakers, on_text, start, final=True)
            if not reply.thinker_tokens:
                reply.notes.append("the thinker ended its reply at once (no text)")
            if stream and i in speakers:
                speakers[i].finish(reply.text)

        graphdef, state, ds, rules, limits = self._prefill(rows, k_think)
        open_rows = list(index)
        with jax.set_mesh(self.mesh):
            for step in range(self.max_new_tokens):
                ds = decoding.decode(graphdef, state, ds, limits, jnp.asarray(step + 1, jnp.int32), rules=rules, sampler=self.sampling)
                tokens, lengths, done = (np.asarray(x) for x in jax.device_get((ds.tokens, ds.lengths, ds.done)))
                for r, i in enumerate(index):
                    if i not in open_rows:
                        continue
                    if len(replies[i].thinker_tokens) < int(lengths[r]):
                        replies[i].thinker_tokens.append(int(tokens[r, step]))
                        rows_text[i].raw = self.tokenizer.decode(replies[i].thinker_tokens, skip_special_tokens=True)
                        self._release(i, rows_text[i], replies[i], speakers, on_text, start, final=False)
                    if done[r]:
                        open_rows.remove(i)
                        close(i)
                if not open_rows:
                    break
        for i in open_rows:  # reached max_new_tokens
            close(i)
        if speak and not stream:
            self._speak_all(replies, index, speakers, k_talk, audio_sink)
        return replies

    def _release(self, i: int, row: _ReplyText, reply: Reply, speakers, on_text, start: float, final: bool) -> None:
        """Hands out the reply text that is certain: once the style tag is settled, and without
        a trailing partial UTF-8 character (until the end)."""
        if not row.decided:
            style, _, row.decided = split_style(row.raw, final)
            if not row.decided:
                return
            reply.style = style
        text = split_style(row.raw)[1] if reply.style else row.raw
        if not final:
            text = text.rstrip("\ufffd")
        if len(text) > row.shown:
            if reply.first_text_s is None:
                reply.first_text_s = time.perf_counter() - start
            if on_text is not None:
                on_text(i, text[row.shown :])
            row.shown = len(text)
        reply.text = text
        speaker = speakers.get(i)
        if speaker is not None and speaker.stream and not final:
            speaker.push(text)

    def _speak_all(self, replies, index, speakers, k_talk, audio_sink) -> None:
        """Not streaming: each reply's whole text into its speech LM, then one batched flow +
        vocoder call for every reply that got speech tokens."""
        talker = self.talker
        for i in index:
            speakers[i].finish(replies[i].text)
        todo = [i for i in index if replies[i].speech_tokens]
        if not todo:
            return
        keys = [jax.random.split(jax.random.fold_in(k_talk, i), 3) for i in todo]
        noise = jnp.concatenate([talker._noise(k[1]) for k in keys], axis=0)
        mel, mel_len = talker.tokens_to_mel([replies[i].speech_tokens for i in todo], self.voice, noise, styles=[replies[i].style for i in todo])
        waves = talker.vocode(mel, mel_len, keys[0][2])
        for i, wav in zip(todo, waves):
            audio_sink(i)(wav)


def _default_stop_ids(tokenizer) -> list[int]:
    from hellochat_jax.cli.generate import stop_ids

    return stop_ids(tokenizer)


def _chat_ids(tokenizer, messages: list[dict[str, Any]]) -> list[int]:
    """A text-only chat in the Qwen2.5 format (what MiDashengLMProcessor renders, without audio)."""
    text = "".join(f"<|im_start|>{m['role']}\n{m['content'] if isinstance(m['content'], str) else ''.join(p['text'] for p in m['content'])}<|im_end|>\n" for m in messages)
    return list(tokenizer.encode(text + "<|im_start|>assistant\n", add_special_tokens=False))


# ----------------------------------------------------------------------------- the talker of a model folder

VOICE_DIR = "voice"  # in a model folder: campplus.onnx and the speech tokenizer, for voice prompts


def talker_from_folder(bundle, mesh: jax.sharding.Mesh):
    """The Talker of a loaded model folder (None without one)."""
    from hellochat_jax.pipelines.talker import (
        SpeakerEncoder,
        Talker,
        TalkerError,
        load_tokenizer,
    )

    model = bundle.model
    if getattr(model, "talker", None) is None:
        return None
    if model.flow is None or model.hift is None or bundle.tokenizer_dir("talker") is None:
        raise ChatError(f"{bundle.folder}: the talker needs its speech LM, flow, HiFT and text tokenizer; this folder has only some")
    hift = model.hift.fold_weight_norm() if hasattr(model.hift, "fold_weight_norm") else model.hift
    missing, s3, speaker = {}, None, None
    voice = bundle.folder / VOICE_DIR
    s3_files = sorted(voice.glob("speech_tokenizer*")) if voice.is_dir() else []
    if s3_files:
        from hellochat_jax.components.s3tokenizer import weights as s3tokenizer

        _, s3 = s3tokenizer.load(s3_files[0], mesh)
    else:
        missing["s3tokenizer"] = f"{bundle.folder} has no speech tokenizer in {VOICE_DIR}/"
    if (voice / "campplus.onnx").exists():
        try:
            speaker = SpeakerEncoder(voice / "campplus.onnx")
        except TalkerError as e:
            missing["campplus"] = str(e)
    else:
        missing["campplus"] = f"{bundle.folder} has no {VOICE_DIR}/campplus.onnx"
    tokenizer = load_tokenizer(bundle.tokenizer_dir("talker"))
    return Talker(model.talker, model.flow, hift, tokenizer, s3tokenizer=s3, speaker_encoder=speaker, mesh=mesh, missing=missing)
