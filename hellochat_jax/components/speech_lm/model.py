"""CosyVoice 2's speech-token LM (their `Qwen2LM`): text tokens -> 25 Hz speech tokens.

The backbone is our one Qwen2 decoder (`Qwen2Model`, the thinker's class): its token embedding
embeds the TEXT, and the LM adds three small tables of its own:

    llm_embedding     [2, D]      row 0 = sos, row 1 = task id (marks "speech starts here")
    speech_embedding  [S + 3, D]  speech tokens 0..S-1, then eos = S, (unused) S+1, fill = S+2
    llm_decoder       D -> S + 3  the output head over speech tokens and the three specials

Sequences mix the tables, so a sequence is given as token ids plus a per-position *kind*
(`TEXT`, `SPEECH`, `SOS`, `TASK` or `PAD`) and embedded in one gather per table.

Layouts (S = speech_token_size, (a, b) = mix_ratio, default (5, 15)):
  inference:  [sos, prompt text + text, task, prompt speech]  then decode speech tokens.
  unistream training:  [sos, text, task, speech] with targets [-1]*(1+Lt) + speech + [eos].
  bistream training:   [sos] + per full text chunk of a tokens: text chunk + b speech tokens
      (targets [-1]*(a-1) + speech chunk + [fill]); the last (partial or empty) text chunk is
      followed by [task] + the remaining speech (targets [-1]*len + speech + [eos]).
Decoding follows the reference's rule: at step i (0-based) eos is masked while i < min_len;
any of the stop ids {S, S+1, S+2} ends the row (not emitted); at most max_len tokens, with
min_len = int(Lt * min_ratio), max_len = int(Lt * max_ratio) for Lt text tokens WITHOUT the
prompt text (float32 product, truncated).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hellochat_jax.components.qwen2.model import (
    KVCache,
    Qwen2Config,
    Qwen2Model,
    init_cache,
)
from hellochat_jax.core import sharding as shd
from hellochat_jax.core.layers import Embed, Linear, as_dtype
from hellochat_jax.core.sharding import constrain

IGNORE_ID = -1

# Kinds of sequence positions: which table embeds the id at that position.
PAD, TEXT, SPEECH, SOS, TASK = 0, 1, 2, 3, 4


@dataclasses.dataclass(frozen=True)
class RasConfig:
    """Repetition-aware sampling (VALL-E 2), CosyVoice 2's default: nucleus sampling (top-p over
    the full distribution, at most top-k tokens); if the drawn token occurs in the last
    `win_size` emitted tokens at least `win_size * tau_r` times, it is banned and the token is
    drawn again from the full distribution. `greedy=True` takes the argmax instead."""

    greedy: bool = False
    top_p: float = 0.8
    top_k: int = 25
    win_size: int = 10
    tau_r: float = 0.1


GREEDY = RasConfig(greedy=True)


@dataclasses.dataclass(frozen=True)
class SpeechTokenLMConfig:
    qwen2: Qwen2Config = Qwen2Config()
    speech_token_size: int = 6561
    length_normalized_loss: bool = True
    lsm_weight: float = 0.0
    mix_ratio: tuple[int, int] = (5, 15)
    sampling: RasConfig = RasConfig()
    # True when the backbone's checkpoint holds an untied text LM head; the speech LM never
    # uses it, it is kept (not trained) only so export reproduces the checkpoint.
    keep_text_lm_head: bool = False

    def __post_init__(self):
        if len(self.mix_ratio) != 2 or min(self.mix_ratio) < 1:
            raise ValueError(f"mix_ratio must be two positive ints (text, speech), got {self.mix_ratio}")
        object.__setattr__(self, "mix_ratio", tuple(int(x) for x in self.mix_ratio))

    @property
    def eos(self) -> int:
        return self.speech_token_size

    @property
    def fill(self) -> int:
        return self.speech_token_size + 2

    @property
    def vocab(self) -> int:
        """Rows of speech_embedding and outputs of llm_decoder."""
        return self.speech_token_size + 3

    @property
    def hidden_size(self) -> int:
        return self.qwen2.hidden_size

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["mix_ratio"] = list(self.mix_ratio)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SpeechTokenLMConfig":
        d = dict(d)
        if isinstance(d.get("qwen2"), dict):
            d["qwen2"] = Qwen2Config(**d["qwen2"])
        if isinstance(d.get("sampling"), dict):
            d["sampling"] = RasConfig(**d["sampling"])
        if "mix_ratio" in d:
            d["mix_ratio"] = tuple(d["mix_ratio"])
        return cls(**d)


class FrozenWeight(nnx.Variable):
    """A checkpoint tensor carried for export only: not an nnx.Param, so never trained."""


class SpeechTokenLM(nnx.Module):
    def __init__(self, cfg: SpeechTokenLMConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        q = cfg.qwen2
        dt, pdt = as_dtype(q.dtype), as_dtype(q.param_dtype)
        self.llm_embedding = Embed(2, q.hidden_size, names=(None, "embed"), dtype=dt, param_dtype=pdt, rngs=rngs)
        self.llm = Qwen2Model(q, rngs=rngs)  # llm.embed_tokens is the text embedding
        self.speech_embedding = Embed(cfg.vocab, q.hidden_size, dtype=dt, param_dtype=pdt, rngs=rngs)
        self.llm_decoder = Linear(q.hidden_size, cfg.vocab, names=("embed", "vocab"), dtype=dt, param_dtype=pdt, precision=q.precision, rngs=rngs)
        if cfg.keep_text_lm_head:
            self.text_lm_head = FrozenWeight(jnp.zeros((q.vocab_size, q.hidden_size), pdt), out_sharding=("vocab", "embed"))

    def embed(self, ids: jax.Array, kinds: jax.Array) -> jax.Array:
        """ids, kinds [B, T] -> embeddings [B, T, D]; PAD positions are zeros."""
        text = self.llm.embed_tokens(jnp.where(kinds == TEXT, ids, 0))
        speech = self.speech_embedding(jnp.where(kinds == SPEECH, ids, 0))
        special = self.llm_embedding((kinds == TASK).astype(jnp.int32))
        k = kinds[..., None]
        x = jnp.where(k == TEXT, text, jnp.where(k == SPEECH, speech, jnp.where((k == SOS) | (k == TASK), special, 0)))
        return constrain(x, ("batch", "length", "embed"))

    def hidden(
        self,
        ids: jax.Array,
        kinds: jax.Array,
        *,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: KVCache | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Backbone output after the final norm (the reference's hidden_states[-1])."""
        if attention_mask is None:
            attention_mask = (kinds != PAD).astype(jnp.int32)
        return self.llm(inputs_embeds=self.embed(ids, kinds), attention_mask=attention_mask, positions=positions, cache=cache)

    def logits(self, hidden: jax.Array) -> jax.Array:
        out = self.llm_decoder(hidden)
        return constrain(out, ("batch", "length", "vocab")) if out.ndim == 3 else out

    def __call__(self, ids, kinds, *, attention_mask=None, positions=None, cache=None) -> tuple[jax.Array, KVCache | None]:
        h, cache = self.hidden(ids, kinds, attention_mask=attention_mask, positions=positions, cache=cache)
        return self.logits(h), cache

    def init_cache(self, batch: int, max_len: int) -> KVCache:
        return init_cache(self.cfg.qwen2, batch, max_len)


# ----------------------------------------------------------------------------- layouts (host side)


class Layout(NamedTuple):
    """One sequence: ids and kinds (what embeds each position); targets for training rows."""

    ids: np.ndarray  # [T] int32
    kinds: np.ndarray  # [T] int32
    targets: np.ndarray | None = None  # [T] int32, IGNORE_ID where no loss


def _seg(ids: Sequence[int], kind: int) -> tuple[list[int], list[int]]:
    ids = [int(i) for i in ids]
    return ids, [kind] * len(ids)


def _join(parts: Iterable[tuple[list[int], list[int]]]) -> tuple[np.ndarray, np.ndarray]:
    ids, kinds = [], []
    for i, k in parts:
        ids += i
        kinds += k
    return np.asarray(ids, np.int32), np.asarray(kinds, np.int32)


def inference_layout(text: Sequence[int], prompt_text: Sequence[int] = (), prompt_speech: Sequence[int] = ()) -> Layout:
    """[sos, prompt text + text, task, prompt speech] (Qwen2LM.inference)."""
    ids, kinds = _join([([0], [SOS]), _seg(list(prompt_text) + list(text), TEXT), ([1], [TASK]), _seg(prompt_speech, SPEECH)])
    return Layout(ids, kinds)


def use_bistream(draw: float, text_len: int, speech_len: int, mix_ratio: tuple[int, int] = (5, 15)) -> bool:
    """The reference's per-row choice: bistream iff draw < 0.5 and speech/text > b/a (float32)."""
    a, b = mix_ratio
    if draw >= 0.5:
        return False
    if text_len == 0:
        return True  # speech / 0 = inf in the reference; the layout then equals unistream's
    return bool(np.float32(speech_len) / np.float32(text_len) > np.float32(b / a))


def training_layout(text: Sequence[int], speech: Sequence[int], *, bistream: bool, speech_token_size: int, mix_ratio: tuple[int, int] = (5, 15)) -> Layout:
    """Input and targets of one training row (Qwen2LM.prepare_lm_input_target)."""
    S, (a, b) = speech_token_size, mix_ratio
    eos, fill = S, S + 2
    text, speech = [int(t) for t in text], [int(s) for s in speech]
    if not bistream:
        ids, kinds = _join([([0], [SOS]), _seg(text, TEXT), ([1], [TASK]), _seg(speech, SPEECH)])
        targets = [IGNORE_ID] * (1 + len(text)) + speech + [eos]
        return Layout(ids, kinds, np.asarray(targets, np.int32))
    parts, targets = [([0], [SOS])], [IGNORE_ID]
    for j in range(-(-(len(text) + 1) // a)):
        tc = text[j * a : (j + 1) * a]
        if len(tc) == a:
            sc = speech[j * b : (j + 1) * b]
            if len(sc) != b:
                raise ValueError(f"bistream row: text chunk {j} has no full speech chunk of {b} tokens (speech/text ratio too low)")
            parts += [_seg(tc, TEXT), _seg(sc, SPEECH)]
            targets += [IGNORE_ID] * (a - 1) + sc + [fill]
        else:
            parts += [_seg(tc, TEXT), ([1], [TASK]), _seg(speech[j * b :], SPEECH)]
            targets += [IGNORE_ID] * len(tc) + speech[j * b :] + [eos]
    ids, kinds = _join(parts)
    return Layout(ids, kinds, np.asarray(targets, np.int32))


class Batch(NamedTuple):
    ids: np.ndarray  # [B, T]
    kinds: np.ndarray  # [B, T]; PAD where padded
    targets: np.ndarray | None  # [B, T]; IGNORE_ID where padded
    lengths: np.ndarray  # [B]


def pad_batch(rows: Sequence[Layout], *, left: bool, length: int | None = None, multiple: int = 1) -> Batch:
    """Stacks layouts: left-padded for decoding prompts, right-padded for training."""
    if not rows:
        raise ValueError("no rows to batch")
    lengths = np.asarray([len(r.ids) for r in rows], np.int32)
    t = int(lengths.max()) if length is None else int(length)
    if t < lengths.max():
        raise ValueError(f"a row has {lengths.max()} positions, more than the requested length {t}")
    t = max(multiple, -(-t // multiple) * multiple)
    ids = np.zeros((len(rows), t), np.int32)
    kinds = np.full((len(rows), t), PAD, np.int32)
    has_targets = rows[0].targets is not None
    targets = np.full((len(rows), t), IGNORE_ID, np.int32) if has_targets else None
    for i, r in enumerate(rows):
        n = len(r.ids)
        sl = slice(t - n, t) if left else slice(0, n)
        ids[i, sl], kinds[i, sl] = r.ids, r.kinds
        if has_targets:
            targets[i, sl] = r.targets
    return Batch(ids, kinds, targets, lengths)


def training_batch(
    text: np.ndarray,
    text_len: np.ndarray,
    speech: np.ndarray,
    speech_len: np.ndarray,
    draws: Sequence[float],
    *,
    speech_token_size: int,
    mix_ratio: tuple[int, int] = (5, 15),
    length: int | None = None,
) -> Batch:
    """Padded training batch from padded text/speech tokens; `draws` are the per-row uniform
    numbers that pick bistream (the reference's random.random(); pass them from your PRNG)."""
    rows = []
    for i in range(len(text_len)):
        t, s = np.asarray(text[i][: text_len[i]]), np.asarray(speech[i][: speech_len[i]])
        bi = use_bistream(float(draws[i]), len(t), len(s), mix_ratio)
        rows.append(training_layout(t, s, bistream=bi, speech_token_size=speech_token_size, mix_ratio=mix_ratio))
    return pad_batch(rows, left=False, length=length)


# ----------------------------------------------------------------------------- loss


def speech_token_loss(logits: jax.Array, targets: jax.Array, *, lsm_weight: float = 0.0, length_normalized: bool = True) -> tuple[jax.Array, jax.Array]:
    """(loss, accuracy) as the reference's LabelSmoothingLoss + th_accuracy.

    loss = sum over positions with target != -1 of KL(smoothed one-hot || softmax(logits)),
    divided by the number of such positions (length_normalized) or by the batch size.
    With lsm_weight 0 this is the mean cross-entropy. Accuracy is argmax == target over the
    same positions.
    """
    logits = logits.astype(jnp.float32)
    v = logits.shape[-1]
    valid = targets != IGNORE_ID
    safe = jnp.where(valid, targets, 0)
    logp = jax.nn.log_softmax(logits, axis=-1)
    logp_target = jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
    if lsm_weight > 0.0:
        # KL(t || p) = sum_v t_v log t_v - sum_v t_v logp_v with t = conf at the target and
        # lsm_weight / (V - 1) elsewhere.
        conf, other = 1.0 - lsm_weight, lsm_weight / (v - 1)
        neg_entropy = float(jax.scipy.special.xlogy(conf, conf) + (v - 1) * jax.scipy.special.xlogy(other, other))
        per = neg_entropy - conf * logp_target - other * (jnp.sum(logp, -1) - logp_target)
    else:
        per = -logp_target
    total = jnp.sum(jnp.where(valid, per, 0.0))
    count = jnp.sum(valid)
    denom = count if length_normalized else targets.shape[0]
    loss = total / jnp.maximum(denom, 1)
    correct = jnp.sum(valid & (jnp.argmax(logits, -1) == targets))
    acc = correct / jnp.maximum(count, 1)
    return loss, acc


def loss_fn(model: SpeechTokenLM, ids: jax.Array, kinds: jax.Array, targets: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Training loss of a right-padded batch (attention: causal and key < length)."""
    logits, _ = model(ids, kinds)
    loss, acc = speech_token_loss(logits, targets, lsm_weight=model.cfg.lsm_weight, length_normalized=model.cfg.length_normalized_loss)
    return loss, {"loss": loss, "acc": acc}


# ----------------------------------------------------------------------------- sampling


def nucleus_sample(logp: jax.Array, key: jax.Array, top_p: float, top_k: int) -> jax.Array:
    """The reference's nucleus_sampling: walking the tokens from most to least likely, keep
    one while the probability mass before it is < top_p and fewer than top_k are kept; draw
    among those in proportion to their probabilities. logp [B, V] -> [B].

    Only the top_k best can be kept, so this takes lax.top_k instead of sorting the whole
    vocabulary (generate.top_p_filter's way), which costs more than the LM step at V = 6564."""
    k = min(top_k, logp.shape[-1]) if top_k > 0 else logp.shape[-1]
    best, index = jax.lax.top_k(logp, k)  # descending
    probs = jnp.exp(best - jax.nn.logsumexp(logp, axis=-1, keepdims=True))  # of the FULL distribution
    before = jnp.cumsum(probs, axis=-1) - probs
    keep = (before < top_p) | (jnp.arange(k) == 0)
    pick = jax.random.categorical(key, jnp.where(keep, best, -jnp.inf), axis=-1)
    return jnp.take_along_axis(index, pick[:, None], axis=-1)[:, 0].astype(jnp.int32)


def ras_sample(logp: jax.Array, history: jax.Array, key: jax.Array, cfg: RasConfig) -> jax.Array:
    """One token per row. logp [B, V] (already masked), history [B, W] (-1 = empty)."""
    if cfg.greedy:
        return jnp.argmax(logp, axis=-1).astype(jnp.int32)
    k_nucleus, k_full = jax.random.split(key)
    first = nucleus_sample(logp, k_nucleus, cfg.top_p, cfg.top_k)
    repeats = jnp.sum(history == first[:, None], axis=-1)
    banned = jnp.where(jnp.arange(logp.shape[-1])[None, :] == first[:, None], -jnp.inf, logp)
    again = jax.random.categorical(k_full, banned, axis=-1).astype(jnp.int32)
    return jnp.where(repeats >= cfg.win_size * cfg.tau_r, again, first)


def _push(history: jax.Array, tokens: jax.Array, where: jax.Array) -> jax.Array:
    shifted = jnp.concatenate([history[:, 1:], tokens[:, None]], axis=1)
    return jnp.where(where[:, None], shifted, history)


def length_limits(text_len: int, min_ratio: float, max_ratio: float) -> tuple[int, int]:
    """The reference's (min_len, max_len): float32 product, truncated."""
    return int(np.float32(text_len) * np.float32(min_ratio)), int(np.float32(text_len) * np.float32(max_ratio))


# ----------------------------------------------------------------------------- decoding


class DecodeState(NamedTuple):
    """Everything the decode loop carries; resumable, so tokens can be streamed in chunks."""

    step: jax.Array  # [] decode steps taken
    logits: jax.Array  # [B, V] f32, scores for the next step
    cache: KVCache
    history: jax.Array  # [B, W] last emitted tokens (-1 = none yet)
    tokens: jax.Array  # [B, N] emitted tokens (pad -1 beyond lengths)
    lengths: jax.Array  # [B]
    done: jax.Array  # [B]
    key: jax.Array
    logp: jax.Array | None  # [B, N, V] per-step log-probs before the eos mask (if recorded)


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len", "max_steps", "window", "record_logp"))
def _prefill(graphdef, state, ids, kinds, max_len, key, cache_len, max_steps, window, record_logp) -> DecodeState:
    model = nnx.merge(graphdef, state)
    b = ids.shape[0]
    cache = model.init_cache(b, cache_len)
    logits, cache = model(ids, kinds, attention_mask=(kinds != PAD).astype(jnp.int32), cache=cache)
    logits = logits[:, -1].astype(jnp.float32)
    logp = jnp.zeros((b, max_steps, logits.shape[-1]), jnp.float32) if record_logp else None
    return DecodeState(
        jnp.zeros((), jnp.int32), logits, cache, jnp.full((b, window), -1, jnp.int32),
        jnp.full((b, max_steps), -1, jnp.int32), jnp.zeros((b,), jnp.int32), max_len <= 0, key, logp,
    )


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling"), donate_argnames=("ds",))
def _decode(graphdef, state, ds: DecodeState, min_len, max_len, until, sampling: RasConfig) -> DecodeState:
    """Decodes until every row is done or `until` steps are taken (one compile per shape)."""
    model = nnx.merge(graphdef, state)
    eos = model.cfg.eos
    max_steps = ds.tokens.shape[1]

    def cond(ds):
        return (ds.step < jnp.minimum(until, max_steps)) & ~jnp.all(ds.done)

    def body(ds):
        key, sub = jax.random.split(ds.key)
        logp = jax.nn.log_softmax(ds.logits, axis=-1)
        rec = ds.logp.at[:, ds.step].set(logp) if ds.logp is not None else None
        vocab = jnp.arange(logp.shape[-1])[None, :]
        masked = jnp.where((ds.step < min_len)[:, None] & (vocab == eos), -jnp.inf, logp)
        tok = ras_sample(masked, ds.history, sub, sampling)
        emit = ~ds.done & (tok < eos)  # eos, S+1 and fill all stop the row
        tokens = ds.tokens.at[:, ds.step].set(jnp.where(emit, tok, -1))
        lengths = ds.lengths + emit
        done = ds.done | ~emit | (lengths >= max_len)
        feed = jnp.where(emit, tok, 0)[:, None]
        logits, cache = model(feed, jnp.full_like(feed, SPEECH), attention_mask=emit[:, None].astype(jnp.int32), cache=ds.cache)
        return DecodeState(ds.step + 1, logits[:, -1].astype(jnp.float32), cache, _push(ds.history, tok, emit), tokens, lengths, done, key, rec)

    return jax.lax.while_loop(cond, body, ds)


def _round_up(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


@dataclasses.dataclass
class SpeechDecoder:
    """A batched decode in progress: `advance(n)` runs n more steps; `result()` reads tokens.

    Prompts are left-padded [sos, prompt text + text, task, prompt speech] rows; the prompt
    and the decode loop are each one compiled call, and lengths are bucketed so nearby sizes
    share compiles.
    """

    model: SpeechTokenLM
    ds: DecodeState
    min_len: jax.Array
    max_len: jax.Array
    sampling: RasConfig
    graphdef: Any
    state: Any
    mesh: Any = None
    emitted: np.ndarray | None = None  # tokens already handed out by `new_tokens`

    @classmethod
    def start(
        cls,
        model: SpeechTokenLM,
        texts: Sequence[Sequence[int]],
        prompt_texts: Sequence[Sequence[int]] | None = None,
        prompt_speech: Sequence[Sequence[int]] | None = None,
        *,
        min_ratio: float = 2.0,
        max_ratio: float = 20.0,
        sampling: RasConfig | None = None,
        key: jax.Array | None = None,
        record_logp: bool = False,
        mesh: jax.sharding.Mesh | None = None,
        multiple: int = 32,
    ) -> "SpeechDecoder":
        cfg = model.cfg
        n = len(texts)
        if n == 0:
            raise ValueError("no texts to decode")
        prompt_texts = prompt_texts if prompt_texts is not None else [[]] * n
        prompt_speech = prompt_speech if prompt_speech is not None else [[]] * n
        if not (len(prompt_texts) == len(prompt_speech) == n):
            raise ValueError(f"{n} texts but {len(prompt_texts)} prompt texts and {len(prompt_speech)} prompt speech rows")
        for i, (t, pt, ps) in enumerate(zip(texts, prompt_texts, prompt_speech)):
            for name, seq, hi in (("text", list(t) + list(pt), cfg.qwen2.vocab_size), ("prompt speech", ps, cfg.speech_token_size)):
                if len(seq) and (min(seq) < 0 or max(seq) >= hi):
                    raise ValueError(f"row {i}: {name} ids must lie in [0, {hi}); got {min(seq)}..{max(seq)}")
        limits = [length_limits(len(t), min_ratio, max_ratio) for t in texts]
        min_len = np.asarray([lo for lo, _ in limits], np.int32)
        max_len = np.asarray([hi for _, hi in limits], np.int32)
        batch = pad_batch([inference_layout(t, pt, ps) for t, pt, ps in zip(texts, prompt_texts, prompt_speech)], left=True, multiple=multiple)
        max_steps = _round_up(int(max_len.max()), multiple)
        cache_len = batch.ids.shape[1] + max_steps
        sampling = sampling or cfg.sampling
        key = jax.random.key(0) if key is None else key
        graphdef, state = nnx.split(model)
        with _mesh_ctx(mesh):
            if mesh is not None:
                ids, kinds, max_len_d, min_len_d = shd.put_batch((batch.ids, batch.kinds, max_len, min_len), mesh, shd.current_rules())
            else:
                ids, kinds, max_len_d, min_len_d = map(jnp.asarray, (batch.ids, batch.kinds, max_len, min_len))
            ds = _prefill(graphdef, state, ids, kinds, max_len_d, key, cache_len, max_steps, max(1, sampling.win_size), record_logp)
        return cls(model, ds, min_len_d, max_len_d, sampling, graphdef, state, mesh, np.zeros(n, np.int64))

    def advance(self, steps: int | None = None) -> "SpeechDecoder":
        until = self.ds.tokens.shape[1] if steps is None else int(self.ds.step) + int(steps)
        with _mesh_ctx(self.mesh):
            self.ds = _decode(self.graphdef, self.state, self.ds, self.min_len, self.max_len, jnp.asarray(until, jnp.int32), self.sampling)
        return self

    @property
    def finished(self) -> bool:
        return bool(jnp.all(self.ds.done))

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(tokens [B, N] padded with -1, lengths [B])."""
        return np.asarray(jax.device_get(self.ds.tokens)), np.asarray(jax.device_get(self.ds.lengths))

    def new_tokens(self) -> list[list[int]]:
        """Tokens emitted since the previous call, per row (for streaming)."""
        tokens, lengths = self.result()
        out = [tokens[i, self.emitted[i] : lengths[i]].tolist() for i in range(len(lengths))]
        self.emitted = lengths.astype(np.int64)
        return out


def generate(
    model: SpeechTokenLM,
    texts: Sequence[Sequence[int]],
    prompt_texts: Sequence[Sequence[int]] | None = None,
    prompt_speech: Sequence[Sequence[int]] | None = None,
    **kwargs: Any,
) -> list[list[int]]:
    """Speech tokens for a batch of texts (stop token excluded). See `SpeechDecoder.start`."""
    dec = SpeechDecoder.start(model, texts, prompt_texts, prompt_speech, **kwargs).advance()
    tokens, lengths = dec.result()
    return [tokens[i, : lengths[i]].tolist() for i in range(len(lengths))]


def stream(
    model: SpeechTokenLM,
    texts: Sequence[Sequence[int]],
    prompt_texts: Sequence[Sequence[int]] | None = None,
    prompt_speech: Sequence[Sequence[int]] | None = None,
    *,
    chunk: int = 5,
    **kwargs: Any,
) -> Iterator[list[list[int]]]:
    """Yields the tokens each row gained every `chunk` decode steps, until all rows stop."""
    dec = SpeechDecoder.start(model, texts, prompt_texts, prompt_speech, **kwargs)
    while not dec.finished:
        dec.advance(chunk)
        yield dec.new_tokens()


# ----------------------------------------------------------------------------- bistream decoding


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def _feed(graphdef, state, ids, kinds, cache):
    """Appends positions to the cache; returns the scores after the last one."""
    model = nnx.merge(graphdef, state)
    logits, cache = model(ids, kinds, attention_mask=(kinds != PAD).astype(jnp.int32), cache=cache)
    return logits[:, -1].astype(jnp.float32), cache


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling", "final", "max_tokens"), donate_argnames=("cache",))
def _segment(graphdef, state, logits, cache, history, key, n_out, next_fill, budget, sampling, final, max_tokens):
    """Decodes one bistream segment (batch 1): until a fill token (streaming phase) or eos
    (final phase), or `budget` tokens. Fill positions are forced as the reference does."""
    model = nnx.merge(graphdef, state)
    S = model.cfg.speech_token_size
    eos, fill, b = S, S + 2, model.cfg.mix_ratio[1]
    vocab = jnp.arange(logits.shape[-1])[None, :]
    # The reference raises if a non-speech token other than the phase's own stop comes up;
    # we never draw one: streaming phase draws speech or fill, the final phase speech or eos.
    banned = (vocab == eos) | (vocab == S + 1) if not final else (vocab == fill) | (vocab == S + 1)

    def cond(c):
        i, _, _, _, _, _, _, stop = c
        return (i < jnp.minimum(budget, max_tokens)) & ~stop  # budget counts fill/eos too

    def body(c):
        i, logits, cache, history, key, next_fill, out, _ = c
        key, sub = jax.random.split(key)
        logp = jnp.where(banned, -jnp.inf, jax.nn.log_softmax(logits, axis=-1))
        tok = ras_sample(logp, history, sub, sampling)
        if not final:
            forced = (next_fill >= 0) & (n_out + i == next_fill)
            tok = jnp.where(forced, fill, tok)
            next_fill = jnp.where(tok[0] == fill, n_out + i + b + 1, next_fill)
        out = out.at[i].set(tok[0])
        stop = tok[0] >= S
        history = _push(history, tok, jnp.ones((1,), bool))
        # A stop token is not fed back: its slot is written masked out (never attended, no
        # position), and the scores stay those before it.
        feed = jnp.where(stop, 0, tok)[:, None]
        new_logits, cache = model(feed, jnp.full_like(feed, SPEECH), attention_mask=(~stop).astype(jnp.int32).reshape(1, 1), cache=cache)
        logits = jnp.where(stop, logits, new_logits[:, -1].astype(jnp.float32))
        return i + 1, logits, cache, history, key, next_fill, out, stop

    out = jnp.full((max_tokens,), -1, jnp.int32)
    c = (jnp.zeros((), jnp.int32), logits, cache, history, key, next_fill, out, jnp.zeros((), bool))
    i, logits, cache, history, key, next_fill, out, stop = jax.lax.while_loop(cond, body, c)
    return logits, cache, history, key, next_fill, out, i


class BistreamDecoder:
    """Speech tokens for text that arrives in pieces (e.g. from the thinker), batch 1.

    The layout is the bistream training layout: [sos], then per a text tokens (a, b =
    mix_ratio) the text chunk and b speech tokens closed by a fill token (which is never fed
    back), and once the text ends, the remaining text, the task id and speech up to eos. A
    voice prompt's text and speech tokens are interleaved into the same layout first; the
    first fill index follows the prompt speech length as in the reference.
    Differences from the reference's `inference_bistream`, on purpose: (1) its final phase
    re-feeds the last already-cached input when the previous segment ended on a fill token
    (one duplicated position the training layout never has); we do not. (2) It raises when
    it draws S+1 (or a fill in the final phase); we mask those tokens instead. (3) Its final
    phase is unbounded; we stop at int(text tokens * max_ratio) speech tokens in all.
    """

    def __init__(
        self,
        model: SpeechTokenLM,
        prompt_text: Sequence[int] = (),
        prompt_speech: Sequence[int] = (),
        *,
        sampling: RasConfig | None = None,
        key: jax.Array | None = None,
        max_ratio: float = 20.0,
        capacity: int = 512,
        mesh: jax.sharding.Mesh | None = None,
    ):
        self.model, self.cfg = model, model.cfg
        self.graphdef, self.state = nnx.split(model)
        self.sampling = sampling or model.cfg.sampling
        self.key = jax.random.key(0) if key is None else key
        self.max_ratio, self.mesh = max_ratio, mesh
        self.pending: list[tuple[int, int]] = [(0, SOS)]  # positions not yet fed: (id, kind)
        self.text_cache = [int(t) for t in prompt_text]
        self.prompt_speech = [int(s) for s in prompt_speech]
        b = self.cfg.mix_ratio[1]
        self.next_fill = (len(self.prompt_speech) // b + 1) * b - len(self.prompt_speech)
        self.out: list[int] = []  # emitted tokens including fill tokens (the RAS window sees them)
        self.text_len = 0
        self.fed = 0
        self.capacity = capacity
        with _mesh_ctx(mesh):
            self.cache = model.init_cache(1, capacity)
            self.history = jnp.full((1, max(1, self.sampling.win_size)), -1, jnp.int32)
        self.logits = None
        self.finished = False

    def _flush(self) -> None:
        if not self.pending:
            return
        n = len(self.pending)
        t = _round_up(n, 8)
        ids = np.zeros((1, t), np.int32)
        kinds = np.full((1, t), PAD, np.int32)
        ids[0, t - n :] = [i for i, _ in self.pending]
        kinds[0, t - n :] = [k for _, k in self.pending]
        self._reserve(t)
        with _mesh_ctx(self.mesh):
            self.logits, self.cache = _feed(self.graphdef, self.state, jnp.asarray(ids), jnp.asarray(kinds), self.cache)
        self.fed += t
        self.pending = []

    def _reserve(self, n: int) -> None:
        """Grows the cache when `n` more slots would not fit (a copy and one new compile)."""
        if self.fed + n <= self.capacity:
            return
        grow = _round_up(self.fed + n - self.capacity, 512)
        c = self.cache
        pad = lambda x, axis: jnp.concatenate([x, jnp.zeros(x.shape[:axis] + (grow,) + x.shape[axis + 1 :], x.dtype)], axis)
        self.cache = KVCache(pad(c.k, 2), pad(c.v, 2), pad(c.mask, 1), c.index)
        self.capacity += grow

    def _decode(self, final: bool) -> list[int]:
        self._flush()
        limit = int(np.float32(self.text_len) * np.float32(self.max_ratio))
        budget = limit - sum(t < self.cfg.speech_token_size for t in self.out)
        if budget <= 0:
            return []
        max_tokens = self.cfg.mix_ratio[1] + 1 if not final else _round_up(budget + 1, 64)
        self._reserve(max_tokens)
        self.key, sub = jax.random.split(self.key)
        with _mesh_ctx(self.mesh):
            self.logits, self.cache, self.history, _, next_fill, out, n = _segment(
                self.graphdef, self.state, self.logits, self.cache, self.history, sub,
                jnp.asarray(len(self.out), jnp.int32), jnp.asarray(self.next_fill, jnp.int32),
                jnp.asarray(budget, jnp.int32), self.sampling, final, max_tokens,
            )
        n = int(n)
        toks = np.asarray(jax.device_get(out))[:n].tolist()
        self.next_fill = int(next_fill)
        self.out += toks
        self.fed += n  # every step wrote one cache slot (a stop token's slot masked out)
        return [t for t in toks if t < self.cfg.speech_token_size]

    def push_text(self, text: Sequence[int]) -> list[int]:
        """Adds text tokens; returns the speech tokens that can be decoded so far."""
        if self.finished:
            raise RuntimeError("push_text after finish()")
        a, b = self.cfg.mix_ratio
        text = [int(t) for t in text]
        if text and (min(text) < 0 or max(text) >= self.cfg.qwen2.vocab_size):
            raise ValueError(f"text ids must lie in [0, {self.cfg.qwen2.vocab_size}); got {min(text)}..{max(text)}")
        self.text_cache += text
        self.text_len += len(text)
        while self.prompt_speech and len(self.text_cache) >= a:
            self.pending += [(t, TEXT) for t in self.text_cache[:a]] + [(s, SPEECH) for s in self.prompt_speech[:b]]
            self.text_cache, self.prompt_speech = self.text_cache[a:], self.prompt_speech[b:]
        new: list[int] = []
        if self.prompt_speech:
            return new  # wait for enough text to place the rest of the prompt speech
        while True:
            at_start = not self.out and self.pending == [(0, SOS)] and self.fed == 0
            if at_start or (self.out and self.out[-1] == self.cfg.fill):
                if len(self.text_cache) < a:
                    return new
                self.pending += [(t, TEXT) for t in self.text_cache[:a]]
                self.text_cache = self.text_cache[a:]
            got = self._decode(final=False)
            new += got
            if not got and not (self.out and self.out[-1] == self.cfg.fill):
                return new  # length budget used up

    def finish(self) -> list[int]:
        """No more text: feeds the rest of the text and the task id, decodes up to eos."""
        if self.finished:
            return []
        self.finished = True
        self.pending += [(t, TEXT) for t in self.text_cache] + [(1, TASK)]
        # Prompt speech that never found enough text goes after the task id, as in the
        # unistream layout's prompt.
        self.pending += [(s, SPEECH) for s in self.prompt_speech]
        self.text_cache, self.prompt_speech = [], []
        return self._decode(final=True)


def stream_bistream(
    model: SpeechTokenLM,
    text_chunks: Iterable[Sequence[int]],
    prompt_text: Sequence[int] = (),
    prompt_speech: Sequence[int] = (),
    **kwargs: Any,
) -> Iterator[list[int]]:
    """Yields speech tokens as text chunks arrive (see `BistreamDecoder`)."""
    dec = BistreamDecoder(model, prompt_text, prompt_speech, **kwargs)
    for chunk in text_chunks:
        got = dec.push_text(chunk)
        if got:
            yield got
    got = dec.finish()
    if got:
        yield got


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _mesh_ctx(mesh):
    return jax.set_mesh(mesh) if mesh is not None else _null()
