"""`hellochat convert FORMAT ...`: one subcommand per checkpoint format.

Each converter module registers its own subcommands with `register_cli(subparsers)`.
"""

from __future__ import annotations

import argparse
import importlib

CONVERTERS = [
    "hellochat_jax.convert.qwen2",
    "hellochat_jax.convert.dasheng",
    "hellochat_jax.convert.midashenglm",
    "hellochat_jax.convert.s3tokenizer",
    "hellochat_jax.convert.cosyvoice2",
    "hellochat_jax.convert.hift",
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="format", required=True)
    for name in CONVERTERS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and name.startswith(e.name):
                continue  # converter not built in this version
            raise
        module.register_cli(sub)


def main(args: argparse.Namespace) -> int:
    return int(args.convert_fn(args) or 0)
