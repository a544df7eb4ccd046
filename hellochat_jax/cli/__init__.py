"""The one `hellochat` command. Subcommands only parse arguments and dispatch."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module with add_arguments(parser) and main(args) -> int, help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "verify": ("hellochat_jax.cli.verify", "check parity against fixture folders"),
    "convert": ("hellochat_jax.convert.cli", "convert checkpoints (HF / release formats <-> Orbax)"),
    "generate": ("hellochat_jax.cli.generate", "generate text with the thinker"),
    "understand": ("hellochat_jax.cli.understand", "answer a prompt about audio files"),
    "speak": ("hellochat_jax.cli.speak", "text to speech with the talker"),
    "data": ("hellochat_jax.cli.data", "build datasets (synthetic corpus, manifest)"),
    "train": ("hellochat_jax.train.cli", "train from a config"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hellochat", description="Hello-Chat in JAX")
    sub = parser.add_subparsers(dest="command", required=True)
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        p.set_defaults(_module=module)
        # Import only the module asked for: keeps `hellochat --help` fast and lets a
        # subcommand whose optional dependencies are absent fail alone.
        if name == wanted:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    module = importlib.import_module(args._module)
    try:
        return int(module.main(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
