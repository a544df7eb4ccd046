"""Test helpers for training stages (train/stages.py)."""

from __future__ import annotations

import types
from typing import Any


def first_batch_matching_spec(data: Any) -> dict[str, Any]:
    """The first batch of a stage's data source, checked against its `local_spec`: the same
    keys, each with the declared shape and dtype (the trainer compiles the step for them)."""
    batch = next(data.iterator())
    spec = data.local_spec()
    assert set(batch) == set(spec)
    for k, s in spec.items():
        assert batch[k].shape == s.shape and batch[k].dtype == s.dtype, k
    return batch


def stage_config(stage: str, corpus: Any, batch_size: int, options: dict[str, Any], **fields: Any) -> types.SimpleNamespace:
    """The part of a TrainConfig that a stage's data source reads: its name, the corpus, the
    batch size, the seed and its options (plus any other `fields`, e.g. `model`)."""
    data = types.SimpleNamespace(corpus={"dataset": str(corpus)}, batch_size=batch_size)
    return types.SimpleNamespace(stage=stage, data=data, seed=0, options=options, **fields)
