"""`hellochat convert midashenglm` / `midashenglm-export` (HF folder <-> Orbax) and
`midashenglm-random` (a tiny random HF folder for demos and tests)."""

from __future__ import annotations

import argparse

from hellochat_jax.components.midashenglm import weights
from hellochat_jax.convert.cli import register_hf_format


def register_cli(sub: argparse._SubParsersAction) -> None:
    register_hf_format(sub, "midashenglm", weights, "MiDashengLM")
    p = sub.add_parser("midashenglm-random", help="write a tiny random MiDashengLM HF folder with a byte-level tokenizer (demos, tests)")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(convert_fn=_random_cli)


def _random_cli(args: argparse.Namespace) -> int:
    from hellochat_jax.testing.midashenglm import make_tiny_midashenglm

    make_tiny_midashenglm(args.out, seed=args.seed)
    print(f"wrote {args.out} (random weights + byte-level tokenizer)")
    return 0
