"""`hellochat generate`: chat with the thinker from a converted checkpoint (or an HF folder)."""

from __future__ import annotations

import argparse
from pathlib import Path

from hellochat_jax.core import sharding as shd


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="converted checkpoint (hellochat convert) or an HF Qwen2 folder")
    p.add_argument("--tokenizer", required=True, help="local tokenizer folder (tokenizer.json + tokenizer_config.json)")
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
    from hellochat_jax.core.decoding import SamplingConfig

    return SamplingConfig(args.temperature, args.top_k, args.top_p, args.repetition_penalty)


# component -> module whose load(path, mesh) reads the HF-style release folder
HF_LOADERS = {"qwen2": "hellochat_jax.components.qwen2.weights", "midashenglm": "hellochat_jax.components.midashenglm.weights"}


def load_model(path: str, mesh, component: str):
    """A converted checkpoint or an HF-style folder of `component`, whichever `path` is."""
    import importlib

    from hellochat_jax.checkpoint.io import META_FILE

    if (Path(path) / META_FILE).exists():
        from hellochat_jax.checkpoint.load import load_checkpoint

        found, cfg, model = load_checkpoint(path, mesh)
        if found != component:
            raise SystemExit(f"{path} holds a {found} checkpoint; this command needs a {component} one")
        return cfg, model
    return importlib.import_module(HF_LOADERS[component]).load(path, mesh)


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
    cfg, model = load_model(args.checkpoint, mesh, "qwen2")
    tokenizer = load_tokenizer(args.tokenizer)
    prompts = encode_chat(tokenizer, args.prompt, args.system, args.raw)
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
