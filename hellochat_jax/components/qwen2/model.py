"""Qwen2 decoder: the thinker, and the backbone of the talker's speech-token LM.

One decoder class serves both: `Qwen2Model` maps embeddings to hidden states (the talker feeds
its own speech/text embeddings), `Qwen2Thinker` adds the token embedding lookup and LM head.

Attention masks: `attention_mask` is [B, T] with 0 = padding and k > 0 a segment id (plain 0/1
masks are one segment). A query attends to keys that are causal, non-padding and in the same
segment, so left-padded inference batches and packed training rows share one code path.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from hellochat_jax.core.layers import Embed, Linear, RMSNorm, as_dtype, as_precision
from hellochat_jax.core.sharding import constrain


@dataclasses.dataclass(frozen=True)
class Qwen2Config:
    vocab_size: int = 151936
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    head_dim: int | None = None
    rope_theta: float = 1000000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 32768
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"  # storage dtype (f32 master weights with bf16 compute)
    precision: str = "default"  # "highest" for bit-level parity on accelerators
    scan_layers: bool = False
    remat: str = "none"  # none | full | dots | dots_no_batch

    def __post_init__(self):
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )

    # Fields of an HF config.json that we read; everything else there is ignored on purpose.
    HF_FIELDS = (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "rope_theta", "rms_norm_eps", "tie_word_embeddings",
        "max_position_embeddings",
    )

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides: Any) -> "Qwen2Config":
        """From a transformers Qwen2 config.json dict (Qwen2.5-0.5B/1.5B/7B and tiny ones)."""
        if hf.get("model_type", "qwen2") != "qwen2":
            raise ValueError(f"expected a qwen2 config, got model_type={hf.get('model_type')!r}")
        if hf.get("use_sliding_window"):
            raise ValueError("sliding-window attention (use_sliding_window=true) is not supported")
        scaling = hf.get("rope_scaling")
        if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
            raise ValueError(f"rope_scaling {scaling} is not supported")
        rope_theta = hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0))
        kwargs = {k: hf[k] for k in cls.HF_FIELDS if k in hf and hf[k] is not None}
        kwargs["rope_theta"] = float(rope_theta)
        kwargs.setdefault("num_key_value_heads", kwargs.get("num_attention_heads"))
        kwargs.setdefault("tie_word_embeddings", False)
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_hf(self) -> dict[str, Any]:
        return {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "hidden_act": "silu",
            "attention_dropout": 0.0,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "use_sliding_window": False,
            "sliding_window": None,
            "max_window_layers": self.num_hidden_layers,
            "rope_scaling": None,
            "use_cache": True,
            "torch_dtype": "float32" if self.param_dtype == "float32" else "bfloat16",
        }


class KVCache(NamedTuple):
    """Per-layer keys/values for decoding, written in place at `index`.

    `mask` holds the segment id of every written slot (0 = empty or padding), so left padding
    stays masked for the whole generation.
    """

    k: jax.Array  # [layers, B, S, kv_heads, head_dim]
    v: jax.Array
    mask: jax.Array  # [B, S] int32
    index: jax.Array  # [] int32, next slot to write


def init_cache(cfg: Qwen2Config, batch: int, max_len: int, dtype: Any | None = None) -> KVCache:
    dtype = as_dtype(dtype or cfg.dtype)
    shape = (cfg.num_hidden_layers, batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
    k = constrain(jnp.zeros(shape, dtype), ("layers", "batch", "length", "kv_heads", "head_dim"))
    v = constrain(jnp.zeros(shape, dtype), ("layers", "batch", "length", "kv_heads", "head_dim"))
    return KVCache(k, v, jnp.zeros((batch, max_len), jnp.int32), jnp.zeros((), jnp.int32))


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotate-half (NeoX) rotary embedding. x [B, T, H, D], positions [B, T]."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    cos = jnp.concatenate([jnp.cos(angles)] * 2, -1)[:, :, None, :]
    sin = jnp.concatenate([jnp.sin(angles)] * 2, -1)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    rotated = jnp.concatenate([-x32[..., d // 2 :], x32[..., : d // 2]], -1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


def grouped_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array, precision: jax.lax.Precision | None
) -> jax.Array:
    """Grouped-query attention. q [B, T, H, D], k/v [B, S, KV, D], allowed [B, T, S] -> [B, T, H, D].

    The G = H / KV query heads that share a key head are folded into the query length
    ([B, KV, G*T, D]), so each matmul (and each of its gradients) has one contracting and one
    free dimension per operand: XLA's CPU dot then reads the [.., T, S] scores in place
    instead of transposing them. The mask is added as a bias rather than selected with
    `where`, so the backward pass has no score-sized select; its finite minimum
    (not -inf) keeps fully masked padding rows finite (uniform)."""
    b, t, h, d = q.shape
    s, kvh = k.shape[1], k.shape[2]
    g = h // kvh
    with jax.named_scope("attention"):
        qf = (q * (d**-0.5)).reshape(b, t, kvh, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kvh, g * t, d)
        scores = jnp.einsum("bkqd,bskd->bkqs", qf, k, precision=precision).astype(jnp.float32)
        bias = jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min)[:, None, None]  # [B, 1, 1, T, S]
        scores = scores.reshape(b, kvh, g, t, s) + bias
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(b, kvh, g * t, s)
        out = jnp.einsum("bkqs,bskd->bkqd", probs, v, precision=precision)
        return out.reshape(b, kvh, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def causal_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array, precision: jax.lax.Precision | None
) -> jax.Array:
    """Self-attention of a sequence on itself (training, or a prefill into an empty cache):
    `grouped_attention` computed in query blocks, block i reading only keys [0, end of block i).
    The causal mask makes every later key's weight exactly zero, so only the work changes:
    about half the score FLOPs and memory traffic, 1.3-2.5x faster forward + backward on CPU
    (bench/attention.py). Rows that allow no key at all (padding) come out as the uniform
    average of their block's keys rather than of all keys: their values are never used.
    q [B, T, H, D], k/v [B, T, KV, D] (key j = query j), allowed [B, T, T] -> [B, T, H, D]."""
    b, t, h, d = q.shape
    kvh = k.shape[2]
    g = h // kvh
    # At most 16 blocks: unrolled, so compile time grows with their number. At least 64 rows:
    # smaller blocks cost more in per-op overhead than they save (tiny train step, T 256:
    # 64-row blocks 3-5% faster than 32-row ones, bench/train.py).
    block = max(64, -(-t // 16))
    if t <= block:
        return grouped_attention(q, k, v, allowed, precision)
    with jax.named_scope("attention"):
        # Rows ordered (position, group) so that a query block is one contiguous row range.
        qf = (q * (d**-0.5)).reshape(b, t, kvh, g, d).transpose(0, 2, 1, 3, 4).reshape(b, kvh, t * g, d)
        kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, KV, T, D]
        bias = jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min)
        outs = []
        for start in range(0, t, block):
            end = min(start + block, t)
            scores = jnp.einsum("bkqd,bksd->bkqs", qf[:, :, start * g : end * g], kt[:, :, :end], precision=precision)
            scores = scores.astype(jnp.float32).reshape(b, kvh, end - start, g, end) + bias[:, None, start:end, None, :end]
            probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(b, kvh, (end - start) * g, end)
            outs.append(jnp.einsum("bkqs,bksd->bkqd", probs, vt[:, :, :end], precision=precision))
        out = jnp.concatenate(outs, axis=2)
        return out.reshape(b, kvh, t, g, d).transpose(0, 2, 1, 3, 4).reshape(b, t, h, d)


class Qwen2Attention(nnx.Module):
    def __init__(self, cfg: Qwen2Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dt, pdt = as_dtype(cfg.dtype), as_dtype(cfg.param_dtype)
        h, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        common = dict(dtype=dt, param_dtype=pdt, precision=cfg.precision, rngs=rngs)
        self.q_proj = Linear(cfg.hidden_size, h * d, names=("embed", "heads"), **common)
        self.k_proj = Linear(cfg.hidden_size, kv * d, names=("embed", "kv_heads"), **common)
        self.v_proj = Linear(cfg.hidden_size, kv * d, names=("embed", "kv_heads"), **common)
        self.o_proj = Linear(h * d, cfg.hidden_size, names=("heads", "embed"), use_bias=False, **common)

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        q_segment: jax.Array,
        q_slot: jax.Array,
        cache_kv: tuple[jax.Array, jax.Array, int] | None,
        kv_segment: jax.Array,
        write_index: jax.Array | None,
        empty_cache: bool = False,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        cfg = self.cfg
        b, t, _ = x.shape
        h, kvh, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q = rope(self.q_proj(x).reshape(b, t, h, d), positions, cfg.rope_theta)
        k = rope(self.k_proj(x).reshape(b, t, kvh, d), positions, cfg.rope_theta)
        v = self.v_proj(x).reshape(b, t, kvh, d)
        q = constrain(q, ("batch", "length", "heads", "head_dim"))
        if cache_kv is not None:
            # Write into the stacked [layers, ...] cache in place (XLA aliases the update
            # inside the decode loop).
            ck, cv, layer = cache_kv
            ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype)[None], (layer, 0, write_index, 0, 0))
            cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype)[None], (layer, 0, write_index, 0, 0))
            new_kv = (ck, cv)
        else:
            new_kv = None
        if cache_kv is None or empty_cache:
            # The sequence attends to itself only (a prefill's keys are all in this call).
            k = constrain(k, ("batch", "length", "kv_heads", "head_dim"))
            v = constrain(v, ("batch", "length", "kv_heads", "head_dim"))
            slot = jnp.arange(t)
            allowed = (slot[None, None, :] <= slot[None, :, None]) & (
                q_segment[:, None, :] == q_segment[:, :, None]
            ) & (q_segment[:, None, :] > 0)
            out = causal_attention(q, k, v, allowed, as_precision(cfg.precision))
        else:
            # This layer's slice of the cache: every slot written so far and this call's.
            k = constrain(ck[layer], ("batch", "length", "kv_heads", "head_dim"))
            v = constrain(cv[layer], ("batch", "length", "kv_heads", "head_dim"))
            kv_slot = jnp.arange(k.shape[1])
            # [B, T, S]: causal in slot order, same non-zero segment.
            allowed = (kv_slot[None, None, :] <= q_slot[:, :, None]) & (
                kv_segment[:, None, :] == q_segment[:, :, None]
            ) & (kv_segment[:, None, :] > 0)
            out = grouped_attention(q, k, v, allowed, as_precision(cfg.precision))
        return self.o_proj(out.reshape(b, t, h * d)), new_kv


class Qwen2MLP(nnx.Module):
    def __init__(self, cfg: Qwen2Config, *, rngs: nnx.Rngs):
        common = dict(dtype=as_dtype(cfg.dtype), param_dtype=as_dtype(cfg.param_dtype), precision=cfg.precision, use_bias=False, rngs=rngs)
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, names=("embed", "mlp"), **common)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, names=("embed", "mlp"), **common)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, names=("mlp", "embed"), **common)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(constrain(h, ("batch", "length", "mlp")))


class Qwen2Block(nnx.Module):
    def __init__(self, cfg: Qwen2Config, *, rngs: nnx.Rngs):
        pdt = as_dtype(cfg.param_dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=pdt, rngs=rngs)
        self.self_attn = Qwen2Attention(cfg, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=pdt, rngs=rngs)
        self.mlp = Qwen2MLP(cfg, rngs=rngs)

    def __call__(self, x, positions, q_segment, q_slot, cache_kv, kv_segment, write_index, empty_cache=False):
        attn, new_kv = self.self_attn(
            self.input_layernorm(x), positions, q_segment, q_slot, cache_kv, kv_segment, write_index, empty_cache
        )
        x = x + attn
        x = x + self.mlp(self.post_attention_layernorm(x))
        return constrain(x, ("batch", "length", "embed")), new_kv


REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the block
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """transformers' generate() rule: cumsum(mask) - 1, and 1 at padding."""
    m = (attention_mask > 0).astype(jnp.int32)
    return jnp.where(m > 0, jnp.cumsum(m, -1) - 1, 1)


class Qwen2Model(nnx.Module):
    """Token embedding + decoder layers + final norm. Heads live in the users of this class."""

    def __init__(self, cfg: Qwen2Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed_tokens = Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=as_dtype(cfg.dtype), param_dtype=as_dtype(cfg.param_dtype),
            precision=cfg.precision, rngs=rngs,
        )
        self.layers = nnx.List([Qwen2Block(cfg, rngs=rngs) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=as_dtype(cfg.param_dtype), rngs=rngs)

    def __call__(
        self,
        input_ids: jax.Array | None = None,
        *,
        inputs_embeds: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: KVCache | None = None,
        empty_cache: bool = False,
    ) -> tuple[jax.Array, KVCache | None]:
        """`empty_cache=True` promises that `cache` holds nothing yet (a prefill): attention then
        reads this call's keys only, causally in blocks, instead of every cache slot."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds.astype(as_dtype(self.cfg.dtype))
        b, t, _ = x.shape
        x = constrain(x, ("batch", "length", "embed"))
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), jnp.int32)
        q_segment = attention_mask.astype(jnp.int32)
        if positions is None:
            positions = positions_from_mask(q_segment) if cache is None else None
        if cache is None:
            q_slot = jnp.broadcast_to(jnp.arange(t), (b, t))
            kv_segment, write_index = q_segment, None
        else:
            q_slot = jnp.broadcast_to(cache.index + jnp.arange(t), (b, t))
            kv_segment = jax.lax.dynamic_update_slice(cache.mask, q_segment, (0, cache.index))
            write_index = cache.index
            if positions is None:
                # Continue each row's positions from the real tokens already in the cache.
                seen = jnp.sum(cache.mask > 0, axis=-1, keepdims=True)
                positions = jnp.where(q_segment > 0, seen + jnp.cumsum(q_segment > 0, -1) - 1, 1)

        def block_fn(block, x, cache_kv):
            return block(x, positions, q_segment, q_slot, cache_kv, kv_segment, write_index, empty_cache)

        if self.cfg.remat != "none":
            if self.cfg.remat not in REMAT_POLICIES:
                raise ValueError(f"remat={self.cfg.remat!r}; choose none or one of {sorted(REMAT_POLICIES)}")
            block_fn = nnx.remat(block_fn, policy=REMAT_POLICIES[self.cfg.remat])

        if self.cfg.scan_layers and cache is None:
            x = self._scan_layers(block_fn, x)
        else:
            ck, cv = (cache.k, cache.v) if cache is not None else (None, None)
            for i, block in enumerate(self.layers):
                x, kv = block_fn(block, x, (ck, cv, i) if cache is not None else None)
                if kv is not None:
                    ck, cv = kv
        x = self.norm(x)
        if cache is not None:
            cache = KVCache(ck, cv, kv_segment, cache.index + t)
        return x, cache

    def _scan_layers(self, block_fn, x):
        """Runs the layers with lax.scan: one compiled block instead of N (compile time and
        code size for deep models). Checkpoints keep one entry per layer; the stacked view is
        built inside the step, so the saved format does not depend on this option."""
        graphdef, first = nnx.split(self.layers[0])
        states = [nnx.state(layer) for layer in self.layers]
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)

        def body(x, state):
            block = nnx.merge(graphdef, state)
            x, _ = block_fn(block, x, None)
            return x, None

        x, _ = jax.lax.scan(body, x, stacked)
        return x


class Qwen2Thinker(nnx.Module):
    """Qwen2 causal LM (Qwen2ForCausalLM): the thinker."""

    def __init__(self, cfg: Qwen2Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.model = Qwen2Model(cfg, rngs=rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear(
                cfg.hidden_size, cfg.vocab_size, names=("embed", "vocab"), use_bias=False,
                dtype=as_dtype(cfg.dtype), param_dtype=as_dtype(cfg.param_dtype), precision=cfg.precision, rngs=rngs,
            )
        else:
            self.lm_head = None

    def logits(self, hidden: jax.Array) -> jax.Array:
        if self.lm_head is None:
            out = self.model.embed_tokens.attend(hidden)
        else:
            out = self.lm_head(hidden)
        return constrain(out, ("batch", "length", "vocab"))

    def __call__(
        self,
        input_ids: jax.Array | None = None,
        *,
        inputs_embeds: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: KVCache | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        hidden, cache = self.model(input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask, positions=positions, cache=cache)
        return self.logits(hidden), cache

    def init_cache(self, batch: int, max_len: int) -> KVCache:
        return init_cache(self.cfg, batch, max_len)


# Published shapes, for benchmarks and memory planning; real runs read config.json.
PRESETS: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
}
