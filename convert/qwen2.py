"""`hellochat convert qwen2` (HF folder -> Orbax) and `hellochat convert qwen2-export` (Orbax -> HF)."""

from __future__ import annotations

import argparse
import time

from hellochat_jax.core import sharding as shd


def register_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("qwen2", help="HF Qwen2/Qwen2.5 folder -> Orbax checkpoint")
    p.add_argument("--hf", required=True, help="folder with config.json and model.safetensors (or an index)")
    p.add_argument("--out", required=True, help="output checkpoint folder")
    p.add_argument("--param-dtype", default=None, choices=["float32", "bfloat16"], help="default: the checkpoint's dtype")
    p.add_argument("--mesh", default=None, help="e.g. fsdp=8 (default: all devices on data)")
    p.set_defaults(convert_fn=_import)
    p = sub.add_parser("qwen2-export", help="Orbax checkpoint -> HF folder (safetensors + config.json)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--max-shard-gb", type=float, default=5.0)
    p.set_defaults(convert_fn=_export)


def _import(args) -> int:
    from hellochat_jax.checkpoint.io import save_orbax
    from hellochat_jax.checkpoint.load import config_to_dict
    from hellochat_jax.components.qwen2 import weights as hf_qwen2

    mesh = shd.make_mesh(shd.parse_mesh_arg(args.mesh))
    start = time.perf_counter()
    overrides = {"param_dtype": args.param_dtype} if args.param_dtype else {}
    cfg, model = hf_qwen2.load(args.hf, mesh, progress=True, **overrides)
    out = save_orbax(model, args.out, component="qwen2", config=config_to_dict(cfg))
    print(f"wrote {out} ({time.perf_counter() - start:.1f} s)")
    return 0


def _export(args) -> int:
    from hellochat_jax.checkpoint.load import load_checkpoint
    from hellochat_jax.components.qwen2 import weights as hf_qwen2

    component, cfg, model = load_checkpoint(args.checkpoint)
    if component != "qwen2":
        raise SystemExit(f"{args.checkpoint} holds a {component} checkpoint, not qwen2")
    out = hf_qwen2.export(model, cfg, args.out, max_shard_bytes=int(args.max_shard_gb * 2**30))
    print(f"wrote {out}")
    return 0
