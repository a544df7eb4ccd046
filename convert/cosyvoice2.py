"""`hellochat convert cosyvoice2`: the command line over `hellochat_jax.components.cosyvoice2.weights`."""

from __future__ import annotations

import argparse
import time

from hellochat_jax.components.cosyvoice2.weights import convert_release, export_release
from hellochat_jax.convert.cli import add_mesh_argument
from hellochat_jax.core import sharding as shd
from hellochat_jax.core.errors import UserError


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("cosyvoice2", help="CosyVoice 2 release folder -> converted talker (Orbax); with --export, back")
    p.add_argument("--release", help="the release folder (cosyvoice2.yaml, llm.pt, flow.pt, hift.pt, CosyVoice-BlankEN/, ...)")
    p.add_argument("--talker", help="with --export: a converted talker folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--export", action="store_true", help="write a release folder from --talker")
    p.add_argument("--no-copy-onnx", action="store_true", help="do not copy speech_tokenizer_v2.onnx (export then cannot restore it)")
    add_mesh_argument(p)
    p.set_defaults(convert_fn=_run)


def _run(args: argparse.Namespace) -> int:
    mesh = shd.make_mesh(shd.parse_mesh_arg(args.mesh))
    start = time.perf_counter()
    if args.export:
        if not args.talker:
            raise UserError("--export needs --talker (a converted folder)")
        out = export_release(args.talker, args.out, mesh)
        print(f"wrote release folder {out} ({time.perf_counter() - start:.1f} s)")
        return 0
    if not args.release:
        raise UserError("--release is required (or --export --talker DIR)")
    manifest = convert_release(args.release, args.out, mesh, copy_onnx=not args.no_copy_onnx)
    print(f"wrote {args.out}: parts {sorted(manifest['parts'])}, copied {manifest['copied']} ({time.perf_counter() - start:.1f} s)")
    for note in manifest["notes"]:
        print(f"note: {note}")
    return 0
