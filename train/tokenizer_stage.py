"""The speech_tokenizer stage: CosyVoice 2's supervised semantic speech tokens, scaled down.

    16 kHz speech --log_mel_128--> S3Tokenizer encoder --FSQ (straight-through)--> codes [T', 8]
      --heads.tokenizer (conv decoder)--> text-token CTC  (+ utterance emotion)

The only way from the audio to the text is through the 3^8-entry FSQ bottleneck, so the
tokens learn to carry what was said (CosyVoice 2 trains its tokenizer inside an ASR model the
same way); the emotion head keeps some of how it was said. The heads are dropped at export;
the trained speech_tokenizer then fills the corpus's speech tokens (`hellochat data tokens`).

Rows are corpus utterances: the user's clip (background events, varied voices, with its
emotion) or, with probability `reply_fraction`, the clean reply voice with the reply text (no
emotion label: the reply voice has one style). Audio is zero-padded to `max_seconds`; clips
longer than that, transcripts longer than `max_text_tokens`, and pairs CTC cannot align
(more labels than frames) are left out.

Metrics: tokenizer_ctc (per row), tokenizer_ctc_accuracy (1 - token error rate of greedy
CTC decoding), tokenizer_codes_used and tokenizer_code_perplexity (of the step's codes: a
collapsed FSQ uses few), tokenizer_emotion_acc.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from hellochat_jax.train import stages

from hellochat_jax.components.s3tokenizer.model import FSQ_DIM, FSQ_LEVELS, SAMPLE_RATE, log_mel_128, num_tokens
from hellochat_jax.core.config import ConfigError

BLANK = 0  # the CTC blank: the text tokenizer's id 0 is <|endoftext|>, which no transcript contains
EMOTIONS = ("neutral", "happy", "sad", "angry")  # the synthetic corpus's labels (synth.EMOTIONS)
CODEBOOK = FSQ_LEVELS**FSQ_DIM
# Past |projection| = 1 (tanh 0.76: code +-1 with a margin) a larger value changes nothing but
# tanh's gradient, which vanishes: the first CTC steps' large gradients drive the projection to
# +-10 and the FSQ collapses to a handful of codes for good (seen on the synthetic corpus).
# A squared penalty beyond the bound keeps every dimension trainable.
SATURATION_BOUND = 1.0


@dataclasses.dataclass
class TokenizerOptions:
    max_seconds: float = 7.2  # rows' audio length: user clips are under 4 s, styled replies up to 7.2 s (synth)
    max_text_tokens: int = 64  # CTC labels per row
    reply_fraction: float = 0.5  # share of rows that are the clean reply voice (when a record has one)
    emotion_weight: float = 0.5  # weight of the emotion cross-entropy (0: no emotion loss)
    saturation_weight: float = 1.0  # keeps the FSQ projection where tanh still has a gradient (see below)
    normalize: str = "rows"  # CTC sum over rows divided by the step's rows, or by its label tokens ("tokens")
    split: str = "train"

    def __post_init__(self):
        if self.normalize not in ("rows", "tokens"):
            raise ConfigError(f"options.normalize={self.normalize!r}; choose rows or tokens")
        if not 0.0 <= self.reply_fraction <= 1.0:
            raise ConfigError(f"options.reply_fraction={self.reply_fraction} must be in [0, 1]")
        if self.max_seconds <= 0 or self.max_text_tokens < 1 or self.emotion_weight < 0 or self.saturation_weight < 0:
            raise ConfigError("options: max_seconds and max_text_tokens must be positive, emotion_weight and saturation_weight >= 0")

    @property
    def max_samples(self) -> int:
        return int(round(self.max_seconds * SAMPLE_RATE))


# ----------------------------------------------------------------------------- data


def _ctc_frames_needed(ids: np.ndarray) -> int:
    """CTC needs a frame per label plus a blank between equal neighbours."""
    return len(ids) + int(np.sum(ids[1:] == ids[:-1]))


class TokenizerData:
    """Per-process rows: audio [rows, S] float32, audio_lengths [rows], text [rows, L] int32
    (0-padded), text_lengths [rows], emotion [rows] (index into EMOTIONS, -1 = no label)."""

    task_names = ("speech",)

    def __init__(self, cfg: Any, process_index: int = 0, process_count: int = 1):
        from hellochat_jax.data import pipeline

        self.cfg = cfg
        self.options = stages.options(cfg, STAGE)
        self.process = (process_index, process_count)
        self.rows = cfg.data.batch_size // process_count
        corpus = cfg.data.corpus
        data_cfg = pipeline.DataConfig(dataset=corpus.get("dataset", "hellochat_synth"), data_dir=corpus.get("data_dir", ""),
                                       tokenizer=corpus.get("tokenizer", ""))  # fmt: skip
        try:
            self.tokenizer_path = pipeline.tokenizer_path(data_cfg)
        except FileNotFoundError as e:
            raise ConfigError(str(e)) from None
        self.vocab_size = len(pipeline._chat_tokens(self.tokenizer_path))

    def make_row(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray] | None:
        """One record -> a row, or None when it does not fit (see the module docstring)."""
        from hellochat_jax.data import pipeline

        o = self.options
        reply = stages.text(record["reply"]).strip()
        if reply and len(record["reply_audio"]) and rng.random() < o.reply_fraction:
            audio, text, emotion = record["reply_audio"], reply, -1
        else:
            label = stages.text(record["emotion"]).strip()
            audio, text = record["audio"], stages.text(record["transcript"]).strip()
            emotion = EMOTIONS.index(label) if label in EMOTIONS else -1
        ids = np.asarray(pipeline._chat_tokens(self.tokenizer_path).text(text), np.int32)
        n = len(audio)
        # the log-mel's reflect padding needs more than 200 samples
        if not 200 < n <= o.max_samples or not 0 < len(ids) <= o.max_text_tokens or _ctc_frames_needed(ids) > num_tokens(n):
            return None
        return {
            "audio": stages.pad_to(stages.pcm(audio), o.max_samples),
            "audio_lengths": np.int32(n),
            "text": stages.pad_to(ids, o.max_text_tokens, BLANK),
            "text_lengths": np.int32(len(ids)),
            "emotion": np.int32(emotion),
        }

    def iterator(self):
        return stages.corpus_records(self.cfg, self.make_row, *self.process, split=self.options.split)

    def local_spec(self) -> dict[str, jax.ShapeDtypeStruct]:
        r, o = self.rows, self.options
        i32 = np.dtype(np.int32)
        return {
            "audio": jax.ShapeDtypeStruct((r, o.max_samples), np.dtype(np.float32)),
            "audio_lengths": jax.ShapeDtypeStruct((r,), i32),
            "text": jax.ShapeDtypeStruct((r, o.max_text_tokens), i32),
            "text_lengths": jax.ShapeDtypeStruct((r,), i32),
            "emotion": jax.ShapeDtypeStruct((r,), i32),
        }


# ----------------------------------------------------------------------------- objective


def greedy_ctc(logits: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Best-path decoding: argmax per frame, repeats merged, blanks dropped. Returns the
    hypotheses left-aligned [B, T] (BLANK after the end) and their lengths [B]."""
    best = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    prev = jnp.pad(best[:, :-1], ((0, 0), (1, 0)), constant_values=BLANK)
    keep = valid & (best != BLANK) & (best != prev)
    slot = jnp.where(keep, jnp.cumsum(keep, axis=1) - 1, best.shape[1])  # past the end: dropped
    rows = jnp.arange(best.shape[0])[:, None]
    hyp = jnp.full_like(best, BLANK).at[rows, slot].set(best, mode="drop")
    return hyp, jnp.sum(keep, axis=1).astype(jnp.int32)


def edit_distance(hyp: jax.Array, hyp_lens: jax.Array, ref: jax.Array, ref_lens: jax.Array) -> jax.Array:
    """Levenshtein distance per row between hyp[:hyp_len] and ref[:ref_len]: [B] int32.

    One Wagner-Fischer row per hypothesis token (a scan); within a row the insertion chain
    D[j] = min_k (base[k] + j - k) is a cumulative min, so each step is vectorised.
    """
    j = jnp.arange(ref.shape[1] + 1, dtype=jnp.int32)
    row0 = jnp.broadcast_to(j, (ref.shape[0], j.size))
    result0 = ref_lens.astype(jnp.int32)  # an empty hypothesis

    def step(carry, xs):
        prev, result = carry
        i, token = xs
        sub = prev[:, :-1] + (token[:, None] != ref).astype(jnp.int32)
        base = jnp.concatenate([prev[:, :1] + 1, jnp.minimum(prev[:, 1:] + 1, sub)], axis=1)
        row = jax.lax.cummin(base - j, axis=1) + j
        result = jnp.where(hyp_lens == i, jnp.take_along_axis(row, ref_lens[:, None], axis=1)[:, 0], result)
        return (row, result), None

    steps = (jnp.arange(1, hyp.shape[1] + 1, dtype=jnp.int32), hyp.T)
    (_, result), _ = jax.lax.scan(step, (row0, result0), steps)
    return result


class TokenizerObjective:
    """CTC over the FSQ codes (+ emotion cross-entropy); normalised by the step's rows (or label
    tokens) and labelled rows, so gradient accumulation gives the big-batch gradient."""

    def __init__(self, cfg: Any, data: TokenizerData):
        self.options = data.options
        self.vocab_size = data.vocab_size

    def normalizers(self, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        lengths = batch["text_lengths"]
        return {
            "rows": jnp.maximum(jnp.sum(lengths > 0), 1).astype(jnp.float32),
            "tokens": jnp.maximum(jnp.sum(lengths), 1).astype(jnp.float32),
            "emotion": jnp.maximum(jnp.sum(batch["emotion"] >= 0), 1).astype(jnp.float32),
            "frames": jnp.maximum(jnp.sum(num_tokens(batch["audio_lengths"])), 1).astype(jnp.float32),
        }

    def __call__(self, model: Any, micro: dict[str, jax.Array], key: jax.Array,
                 norms: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:  # fmt: skip
        del key  # nothing stochastic
        heads = model.heads.tokenizer if model.heads is not None else None
        if model.speech_tokenizer is None or heads is None:
            raise ConfigError("the speech_tokenizer stage needs model.speech_tokenizer and model.heads with tokenizer_ctc: true")
        mel, mel_lens = log_mel_128(micro["audio"], micro["audio_lengths"])
        fsq = model.speech_tokenizer.codes(mel, mel_lens)
        tokens, valid = fsq.tokens, fsq.valid
        logits, emotion_logits = heads(fsq.codes, valid)
        if logits.shape[-1] < self.vocab_size:
            raise ConfigError(f"model.heads.vocab_size is {logits.shape[-1]} but the text tokenizer has {self.vocab_size} tokens")
        logits = logits.astype(jnp.float32)

        labels, label_lens = micro["text"], micro["text_lengths"]
        label_pad = (jnp.arange(labels.shape[1])[None, :] >= label_lens[:, None]).astype(jnp.float32)
        ctc = optax.ctc_loss(logits, 1.0 - valid.astype(jnp.float32), labels, label_pad, blank_id=BLANK)
        labelled = label_lens > 0
        ctc = jnp.where(labelled, ctc, 0.0)

        hyp, hyp_lens = greedy_ctc(jax.lax.stop_gradient(logits), valid)
        edits = jnp.where(labelled, edit_distance(hyp, hyp_lens, labels, label_lens), 0)
        stats = {
            "tokenizer_ctc": jnp.sum(ctc),
            "tokenizer_rows": jnp.sum(labelled).astype(jnp.float32),
            "tokenizer_label_tokens": jnp.sum(label_lens).astype(jnp.float32),
            "tokenizer_edits": jnp.sum(edits).astype(jnp.float32),
            # a histogram, not a distinct count, so that it sums over micro-batches
            "tokenizer_code_counts": jnp.bincount(tokens.ravel(), weights=valid.ravel().astype(jnp.float32), length=CODEBOOK),
        }
        excess = jnp.maximum(jnp.abs(fsq.projection) - SATURATION_BOUND, 0.0)
        stats["tokenizer_saturation"] = jnp.sum(jnp.square(excess) * valid[..., None])
        loss = stats["tokenizer_ctc"] / norms[self.options.normalize]
        loss = loss + self.options.saturation_weight * stats["tokenizer_saturation"] / (norms["frames"] * FSQ_DIM)

        if self.options.emotion_weight > 0:
            if emotion_logits is None or emotion_logits.shape[-1] < len(EMOTIONS):
                raise ConfigError(f"options.emotion_weight > 0 needs model.heads.emotions: {len(EMOTIONS)} (or set emotion_weight: 0)")
            emotion = micro["emotion"]
            labelled = emotion >= 0
            logp = jax.nn.log_softmax(emotion_logits.astype(jnp.float32), axis=-1)
            ce = -jnp.take_along_axis(logp, jnp.maximum(emotion, 0)[:, None], axis=1)[:, 0]
            stats["tokenizer_emotion_ce"] = jnp.sum(jnp.where(labelled, ce, 0.0))
            stats["tokenizer_emotion_correct"] = jnp.sum(labelled & (jnp.argmax(logp, axis=-1) == emotion)).astype(jnp.float32)
            stats["tokenizer_emotion_rows"] = jnp.sum(labelled).astype(jnp.float32)
            loss = loss + self.options.emotion_weight * stats["tokenizer_emotion_ce"] / norms["emotion"]
        return loss, stats

    def record(self, stats: dict[str, np.ndarray]) -> dict[str, float]:
        rows = max(float(stats["tokenizer_rows"]), 1.0)
        counts = np.asarray(stats["tokenizer_code_counts"], np.float64)
        p = counts[counts > 0] / max(counts.sum(), 1.0)
        rec = {
            "tokenizer_ctc": float(stats["tokenizer_ctc"]) / rows,
            # 1 - token error rate, floored at 0 (insertions can make the error rate exceed 1)
            "tokenizer_ctc_accuracy": max(0.0, 1.0 - float(stats["tokenizer_edits"]) / max(float(stats["tokenizer_label_tokens"]), 1.0)),
            "tokenizer_codes_used": float(np.count_nonzero(counts)),
            "tokenizer_code_perplexity": float(np.exp(-np.sum(p * np.log(p)))) if p.size else 0.0,
            "tokenizer_saturation": float(stats["tokenizer_saturation"]) / max(float(counts.sum()) * FSQ_DIM, 1.0),
        }
        if "tokenizer_emotion_rows" in stats:
            n = max(float(stats["tokenizer_emotion_rows"]), 1.0)
            rec["tokenizer_emotion_ce"] = float(stats["tokenizer_emotion_ce"]) / n
            rec["tokenizer_emotion_acc"] = float(stats["tokenizer_emotion_correct"]) / n
        return rec


STAGE = stages.Stage("speech_tokenizer", ("speech_tokenizer", "heads"), TokenizerData, TokenizerObjective, TokenizerOptions)
