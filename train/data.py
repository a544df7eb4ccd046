"""What the trainer reads: per-process micro-batches from a checkpointable grain iterator.

A source provides `task_names`, `iterator()` (a grain `DatasetIterator` over this process's
rows of each global micro-batch, as dicts of numpy arrays), `local_spec()` (the shapes of
the arrays the model reads; other keys in a batch are ignored) and optionally `prepare(batch)`
(a deterministic host-side transform applied to each batch after the iterator). The trainer stacks
`grad_accum` micro-batches and assembles global arrays with
`jax.make_array_from_process_local_data`, so every process feeds only its own shard.

Batch layout (the data pipeline's, hellochat_jax/data/pipeline.py; [rows, seq_len] unless noted):
    input_ids, targets   int32; targets[t] is the token after input_ids[t] in the same sample
    loss_mask            float32; 1 where targets[t] is an assistant token
    segment_ids          int32; packed samples 1, 2, ...; 0 = padding
    positions            int32; restart at 0 in every packed sample
    task_id              int32; index into `task_names` of each position's sample
    audio [rows, clips, samples] float32, audio_lengths [rows, clips] int32   (audio encoder)
    bad_records, too_long [rows] int32   records the pipeline skipped (counted in the metrics)
    speech_ids, speech_kinds, speech_targets [rows, speech_len]                (talker)
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import grain
import jax
import numpy as np
from hellochat_jax.train.config import DataConfig
from jax.sharding import Mesh, NamedSharding

from hellochat_jax.core import sharding as shd


class TrainData(Protocol):
    task_names: tuple[str, ...]

    def iterator(self) -> grain.DatasetIterator: ...

    def local_spec(self) -> dict[str, jax.ShapeDtypeStruct]: ...


# ----------------------------------------------------------------------------- synthetic source

PAD, SEP, EOS = 0, 1, 2
FIRST_TASK_TOKEN = 3


class SyntheticData:
    """Packed rows of tiny seq2seq tasks: ``[task] x1..xn [SEP] y1..yn [EOS]`` where y is x
    copied, reversed, sorted or rotated (one task each); the loss covers y and EOS.

    Every row is a pure function of (seed, global batch index, global row), so the stream is
    deterministic, resumable and splits across processes by rows.
    """

    TASKS = ("copy", "reverse", "sort", "shift")

    def __init__(self, cfg: DataConfig, seed: int, process_index: int = 0, process_count: int = 1):
        s = cfg.synthetic
        if not 1 <= s.num_tasks <= len(self.TASKS):
            raise ValueError(f"data.synthetic.num_tasks must lie in [1, {len(self.TASKS)}]")
        self.cfg = cfg
        self.seed = seed
        self.task_names = self.TASKS[: s.num_tasks]
        self.first_content = FIRST_TASK_TOKEN + s.num_tasks
        if s.vocab_size <= self.first_content + 2:
            raise ValueError(f"data.synthetic.vocab_size={s.vocab_size} leaves no content tokens")
        self.rows = cfg.batch_size // process_count
        self.row_offset = process_index * self.rows

    def _row(self, batch_index: int, row: int) -> dict[str, np.ndarray]:
        t = self.cfg.seq_len
        rng = np.random.default_rng([self.seed, batch_index, row])
        ids = np.full(t + 1, PAD, np.int32)
        mask = np.zeros(t + 1, np.float32)
        seg = np.zeros(t + 1, np.int32)
        pos = np.zeros(t + 1, np.int32)
        task = np.zeros(t + 1, np.int32)
        at, k = 0, 1
        while True:
            n = int(rng.integers(2, max(3, min(12, (t - 3) // 2))))
            need = 2 * n + 3
            if at + need > t + 1:
                break
            task_id = int(rng.integers(0, len(self.task_names)))
            x = rng.integers(self.first_content, self.cfg.synthetic.vocab_size, n).astype(np.int32)
            y = {0: x, 1: x[::-1], 2: np.sort(x), 3: np.roll(x, 1)}[task_id]
            sample = np.concatenate([[FIRST_TASK_TOKEN + task_id], x, [SEP], y, [EOS]]).astype(np.int32)
            sl = slice(at, at + need)
            ids[sl], seg[sl], pos[sl], task[sl] = sample, k, np.arange(need), task_id
            # position i predicts sample[i + 1]: learned from SEP (predicting y1) to y_n (predicting EOS)
            mask[at + n + 1 : at + need - 1] = 1.0
            at, k = at + need, k + 1
        return {
            "input_ids": ids[:t],
            "targets": np.where(seg[1:] == seg[:t], ids[1:], PAD).astype(np.int32),
            "loss_mask": mask[:t],
            "segment_ids": seg[:t],
            "positions": pos[:t],
            "task_id": task[:t],
        }

    def batch(self, batch_index: int) -> dict[str, np.ndarray]:
        """This process's rows of global micro-batch `batch_index`."""
        if self.cfg.synthetic.delay_s:
            time.sleep(self.cfg.synthetic.delay_s)
        rows = [self._row(batch_index, self.row_offset + r) for r in range(self.rows)]
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

    def iterator(self) -> grain.DatasetIterator:
        ds = grain.MapDataset.range(2**40).map(self.batch)
        return iter(ds.to_iter_dataset(read_options=grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)))

    def local_spec(self) -> dict[str, jax.ShapeDtypeStruct]:
        shape = (self.rows, self.cfg.seq_len)
        i32, f32 = np.dtype(np.int32), np.dtype(np.float32)
        names = {"input_ids": i32, "targets": i32, "loss_mask": f32, "segment_ids": i32, "positions": i32, "task_id": i32}
        return {k: jax.ShapeDtypeStruct(shape, dt) for k, dt in names.items()}

    def eval_examples(self, n: int) -> list[dict[str, Any]]:
        """Held-out prompts (from batch indices training never reaches) with their answers."""
        out = []
        for i in range(n):
            row = self._row(2**41 + i, 0)
            first = row["segment_ids"] == 1
            ids, mask = row["input_ids"][first], row["loss_mask"][first]
            start = int(np.argmax(mask > 0))  # the SEP position: the prompt ends with it
            answer = ids[start + 1 :]
            out.append({"task": self.task_names[int(row["task_id"][0])], "prompt": ids[: start + 1], "answer": answer})
        return out


# ----------------------------------------------------------------------------- global arrays


def stacked_spec(local: dict[str, jax.ShapeDtypeStruct], accum: int, process_count: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Global shapes of one train step's input: [accum, global rows, ...]."""
    return {k: jax.ShapeDtypeStruct((accum, v.shape[0] * process_count, *v.shape[1:]), v.dtype) for k, v in local.items()}


def input_shardings(spec: dict[str, jax.ShapeDtypeStruct], mesh: Mesh, rules: shd.Rules) -> dict[str, NamedSharding]:
    """Rows over the batch axes; the accumulation axis and everything else replicated."""
    return {
        k: shd.logical_sharding((None, "batch") + (None,) * (len(v.shape) - 2), v.shape, mesh, rules)
        for k, v in spec.items()
    }


def to_global(micro_batches: list[dict[str, np.ndarray]], spec: dict[str, jax.ShapeDtypeStruct],
              shardings: dict[str, NamedSharding]) -> dict[str, jax.Array]:
    """Stacks this process's micro-batches and assembles the global step input."""
    out = {}
    for k, s in spec.items():
        local = np.stack([np.asarray(b[k]) for b in micro_batches])
        if local.dtype != s.dtype:
            local = local.astype(s.dtype)
        out[k] = jax.make_array_from_process_local_data(shardings[k], local, s.shape)
    return out
