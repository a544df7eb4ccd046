"""Tiny MiDashengLM folders with random weights, for tests and the README's end-to-end demo.

`make_tiny_midashenglm(folder)` writes what a MiDashengLM Hugging Face folder holds (config.json,
model.safetensors, tokenizer.json + tokenizer_config.json) at the midashenglm-tiny fixture's
shapes. The tokenizer is byte-level BPE without merges (256 byte tokens) plus the Qwen2.5 chat
and audio special tokens, so any text round-trips. The replies of a random model are noise;
the folder exercises the pipeline (convert, load, batch, encode, splice, generate, decode).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"]


def write_tiny_tokenizer(folder: str | os.PathLike) -> dict[str, int]:
    """A transformers-loadable byte-level tokenizer; returns the special tokens' ids."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "model_max_length": 32768,
    }, indent=2))
    return {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}


def tiny_config(vocab_size: int = 512, audio_token_id: int = 500, **text_overrides):
    """The midashenglm-tiny fixture's shapes (encoder 64 wide / 2 blocks / 4 heads, thinker 64
    wide / 2 layers / 4 heads / 2 KV heads)."""
    from hellochat_jax.components.dasheng.model import DashengConfig
    from hellochat_jax.components.midashenglm.model import MiDashengLMConfig
    from hellochat_jax.components.qwen2.model import Qwen2Config

    text = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=False)
    return MiDashengLMConfig(DashengConfig.preset("tiny"), Qwen2Config(**{**text, **text_overrides}), 5, audio_token_id)


def write_random(folder: str | os.PathLike, cfg, *, seed: int = 0) -> Path:
    """A randomly initialised MiDashengLM written as an HF folder by our exporter."""
    from flax import nnx

    from hellochat_jax.components.midashenglm import weights as convert_midashenglm
    from hellochat_jax.components.midashenglm.model import MiDashengLM

    return convert_midashenglm.export(MiDashengLM(cfg, rngs=nnx.Rngs(seed)), cfg, folder)


def make_tiny_midashenglm(folder: str | os.PathLike, *, seed: int = 0, vocab_size: int = 512, **text_overrides):
    """Model + tokenizer in one folder (usable as both --checkpoint/--hf and --tokenizer)."""
    ids = write_tiny_tokenizer(folder)
    cfg = tiny_config(vocab_size, ids["<|AUDIO|>"], **text_overrides)
    write_random(folder, cfg, seed=seed)
    return cfg
