"""Tokenizers: a small byte-level BPE for the embedded corpus, saved as a Hugging Face tokenizer
folder with Qwen's chat special tokens and a Qwen2.5-style chat template, so that the pipeline
treats it exactly like a real Qwen2.5 / MiDashengLM tokenizer folder (`load_tokenizer`).

`ChatTokens` resolves the special-token ids from whichever tokenizer is loaded and turns chat
messages into token ids, building them piece by piece so that each token knows whether it is an
assistant token (the loss mask) and where audio placeholders go.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

# Qwen2.5 (and MiDashengLM) special tokens. <|AUDIO|> is the audio placeholder, repeated once per
# audio embedding between <|audio_bos|> and <|audio_eos|>.
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
AUDIO_BOS, AUDIO, AUDIO_EOS = "<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, AUDIO_BOS, AUDIO, AUDIO_EOS)

# The thinker writes how its reply should be spoken before the reply: <style>calm</style>Okay...
# (the chat pipeline hands the style to the talker as CosyVoice 2's instruction text).
STYLE_OPEN, STYLE_CLOSE = "<style>", "</style>"


def with_style(text: str, style: str | None) -> str:
    """An assistant reply with its style tag first (as the thinker writes it)."""
    return f"{STYLE_OPEN}{style}{STYLE_CLOSE}{text}" if style else text

# Qwen2's pre-tokenizer split (numbers one digit at a time, letters with one leading space).
QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen2.5's template, plus content given as a list of parts ({"type": "text", "text": ...} or
# {"type": "audio"}); an audio part renders as one placeholder, which a processor repeats once
# per audio embedding. Unlike Qwen2.5 no default system prompt is inserted: the tiny models
# train faster without one, and a system message can always be given.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'audio' %}{{- '<|audio_bos|><|AUDIO|><|audio_eos|>' }}"
    "{%- else %}{{- part['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def train_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 1024) -> Path:
    """Trains a byte-level BPE on `texts` and saves an HF tokenizer folder at `out_dir`.

    Ids 0..5 are the special tokens (<|endoftext|> = 0 is also the padding id), then the 256
    byte symbols, then merges up to `vocab_size`.
    """
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the 262 special + byte tokens")
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # The chat scaffolding is part of every sample, so it should be cheap to encode.
    scaffolding = ["system\n", "user\n", "assistant\n", "You are a helpful assistant."] * 100
    scaffolding += ["You are a helpful language and speech assistant."] * 100  # processor.DEFAULT_SYSTEM
    tok.train_from_iterator(sorted(set(texts)) + scaffolding, trainer=trainer)  # sorted: same corpus -> same file
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        additional_special_tokens=[IM_START, AUDIO_BOS, AUDIO, AUDIO_EOS],
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )
    hf.chat_template = CHAT_TEMPLATE
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out_dir))
    return out_dir


@functools.lru_cache(maxsize=8)
def load_tokenizer(path: str | Path):
    """An HF tokenizer from a folder (ours, Qwen2.5's, MiDashengLM's)."""
    from transformers import AutoTokenizer

    path = Path(path).expanduser()
    if not (path / "tokenizer_config.json").is_file() and not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer folder at {path} (expected tokenizer.json / tokenizer_config.json)")
    return AutoTokenizer.from_pretrained(str(path))


@dataclasses.dataclass(frozen=True)
class AudioPart:
    """An audio clip inside a message: 16 kHz float32 samples, shown to the model as
    `num_tokens` <|AUDIO|> placeholders."""

    samples: Any
    num_tokens: int


Part = str | AudioPart


@dataclasses.dataclass(frozen=True)
class Message:
    role: str  # "system" | "user" | "assistant"
    parts: tuple[Part, ...]


@dataclasses.dataclass
class Encoded:
    ids: list[int]
    assistant: list[int]  # 1 where the token is an assistant token the model should produce
    clips: list[Any]  # audio samples in placeholder order


class ChatTokens:
    """Chat-template encoding with a per-token assistant mask, for any tokenizer that has the
    Qwen chat special tokens. Assistant tokens are the reply and its closing <|im_end|>; the
    role header and the newline after <|im_end|> are not (the model never has to produce them)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        ids = {}
        for t in SPECIAL_TOKENS:
            i = tokenizer.convert_tokens_to_ids(t)
            if i is None or i == getattr(tokenizer, "unk_token_id", None) or tokenizer.convert_ids_to_tokens(i) != t:
                raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no special token {t}")
            ids[t] = int(i)
        self.endoftext, self.im_start, self.im_end = ids[ENDOFTEXT], ids[IM_START], ids[IM_END]
        self.audio_bos, self.audio, self.audio_eos = ids[AUDIO_BOS], ids[AUDIO], ids[AUDIO_EOS]
        self.pad = self.endoftext
        self._newline = self.text("\n")

    def __len__(self) -> int:
        return len(self.tokenizer)

    @functools.lru_cache(maxsize=65536)
    def text(self, s: str) -> tuple[int, ...]:
        return tuple(self.tokenizer.encode(s, add_special_tokens=False))

    def encode(self, messages: Sequence[Message]) -> Encoded:
        ids: list[int] = []
        mask: list[int] = []
        clips: list[Any] = []

        def add(tokens: Sequence[int], assistant: int) -> None:
            ids.extend(tokens)
            mask.extend([assistant] * len(tokens))

        for m in messages:
            add((self.im_start, *self.text(m.role + "\n")), 0)
            target = int(m.role == "assistant")
            for part in m.parts:
                if isinstance(part, AudioPart):
                    add((self.audio_bos, *([self.audio] * part.num_tokens), self.audio_eos), 0)
                    clips.append(part.samples)
                else:
                    add(self.text(part), target)
            add((self.im_end,), target)
            add(self._newline, 0)
        return Encoded(ids, mask, clips)

    def template_messages(self, messages: Sequence[Message]) -> list[dict[str, Any]]:
        """The same conversation in HF chat-template form (audio as {"type": "audio"})."""
        out = []
        for m in messages:
            parts = [{"type": "audio"} if isinstance(p, AudioPart) else {"type": "text", "text": p} for p in m.parts]
            out.append({"role": m.role, "content": parts})
        return out
