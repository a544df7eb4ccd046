"""`hellochat generate`: chat with the thinker of a model folder (`hellochat export`, `hellochat
convert`), an older converted checkpoint, or an HF folder."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from hellochat_jax.core import sharding as shd


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "--checkpoint", dest="model", required=True,
                   help="model folder (hellochat export / convert), converted checkpoint, or an HF Qwen2 folder")
    p.add_argument("--tokenizer", default=None, help="local tokenizer folder (default: the model folder's)")
    p.add_argument("--prompt", action="append", required=True, help="user message; repeat for a batch")
    p.add_argument("--system", default=None, help="optional system message")
    add_sampling_arguments(p)
    p.add_argument("--raw", action="store_true", help="feed the prompt as plain text, without the chat template")
    p.add_argument("--mesh", default=None)


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    """Decoding options shared by `generate` and `understand`."""
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)


def sampling_from_args(args: argparse.Namespace):
    from hellochat_jax.core.decoding import sampling_method

    try:
        return sampling_method(args.temperature, args.top_k, args.top_p, args.repetition_penalty)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


# component -> module whose load(path, mesh) reads the HF-style release folder
HF_LOADERS = {"qwen2": "hellochat_jax.components.qwen2.weights", "midashenglm": "hellochat_jax.components.midashenglm.weights"}


@dataclasses.dataclass
class LoadedThinker:
    cfg: Any  # Qwen2Config (text) or MiDashengLMConfig (audio)
    model: Any  # Qwen2Thinker or MiDashengLM
    tokenizer_dir: Path | None  # the folder's own tokenizer, if it has one
    system: str | None  # the system prompt the model was trained with ("" = none), if recorded


def load_model(path: str, mesh, component: str) -> LoadedThinker:
    """The thinker of a model folder (or older converted checkpoint, via `load_model_folder`)
    or of an HF-style folder, whichever `path` is: its decoder alone for `component` "qwen2",
    the whole MiDashengLM (encoder required) for "midashenglm"."""
    import importlib

    from hellochat_jax.checkpoint.io import META_FILE

    if not (Path(path) / META_FILE).exists() and not (Path(path) / "state").is_dir():  # an HF folder
        cfg, model = importlib.import_module(HF_LOADERS[component]).load(path, mesh)
        return LoadedThinker(cfg, model, Path(path), None)
    from hellochat_jax.checkpoint.folder import load_model_folder, thinker_module

    bundle = load_model_folder(path, mesh)
    cfg, model = thinker_module(bundle, component)
    return LoadedThinker(cfg, model, bundle.tokenizer_dir("thinker"), bundle.system_prompt)


def tokenizer_folder(args_tokenizer: str | None, loaded: LoadedThinker, model_path: str) -> str:
    if args_tokenizer is not None:
        return args_tokenizer
    if loaded.tokenizer_dir is None:
        raise SystemExit(f"error: {model_path} has no tokenizer folder; pass --tokenizer")
    return str(loaded.tokenizer_dir)


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    if not Path(path).is_dir():
        raise SystemExit(f"--tokenizer {path}: not a folder (tokenizers are read from local folders only)")
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def encode_chat(tokenizer, prompts: list[str], system: str | None, raw: bool) -> list[list[int]]:
    out = []
    for prompt in prompts:
        if raw or not getattr(tokenizer, "chat_template", None):
            out.append(tokenizer.encode(prompt, add_special_tokens=False))
            continue
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        out.append(list(ids))
    return out


def stop_ids(tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for tok in ("<|im_end|>", "<|endoftext|>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0:
            ids.add(tid)
    return sorted(i for i in ids if i is not None)


def main(args: argparse.Namespace) -> int:
    import jax

    from hellochat_jax.core.decoding import generate, left_pad

    mesh = shd.make_mesh(shd.parse_mesh_arg(args.mesh))
    loaded = load_model(args.model, mesh, "qwen2")
    model = loaded.model
    tokenizer = load_tokenizer(tokenizer_folder(args.tokenizer, loaded, args.model))
    system = args.system if args.system is not None else loaded.system
    prompts = encode_chat(tokenizer, args.prompt, system or None, args.raw)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids, mask = left_pad(prompts, pad_id=pad, multiple=16)
    sampling = sampling_from_args(args)
    tokens, lengths = generate(
        model, ids, mask, max_new_tokens=args.max_new_tokens, sampling=sampling, stop_tokens=stop_ids(tokenizer),
        pad_id=pad, key=jax.random.key(args.seed), mesh=mesh,
    )
    for row, n in zip(tokens, lengths):
        print(tokenizer.decode(row[:n], skip_special_tokens=True))
    return 0
