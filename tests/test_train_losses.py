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


def _brute_force_ctc(log_probs: np.ndarray, labels: list[int], blank: int) -> float:
    """-log of the summed probability of every frame-level path that collapses to `labels`."""
    import itertools

    total = 0.0
    for path in itertools.product(range(log_probs.shape[1]), repeat=log_probs.shape[0]):
        collapsed = [p for i, p in enumerate(path) if p != blank and (i == 0 or p != path[i - 1])]
        if collapsed == labels:
            total += np.exp(sum(log_probs[t, p] for t, p in enumerate(path)))
    return -np.log(total)


def test_adapter_ctc_reads_the_audio_rows_through_the_token_embeddings_with_the_placeholder_as_blank():
    """Each clip's CTC over its own adapter rows, logits = rows . embedding table, blank = the
    `<|AUDIO|>` id; clips without words, or with more words than rows, add nothing."""
    from types import SimpleNamespace

    from hellochat_jax.components.dasheng.model import FRAMES_PER_PATCH

    rng = np.random.default_rng(0)
    vocab, width, audio_id = 4, 3, 2
    table = rng.normal(size=(vocab, width)).astype(np.float32)
    embed = SimpleNamespace(attend=lambda x: x @ table.T)
    cfg = SimpleNamespace(audio_token_id=audio_id, subsample_factor=1, audio_encoder=SimpleNamespace(hop_size=1))
    model = SimpleNamespace(thinker=SimpleNamespace(cfg=cfg, decoder=SimpleNamespace(model=SimpleNamespace(embed_tokens=embed))))
    rows = rng.normal(size=(4, 4, width)).astype(np.float32)  # 4 clips, up to 4 rows each
    n_rows = np.asarray([4, 3, 4, 1])
    lengths = n_rows * FRAMES_PER_PATCH - 1  # (1 + samples // hop) // frames per patch = n_rows
    labels = np.asarray([[1, 3, 0], [3, 3, 0], [0, 0, 0], [1, 3, 0]], np.int32)
    n_labels = np.asarray([2, 2, 0, 2], np.int32)  # clip 2 has no words, clip 3 more words than rows
    batch = {"audio_lengths": jnp.asarray(lengths[None]), "ctc_labels": jnp.asarray(labels[None]),
             "ctc_label_lengths": jnp.asarray(n_labels[None])}
    got, counted = Objective(("t0",), adapter_ctc_weight=1.0).adapter_ctc(model, jnp.asarray(rows), batch)

    want = 0.0
    for clip in (0, 1):
        logits = rows[clip, : n_rows[clip]] @ table.T
        log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        want += _brute_force_ctc(log_probs, labels[clip, : n_labels[clip]].tolist(), audio_id)
    np.testing.assert_allclose(float(got), want, rtol=1e-4)
    assert float(counted) == 4.0


def test_an_events_logit_is_its_loudest_frames_within_the_clip():
    """The encoder's event classifier scores each frame and keeps each event's highest frame
    (a 0.1 s beep is a few of 250 frames: a mean would wash it out); frames past a clip's end
    do not count. Emotion stays on the mean of the clip's frames."""
    from types import SimpleNamespace

    from hellochat_jax.components.dasheng.model import FRAMES_PER_PATCH

    heads = SimpleNamespace(encoder_events=lambda x: x, encoder_emotion=lambda x: jnp.concatenate([x, -x], -1))
    model = SimpleNamespace(thinker=SimpleNamespace(audio_encoder=SimpleNamespace(cfg=SimpleNamespace(hop_size=1))),
                            heads=heads)
    # one clip of 3 valid frames (feature = the event's logit), then padding that would win
    features = jnp.asarray([[[0.0], [5.0], [1.0], [100.0]]])
    batch = {"audio_lengths": jnp.asarray([3 * FRAMES_PER_PATCH - 1]), "clip_emotion": jnp.asarray([0]),
             "clip_events": jnp.asarray([[1]])}
    out = Objective(("asr",)).encoder_labels(model, features, batch)
    np.testing.assert_allclose(out["encoder_events_bce"], np.log1p(np.exp(-5.0)), rtol=1e-5)
    mean = 2.0  # (0 + 5 + 1) / 3
    np.testing.assert_allclose(out["encoder_emotion_ce"], np.log1p(np.exp(-2 * mean)), rtol=1e-5)


def test_adapter_rows_name_the_events_through_the_thinkers_embedding_table():
    """options.adapter_event_weight: event e's logit is the highest of the clip's adapter rows'
    dot products with the embedding of e's token; rows past the clip's placeholders and
    unclassified events (token -1: "silence") do not count."""
    from types import SimpleNamespace

    from hellochat_jax.components.dasheng.model import FRAMES_PER_PATCH

    table = jnp.asarray([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    cfg = SimpleNamespace(audio_encoder=SimpleNamespace(hop_size=1), subsample_factor=1)
    embed = SimpleNamespace(embedding=table)
    model = SimpleNamespace(thinker=SimpleNamespace(cfg=cfg, decoder=SimpleNamespace(model=SimpleNamespace(embed_tokens=embed))))
    rows = jnp.asarray([[[3.0, 0.0], [0.0, -1.0], [50.0, 50.0]]])  # 2 rows of the clip, then padding
    batch = {"audio_lengths": jnp.asarray([2 * FRAMES_PER_PATCH - 1]), "clip_events": jnp.asarray([[1, 0, 1]])}
    bce, clips = Objective(("asr",), event_token_ids=(1, 2, -1)).adapter_events(model, rows, batch)
    np.testing.assert_allclose(bce, np.log1p(np.exp(-3.0)) + np.log(2.0), rtol=1e-5)
    assert float(clips) == 1.0
    unlabelled = {**batch, "clip_events": jnp.asarray([[-1, -1, -1]])}
    assert float(Objective(("asr",), event_token_ids=(1, 2, -1)).adapter_events(model, rows, unlabelled)[0]) == 0.0
