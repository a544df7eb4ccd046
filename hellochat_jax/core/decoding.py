"""KV-cached batched decoding: one compiled loop for every decoder, sampling methods as plug-ins.

The thinker (Qwen2), the talker's speech-token LM and its bistream (text arriving piecewise)
decoding all run `decode`: a `lax.while_loop` over a fixed-size cache, so no step recompiles
and no Python runs per token. What differs between them is small and static:

  * `StepRules`: how a drawn token is fed back (which embedding table, which head), which ids
    stop a row, which are never drawn, which is banned below a row's minimum length, which is
    forced at a given step (bistream's fill token), and whether samplers see raw logits
    (transformers) or log-probs (CosyVoice);
  * a `SamplingMethod`: `Greedy`, `Nucleus`, `RepetitionPenalty(inner)`, `RepetitionAware(inner)`
    (CosyVoice 2's RAS). Each is a frozen dataclass, so it is hashable and is a static argument
    of the compiled loop: the same method reuses the compile, another one compiles once.

Per-row numbers (min/max length, forced step) are arrays, so new values do not recompile, and
the loop state (`DecodeState`) is resumable: `decode(..., until=n)` stops after n steps and a
later call continues, which is how tokens stream out in chunks.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hellochat_jax.core import sharding as shd

# ----------------------------------------------------------------------------- sampling methods


class History(NamedTuple):
    """What sampling methods may look at besides the scores."""

    seen: jax.Array | None = None  # [B, V] bool: ids in the prompt or emitted so far
    recent: jax.Array | None = None  # [B, W] int32: the last W drawn tokens, oldest first, -1 = none


class SamplingMethod(abc.ABC):
    """Picks one token per row: `method(scores [B, V], key, history) -> tokens [B]`.

    Subclasses are frozen dataclasses, hashable so that a method is a jit static argument.
    Scores are logits or log-probs (the loop's `StepRules.log_probs` says which; both give the
    same distribution), with -inf where a token must not be drawn.
    """

    @property
    def recent_tokens(self) -> int:
        """How many recently drawn tokens the method reads from `history.recent`."""
        return 0

    @abc.abstractmethod
    def __call__(self, scores: jax.Array, key: jax.Array, history: History) -> jax.Array: ...


@dataclasses.dataclass(frozen=True)
class Greedy(SamplingMethod):
    def __call__(self, scores: jax.Array, key: jax.Array, history: History) -> jax.Array:
        return jnp.argmax(scores, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Nucleus(SamplingMethod):
    """Temperature, then top-k, then top-p: walking the tokens from most to least likely, keep
    one while the mass before it is < top_p (at least one is kept); draw among those kept.

    full_mass=False measures that mass within the top-k renormalised (transformers' top-k
    then top-p warpers); full_mass=True in the full distribution (CosyVoice's
    nucleus_sampling). top_k=0 means no cap. Only the top-k can be kept, so this takes
    lax.top_k rather than sorting the whole vocabulary.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    full_mass: bool = False

    def __post_init__(self):
        if not self.temperature > 0.0:
            raise ValueError(f"temperature must be > 0 (use Greedy for argmax), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = no cap), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")

    def __call__(self, scores: jax.Array, key: jax.Array, history: History) -> jax.Array:
        scores = scores.astype(jnp.float32) / self.temperature
        v = scores.shape[-1]
        k = min(self.top_k, v) if self.top_k > 0 else v
        if k == v and self.top_p >= 1.0:
            return jax.random.categorical(key, scores, axis=-1).astype(jnp.int32)
        best, index = jax.lax.top_k(scores, k)  # descending
        total = jax.nn.logsumexp(scores if self.full_mass else best, axis=-1, keepdims=True)
        probs = jnp.exp(best - total)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
        keep = (before < self.top_p) | (jnp.arange(k) == 0)
        pick = jax.random.categorical(key, jnp.where(keep, best, -jnp.inf), axis=-1)
        return jnp.take_along_axis(index, pick[:, None], axis=-1)[:, 0].astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class RepetitionPenalty(SamplingMethod):
    """CTRL's penalty on ids already seen (prompt included), applied to raw logits before
    `inner` as transformers does: positive logits divided by `penalty`, negative multiplied."""

    inner: SamplingMethod = Greedy()
    penalty: float = 1.0

    @property
    def recent_tokens(self) -> int:
        return self.inner.recent_tokens

    def __call__(self, scores: jax.Array, key: jax.Array, history: History) -> jax.Array:
        penalised = jnp.where(scores > 0, scores / self.penalty, scores * self.penalty)
        return self.inner(jnp.where(history.seen, penalised, scores), key, history)


@dataclasses.dataclass(frozen=True)
class RepetitionAware(SamplingMethod):
    """Repetition-aware sampling (VALL-E 2; CosyVoice 2's ras_sampling): draw with `inner`; if
    that token is among the last `window` drawn at least `window * tau_r` times, ban it and
    draw again from the full distribution."""

    inner: SamplingMethod = Nucleus(top_p=0.8, top_k=25, full_mass=True)
    window: int = 10
    tau_r: float = 0.1

    @property
    def recent_tokens(self) -> int:
        return max(self.window, self.inner.recent_tokens)

    def __post_init__(self):
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")

    def __call__(self, scores: jax.Array, key: jax.Array, history: History) -> jax.Array:
        k_inner, k_full = jax.random.split(key)
        first = self.inner(scores, k_inner, history)
        repeats = jnp.sum(history.recent[:, -self.window :] == first[:, None], axis=-1)
        banned = jnp.where(jnp.arange(scores.shape[-1])[None, :] == first[:, None], -jnp.inf, scores)
        again = jax.random.categorical(k_full, banned, axis=-1).astype(jnp.int32)
        return jnp.where(repeats >= self.window * self.tau_r, again, first)


def sampling_method(temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0) -> SamplingMethod:
    """transformers-style options -> a method; temperature 0 means greedy."""
    method: SamplingMethod = Greedy() if temperature <= 0.0 else Nucleus(temperature, top_k, top_p)
    return RepetitionPenalty(method, repetition_penalty) if repetition_penalty != 1.0 else method


_METHODS = {cls.__name__: cls for cls in (Greedy, Nucleus, RepetitionPenalty, RepetitionAware)}


def sampling_to_dict(method: SamplingMethod) -> dict[str, Any]:
    """A JSON-able description, e.g. {"method": "RepetitionAware", "inner": {...}, ...}."""
    out: dict[str, Any] = {"method": type(method).__name__}
    for f in dataclasses.fields(method):
        value = getattr(method, f.name)
        out[f.name] = sampling_to_dict(value) if isinstance(value, SamplingMethod) else value
    return out


def sampling_from_dict(d: dict[str, Any]) -> SamplingMethod:
    if d.get("method") not in _METHODS:
        raise ValueError(f"unknown sampling method {d.get('method')!r}; known: {sorted(_METHODS)}")
    fields = {k: sampling_from_dict(v) if isinstance(v, dict) else v for k, v in d.items() if k != "method"}
    return _METHODS[d["method"]](**fields)


# ----------------------------------------------------------------------------- the decode loop

# feed(model, tokens [B], live [B] bool, cache) -> (scores [B, V] f32, cache): appends one
# position per row (masked out where not live) and returns the next scores.
Feed = Callable[[nnx.Module, jax.Array, jax.Array, Any], tuple[jax.Array, Any]]


@dataclasses.dataclass(frozen=True)
class StepRules:
    """The static part of a decode: everything here is in the compile key."""

    feed: Feed
    stop_ids: tuple[int, ...] = ()  # a drawn stop id ends its row; it is not emitted nor fed
    banned_ids: tuple[int, ...] = ()  # never drawn
    min_len_banned: tuple[int, ...] = ()  # banned while a row has taken fewer than min_len steps
    force_id: int | None = None  # taken instead of the draw at a row's force_step
    pad_id: int = 0  # written to `tokens` where nothing was emitted
    log_probs: bool = False  # samplers see log-softmax scores instead of raw logits


class RowLimits(NamedTuple):
    """Per-row numbers of one decode (arrays: new values reuse the compile)."""

    min_len: jax.Array  # [B] int32
    max_len: jax.Array  # [B] int32: a row ends once it has emitted this many tokens
    force_step: jax.Array  # [B] int32: the step that takes StepRules.force_id (-1 = none)


def row_limits(batch: int, min_len: Any = 0, max_len: Any = np.iinfo(np.int32).max, force_step: Any = -1) -> RowLimits:
    full = lambda x: np.broadcast_to(np.asarray(x, np.int32), (batch,)).copy()
    return RowLimits(full(min_len), full(max_len), full(force_step))


class DecodeState(NamedTuple):
    """Everything the loop carries; `decode` may stop and resume it any number of times."""

    step: jax.Array  # [] steps taken
    scores: jax.Array  # [B, V] f32 logits for the next step
    cache: Any
    history: History
    tokens: jax.Array  # [B, N] emitted tokens (StepRules.pad_id elsewhere)
    lengths: jax.Array  # [B] tokens emitted
    done: jax.Array  # [B]
    stop_token: jax.Array  # [B] the stop id that ended the row (-1 = none)
    key: jax.Array
    logp: jax.Array | None  # [B, N, V] per-step log-probs before any mask (if recorded)


def initial_state(
    scores: jax.Array,
    cache: Any,
    key: jax.Array,
    *,
    max_steps: int,
    sampler: SamplingMethod,
    seen: jax.Array | None = None,
    recent: jax.Array | None = None,
    pad_id: int = 0,
    done: jax.Array | None = None,
    record_logp: bool = False,
) -> DecodeState:
    """A fresh state after a prompt: `scores` are the prompt's last-position logits. `seen`
    defaults to nothing seen, `recent` to an empty window of the sampler's size."""
    b, v = scores.shape
    seen = jnp.zeros((b, v), bool) if seen is None else seen
    recent = jnp.full((b, max(1, sampler.recent_tokens)), -1, jnp.int32) if recent is None else recent
    return DecodeState(
        step=jnp.zeros((), jnp.int32),
        scores=scores,
        cache=cache,
        history=History(seen, recent),
        tokens=jnp.full((b, max_steps), pad_id, jnp.int32),
        lengths=jnp.zeros((b,), jnp.int32),
        done=jnp.zeros((b,), bool) if done is None else done,
        stop_token=jnp.full((b,), -1, jnp.int32),
        key=jax.random.clone(key),  # `decode` donates the state; the caller keeps its key
        logp=jnp.zeros((b, max_steps, v), jnp.float32) if record_logp else None,
    )


@functools.partial(jax.jit, static_argnames=("graphdef", "prompt", "cache_len"))
def prefill(graphdef, state, inputs: Any, *, prompt: Callable, cache_len: int) -> tuple[jax.Array, Any]:
    """Runs a prompt into a fresh cache of `cache_len` slots: `prompt(model, inputs, cache) ->
    (scores [B, V] f32, cache)`; the batch size is that of the first leaf of `inputs`."""
    model = nnx.merge(graphdef, state)
    batch = jax.tree.leaves(inputs)[0].shape[0]
    return prompt(model, inputs, model.init_cache(batch, cache_len))


@functools.partial(jax.jit, static_argnames=("graphdef", "prompt"), donate_argnames=("cache",))
def extend(graphdef, state, inputs: Any, cache: Any, *, prompt: Callable) -> tuple[jax.Array, Any]:
    """Appends more prompt positions to an existing cache (bistream's incoming text)."""
    return prompt(nnx.merge(graphdef, state), inputs, cache)


@functools.partial(jax.jit, static_argnames=("graphdef", "rules", "sampler"), donate_argnames=("ds",))
def decode(graphdef, state, ds: DecodeState, limits: RowLimits, until: jax.Array, *, rules: StepRules, sampler: SamplingMethod) -> DecodeState:
    """Steps until every row is done, the token buffer is full, or `until` steps are taken.

    Per step and row: mask the scores (banned ids; min_len_banned below min_len), draw with `sampler`,
    override at force_step, then a stop id ends the row, anything else is emitted and fed back.
    Finished rows keep stepping (fixed shapes) with their positions masked out of the cache.
    """
    model = nnx.merge(graphdef, state)
    b, max_steps = ds.tokens.shape
    rows = jnp.arange(b)
    stop_ids = jnp.asarray(rules.stop_ids or (-1,), jnp.int32)

    def cond(ds: DecodeState):
        return (ds.step < jnp.minimum(until, max_steps)) & ~jnp.all(ds.done)

    def body(ds: DecodeState) -> DecodeState:
        key, sub = jax.random.split(ds.key)
        logp = jax.nn.log_softmax(ds.scores, axis=-1)
        recorded = ds.logp.at[:, ds.step].set(logp) if ds.logp is not None else None
        scores = logp if rules.log_probs else ds.scores
        vocab = jnp.arange(scores.shape[-1])[None, :]
        if rules.banned_ids:
            scores = jnp.where(jnp.isin(vocab, jnp.asarray(rules.banned_ids)), -jnp.inf, scores)
        if rules.min_len_banned:
            early = (ds.step < limits.min_len)[:, None] & jnp.isin(vocab, jnp.asarray(rules.min_len_banned))
            scores = jnp.where(early, -jnp.inf, scores)
        tok = sampler(scores, sub, ds.history)
        if rules.force_id is not None:
            tok = jnp.where(ds.step == limits.force_step, rules.force_id, tok)

        live = ~ds.done
        is_stop = jnp.any(tok[:, None] == stop_ids[None, :], axis=-1)
        emit = live & ~is_stop
        lengths = ds.lengths + emit
        history = History(
            seen=ds.history.seen.at[rows, tok].set(ds.history.seen[rows, tok] | emit),
            # the window sees stop tokens too (bistream's fill tokens count as repeats)
            recent=jnp.where(live[:, None], jnp.concatenate([ds.history.recent[:, 1:], tok[:, None]], axis=1), ds.history.recent),
        )
        # A stop token is not fed back: its slot is written masked out (never attended, no
        # position), and the row keeps the scores from before it.
        new_scores, cache = rules.feed(model, jnp.where(emit, tok, 0), emit, ds.cache)
        return DecodeState(
            step=ds.step + 1,
            scores=jnp.where(emit[:, None], new_scores, ds.scores),
            cache=cache,
            history=history,
            tokens=ds.tokens.at[:, ds.step].set(jnp.where(emit, tok, rules.pad_id)),
            lengths=lengths,
            done=ds.done | is_stop | (lengths >= limits.max_len),
            stop_token=jnp.where(live & is_stop, tok, ds.stop_token),
            key=key,
            logp=recorded,
        )

    return jax.lax.while_loop(cond, body, ds)


# ----------------------------------------------------------------------------- the thinker


def thinker_prompt(model: nnx.Module, inputs: dict[str, jax.Array], cache: Any) -> tuple[jax.Array, Any]:
    """inputs: attention_mask and input_ids, or inputs_embeds (MiDashengLM's audio-spliced prompt).
    `model` is a Qwen2Thinker; only the last position goes through the LM head (over a whole
    prompt, a 150k-way head would be most of the prefill's FLOPs). `prefill` hands it a fresh cache,
    hence `empty_cache=True`."""
    if "inputs_embeds" in inputs:
        hidden, cache = model.model(
            inputs_embeds=inputs["inputs_embeds"], attention_mask=inputs["attention_mask"], cache=cache, empty_cache=True
        )
    else:
        hidden, cache = model.model(inputs["input_ids"], attention_mask=inputs["attention_mask"], cache=cache, empty_cache=True)
    return model.logits(hidden[:, -1:])[:, 0].astype(jnp.float32), cache


def thinker_feed(model: nnx.Module, tokens: jax.Array, live: jax.Array, cache: Any) -> tuple[jax.Array, Any]:
    logits, cache = model(tokens[:, None], attention_mask=live[:, None].astype(jnp.int32), cache=cache)
    return logits[:, -1].astype(jnp.float32), cache


def round_up(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int = 0, multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> (ids, mask) left-padded to a common (bucketed) length."""
    t = round_up(max(len(s) for s in sequences), multiple)
    ids = np.full((len(sequences), t), pad_id, np.int32)
    mask = np.zeros((len(sequences), t), np.int32)
    for i, s in enumerate(sequences):
        if len(s):
            ids[i, t - len(s):] = s
            mask[i, t - len(s):] = 1
    return ids, mask


def generate(
    model: nnx.Module,
    input_ids: np.ndarray,
    attention_mask: np.ndarray | None = None,
    *,
    max_new_tokens: int,
    sampling: SamplingMethod = Greedy(),
    stop_tokens: Sequence[int] = (),
    min_new_tokens: int = 0,
    pad_id: int = 0,
    key: jax.Array | None = None,
    inputs_embeds: jax.Array | None = None,
    mesh: jax.sharding.Mesh | None = None,
    cache_multiple: int = 64,
) -> tuple[np.ndarray, np.ndarray]:
    """Generates up to `max_new_tokens` per row from a LEFT-padded batch.

    `model` is any module with `__call__(input_ids | inputs_embeds, attention_mask, cache)
    -> (logits, cache)` and `init_cache(batch, max_len)` (the thinker; MiDashengLM passes its
    audio-spliced `inputs_embeds` for the prompt). Stop tokens are banned for the first
    `min_new_tokens` steps. Returns (tokens [B, N] padded with pad_id after a stop token,
    lengths [B] = tokens before the stop).
    """
    input_ids = np.asarray(input_ids, np.int32)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
    attention_mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask, np.int32)
    if np.any(attention_mask[:, -1] == 0):
        raise ValueError("prompts must be LEFT-padded (the last position of every row must be a real token)")
    if max_new_tokens <= 0:
        raise ValueError("max_new_tokens must be positive")
    b, t = input_ids.shape
    vocab = _vocab_size(model)
    if int(input_ids.max(initial=0)) >= vocab or int(input_ids.min(initial=0)) < 0:
        raise ValueError(f"token ids must lie in [0, {vocab}); got {input_ids.min()}..{input_ids.max()}")
    stop = tuple(sorted({int(s) for s in stop_tokens}))
    key = jax.random.key(0) if key is None else key
    seen = np.zeros((b, vocab), bool)
    real = attention_mask > 0
    seen[np.repeat(np.arange(b), t)[real.reshape(-1)], input_ids[real]] = True
    rules = StepRules(thinker_feed, stop_ids=stop, min_len_banned=stop if min_new_tokens > 0 else (), pad_id=pad_id)
    limits = row_limits(b, min_len=min_new_tokens)

    graphdef, state = nnx.split(model)
    with mesh_context(mesh):
        if mesh is not None:
            ids_d, mask_d, seen_d, limits = shd.put_batch((input_ids, attention_mask, seen, limits), mesh, shd.current_rules())
        else:
            ids_d, mask_d, seen_d = jnp.asarray(input_ids), jnp.asarray(attention_mask), jnp.asarray(seen)
        inputs = {"attention_mask": mask_d, **({"inputs_embeds": inputs_embeds} if inputs_embeds is not None else {"input_ids": ids_d})}
        scores, cache = prefill(graphdef, state, inputs, prompt=thinker_prompt, cache_len=round_up(t + max_new_tokens, cache_multiple))
        ds = initial_state(scores, cache, key, max_steps=max_new_tokens, sampler=sampling, seen=seen_d, pad_id=pad_id)
        ds = decode(graphdef, state, ds, limits, jnp.asarray(max_new_tokens, jnp.int32), rules=rules, sampler=sampling)
    return np.asarray(jax.device_get(ds.tokens)), np.asarray(jax.device_get(ds.lengths))


def _vocab_size(model) -> int:
    cfg = getattr(model, "cfg", None)
    return int(getattr(cfg, "vocab_size", 0)) or int(model.model.embed_tokens.embedding.shape[0])


def mesh_context(mesh: jax.sharding.Mesh | None):
    return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()
