"""Test helpers for training stages (train/stages.py)."""

from __future__ import annotations

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
