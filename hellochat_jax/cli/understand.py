"""`hellochat understand`: ask MiDashengLM about audio files (a transcript, an emotion, a caption:
whatever the prompt asks). Files are processed in batches; a file that cannot be used is
reported with the reason and the others still get their answer (exit status 1 then).
"""

from __future__ import annotations

import argparse
import sys

from hellochat_jax.cli.generate import add_sampling_arguments
from hellochat_jax.core import sharding as shd

DEFAULT_PROMPT = "Caption the audio."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "--checkpoint", dest="model", required=True,
                   help="model folder (hellochat export / convert midashenglm), converted checkpoint, or an HF MiDashengLM folder")
    p.add_argument("--tokenizer", default=None,
                   help="local tokenizer folder with the Qwen2.5 chat and audio special tokens (default: the model folder's)")
    p.add_argument("--audio", nargs="+", required=True, help="audio files (wav, flac, ogg, mp3; any rate and channel count)")
    p.add_argument("--prompt", action="append", default=None,
                   help=f"instruction after the audio; repeat to ask several (default: {DEFAULT_PROMPT!r})")
    p.add_argument("--system", default=None,
                   help='system message; "" for none (default: the one the model folder was trained with, else MiDashengLM\'s)')
    p.add_argument("--batch-size", type=int, default=8)
    add_sampling_arguments(p)
    p.add_argument("--per-sample-top-db", action="store_true",
                   help="floor each clip's log-mel at its own peak - 120 dB instead of the batch's (the reference's "
                        "convention), so a loud file in the batch does not change a quiet one's features")
    p.add_argument("--mesh", default=None, help="e.g. data=2,fsdp=2,tensor=2 (default: all devices on data)")


def load_model(path: str, mesh):
    """The MiDashengLM of a model folder, converted checkpoint or HF folder (`generate.LoadedThinker`)."""
    from hellochat_jax.cli.generate import load_model as load

    return load(path, mesh, "midashenglm")


def load_tokenizer(path: str):
    """The tokenizer of a local folder. A MiDashengLM folder's config.json has a model type
    transformers does not know; AutoTokenizer reads it anyway and warns, harmlessly: hushed."""
    from transformers.utils import logging as hf_logging

    from hellochat_jax.cli.generate import load_tokenizer as load

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return load(path)
    finally:
        hf_logging.set_verbosity(level)


def main(args: argparse.Namespace) -> int:
    import jax

    from hellochat_jax.cli.generate import (
        sampling_from_args,
        stop_ids,
        tokenizer_folder,
    )
    from hellochat_jax.components.midashenglm import model as midashenglm
    from hellochat_jax.core import dsp as audio_io
    from hellochat_jax.pipelines.thinker import (
        DEFAULT_SYSTEM,
        MiDashengLMProcessor,
        user_turn,
    )

    if args.batch_size < 1:
        raise SystemExit("--batch-size must be at least 1")
    # Read and check every file first: a bad file is reported, not fatal to the others.
    clips, failed = [], 0
    for path in args.audio:
        try:
            clips.append((path, audio_io.load(path)))
        except audio_io.AudioError as e:
            print(f"error: {e}", file=sys.stderr)  # the message names the file
            failed += 1
    if not clips:
        return 1

    mesh = shd.make_mesh(shd.parse_mesh_arg(args.mesh))
    loaded = load_model(args.model, mesh)
    cfg, model = loaded.cfg, loaded.model
    if args.per_sample_top_db:
        cfg = midashenglm.with_encoder_options(model, top_db_per_sample=True)
    tokenizer = load_tokenizer(tokenizer_folder(args.tokenizer, loaded, args.model))
    # The model's own convention first: a model trained without a system prompt is asked without one.
    system = next(s for s in (args.system, loaded.system, DEFAULT_SYSTEM) if s is not None)
    processor = MiDashengLMProcessor(tokenizer, audio_token_id=cfg.audio_token_id, system=system or None,
                                     subsample=cfg.subsample_factor)
    prompts = args.prompt or [DEFAULT_PROMPT]
    sampling = sampling_from_args(args)
    key = jax.random.key(args.seed)
    max_positions = cfg.text.max_position_embeddings
    for prompt, start in ((p, s) for s in range(0, len(clips), args.batch_size) for p in prompts):
        group = clips[start : start + args.batch_size]
        batch = processor([[user_turn(prompt, wav)] for _, wav in group])
        if batch.input_ids.shape[1] + args.max_new_tokens > max_positions:
            longest = max(len(w) for _, w in group) / audio_io.SAMPLE_RATE
            raise SystemExit(
                f"prompt of {batch.input_ids.shape[1]} tokens (longest clip {longest:.0f} s, 5 tokens per second) + "
                f"{args.max_new_tokens} new tokens exceeds the thinker's {max_positions} positions; split the audio"
            )
        key, sub = jax.random.split(key)
        with jax.set_mesh(mesh), shd.use_rules(shd.DEFAULT_RULES):
            tokens, lengths = midashenglm.generate(
                model, batch.input_ids, batch.attention_mask, batch.waveform, batch.lengths,
                max_new_tokens=args.max_new_tokens, sampling=sampling, stop_tokens=stop_ids(tokenizer),
                pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0, key=sub, mesh=mesh,
            )
        for (path, _), row, n in zip(group, tokens, lengths):
            label = path if len(prompts) == 1 else f"{path} [{prompt}]"
            print(f"{label}: {tokenizer.decode(row[:n], skip_special_tokens=True)}")
    return 1 if failed else 0
