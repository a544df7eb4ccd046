"""`hellochat convert cosyvoice2-hift`: the command line over `hellochat_jax.components.hift.weights`."""

from __future__ import annotations

import argparse

from hellochat_jax.components.hift import weights
from hellochat_jax.convert.cli import add_mesh_argument, import_or_export


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """`hellochat convert cosyvoice2-hift --checkpoint X --out DIR [--export]`."""
    p = subparsers.add_parser("cosyvoice2-hift", help="CosyVoice 2 hift.pt (+ cosyvoice2.yaml) -> Orbax; with --export, Orbax -> hift.pt")
    p.add_argument("--checkpoint", required=True, help="release folder, or hift.pt with cosyvoice2.yaml beside it, or (with --export) a converted folder")
    p.add_argument("--out", required=True, help="output folder (or .pt file with --export)")
    p.add_argument("--export", action="store_true", help="read a converted folder and write hift.pt in its original naming")
    add_mesh_argument(p)
    p.set_defaults(convert_fn=import_or_export(weights.COMPONENT, weights.load, weights.export))

