"""The training config: one typed tree, filled from configs/*.yaml plus ``key=value`` overrides.

Everything that can be wrong with a config (an unknown key, a mesh that does not divide the
devices, a batch that does not divide the batch axes) is reported by `validate` before any
array is created, so a bad run fails in seconds, not after a compile.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from hellochat_jax.components.hellochat.model import PARAM_GROUPS
from hellochat_jax.components.qwen2.model import Qwen2Config
from hellochat_jax.core import config as config_lib
from hellochat_jax.core.config import ConfigError
from hellochat_jax.core.sharding import MESH_AXES, MeshConfig

GROUPS = tuple(PARAM_GROUPS)  # the names freezing, LoRA and init_from use


@dataclasses.dataclass
class LoRAConfig:
    """Low-rank adapters on the named Linear layers of the groups listed; their base weights
    are frozen, only the adapters train."""

    groups: list[str] = dataclasses.field(default_factory=lambda: ["thinker"])
    rank: int = 8
    alpha: float = 16.0
    targets: list[str] = dataclasses.field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclasses.dataclass
class ModelConfig:
    """Which components exist and which of them train.

    `encoder`/`adapter`/`talker`/`flow`/`hift`/`speech_tokenizer`/`heads` take the component's own
    config fields (DashengConfig, AudioAdapter widths, SpeechTokenLMConfig, FlowConfig, HiFTConfig,
    S3TokenizerConfig, HeadsConfig); null leaves the component out. A run builds only the parts
    its stage trains (train/stages.py), but every section rides along in its checkpoints. `dtype`,
    `param_dtype`, `remat` and `scan_layers` apply to every component: bfloat16 `dtype` with
    float32 `param_dtype` is bf16 compute on f32 master weights.
    """

    thinker: Qwen2Config = dataclasses.field(default_factory=Qwen2Config)
    encoder: dict[str, Any] | None = None
    adapter: dict[str, Any] | None = None
    talker: dict[str, Any] | None = None
    flow: dict[str, Any] | None = None
    hift: dict[str, Any] | None = None
    speech_tokenizer: dict[str, Any] | None = None
    heads: dict[str, Any] | None = None
    audio_token_id: int | None = None  # placeholder id whose embeddings the adapter output replaces
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"  # none | full | dots | dots_no_batch
    scan_layers: bool = False
    frozen: list[str] = dataclasses.field(default_factory=list)  # groups that do not train
    lora: LoRAConfig | None = None
    init_from: dict[str, str] = dataclasses.field(default_factory=dict)  # group -> converted checkpoint dir


@dataclasses.dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay to `end_lr_ratio * lr`."""

    lr: float = 3e-4
    warmup_steps: int = 100
    decay_steps: int | None = None  # optimizer updates until the end of the cosine; None: `steps`
    end_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    # Parameters whose path contains one of these names get no weight decay (norms, biases).
    no_decay: list[str] = dataclasses.field(default_factory=lambda: ["bias", "scale", "norm"])
    clip_norm: float | None = 1.0
    grad_accum: int = 1  # micro-batches per optimizer update (optax.MultiSteps)


@dataclasses.dataclass
class SyntheticDataConfig:
    """An in-memory token task (copy/reverse with task ids) for tests and benchmarks: it needs
    no corpus and has the same batch layout as the real pipeline."""

    vocab_size: int = 64
    num_tasks: int = 2
    delay_s: float = 0.0  # simulated input latency per batch (exercises the data-wait metric)


@dataclasses.dataclass
class DataConfig:
    """`batch_size` is the GLOBAL batch of one micro-step (all processes together)."""

    source: str = "synthetic"  # synthetic | corpus
    batch_size: int = 8
    seq_len: int = 64
    synthetic: SyntheticDataConfig = dataclasses.field(default_factory=SyntheticDataConfig)
    corpus: dict[str, Any] = dataclasses.field(default_factory=dict)  # the data pipeline's own config


@dataclasses.dataclass
class CheckpointConfig:
    dir: str | None = None  # default: <run_dir>/checkpoints
    every: int = 100  # optimizer updates between saves (0: only at the end)
    keep: int = 3
    async_save: bool = True


@dataclasses.dataclass
class EvalConfig:
    every: int = 0  # optimizer updates between evaluations; 0: off
    num_examples: int = 64
    batch_size: int = 16
    max_new_tokens: int = 32
    at_end: bool = True


@dataclasses.dataclass
class LogConfig:
    every: int = 1
    tensorboard: bool = True
    jsonl: bool = True
    progress: bool = True
    # Peak FLOP/s of ONE device for MFU; None: a table for known accelerators, a measured
    # matmul peak on CPU.
    peak_flops: float | None = None
    plot: bool = True


@dataclasses.dataclass
class DistributedConfig:
    """Multi-process runs: jax.distributed.initialize arguments (null: auto-detect on
    TPU/SLURM, or a single process)."""

    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: list[int] | None = None
    cpu_collectives: str | None = None  # "gloo" for multi-process CPU runs


@dataclasses.dataclass
class TrainConfig:
    stage: str = "thinker"  # what this run trains (train/stages.py)
    stages: dict[str, Any] = dataclasses.field(default_factory=dict)  # stage -> overrides of this file
    options: dict[str, Any] = dataclasses.field(default_factory=dict)  # the stage's own settings
    seed: int = 0
    steps: int = 1000  # optimizer updates
    run_dir: str = "runs/default"
    max_bad_steps: int = 10  # consecutive non-finite steps that stop the run
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    rules: dict[str, Any] | None = None  # logical name -> mesh axis/axes/null; overrides the defaults
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else Path(self.run_dir) / "checkpoints"

    @property
    def decay_steps(self) -> int:
        return self.optim.decay_steps if self.optim.decay_steps is not None else self.steps


def load(path: str | Path | None, overrides: list[str] | None = None, stage: str | None = None) -> TrainConfig:
    """Reads and type-checks a config (no devices touched); `validate` checks it against them.

    With a `stage` (or `stage=` among the overrides) the file's `stages.<stage>` section is
    merged over the rest of the file before the overrides; a stage other than the thinker runs
    in `<run_dir>/<stage>` unless its section names a run_dir."""
    data = config_lib.load_dict(path)
    update = config_lib.parse_overrides(overrides or [])
    stage = stage or update.get("stage") or data.get("stage") or "thinker"
    if "stages" in update:  # `stages.<name>.key=value` overrides reach that stage's section
        data = config_lib.merge(data, {"stages": update["stages"]})
    from hellochat_jax.train import stages as stages_lib

    if stage not in stages_lib.STAGE_MODULES:
        raise ConfigError(f"unknown stage {stage!r}; the stages are {list(stages_lib.STAGE_MODULES)}")
    unknown = sorted(set(data.get("stages") or {}) - set(stages_lib.STAGE_MODULES))
    if unknown:
        raise ConfigError(f"stages: unknown stage(s) {unknown}; the stages are {list(stages_lib.STAGE_MODULES)}")
    section = (data.get("stages") or {}).get(stage) or {}
    if not isinstance(section, dict):
        raise ConfigError(f"stages.{stage}: expected a mapping of overrides")
    merged = config_lib.merge(data, section)
    if stage != data.get("stage", "thinker"):
        # options are the stage's own: the file's top-level ones belong to the file's stage
        merged["options"] = dict(section.get("options") or {})
    merged = config_lib.merge(merged, update)
    if stage != "thinker" and "run_dir" not in section:
        # the whole model's run folder (from the file or an override) holds each stage's run
        merged["run_dir"] = str(Path(merged.get("run_dir", TrainConfig.run_dir)) / stage)
    merged["stage"] = stage
    cfg = config_lib.from_dict(TrainConfig, merged, where=str(path or "config"))
    check_static(cfg)
    return cfg


def check_static(cfg: TrainConfig) -> None:
    """Checks that need no devices."""
    m, o, d = cfg.model, cfg.optim, cfg.data
    for name in m.frozen + (m.lora.groups if m.lora else []) + list(m.init_from):
        if name not in GROUPS:
            raise ConfigError(f"model: unknown component group {name!r}; the groups are {GROUPS}")
    if m.lora and set(m.lora.groups) & set(m.frozen):
        raise ConfigError(f"model: groups {sorted(set(m.lora.groups) & set(m.frozen))} are both frozen and LoRA-adapted")
    if (m.encoder is None) != (m.adapter is None):
        raise ConfigError("model: encoder and adapter come together (both set or both null)")
    if m.encoder is not None and m.audio_token_id is None:
        raise ConfigError("model: an audio encoder needs model.audio_token_id (the <|AUDIO|> placeholder id)")
    if m.remat not in ("none", "full", "dots", "dots_no_batch"):
        raise ConfigError(f"model.remat={m.remat!r}; choose none, full, dots or dots_no_batch")
    for key in ("dtype", "param_dtype"):
        if getattr(m, key) not in ("float32", "bfloat16"):
            raise ConfigError(f"model.{key}={getattr(m, key)!r}; choose float32 or bfloat16")
    from hellochat_jax.train import stages as stages_lib

    stage = stages_lib.get(cfg.stage)
    stages_lib.options(cfg, stage)  # the stage's options, type-checked
    for part in stages_lib.parts_of(stage, cfg):
        if part not in ("thinker", "heads") and getattr(m, part, None) is None:
            raise ConfigError(f"stage {cfg.stage!r} trains model.{part}, but the config has no model.{part} section")
    if cfg.steps <= 0:
        raise ConfigError(f"steps={cfg.steps}: must be positive")
    if o.grad_accum < 1:
        raise ConfigError(f"optim.grad_accum={o.grad_accum}: must be >= 1")
    if o.warmup_steps < 0 or o.warmup_steps > cfg.decay_steps:
        raise ConfigError(f"optim.warmup_steps={o.warmup_steps} must lie in [0, decay_steps={cfg.decay_steps}]")
    if d.source not in ("synthetic", "corpus"):
        raise ConfigError(f"data.source={d.source!r}; choose synthetic or corpus")
    if d.batch_size <= 0 or d.seq_len <= 1:
        raise ConfigError(f"data: batch_size={d.batch_size} and seq_len={d.seq_len} must be positive (seq_len > 1)")
    if d.source == "synthetic" and d.synthetic.vocab_size > m.thinker.vocab_size:
        raise ConfigError(
            f"data.synthetic.vocab_size={d.synthetic.vocab_size} exceeds model.thinker.vocab_size={m.thinker.vocab_size}"
        )
    from hellochat_jax.train.model import encoder_config, talker_config

    if m.encoder is not None:
        encoder_config(m)  # the component configs, type-checked
    if m.talker is not None:
        talker_config(m)
    if d.source == "corpus" and cfg.stage == "thinker":
        from hellochat_jax.train.corpus import pipeline_config

        pipeline_config(cfg)  # the pipeline's own fields, type-checked
    if cfg.max_bad_steps < 1:
        raise ConfigError(f"max_bad_steps={cfg.max_bad_steps}: must be >= 1")
    for axis in MESH_AXES:
        size = getattr(cfg.mesh, axis)
        if size == 0 or size < -1:
            raise ConfigError(f"mesh.{axis}={size}: sizes are positive or -1")


def batch_axes_size(mesh_shape: dict[str, int], rules: Any) -> int:
    """How many ways the rules split the batch dimension on this mesh."""
    table: dict[str, Any] = {}
    for name, axes in rules:
        table.setdefault(name, axes)
    axes = table.get("batch")
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    return math.prod(mesh_shape[a] for a in axes)


def validate(cfg: TrainConfig, num_devices: int, num_processes: int = 1) -> dict[str, int]:
    """Checks the config against the devices; returns the resolved mesh shape."""
    from hellochat_jax.core.sharding import rules_from_config

    sizes = {a: getattr(cfg.mesh, a) for a in MESH_AXES}
    if sum(s == -1 for s in sizes.values()) > 1:
        raise ConfigError(f"mesh {sizes}: at most one axis may be -1")
    known = math.prod(s for s in sizes.values() if s != -1)
    if num_devices % known:
        raise ConfigError(f"mesh {sizes} does not divide the {num_devices} available devices")
    resolved = {a: (num_devices // known if s == -1 else s) for a, s in sizes.items()}
    if math.prod(resolved.values()) != num_devices:
        raise ConfigError(f"mesh {resolved} needs {math.prod(resolved.values())} devices, but {num_devices} are available")
    rules = rules_from_config(cfg.rules)
    ways = batch_axes_size(resolved, rules)
    if cfg.data.batch_size % ways:
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size} does not divide over the batch axes of mesh {resolved} "
            f"({ways} ways); use a multiple of {ways}"
        )
    if cfg.data.batch_size % num_processes:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} does not divide over {num_processes} processes")
    return resolved
