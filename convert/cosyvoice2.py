"""`hellochat convert cosyvoice2`: the command line over `hellochat_jax.components.cosyvoice2.weights`."""

from __future__ import annotations

import argparse
import time

from hellochat_jax.checkpoint.io import CheckpointError
from hellochat_jax.components.cosyvoice2.weights import convert_release, export_release
from hellochat_jax.core import sharding as shd


def register_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("cosyvoice2", help="CosyVoice 2 release folder -> converted talker (Orbax); with --export, back")
    p.add_argument("--release", help="the release folder (cosyvoice2.yaml, llm.pt, flow.pt, hift.pt, CosyVoice-BlankEN/, ...)")
    p.add_argument("--talker", help="with --export: a converted talker folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--export", action="store_true", help="write a release folder from --talker")
    p.add_argument("--no-copy-onnx", action="store_true", help="do not copy speech_tokenizer_v2.onnx (export then cannot restore it)")
    p.add_argument("--mesh", default=None, help="e.g. fsdp=8 (default: all devices on data)")
    p.set_defaults(convert_fn=run_cli)
    return p


def run_cli(args: argparse.Namespace) -> int:
    mesh = shd.make_mesh(shd.parse_mesh_arg(args.mesh))
    start = time.perf_counter()
    try:
        if args.export:
            if not args.talker:
                print("error: --export needs --talker (a converted folder)")
                return 2
            out = export_release(args.talker, args.out, mesh)
            print(f"wrote release folder {out} ({time.perf_counter() - start:.1f} s)")
        else:
            if not args.release:
                print("error: --release is required (or --export --talker DIR)")
                return 2
            manifest = convert_release(args.release, args.out, mesh, copy_onnx=not args.no_copy_onnx)
            print(f"wrote {args.out}: parts {sorted(manifest['parts'])}, copied {manifest['copied']} ({time.perf_counter() - start:.1f} s)")
            for note in manifest["notes"]:
                print(f"note: {note}")
    except CheckpointError as e:
        print(f"error: {e}")
        return 1
    return 0
