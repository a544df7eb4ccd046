"""`hellochat convert dasheng`: the command line over `hellochat_jax.components.dasheng.weights`."""

from __future__ import annotations

import argparse
import time

from hellochat_jax.components.dasheng.weights import export, load
from hellochat_jax.core import sharding as shd


def register_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dasheng", help="dasheng release .pt -> Orbax checkpoint")
    p.add_argument("--pt", required=True, help="release checkpoint, e.g. dasheng_base.pt")
    p.add_argument("--out", required=True, help="output checkpoint folder")
    p.add_argument("--mesh", default=None, help="e.g. fsdp=8 (default: all devices on data)")
    p.set_defaults(convert_fn=_import_cli)
    p = sub.add_parser("dasheng-export", help="Orbax checkpoint -> dasheng release .pt")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True, help="output .pt file")
    p.set_defaults(convert_fn=_export_cli)


def _import_cli(args) -> int:
    from hellochat_jax.checkpoint.io import save_orbax
    from hellochat_jax.checkpoint.load import config_to_dict

    mesh = shd.make_mesh(shd.parse_mesh_arg(args.mesh))
    start = time.perf_counter()
    cfg, model = load(args.pt, mesh, progress=True)
    out = save_orbax(model, args.out, component="dasheng", config=config_to_dict(cfg))
    print(f"wrote {out} ({time.perf_counter() - start:.1f} s)")
    return 0


def _export_cli(args) -> int:
    from hellochat_jax.checkpoint.load import load_checkpoint

    component, cfg, model = load_checkpoint(args.checkpoint)
    if component != "dasheng":
        raise SystemExit(f"{args.checkpoint} holds a {component} checkpoint, not dasheng")
    print(f"wrote {export(model, cfg, args.out)}")
    return 0
