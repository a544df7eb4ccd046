"""KV-cached batched decoding and the samplers.

Prefill and the whole decode loop are each one compiled function: the loop is a
`lax.while_loop` over a fixed-size cache, so no step recompiles and no Python runs per token.
Prompt and cache lengths are rounded up to buckets so nearby prompt sizes share a compile.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hellochat_jax.core import sharding as shd


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 means greedy; the filters apply in transformers' order:
    repetition penalty -> temperature -> top-k -> top-p."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0


def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: float) -> jax.Array:
    """CTRL-style penalty on tokens already present: divide positive logits, multiply negative."""
    if penalty == 1.0:
        return logits
    penalised = jnp.where(logits > 0, logits / penalty, logits * penalty)
    return jnp.where(seen, penalised, logits)


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, -jnp.inf, logits)


def top_p_filter(logits: jax.Array, p: float) -> jax.Array:
    """Keeps the smallest set of most likely tokens whose probability reaches p (at least one)."""
    if p >= 1.0:
        return logits
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
    keep_sorted = before < p
    threshold = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < threshold, -jnp.inf, logits)


def sample_next(logits: jax.Array, seen: jax.Array, key: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """logits [B, V] -> next tokens [B]."""
    logits = apply_repetition_penalty(logits.astype(jnp.float32), seen, cfg.repetition_penalty)
    if cfg.temperature <= 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / cfg.temperature
    logits = top_p_filter(top_k_filter(logits, cfg.top_k), cfg.top_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _round_up(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int = 0, multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> (ids, mask) left-padded to a common (bucketed) length."""
    t = _round_up(max(len(s) for s in sequences), multiple)
    ids = np.full((len(sequences), t), pad_id, np.int32)
    mask = np.zeros((len(sequences), t), np.int32)
    for i, s in enumerate(sequences):
        if len(s):
            ids[i, t - len(s):] = s
            mask[i, t - len(s):] = 1
    return ids, mask


@functools.partial(jax.jit, static_argnames=("graphdef", "max_len"))
def _prefill(graphdef, state, input_ids, inputs_embeds, attention_mask, max_len):
    model = nnx.merge(graphdef, state)
    cache = model.init_cache(attention_mask.shape[0], max_len)
    if inputs_embeds is not None:
        logits, cache = model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, cache=cache)
    else:
        logits, cache = model(input_ids, attention_mask=attention_mask, cache=cache)
    return logits[:, -1].astype(jnp.float32), cache


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "sampling", "pad_id"))
def _decode(graphdef, state, logits, cache, seen, stop_tokens, key, max_new_tokens, sampling, pad_id):
    model = nnx.merge(graphdef, state)
    b = logits.shape[0]
    tokens = jnp.full((b, max_new_tokens), pad_id, jnp.int32)
    done = jnp.zeros((b,), bool)
    lengths = jnp.zeros((b,), jnp.int32)

    def cond(carry):
        step, _, _, _, _, done, _, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, logits, cache, seen, tokens, done, lengths, key = carry
        key, sub = jax.random.split(key)
        nxt = sample_next(logits, seen, sub, sampling)
        nxt = jnp.where(done, pad_id, nxt)
        is_stop = jnp.any(nxt[:, None] == stop_tokens[None, :], axis=-1) & ~done
        tokens = tokens.at[:, step].set(jnp.where(is_stop, pad_id, nxt))
        lengths = lengths + (~done & ~is_stop)
        done = done | is_stop
        seen = seen.at[jnp.arange(b), nxt].set(seen[jnp.arange(b), nxt] | ~done)
        # Finished rows keep stepping (fixed shapes); their outputs are discarded.
        new_logits, cache = model(nxt[:, None], attention_mask=jnp.ones((b, 1), jnp.int32), cache=cache)
        return step + 1, new_logits[:, -1].astype(jnp.float32), cache, seen, tokens, done, lengths, key

    carry = (jnp.zeros((), jnp.int32), logits, cache, seen, tokens, done, lengths, key)
    carry = jax.lax.while_loop(cond, body, carry)
    return carry[4], carry[6]


def generate(
    model: nnx.Module,
    input_ids: np.ndarray,
    attention_mask: np.ndarray | None = None,
    *,
    max_new_tokens: int,
    sampling: SamplingConfig = SamplingConfig(),
    stop_tokens: Sequence[int] = (),
    pad_id: int = 0,
    key: jax.Array | None = None,
    inputs_embeds: jax.Array | None = None,
    mesh: jax.sharding.Mesh | None = None,
    cache_multiple: int = 64,
) -> tuple[np.ndarray, np.ndarray]:
    """Generates up to `max_new_tokens` per row from a LEFT-padded batch.

    `model` is any module with `__call__(input_ids | inputs_embeds, attention_mask, cache)
    -> (logits, cache)` and `init_cache(batch, max_len)` (the thinker; MiDashengLM passes its
    audio-spliced `inputs_embeds` for the prompt). Returns (tokens [B, N] padded with pad_id
    after a stop token, lengths [B] = tokens before the stop).
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
    max_len = _round_up(t + max_new_tokens, cache_multiple)
    key = jax.random.key(0) if key is None else key
    seen = np.zeros((b, vocab), bool)
    rows = np.repeat(np.arange(b), t)
    seen[rows[attention_mask.reshape(-1) > 0], input_ids.reshape(-1)[attention_mask.reshape(-1) > 0]] = True
    stop = np.asarray(list(stop_tokens) or [-1], np.int32)

    graphdef, state = nnx.split(model)
    ctx = jax.set_mesh(mesh) if mesh is not None else _null()
    with ctx:
        if mesh is not None:
            ids_d, mask_d, seen_d = shd.put_batch((input_ids, attention_mask, seen), mesh, shd.current_rules())
        else:
            ids_d, mask_d, seen_d = jnp.asarray(input_ids), jnp.asarray(attention_mask), jnp.asarray(seen)
        logits, cache = _prefill(graphdef, state, ids_d, inputs_embeds, mask_d, max_len)
        tokens, lengths = _decode(graphdef, state, logits, cache, seen_d, jnp.asarray(stop), key, max_new_tokens, sampling, pad_id)
    return np.asarray(jax.device_get(tokens)), np.asarray(jax.device_get(lengths))


def _vocab_size(model) -> int:
    cfg = getattr(model, "cfg", None)
    return int(getattr(cfg, "vocab_size", 0)) or int(model.model.embed_tokens.embedding.shape[0])


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
