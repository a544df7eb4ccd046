"""`hellochat export --run runs/tiny [--step N] --out models/tiny`: a training run's checkpoint ->
a model folder (`hellochat_jax.checkpoint.folder`) that every serving command loads.

Only the model's variables are read from the step's Orbax state (no optimizer state, no data
iterator). The training config saved with each step rebuilds the model; LoRA adapters are
merged into their base kernels (W + alpha / r * A B), so the folder holds a plain HelloChat.
With the corpus as data, the run's tokenizer folder and system prompt go into the folder.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import jax
from flax import nnx
from hellochat_jax.train.checkpoint import abstract_with_shardings
from hellochat_jax.train.config import TrainConfig
from hellochat_jax.train.model import build, model_config

from hellochat_jax.checkpoint.io import CheckpointError
from hellochat_jax.core import sharding as shd
from hellochat_jax.core.config import ConfigError, from_dict


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="training run folder (its checkpoints/), or a checkpoint folder itself")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--out", required=True, help="model folder to write")


def main(args: argparse.Namespace) -> int:
    out = export_run(args.run, args.out, step=args.step)
    print(f"wrote {out}")
    return 0


def _step_dirs(ckpt_dir: Path) -> dict[int, Path]:
    return {int(p.name): p for p in ckpt_dir.iterdir() if p.name.isdigit() and (p / "state").is_dir()} if ckpt_dir.is_dir() else {}


def read_step(run: str | Path, step: int | None = None) -> tuple[int, Path, TrainConfig]:
    """(step, its directory, the training config saved with it) of a run."""
    run = Path(run)
    steps = _step_dirs(run / "checkpoints") or _step_dirs(run)
    if not steps:
        raise CheckpointError(f"{run}: no training checkpoints (looked in {run / 'checkpoints'} and {run})")
    step = max(steps) if step is None else step
    if step not in steps:
        raise CheckpointError(f"{run}: no checkpoint at step {step}; there are {sorted(steps)}")
    import json

    meta_file = steps[step] / "meta" / "metadata"
    try:
        saved = json.loads(meta_file.read_text()).get("config")
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{meta_file}: unreadable ({e})") from None
    if saved is None:
        raise CheckpointError(f"{meta_file}: holds no training config (written by an older trainer); retrain or resume once")
    try:
        cfg = from_dict(TrainConfig, saved, where=str(meta_file))
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    return step, steps[step], cfg


def restore_run(run: str | Path, step: int | None = None, mesh: jax.sharding.Mesh | None = None):
    """(the HelloChat config of the parts a run trained (training heads left out), their
    {path: array} with LoRA merged, the run's config, the step) of one step of a run."""
    import orbax.checkpoint as ocp

    from hellochat_jax.train import stages

    step, step_dir, cfg = read_step(run, step)
    mesh = mesh if mesh is not None else shd.make_mesh()
    rules = shd.rules_from_config(cfg.rules)
    parts = stages.parts_of(stages.get(cfg.stage), cfg)
    try:
        trained = shd.abstract_model(build(cfg.model, cfg.seed, parts))  # the structure the run trained (LoRA included)
    except ConfigError as e:
        raise CheckpointError(f"{step_dir}: {e}") from None
    from hellochat_jax.train.lora import trainable_filter

    m = cfg.model
    graphdef, abs_params, abs_rest = nnx.split(trained, trainable_filter(m.frozen, m.lora.groups if m.lora else []), ...)

    # Only the model's variables: the optimizer state and counters stay on disk.
    wanted = {part: abstract_with_shardings(state, shd.shardings_for(state, mesh, rules))
              for part, state in (("params", abs_params), ("rest", abs_rest))}
    with ocp.PyTreeCheckpointer() as ckptr:
        restored = ckptr.restore(
            step_dir.absolute() / "state",
            args=ocp.args.PyTreeRestore(wanted, restore_args=ocp.checkpoint_utils.construct_restore_args(wanted),
                                        partial_restore=True),
        )
    trained = nnx.merge(graphdef, restored["params"], restored["rest"])
    values = {k: v for k, v in _merged_variables(trained).items() if k[0] != "heads"}
    # Serving needs no remat or layer scan; the parameter paths are the same either way.
    served = model_config(dataclasses.replace(cfg.model, remat="none", scan_layers=False), tuple(p for p in parts if p != "heads"))
    return dataclasses.replace(served, heads=None), values, cfg, step


def export_run(run: str | Path, out: str | Path, *, step: int | None = None, mesh: jax.sharding.Mesh | None = None) -> Path:
    """Writes the model folder of a run; returns its path. The run's own stage gives its parts
    (at `step`, default the latest); every later stage found in `<run>/<stage>/` (the
    speech tokenizer, talker, flow, vocoder: train/stages.py) adds its parts at its latest step."""
    from hellochat_jax.checkpoint.folder import save_model_folder
    from hellochat_jax.components.hellochat.model import HelloChat
    from hellochat_jax.train import stages

    mesh = mesh if mesh is not None else shd.make_mesh()
    model_cfg, values, cfg, _ = restore_run(run, step, mesh)
    composed = [f"{cfg.stage} ({Path(run)})"]
    for stage in stages.ORDER:
        sub = Path(run) / stage
        if stage == cfg.stage or not (sub / "checkpoints").is_dir() or not _step_dirs(sub / "checkpoints"):
            continue
        part_cfg, part_values, _, part_step = restore_run(sub, None, mesh)
        for part in part_cfg.parts:
            if getattr(model_cfg, part) is not None:
                raise CheckpointError(f"{sub}: part {part!r} was trained by two stages")
            model_cfg = dataclasses.replace(model_cfg, **{part: getattr(part_cfg, part)})
        values.update(part_values)
        composed.append(f"{stage} (step {part_step})")

    model = shd.abstract_model(lambda: HelloChat(model_cfg, rngs=nnx.Rngs(0)))
    _, plain = nnx.split(model)
    missing = []
    for path, var in nnx.to_flat_state(plain):
        key = tuple(str(p) for p in path)
        if key not in values:
            missing.append(".".join(key))
            continue
        var.set_value(values.pop(key))
    if missing or values:
        raise CheckpointError(f"{run}: does not match its config: missing {missing[:8]}, unexpected {list(values)[:8]}")
    nnx.update(model, plain)

    tokenizer, prompt = None, {}
    if cfg.data.source == "corpus":
        from hellochat_jax.train.corpus import pipeline_config

        from hellochat_jax.data import pipeline

        pipeline_cfg = pipeline_config(cfg)
        tokenizer = pipeline.tokenizer_path(pipeline_cfg)
        prompt = {"system": pipeline_cfg.system_prompt}
    # The talker reads text with the corpus tokenizer too (plus CosyVoice 2's special tokens,
    # added when it is loaded).
    talker_tokenizer = tokenizer if model_cfg.talker is not None else None
    print(f"model folder parts: {', '.join(composed)}")
    return save_model_folder(model, out, thinker_tokenizer=tokenizer, talker_tokenizer=talker_tokenizer, prompt=prompt)


def _merged_variables(model: nnx.Module) -> dict[tuple, jax.Array]:
    """Flat {path: array} of a trained model, each LoRA layer's low-rank update folded into its
    kernel (W + alpha / r * A B) and its adapter variables dropped."""
    from hellochat_jax.train.lora import LoRALinear

    out = {tuple(str(p) for p in path): var.get_value() for path, var in nnx.to_flat_state(nnx.state(model))}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, LoRALinear):
            key = tuple(str(p) for p in path)
            a, b = out.pop(key + ("lora_a",)), out.pop(key + ("lora_b",))
            kernel = out[key + ("kernel",)]
            out[key + ("kernel",)] = (kernel + node.scale * (a.astype(kernel.dtype) @ b.astype(kernel.dtype))).astype(kernel.dtype)
    return out
