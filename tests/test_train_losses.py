"""The trainer's talker loss is the speech LM's verified loss (the cosyvoice2-llm fixture's
train_loss), with the talker config's label smoothing and length normalisation, also when a
step is split into accumulated micro-batches."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from hellochat_jax.components.speech_lm.model import speech_token_loss
from hellochat_jax.train.losses import Objective


@dataclasses.dataclass
class FixedTalker:
    """Stands in for a SpeechTokenLM: returns fixed logits, carries the loss settings."""

    logits: jnp.ndarray
    cfg: object

    def __call__(self, ids, kinds):
        return self.logits, None


@dataclasses.dataclass
class LossSettings:
    lsm_weight: float
    length_normalized_loss: bool


def batch(rows: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(rows, 12, 17)).astype(np.float32)
    targets = rng.integers(0, 17, size=(rows, 12))
    for r in range(rows):  # right padding of different lengths, as the reference's batches
        targets[r, rng.integers(3, 12):] = -1
    return jnp.asarray(logits), jnp.asarray(targets, jnp.int32)


@pytest.mark.parametrize("lsm_weight", [0.0, 0.1])
@pytest.mark.parametrize("length_normalized", [True, False])
def test_talker_loss_is_the_speech_lm_loss(lsm_weight, length_normalized):
    logits, targets = batch(4)
    settings = LossSettings(lsm_weight, length_normalized)
    want, _ = speech_token_loss(logits, targets, lsm_weight=lsm_weight, length_normalized=length_normalized)
    objective = Objective(("t0",))
    step = {"speech_targets": targets[None]}  # [accum=1, rows, T]
    micro = {"speech_ids": None, "speech_kinds": None, "speech_targets": targets}
    got, stats = objective.talker_loss(FixedTalker(logits, settings), micro, _norms(objective, step))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert stats["talker_tokens"] == int(jnp.sum(targets != -1))


def test_accumulated_micro_batches_sum_to_the_whole_batch_loss():
    logits, targets = batch(4, seed=1)
    settings = LossSettings(0.1, False)
    want, _ = speech_token_loss(logits, targets, lsm_weight=0.1, length_normalized=False)
    objective = Objective(("t0",), remat=True)
    norms = _norms(objective, {"speech_targets": targets.reshape(2, 2, -1)})
    got = sum(
        objective.talker_loss(FixedTalker(logits[i:i + 2], settings), {"speech_ids": None, "speech_kinds": None, "speech_targets": targets[i:i + 2]}, norms)[0]
        for i in (0, 2)
    )
    np.testing.assert_allclose(got, want, rtol=1e-6)


def _norms(objective: Objective, step: dict) -> dict:
    """The step normalisers from the speech targets alone (the thinker's need loss_mask)."""
    return objective.normalizers({"loss_mask": jnp.ones((1,)), **step})
