"""`hellochat train --config configs/tiny.yaml [--stage NAME] [key=value ...] [--resume] [--plan]`."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML file, or the name of a shipped config (tiny, hellochat-7b)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=1e-3 mesh.data=2")
    parser.add_argument("--stage", default=None, help="what to train (thinker, speech_tokenizer, talker, flow, hift: "
                        "train/stages.py); the config's stages.<stage> section overrides the rest of it")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the run's checkpoint dir")
    parser.add_argument("--plan", action="store_true",
                        help="print per-device memory of params, gradients, optimizer state and activations "
                             "(jax.eval_shape; no arrays allocated) and exit")
    parser.add_argument("--plan-devices", type=int, default=None,
                        help="with --plan: the device count to plan for (default: the devices present)")


def main(args: argparse.Namespace) -> int:
    from hellochat_jax.train import config as train_config

    # A ConfigError reaches the command line's one-line error report (hellochat_jax.cli.main).
    cfg = train_config.load(args.config, args.overrides, getattr(args, "stage", None))
    if args.plan:
        from hellochat_jax.train.plan import print_plan

        print_plan(cfg, args.plan_devices)
        return 0
    from hellochat_jax.train.trainer import Trainer

    trainer = Trainer(cfg)
    code = trainer.fit(resume=args.resume)
    summary = getattr(trainer, "summary", None)
    if summary:
        print(summary)
    return code
