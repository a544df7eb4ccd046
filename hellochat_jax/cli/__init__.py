"""The one `hellochat` command. Subcommands only parse arguments and dispatch; a mistake in
what the user gave (any `UserError`, or a path that does not exist) ends the command with one
`error: ...` line on stderr and exit status 1 (``hellochat --debug ...`` shows the traceback)."""

from __future__ import annotations

import argparse
import importlib
import sys

from hellochat_jax.core.errors import UserError
from hellochat_jax.core.host_memory import reuse_freed_memory

# subcommand -> (module with add_arguments(parser) and main(args) -> int, help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "verify": ("hellochat_jax.cli.verify", "check parity against fixture folders"),
    "convert": ("hellochat_jax.convert.cli", "convert checkpoints (HF / release formats <-> Orbax)"),
    "generate": ("hellochat_jax.cli.generate", "generate text with the thinker"),
    "understand": ("hellochat_jax.cli.understand", "answer a prompt about audio files"),
    "speak": ("hellochat_jax.cli.speak", "text to speech with the talker"),
    "chat": ("hellochat_jax.cli.chat", "speech in, speech out with a Hello-Chat model folder"),
    "serve": ("hellochat_jax.cli.serve", "a local Gradio app for chatting with a model folder"),
    "eval": ("hellochat_jax.cli.eval", "held-out metrics of a model folder (understanding, TTS)"),
    "data": ("hellochat_jax.cli.data", "build datasets (synthetic corpus, manifest), fill their speech tokens"),
    "train": ("hellochat_jax.train.cli", "train from a config"),
    "export": ("hellochat_jax.train.export", "turn a training run's checkpoint into a model folder"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hellochat", description="Hello-Chat in JAX")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line")
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
    reuse_freed_memory()  # before a subcommand's imports start threads
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    module = importlib.import_module(args._module)
    try:
        return int(module.main(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (UserError, FileNotFoundError) as e:
        if args.debug:
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1


def one_line(error: BaseException) -> str:
    """The error's message on one line (multi-line messages list their problems)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " ".join(lines) or type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
