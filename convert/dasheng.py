"""`hellochat convert dasheng`: the command line over `hellochat_jax.components.dasheng.weights`."""

from __future__ import annotations

import argparse

from hellochat_jax.components.dasheng import weights
from hellochat_jax.convert.cli import add_mesh_argument, export_checkpoint, import_checkpoint


def register_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dasheng", help="dasheng release .pt -> Orbax checkpoint")
    p.add_argument("--pt", required=True, help="release checkpoint, e.g. dasheng_base.pt")
    p.add_argument("--out", required=True, help="output checkpoint folder")
    add_mesh_argument(p)
    p.set_defaults(convert_fn=lambda args: import_checkpoint(args, "dasheng", weights.load, args.pt))
    p = sub.add_parser("dasheng-export", help="Orbax checkpoint -> dasheng release .pt")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True, help="output .pt file")
    p.set_defaults(convert_fn=lambda args: export_checkpoint(args, "dasheng", weights.export))
