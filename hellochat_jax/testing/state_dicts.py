"""Comparing torch state dicts, for the converters' bit-exact round-trip tests."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def assert_same_state_dict(ours: Mapping[str, Any], theirs: Mapping[str, Any], *, ordered: bool = True) -> None:
    """Bit for bit: the same keys (in the same order when ``ordered``: a release's own file
    order), dtypes, shapes and values."""
    import torch

    if ordered:
        assert list(ours) == list(theirs), (list(ours), list(theirs))
    else:
        assert sorted(ours) == sorted(theirs), sorted(set(ours) ^ set(theirs))
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype and ours[key].shape == theirs[key].shape, key
        assert torch.equal(ours[key], theirs[key]), key
