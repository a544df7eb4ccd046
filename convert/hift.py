"""`hellochat convert hift`: the command line over `hellochat_jax.components.hift.weights`."""

from __future__ import annotations

import argparse

from hellochat_jax.checkpoint.io import (
    CheckpointError,
)
from hellochat_jax.components.hift.weights import export, load, load_converted, save
from hellochat_jax.core import sharding as shd


def register_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """`hellochat convert cosyvoice2-hift --checkpoint X --out DIR [--export]`."""
    p = subparsers.add_parser("cosyvoice2-hift", help="CosyVoice 2 hift.pt (+ cosyvoice2.yaml) -> Orbax; with --export, Orbax -> hift.pt")
    p.add_argument("--checkpoint", required=True, help="release folder, or hift.pt with cosyvoice2.yaml beside it, or (with --export) a converted folder")
    p.add_argument("--out", required=True, help="output folder (or .pt file with --export)")
    p.add_argument("--export", action="store_true", help="read a converted folder and write hift.pt in its original naming")
    p.add_argument("--mesh", default=None, help="e.g. data=1,fsdp=2,tensor=2 (default: all devices on data)")
    p.set_defaults(convert_fn=run_cli)
    return p


def run_cli(args: argparse.Namespace) -> int:
    mesh = shd.make_mesh(shd.parse_mesh_arg(args.mesh))
    try:
        if args.export:
            cfg, model = load_converted(args.checkpoint, mesh)
            print(f"wrote {export(model, cfg, args.out)}")
        else:
            cfg, model = load(args.checkpoint, mesh, progress=True)
            print(f"converted HiFT vocoder (base {cfg.base_channels} channels, {cfg.checkpoint_naming} weight norm) -> {save(model, cfg, args.out)}")
    except CheckpointError as e:
        print(f"error: {e}")
        return 1
    return 0
