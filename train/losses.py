"""Training objectives.

Each loss is a SUM over the positions it covers divided by a normaliser computed from the
whole step's batch (all accumulated micro-batches) before any forward pass: the normaliser
depends only on masks, so summing the micro-batches' gradients gives exactly the gradient of
one big batch, whatever `grad_accum` is.

    thinker: next-token cross-entropy on assistant tokens (loss_mask), per task
    talker:  the speech LM's own loss terms (`speech_lm.model.speech_token_terms`: label
             smoothing `lsm_weight`, verified against CosyVoice 2) on speech targets (!= -1),
             normalised by their count (`length_normalized_loss`) or by the rows that have any
             (as CosyVoice 2 divides by its batch size)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from hellochat_jax.components.speech_lm.model import speech_token_terms

IGNORE_ID = -1


def token_cross_entropy(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-position cross-entropy (f32) and whether the target has the top logit; targets < 0
    are safe. (Top-logit comparison instead of argmax: one max reduction, no index search.)"""
    with jax.named_scope("cross_entropy"):  # the op class the benches' --profile reports
        logits = logits.astype(jnp.float32)
        safe = jnp.maximum(targets, 0)
        logz = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
        return logz - picked, picked >= jnp.max(logits, axis=-1)


# Recomputes the cross-entropy in the backward pass: only the logits are kept, not their f32
# exponentials (vocab-sized per token: the largest activation of a big-vocabulary LM).
remat_cross_entropy = jax.checkpoint(token_cross_entropy)


def clip_ctc(logits: jax.Array, frames: jax.Array, batch: dict[str, jax.Array], *, blank_id: int,
             alignable_only: bool = False) -> tuple[jax.Array, jax.Array]:
    """CTC of each clip's words (`ctc_labels` / `ctc_label_lengths`, empty = none) on its
    `frames` valid rows of `logits` [clips, T, V]. Clips without audio or words add nothing; with
    `alignable_only`, neither do clips with more words than frames. Returns (sum over clips,
    their label tokens)."""
    import optax

    lengths = batch["audio_lengths"].reshape(-1)
    labels = batch["ctc_labels"].reshape(lengths.shape[0], -1)
    n_labels = batch["ctc_label_lengths"].reshape(-1)
    logit_pad = (jnp.arange(logits.shape[1])[None, :] >= frames[:, None]).astype(jnp.float32)
    label_pad = (jnp.arange(labels.shape[1])[None, :] >= n_labels[:, None]).astype(jnp.float32)
    per_clip = optax.ctc_loss(logits.astype(jnp.float32), logit_pad, labels, label_pad, blank_id=blank_id)
    has = (n_labels > 0) & (lengths > 0)
    if alignable_only:
        has &= n_labels <= frames
    return jnp.sum(jnp.where(has, per_clip, 0.0)), jnp.sum(jnp.where(has, n_labels, 0)).astype(jnp.float32)


def loudest_step_bce(logits: jax.Array, valid: jax.Array, labels: jax.Array, labelled: jax.Array) -> jax.Array:
    """Multi-label BCE of clips whose class logits are per step [N, T, E]: each class scores by
    its highest valid step (valid [N, T]); summed over classes and over the `labelled` clips
    (labels [N, E], 0/1)."""
    pooled = jnp.max(jnp.where(valid[..., None], logits, -1e9), axis=1)
    bce = jnp.sum(optax.sigmoid_binary_cross_entropy(pooled, jnp.maximum(labels, 0).astype(jnp.float32)), -1)
    return jnp.sum(jnp.where(labelled, bce, 0.0))


class Objective:
    """The step's loss: thinker CE plus, when the model has a talker, weighted speech CE.
    `remat` trades the cross-entropy's saved exponentials for a recomputation (on with any
    `model.remat` policy: memory first; off with `none`: speed first)."""

    def __init__(self, task_names: tuple[str, ...], talker_weight: float = 1.0, remat: bool = False,
                 encoder_ctc_weight: float = 0.0, encoder_label_weight: float = 0.0, adapter_ctc_weight: float = 0.0,
                 adapter_event_weight: float = 0.0, event_token_ids: tuple[int, ...] = ()):
        self.task_names = tuple(task_names)
        self.num_tasks = len(self.task_names)
        self.encoder_ctc_weight = encoder_ctc_weight
        self.adapter_ctc_weight = adapter_ctc_weight
        self.encoder_label_weight = encoder_label_weight
        self.adapter_event_weight = adapter_event_weight
        # per synth.EVENTS entry, the text token its name starts with; -1: not classified
        self.event_token_ids = tuple(event_token_ids)
        self.talker_weight = talker_weight
        self.cross_entropy = remat_cross_entropy if remat else token_cross_entropy
        self.speech_terms = jax.checkpoint(speech_token_terms, static_argnums=(2,)) if remat else speech_token_terms

    def normalizers(self, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """From the stacked step batch [accum, rows, ...]."""
        out = {"thinker": jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)}
        if "ctc_label_lengths" in batch:
            # per label token: an utterance's CTC is a sum over its words
            out["ctc_labels"] = jnp.maximum(jnp.sum(batch["ctc_label_lengths"]).astype(jnp.float32), 1.0)
        if "clip_emotion" in batch:
            real = batch["audio_lengths"] > 0
            out["encoder_emotion_clips"] = jnp.maximum(jnp.sum(real & (batch["clip_emotion"] >= 0)).astype(jnp.float32), 1.0)
            out["encoder_events_clips"] = jnp.maximum(jnp.sum(real & (batch["clip_events"][..., 0] >= 0)).astype(jnp.float32), 1.0)
        if "speech_targets" in batch:
            speech = batch["speech_targets"] != IGNORE_ID
            out["talker"] = jnp.maximum(jnp.sum(speech).astype(jnp.float32), 1.0)
            out["talker_rows"] = jnp.maximum(jnp.sum(jnp.any(speech, axis=-1)).astype(jnp.float32), 1.0)
        return out

    def __call__(self, model, batch: dict[str, jax.Array], key: jax.Array, norms: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, Any]]:
        """One micro-batch -> (its share of the step loss, summed statistics)."""
        del key  # no stochastic layers yet; kept so dropout or flow-matching noise can use it
        use_ctc = self.encoder_ctc_weight > 0 and model.heads is not None and model.heads.encoder_ctc is not None
        embeds, features, clip_rows = model.thinker.embed_rows(batch["input_ids"], batch.get("audio"), batch.get("audio_lengths"),
                                                               return_features=True)
        logits, _ = model.thinker.decoder(inputs_embeds=embeds, attention_mask=batch["segment_ids"], positions=batch["positions"])
        ce, correct = self.cross_entropy(logits, batch["targets"])
        mask = batch["loss_mask"].astype(jnp.float32)
        onehot = jax.nn.one_hot(batch["task_id"], self.num_tasks, dtype=jnp.float32) * mask[..., None]
        stats = {
            "thinker_ce": jnp.sum(ce * mask),
            "thinker_tokens": jnp.sum(mask),
            "thinker_correct": jnp.sum(correct * mask),
            "task_ce": jnp.einsum("bt,btk->k", ce, onehot),
            "task_tokens": jnp.sum(onehot, axis=(0, 1)),
            "input_tokens": jnp.sum(batch["segment_ids"] > 0).astype(jnp.float32),
        }
        if "bad_records" in batch:  # records the data pipeline skipped for this micro-batch
            stats["skipped_records"] = jnp.sum(batch["bad_records"] + batch["too_long"]).astype(jnp.float32)
        loss = stats["thinker_ce"] / norms["thinker"]
        if use_ctc and features is not None:
            ctc, labels = self.encoder_ctc(model, features, batch)
            stats.update(encoder_ctc=ctc, encoder_ctc_labels=labels)
            loss = loss + self.encoder_ctc_weight * ctc / norms["ctc_labels"]
        if self.adapter_ctc_weight and clip_rows is not None and "ctc_labels" in batch:
            ctc, labels = self.adapter_ctc(model, clip_rows, batch)
            stats.update(adapter_ctc=ctc, adapter_ctc_labels=labels)
            loss = loss + self.adapter_ctc_weight * ctc / norms["ctc_labels"]
        if self.encoder_label_weight and features is not None and "clip_emotion" in batch:
            labels = self.encoder_labels(model, features, batch)
            stats.update(labels)
            loss = loss + self.encoder_label_weight * (labels["encoder_emotion_ce"] / norms["encoder_emotion_clips"]
                                                       + labels["encoder_events_bce"] / norms["encoder_events_clips"])
        if self.adapter_event_weight and clip_rows is not None and "clip_events" in batch:
            bce, clips = self.adapter_events(model, clip_rows, batch)
            stats.update(adapter_events_bce=bce, adapter_events_n=clips)
            loss = loss + self.adapter_event_weight * bce / norms["encoder_events_clips"]
        if "talker" in norms and model.talker is not None:
            talker_loss, talker_stats = self.talker_loss(model.talker, batch, norms)
            stats.update(talker_stats)
            loss = loss + self.talker_weight * talker_loss
        return loss, stats

    def encoder_ctc(self, model, features: jax.Array, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        """CTC of each clip's words (`ctc_labels`, empty = none) on the audio encoder's 25 Hz
        features of that clip, from the thinker's own forward. Returns (sum over clips, label tokens)."""
        from hellochat_jax.components.dasheng.model import FRAMES_PER_PATCH

        enc = model.thinker.audio_encoder.cfg
        lengths = batch["audio_lengths"].reshape(-1)
        logits = model.heads.encoder_ctc(features)
        with jax.named_scope("encoder_ctc"):
            return clip_ctc(logits, (1 + lengths // enc.hop_size) // FRAMES_PER_PATCH, batch, blank_id=0)

    def adapter_ctc(self, model, clip_rows: jax.Array, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        """CTC of each clip's words on the adapter's rows themselves, read through the thinker's
        own token-embedding table (logit of token v = row . embedding[v]; the never-read
        `<|AUDIO|>` row is the blank). The encoder's CTC head transcribed held-out clips better
        (WER 0.27) than the thinker did from the same features (0.37): the words were there, the
        LM did not find them. Here each audio row is pulled towards the embedding of the word
        said in it, so the thinker reads audio almost as it reads text. Clips with more words
        than rows are left out (CTC cannot align them). Returns (sum over clips, label tokens)."""
        from hellochat_jax.components.midashenglm.model import audio_token_counts

        cfg = model.thinker.cfg
        rows = audio_token_counts(batch["audio_lengths"].reshape(-1), cfg)
        logits = model.thinker.decoder.model.embed_tokens.attend(clip_rows)
        with jax.named_scope("adapter_ctc"):
            return clip_ctc(logits, rows, batch, blank_id=cfg.audio_token_id, alignable_only=True)

    def adapter_events(self, model, clip_rows: jax.Array, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        """Event BCE of each labelled clip on the adapter's rows read through the thinker's own
        embedding table: event e's logit is the highest row's dot product with the embedding of
        the token that starts e's name in an answer. The encoder hears knocks (its classifier
        found 26 of 33 held out) that the thinker did not name (4 of 33): as CTC on these rows
        did for words, a row where a knock sounds comes to look like the word the thinker
        answers with. Returns (sum over clips, labelled clips)."""
        from hellochat_jax.components.midashenglm.model import audio_token_counts

        columns = [i for i, t in enumerate(self.event_token_ids) if t >= 0]
        table = model.thinker.decoder.model.embed_tokens.embedding[...]
        names = jnp.take(table, jnp.asarray([self.event_token_ids[i] for i in columns], jnp.int32), axis=0)  # [E, H]
        rows = audio_token_counts(batch["audio_lengths"].reshape(-1), model.thinker.cfg)
        labels = batch["clip_events"].reshape(rows.shape[0], -1)
        has_events = (rows > 0) & (labels[:, 0] >= 0)
        events = labels[:, jnp.asarray(columns)]
        with jax.named_scope("adapter_events"):
            logits = jnp.einsum("arh,eh->are", clip_rows.astype(jnp.float32), names.astype(jnp.float32))
            valid = jnp.arange(clip_rows.shape[1])[None, :] < rows[:, None]
            return loudest_step_bce(logits, valid, events, has_events), jnp.sum(has_events).astype(jnp.float32)

    def encoder_labels(self, model, features: jax.Array, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """Emotion CE (from the encoder's mean-pooled features) and event BCE (summed over the
        events; each event's logit is its highest frame's) of each labelled clip, summed over
        clips."""
        from hellochat_jax.components.dasheng.model import FRAMES_PER_PATCH

        enc = model.thinker.audio_encoder.cfg
        lengths = batch["audio_lengths"].reshape(-1)
        frames = (1 + lengths // enc.hop_size) // FRAMES_PER_PATCH
        valid = (jnp.arange(features.shape[1])[None, :] < frames[:, None]).astype(jnp.float32)
        pooled = jnp.sum(features * valid[..., None], axis=1) / jnp.maximum(jnp.sum(valid, axis=1, keepdims=True), 1.0)
        emotion = batch["clip_emotion"].reshape(-1)
        events = batch["clip_events"].reshape(lengths.shape[0], -1)
        has_emotion = (lengths > 0) & (emotion >= 0)
        has_events = (lengths > 0) & (events[:, 0] >= 0)
        heads = model.heads
        out = {}
        with jax.named_scope("encoder_labels"):
            logits = heads.encoder_emotion(pooled).astype(jnp.float32)
            ce = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, jnp.maximum(emotion, 0)[:, None], -1)[:, 0]
            out["encoder_emotion_ce"] = jnp.sum(jnp.where(has_emotion, ce, 0.0))
            out["encoder_emotion_correct"] = jnp.sum(has_emotion & (jnp.argmax(logits, -1) == emotion)).astype(jnp.float32)
            out["encoder_emotion_n"] = jnp.sum(has_emotion).astype(jnp.float32)
            # Events by the loudest frame, not the mean: a 0.1 s beep is 3 of 250 frames, and a
            # mean-pooled head learnt to miss it (micro F1 0.73), so the encoder was never asked
            # to mark short events where they sound.
            frame_logits = heads.encoder_events(features).astype(jnp.float32)
            out["encoder_events_bce"] = loudest_step_bce(frame_logits, valid > 0, events, has_events)
            out["encoder_events_n"] = jnp.sum(has_events).astype(jnp.float32)
        return out

    def talker_loss(self, talker, batch: dict[str, jax.Array], norms: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The speech LM's loss on one micro-batch (its share of the step's), as its config says."""
        logits, _ = talker(batch["speech_ids"], batch["speech_kinds"])
        terms, correct, valid = self.speech_terms(logits, batch["speech_targets"], talker.cfg.lsm_weight)
        stats = {
            "talker_ce": jnp.sum(terms),  # label-smoothed when lsm_weight > 0
            "talker_tokens": jnp.sum(valid).astype(jnp.float32),
            "talker_correct": jnp.sum(correct).astype(jnp.float32),
        }
        norm = norms["talker"] if talker.cfg.length_normalized_loss else norms["talker_rows"]
        return stats["talker_ce"] / norm, stats

    def record(self, stats: dict[str, Any]) -> dict[str, float]:
        """The thinker's entries of a train record (host side)."""
        tok = max(float(stats["thinker_tokens"]), 1.0)
        rec = {"thinker_loss": float(stats["thinker_ce"]) / tok, "thinker_accuracy": float(stats["thinker_correct"]) / tok}
        for name, ce, n in zip(self.task_names, stats["task_ce"], stats["task_tokens"]):
            if n > 0:
                rec[f"loss/{name}"] = float(ce) / float(n)
        if "talker_ce" in stats:
            n = max(float(stats["talker_tokens"]), 1.0)
            rec["talker_loss"] = float(stats["talker_ce"]) / n
            rec["talker_accuracy"] = float(stats["talker_correct"]) / n
        if "encoder_emotion_ce" in stats:
            n = max(float(stats["encoder_emotion_n"]), 1.0)
            rec["encoder_emotion_acc"] = float(stats["encoder_emotion_correct"]) / n
            rec["encoder_events_bce"] = float(stats["encoder_events_bce"]) / max(float(stats["encoder_events_n"]), 1.0)
        if "encoder_ctc" in stats:
            rec["encoder_ctc"] = float(stats["encoder_ctc"]) / max(float(stats["encoder_ctc_labels"]), 1.0)
        if "adapter_ctc" in stats:
            rec["adapter_ctc"] = float(stats["adapter_ctc"]) / max(float(stats["adapter_ctc_labels"]), 1.0)
        if "adapter_events_bce" in stats:
            rec["adapter_events_bce"] = float(stats["adapter_events_bce"]) / max(float(stats["adapter_events_n"]), 1.0)
        return rec
