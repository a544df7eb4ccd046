"""MiDashengLM prompts: chats with audio and text turns -> token ids with audio placeholders,
plus the batched 16 kHz waveforms that fill them.

A conversation is a list of turns ``{"role": "system" | "user" | "assistant", "content": ...}``;
content is a string or a list of parts ``{"type": "text", "text": str}`` and
``{"type": "audio", "audio": path | np.ndarray (16 kHz mono)}``. It renders in the Qwen2.5
chat format; each clip becomes ``<|audio_bos|>`` + N x ``<|AUDIO|>`` + ``<|audio_eos|>`` with
N = ``num_audio_tokens(samples, subsample)`` (5 per second of audio with the release's adapter,
which stacks 5 encoder frames; pass the model's ``subsample_factor``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from hellochat_jax.core import dsp as audio_io
from hellochat_jax.core.decoding import left_pad

AUDIO_TOKEN = "<|AUDIO|>"
AUDIO_BOS = "<|audio_bos|>"
AUDIO_EOS = "<|audio_eos|>"
DEFAULT_SYSTEM = "You are a helpful language and speech assistant."


@dataclasses.dataclass
class Batch:
    input_ids: np.ndarray  # [B, L] int32, left-padded
    attention_mask: np.ndarray  # [B, L] int32, 1 = real token
    waveform: np.ndarray  # [A, S] float32, zero-padded 16 kHz clips in placeholder order
    lengths: np.ndarray  # [A] int32 valid samples per clip
    audio_per_row: list[int]  # clips in each conversation


def user_turn(text: str | None, audio: str | os.PathLike | np.ndarray) -> dict[str, Any]:
    """The usual single-audio question: the clip first, then the instruction."""
    parts: list[dict[str, Any]] = [{"type": "audio", "audio": audio}]
    if text:
        parts.append({"type": "text", "text": text})
    return {"role": "user", "content": parts}


class MiDashengLMProcessor:
    def __init__(self, tokenizer, *, audio_token_id: int | None = None, system: str | None = DEFAULT_SYSTEM,
                 subsample: int = audio_io.PATCHES_PER_TOKEN):
        self.tokenizer = tokenizer
        self.system = system
        self.subsample = subsample
        ids = {}
        for tok in (AUDIO_TOKEN, AUDIO_BOS, AUDIO_EOS, "<|im_start|>", "<|im_end|>"):
            tid = tokenizer.convert_tokens_to_ids(tok)
            if not isinstance(tid, int) or tid < 0 or (tokenizer.unk_token_id is not None and tid == tokenizer.unk_token_id):
                raise ValueError(f"the tokenizer has no {tok} token; MiDashengLM needs the Qwen2.5 chat and audio special tokens")
            ids[tok] = tid
        self.audio_token_id = ids[AUDIO_TOKEN]
        if audio_token_id is not None and audio_token_id != self.audio_token_id:
            raise ValueError(f"tokenizer maps {AUDIO_TOKEN} to {self.audio_token_id} but the model expects audio_token_id {audio_token_id}")

    # ------------------------------------------------------------------ one conversation

    def render(self, conversation: Sequence[Mapping[str, Any]]) -> tuple[str, list[np.ndarray]]:
        """Chat text with ONE <|AUDIO|> per clip (expanded after tokenisation) and the clips."""
        turns = list(conversation)
        if self.system is not None and not any(t.get("role") == "system" for t in turns):
            turns = [{"role": "system", "content": self.system}] + turns
        text, clips = [], []
        for turn in turns:
            role = turn.get("role")
            if role not in ("system", "user", "assistant"):
                raise ValueError(f"turn role must be system, user or assistant, got {role!r}")
            content = turn.get("content", "")
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else list(content)
            body = []
            for part in parts:
                if part.get("type") == "text":
                    if AUDIO_TOKEN in part["text"]:
                        raise ValueError(f"text parts must not contain {AUDIO_TOKEN}; pass audio as an audio part")
                    body.append(part["text"])
                elif part.get("type") == "audio":
                    clip = part.get("audio")
                    wav = (audio_io.validate(clip, subsample=self.subsample) if isinstance(clip, np.ndarray)
                           else audio_io.load(clip, self.subsample))
                    clips.append(wav)
                    body.append(AUDIO_BOS + AUDIO_TOKEN + AUDIO_EOS)
                else:
                    raise ValueError(f"content parts are {{'type': 'text'}} or {{'type': 'audio'}}, got {part!r}")
            text.append(f"<|im_start|>{role}\n{''.join(body)}<|im_end|>\n")
        text.append("<|im_start|>assistant\n")
        return "".join(text), clips

    def encode(self, conversation: Sequence[Mapping[str, Any]]) -> tuple[list[int], list[np.ndarray]]:
        """Token ids with N_k placeholders for the k-th clip, and the clips."""
        text, clips = self.render(conversation)
        ids = list(self.tokenizer.encode(text, add_special_tokens=False))
        if ids.count(self.audio_token_id) != len(clips):
            raise ValueError(f"tokenising the chat gave {ids.count(self.audio_token_id)} {AUDIO_TOKEN} tokens for {len(clips)} clip(s)")
        out, k = [], 0
        for tid in ids:
            if tid == self.audio_token_id:
                out.extend([tid] * audio_io.num_audio_tokens(len(clips[k]), self.subsample))
                k += 1
            else:
                out.append(tid)
        return out, clips

    # ------------------------------------------------------------------ batches

    def __call__(self, conversations: Sequence[Sequence[Mapping[str, Any]]], *, pad_multiple: int = 16) -> Batch:
        """Batches conversations for generation: left-padded ids, clips zero-padded to the
        longest (no further, so the longest clip is computed exactly as it would be alone)."""
        rows, clips, per_row = [], [], []
        for conversation in conversations:
            ids, row_clips = self.encode(conversation)
            rows.append(ids)
            clips.extend(row_clips)
            per_row.append(len(row_clips))
        if not clips:
            raise ValueError("no audio in the batch; use `hellochat generate` for text-only chats")
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        if pad == self.audio_token_id:
            raise ValueError(f"the tokenizer's pad id {pad} is the {AUDIO_TOKEN} id; padding would read as audio")
        input_ids, attention_mask = left_pad(rows, pad_id=pad, multiple=pad_multiple)
        waveform, lengths = audio_io.batch(clips)
        return Batch(input_ids, attention_mask, waveform, lengths, per_row)
