"""`hellochat convert midashenglm`: the command line over `hellochat_jax.components.midashenglm.weights`."""

from __future__ import annotations

import argparse
import time

from hellochat_jax.components.midashenglm.weights import export, load
from hellochat_jax.core import sharding as shd


def register_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("midashenglm", help="HF MiDashengLM folder -> Orbax checkpoint")
    p.add_argument("--hf", required=True, help="folder with config.json and model.safetensors (or an index)")
    p.add_argument("--out", required=True, help="output checkpoint folder")
    p.add_argument("--param-dtype", default=None, choices=["float32", "bfloat16"], help="default: the checkpoint's dtype")
    p.add_argument("--mesh", default=None, help="e.g. fsdp=8 (default: all devices on data)")
    p.set_defaults(convert_fn=_import_cli)
    p = sub.add_parser("midashenglm-export", help="Orbax checkpoint -> HF MiDashengLM folder")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--max-shard-gb", type=float, default=5.0)
    p.set_defaults(convert_fn=_export_cli)
    p = sub.add_parser("midashenglm-random", help="write a tiny random MiDashengLM HF folder with a byte-level tokenizer (demos, tests)")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(convert_fn=_random_cli)


def _import_cli(args) -> int:
    from hellochat_jax.checkpoint.io import save_orbax
    from hellochat_jax.checkpoint.load import config_to_dict

    mesh = shd.make_mesh(shd.parse_mesh_arg(args.mesh))
    start = time.perf_counter()
    overrides = {"param_dtype": args.param_dtype} if args.param_dtype else {}
    cfg, model = load(args.hf, mesh, progress=True, **overrides)
    out = save_orbax(model, args.out, component="midashenglm", config=config_to_dict(cfg))
    print(f"wrote {out} ({time.perf_counter() - start:.1f} s)")
    return 0


def _export_cli(args) -> int:
    from hellochat_jax.checkpoint.load import load_checkpoint

    component, cfg, model = load_checkpoint(args.checkpoint)
    if component != "midashenglm":
        raise SystemExit(f"{args.checkpoint} holds a {component} checkpoint, not midashenglm")
    print(f"wrote {export(model, cfg, args.out, max_shard_bytes=int(args.max_shard_gb * 2**30))}")
    return 0


def _random_cli(args) -> int:
    from hellochat_jax.testing.midashenglm import make_tiny_midashenglm

    make_tiny_midashenglm(args.out, seed=args.seed)
    print(f"wrote {args.out} (random weights + byte-level tokenizer)")
    return 0
