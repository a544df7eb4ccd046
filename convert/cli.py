"""`hellochat convert FORMAT ...`: one subcommand per checkpoint format.

Each converter module registers its own subcommands with `register_cli(subparsers)`; what they
all do (make the mesh, stream the release in, write the converted checkpoint, or the reverse)
is `import_checkpoint` / `export_checkpoint` here. A bad checkpoint raises CheckpointError,
which the `hellochat` command reports in one line.
"""

from __future__ import annotations

import argparse
import importlib
import time
from collections.abc import Callable
from typing import Any

CONVERTERS = [
    "hellochat_jax.convert.qwen2",
    "hellochat_jax.convert.dasheng",
    "hellochat_jax.convert.midashenglm",
    "hellochat_jax.convert.s3tokenizer",
    "hellochat_jax.convert.cosyvoice2",
    "hellochat_jax.convert.hift",
    "hellochat_jax.convert.hellochat",
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


def add_mesh_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mesh", default=None, help="e.g. fsdp=8 or data=1,fsdp=2,tensor=2 (default: all devices on data)")


def dtype_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """--param-dtype, when given (otherwise the checkpoint's own dtype is kept)."""
    return {"param_dtype": args.param_dtype} if getattr(args, "param_dtype", None) else {}


def import_checkpoint(args: argparse.Namespace, component: str, load: Callable[..., tuple[Any, Any]], source: str, **overrides: Any) -> int:
    """``load(source, mesh, progress=True, **overrides)`` -> a converted checkpoint in args.out."""
    from hellochat_jax.checkpoint.folder import THINKER_COMPONENTS, save_thinker_folder
    from hellochat_jax.checkpoint.load import save_checkpoint
    from hellochat_jax.core import sharding as shd

    mesh = shd.make_mesh(shd.parse_mesh_arg(getattr(args, "mesh", None)))
    start = time.perf_counter()
    cfg, model = load(source, mesh, progress=True, **overrides)
    if component in THINKER_COMPONENTS:  # a model folder, with the release's tokenizer
        out = save_thinker_folder(component, cfg, model, args.out, tokenizer=source)
    else:
        out = save_checkpoint(model, cfg, args.out, component)
    print(f"wrote {out} ({time.perf_counter() - start:.1f} s)")
    return 0


def export_checkpoint(args: argparse.Namespace, component: str, export: Callable[..., Any], **export_kwargs: Any) -> int:
    """The converted checkpoint args.checkpoint -> ``export(model, cfg, args.out, **export_kwargs)``."""
    from hellochat_jax.checkpoint.folder import THINKER_COMPONENTS, copy_tokenizer, load_model_folder, thinker_module
    from hellochat_jax.checkpoint.load import load_checkpoint
    from hellochat_jax.core import sharding as shd

    mesh = shd.make_mesh(shd.parse_mesh_arg(getattr(args, "mesh", None)))
    if component not in THINKER_COMPONENTS:
        _, cfg, model = load_checkpoint(args.checkpoint, mesh, component=component)
        print(f"wrote {export(model, cfg, args.out, **export_kwargs)}")
        return 0
    # Any model folder (a trained one too) or older converted checkpoint; its tokenizer goes along.
    bundle = load_model_folder(args.checkpoint, mesh)
    cfg, model = thinker_module(bundle, component)
    out = export(model, cfg, args.out, **export_kwargs)
    if bundle.tokenizer_dir("thinker") is not None:
        copy_tokenizer(bundle.tokenizer_dir("thinker"), args.out)
    print(f"wrote {out}")
    return 0


def import_or_export(component: str, load: Callable[..., tuple[Any, Any]], export: Callable[..., Any]) -> Callable[[argparse.Namespace], int]:
    """The run function of a one-subcommand converter: --checkpoint in, --out, --export reverses."""

    def run(args: argparse.Namespace) -> int:
        if args.export:
            return export_checkpoint(args, component, export)
        return import_checkpoint(args, component, load, args.checkpoint)

    return run


def register_hf_format(sub: argparse._SubParsersAction, component: str, weights: Any, what: str) -> None:
    """`COMPONENT --hf DIR --out DIR` (HF folder -> converted checkpoint) and `COMPONENT-export
    --checkpoint DIR --out DIR` (back) for a format stored as an HF folder; `weights` is the
    component's weights module (`load`, `export`)."""
    p = sub.add_parser(component, help=f"HF {what} folder -> Orbax checkpoint")
    p.add_argument("--hf", required=True, help="folder with config.json and model.safetensors (or an index)")
    p.add_argument("--out", required=True, help="output checkpoint folder")
    p.add_argument("--param-dtype", default=None, choices=["float32", "bfloat16"], help="default: the checkpoint's dtype")
    add_mesh_argument(p)
    p.set_defaults(convert_fn=lambda args: import_checkpoint(args, component, weights.load, args.hf, **dtype_overrides(args)))
    p = sub.add_parser(f"{component}-export", help=f"model folder / Orbax checkpoint -> HF {what} folder (safetensors + config.json)")
    p.add_argument("--checkpoint", "--model", dest="checkpoint", required=True, help="model folder or converted checkpoint")
    p.add_argument("--out", required=True)
    p.add_argument("--max-shard-gb", type=float, default=5.0)
    p.set_defaults(convert_fn=lambda args: export_checkpoint(args, component, weights.export, max_shard_bytes=int(args.max_shard_gb * 2**30)))
