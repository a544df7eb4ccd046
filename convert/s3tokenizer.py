"""`hellochat convert s3tokenizer`: the command line over `hellochat_jax.components.s3tokenizer.weights`."""

from __future__ import annotations

import argparse

from hellochat_jax.checkpoint.io import (
    CheckpointError,
)
from hellochat_jax.components.s3tokenizer.weights import (
    export,
    load,
    load_converted,
    save,
)
from hellochat_jax.core import sharding as shd


def register_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """`hellochat convert s3tokenizer --checkpoint X --out DIR [--export]`."""
    p = subparsers.add_parser(
        "s3tokenizer",
        help="S3Tokenizer v2 (.pt / release .onnx / folder) -> Orbax; with --export, Orbax -> .pt",
    )
    p.add_argument("--checkpoint", required=True, help="the package's .pt, the release speech_tokenizer_v2.onnx, or a folder with one")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--export", action="store_true", help="read a converted (Orbax) folder and write the package's .pt + config.json")
    p.add_argument("--mesh", default=None, help="e.g. data=1,fsdp=2,tensor=2 (default: all devices on data)")
    p.set_defaults(convert_fn=run_cli)
    return p


def run_cli(args: argparse.Namespace) -> int:
    mesh = shd.make_mesh(shd.parse_mesh_arg(args.mesh))
    try:
        if args.export:
            cfg, model = load_converted(args.checkpoint, mesh)
            pt = export(model, cfg, args.out)
            print(f"wrote {pt}")
        else:
            cfg, model = load(args.checkpoint, mesh, progress=True)
            out = save(model, cfg, args.out)
            print(
                f"converted S3Tokenizer v2 (width {cfg.n_audio_state}, {cfg.n_audio_head} heads, "
                f"{cfg.n_audio_layer} blocks) -> {out}"
            )
    except CheckpointError as e:
        print(f"error: {e}")
        return 1
    return 0
