"""Training stages: what one `hellochat train` run trains, on what data, with which loss.

Hello-Chat is trained in stages (CosyVoice 2's recipe for the talker, scaled down), each
through the same trainer (sharded, Orbax exact resume, SIGTERM-safe, metrics, TensorBoard):

    stage             parts built          data                                   loss
    thinker           thinker              the interleaved chat corpus            next-token CE (+ encoder CTC)
    speech_tokenizer  speech_tokenizer,    corpus speech + transcripts            CTC through the FSQ bottleneck
                      heads
    talker            talker               reply text -> reply speech tokens      the speech LM's CE
    flow              flow                 reply speech tokens -> reply mel       conditional flow matching
    hift              hift                 reply mel -> reply waveform            multi-resolution STFT + mel + F0

A config names its stage (`stage:`) and may hold a `stages:` section per stage whose keys
override the rest of the file for that stage (`hellochat train --config tiny --stage flow`).
A stage's run folder is `<run_dir>/<stage>` for every stage but the thinker, so one run
folder holds the whole model and `hellochat export --run` composes it.

A stage module provides `STAGE`; its data source and objective follow the protocols below.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any, Protocol

import grain
import jax
import numpy as np

from hellochat_jax.core.config import ConfigError

# stage -> the module that defines it (imported on use: a stage's dependencies load only when run)
STAGE_MODULES = {
    "thinker": "hellochat_jax.train.thinker_stage",
    "speech_tokenizer": "hellochat_jax.train.tokenizer_stage",
    "talker": "hellochat_jax.train.talker_stage",
    "flow": "hellochat_jax.train.flow_stage",
    "hift": "hellochat_jax.train.hift_stage",
}
ORDER = tuple(STAGE_MODULES)  # the order the main job runs them in


class StageData(Protocol):
    """Per-process micro-batches (see train/data.py): fixed shapes, checkpointable iterator."""

    task_names: tuple[str, ...]

    def iterator(self) -> grain.DatasetIterator: ...

    def local_spec(self) -> dict[str, jax.ShapeDtypeStruct]: ...

    # optional: prepare(batch) -> batch (host-side), evaluator(trainer) -> callable(model) -> {"eval/...": float}


class Objective(Protocol):
    """The step loss. Losses are SUMS over what they cover divided by normalisers computed from
    the whole step's batch (all micro-batches) before any forward pass, so gradient accumulation
    gives exactly the big-batch gradient."""

    def normalizers(self, batch: dict[str, jax.Array]) -> dict[str, jax.Array]: ...  # batch: [accum, rows, ...]

    def __call__(self, model: Any, micro: dict[str, jax.Array], key: jax.Array,
                 norms: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]: ...

    def record(self, stats: dict[str, np.ndarray]) -> dict[str, float]: ...  # host: the stage's metrics


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    # HelloChat parts this stage builds and trains (the others are None), or cfg -> those parts
    parts: tuple[str, ...] | Callable[[Any], tuple[str, ...]]
    data: Callable[..., StageData]  # (cfg, process_index, process_count)
    objective: Callable[..., Objective]  # (cfg, data)
    options: type | None = None  # the dataclass of this stage's `options:` section


def get(name: str) -> Stage:
    if name not in STAGE_MODULES:
        raise ConfigError(f"unknown stage {name!r}; the stages are {list(STAGE_MODULES)}")
    return importlib.import_module(STAGE_MODULES[name]).STAGE


def parts_of(stage: Stage, cfg: Any) -> tuple[str, ...]:
    return stage.parts(cfg) if callable(stage.parts) else stage.parts


def options(cfg: Any, stage: Stage) -> Any:
    """The stage's typed `options:` section."""
    from hellochat_jax.core.config import from_dict

    if stage.options is None:
        if cfg.options:
            raise ConfigError(f"options: stage {stage.name!r} takes no options, got {sorted(cfg.options)}")
        return None
    return from_dict(stage.options, dict(cfg.options), where=f"stages.{stage.name}.options")


# ----------------------------------------------------------------------------- corpus records


def corpus_records(cfg: Any, make_row: Callable[[dict[str, Any], np.random.Generator], dict[str, np.ndarray] | None],
                   process_index: int, process_count: int, *, split: str = "train", seed_offset: int = 0) -> grain.DatasetIterator:
    """This process's rows of each global micro-batch from the corpus records: shuffled,
    repeated, `make_row(record, rng)` (None drops a record), batched to the per-process rows.
    The iterator is grain's, so its position is saved with every checkpoint."""
    from hellochat_jax.data import builders

    dataset = cfg.data.corpus.get("dataset", "hellochat_synth")
    data_dir = cfg.data.corpus.get("data_dir") or None
    source = builders.open_source(dataset, split, data_dir)
    rows = cfg.data.batch_size // process_count
    ds = grain.MapDataset.source(source)[process_index::process_count]
    epoch = len(ds)
    ds = ds.shuffle(seed=cfg.seed + seed_offset).repeat(None)
    ds = ds.random_map(_Row(make_row, patience=epoch, stage=cfg.stage), seed=cfg.seed + seed_offset)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4 * rows))
    it = it.filter(lambda r: r is not None).batch(rows, batch_fn=_stack)
    return iter(it)


class _Row(grain.transforms.RandomMap):
    """`make_row` on one record. A whole epoch of dropped records in a row means that none can
    pass the stage's filters (e.g. its max_text/max_speech): without this the batcher would
    wait forever for a row."""

    def __init__(self, fn, patience: int, stage: str):
        self.fn, self.patience, self.stage = fn, max(patience, 1), stage
        self.dropped = 0  # in a row; grain's reader threads may race on it, which only blurs the count

    def random_map(self, record, rng: np.random.Generator):
        row = self.fn(record, rng)
        self.dropped = 0 if row is not None else self.dropped + 1
        if self.dropped >= self.patience:
            from hellochat_jax.core.config import ConfigError

            raise ConfigError(f"stage {self.stage}: no corpus record fits its limits ({self.dropped} dropped in a row); "
                              "raise the stage's length limits or rebuild the corpus")
        return row


def _stack(rows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def text(x: Any) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def reply_style(record: dict[str, Any]) -> str | None:
    """The style a corpus record's reply is spoken in: the one that fits the user's emotion
    (synth.STYLE_FOR_EMOTION), None without one."""
    from hellochat_jax.data.synth import STYLE_FOR_EMOTION

    return STYLE_FOR_EMOTION.get(text(record["emotion"]).strip())


def pcm(x: Any) -> np.ndarray:
    """Stored int16 PCM -> float32 in [-1, 1)."""
    return np.asarray(x, np.int16).astype(np.float32) / 32768.0


def pad_to(x: np.ndarray, length: int, value: float | int = 0) -> np.ndarray:
    """Right-pads (or cuts) the first axis to `length`."""
    x = np.asarray(x)
    if len(x) >= length:
        return x[:length]
    return np.concatenate([x, np.full((length - len(x),) + x.shape[1:], value, x.dtype)])


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)
