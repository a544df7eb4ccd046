"""`hellochat convert s3tokenizer`: the command line over `hellochat_jax.components.s3tokenizer.weights`."""

from __future__ import annotations

import argparse

from hellochat_jax.components.s3tokenizer import weights
from hellochat_jax.convert.cli import add_mesh_argument, import_or_export


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """`hellochat convert s3tokenizer --checkpoint X --out DIR [--export]`."""
    p = subparsers.add_parser(
        "s3tokenizer",
        help="S3Tokenizer v2 (.pt / release .onnx / folder) -> Orbax; with --export, Orbax -> .pt",
    )
    p.add_argument("--checkpoint", required=True, help="the package's .pt, the release speech_tokenizer_v2.onnx, or a folder with one")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--export", action="store_true", help="read a converted (Orbax) folder and write the package's .pt + config.json")
    add_mesh_argument(p)
    p.set_defaults(convert_fn=import_or_export(weights.COMPONENT, weights.load, weights.export))

