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
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.special
from flax import nnx

from hellochat_jax.components.qwen2.model import (
    KVCache,
    Qwen2Config,
    Qwen2Model,
    init_cache,
)
from hellochat_jax.core import sharding as shd
from hellochat_jax.core.decoding import (
    DecodeState,
    Greedy,
    Nucleus,
    RepetitionAware,
    RowLimits,
    SamplingMethod,
    StepRules,
    decode,
    extend,
    initial_state,
    mesh_context,
    prefill,
    round_up,
    row_limits,
    sampling_from_dict,
    sampling_to_dict,
)
from hellochat_jax.core.layers import Embed, Linear, as_dtype
from hellochat_jax.core.sharding import constrain

IGNORE_ID = -1

# Kinds of sequence positions: which table embeds the id at that position.
PAD, TEXT, SPEECH, SOS, TASK = 0, 1, 2, 3, 4


@dataclasses.dataclass(frozen=True)
class SpeechTokenLMConfig:
    qwen2: Qwen2Config = Qwen2Config()
    speech_token_size: int = 6561
    length_normalized_loss: bool = True
    lsm_weight: float = 0.0
    mix_ratio: tuple[int, int] = (5, 15)
    sampling: SamplingMethod = RepetitionAware(Nucleus(top_p=0.8, top_k=25, full_mass=True), window=10, tau_r=0.1)
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
        d["sampling"] = sampling_to_dict(self.sampling)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SpeechTokenLMConfig":
        d = dict(d)
        if isinstance(d.get("qwen2"), dict):
            d["qwen2"] = Qwen2Config(**d["qwen2"])
        if isinstance(d.get("sampling"), dict):
            d["sampling"] = sampling_from_config(d["sampling"])
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


def speech_token_terms(logits: jax.Array, targets: jax.Array, lsm_weight: float = 0.0) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per position (loss term, argmax == target, target != -1) of the reference's
    LabelSmoothingLoss + th_accuracy; the first two are zero where the target is -1.

    The term is KL(smoothed one-hot || softmax(logits)): the cross-entropy when lsm_weight is
    0. `speech_token_loss` normalises their sums over one batch, the trainer over a whole
    accumulated step.
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
        # A host constant (scipy, not jax): it must stay concrete under jax.checkpoint.
        neg_entropy = float(scipy.special.xlogy(conf, conf) + (v - 1) * scipy.special.xlogy(other, other))
        per = neg_entropy - conf * logp_target - other * (jnp.sum(logp, -1) - logp_target)
    else:
        per = -logp_target
    correct = valid & (jnp.argmax(logits, -1) == targets)
    return jnp.where(valid, per, 0.0), correct, valid


def speech_token_loss(logits: jax.Array, targets: jax.Array, *, lsm_weight: float = 0.0, length_normalized: bool = True) -> tuple[jax.Array, jax.Array]:
    """(loss, accuracy) as the reference's LabelSmoothingLoss + th_accuracy: the sum of
    `speech_token_terms` divided by the number of positions with target != -1
    (length_normalized) or by the batch size; accuracy over the same positions."""
    per, correct, valid = speech_token_terms(logits, targets, lsm_weight)
    count = jnp.sum(valid)
    denom = count if length_normalized else targets.shape[0]
    loss = jnp.sum(per) / jnp.maximum(denom, 1)
    acc = jnp.sum(correct) / jnp.maximum(count, 1)
    return loss, acc


def loss_fn(model: SpeechTokenLM, ids: jax.Array, kinds: jax.Array, targets: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Training loss of a right-padded batch (attention: causal and key < length)."""
    logits, _ = model(ids, kinds)
    loss, acc = speech_token_loss(logits, targets, lsm_weight=model.cfg.lsm_weight, length_normalized=model.cfg.length_normalized_loss)
    return loss, {"loss": loss, "acc": acc}


# ----------------------------------------------------------------------------- decoding
#
# Both decoders below run core.decoding's one loop; what is the speech LM's own is how a
# prompt and a drawn token are embedded (`speech_prompt`, `speech_feed`) and the step rules.


def cosyvoice_ras(top_p: float = 0.8, top_k: int = 25, win_size: int = 10, tau_r: float = 0.1) -> SamplingMethod:
    """CosyVoice 2's ras_sampling with the release yaml's argument names."""
    return RepetitionAware(Nucleus(top_p=top_p, top_k=top_k, full_mass=True), window=win_size, tau_r=tau_r)


def sampling_from_config(d: dict[str, Any]) -> SamplingMethod:
    """`SpeechTokenLMConfig.sampling` from a saved dict; also reads the older RasConfig form
    ({"greedy", "top_p", "top_k", "win_size", "tau_r"}) of checkpoints converted before."""
    if "method" in d:
        return sampling_from_dict(d)
    if d.get("greedy"):
        return Greedy()
    return cosyvoice_ras(**{k: d[k] for k in ("top_p", "top_k", "win_size", "tau_r") if k in d})


def length_limits(text_len: int, min_ratio: float, max_ratio: float) -> tuple[int, int]:
    """The reference's (min_len, max_len): float32 product, truncated."""
    return int(np.float32(text_len) * np.float32(min_ratio)), int(np.float32(text_len) * np.float32(max_ratio))


def speech_prompt(model: SpeechTokenLM, inputs: tuple[jax.Array, jax.Array], cache: KVCache) -> tuple[jax.Array, KVCache]:
    """inputs: (ids, kinds) [B, T], PAD kinds masked out."""
    ids, kinds = inputs
    logits, cache = model(ids, kinds, attention_mask=(kinds != PAD).astype(jnp.int32), cache=cache)
    return logits[:, -1].astype(jnp.float32), cache


def speech_feed(model: SpeechTokenLM, tokens: jax.Array, live: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
    ids = tokens[:, None]
    logits, cache = model(ids, jnp.full_like(ids, SPEECH), attention_mask=live[:, None].astype(jnp.int32), cache=cache)
    return logits[:, -1].astype(jnp.float32), cache


def unistream_rules(cfg: SpeechTokenLMConfig) -> StepRules:
    """The reference's rule: eos masked below min_len; eos, S+1 and fill all end a row."""
    S = cfg.speech_token_size
    return StepRules(speech_feed, stop_ids=(S, S + 1, S + 2), min_len_banned=(S,), pad_id=-1, log_probs=True)


def bistream_rules(cfg: SpeechTokenLMConfig, final: bool) -> StepRules:
    """A streaming segment draws speech or fill (fill forced every b + 1 tokens) and ends on
    fill; the final one draws speech or eos. The reference raises on the other non-speech
    ids; we never draw them."""
    S = cfg.speech_token_size
    banned = (S + 1, S + 2) if final else (S, S + 1)
    return StepRules(speech_feed, stop_ids=(S, S + 1, S + 2), banned_ids=banned, force_id=None if final else S + 2, pad_id=-1, log_probs=True)


@dataclasses.dataclass
class SpeechDecoder:
    """A batched decode in progress: `advance(n)` runs n more steps; `result()` reads tokens.

    Prompts are left-padded [sos, prompt text + text, task, prompt speech] rows; the prompt
    and the decode loop are each one compiled call, and lengths are bucketed so nearby sizes
    share compiles.
    """

    model: SpeechTokenLM
    ds: DecodeState
    limits: RowLimits
    sampling: SamplingMethod
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
        sampling: SamplingMethod | None = None,
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
        lengths = np.asarray([length_limits(len(t), min_ratio, max_ratio) for t in texts], np.int32).reshape(n, 2)
        limits = row_limits(n, min_len=lengths[:, 0], max_len=lengths[:, 1])
        batch = pad_batch([inference_layout(t, pt, ps) for t, pt, ps in zip(texts, prompt_texts, prompt_speech)], left=True, multiple=multiple)
        max_steps = round_up(int(lengths[:, 1].max()), multiple)
        sampling = sampling or cfg.sampling
        key = jax.random.key(0) if key is None else key
        graphdef, state = nnx.split(model)
        with mesh_context(mesh):
            if mesh is not None:
                ids, kinds, limits = shd.put_batch((batch.ids, batch.kinds, limits), mesh, shd.current_rules())
            else:
                ids, kinds, limits = jnp.asarray(batch.ids), jnp.asarray(batch.kinds), RowLimits(*map(jnp.asarray, limits))
            scores, cache = prefill(graphdef, state, (ids, kinds), prompt=speech_prompt, cache_len=batch.ids.shape[1] + max_steps)
            ds = initial_state(scores, cache, key, max_steps=max_steps, sampler=sampling, pad_id=-1, done=limits.max_len <= 0, record_logp=record_logp)
        return cls(model, ds, limits, sampling, graphdef, state, mesh, np.zeros(n, np.int64))

    def advance(self, steps: int | None = None) -> "SpeechDecoder":
        until = self.ds.tokens.shape[1] if steps is None else int(self.ds.step) + int(steps)
        with mesh_context(self.mesh):
            self.ds = decode(self.graphdef, self.state, self.ds, self.limits, jnp.asarray(until, jnp.int32), rules=unistream_rules(self.model.cfg), sampler=self.sampling)
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


class BistreamDecoder:
    """Speech tokens for text that arrives in pieces (e.g. from the thinker), batch 1.

    Use:
        dec = BistreamDecoder(llm, prompt_text, prompt_speech, sampling=..., key=...)
        for text_ids in thinker_token_stream:      # any number of ids per call, even 0
            speech = dec.push_text(text_ids)       # speech tokens decodable so far (maybe [])
        speech = dec.finish()                      # the rest, up to eos; push_text is then refused

    Every returned list holds only speech tokens (0..S-1), in order, and each token is returned
    once. `push_text` decodes only once a full chunk of a text tokens (a, b = mix_ratio) is
    there, so fewer tokens may come back than were pushed; `finish` flushes everything.

    The layout is the bistream training layout: [sos], then per a text tokens the text chunk
    and b speech tokens closed by a fill token (which is never fed back), and once the text
    ends, the remaining text, the task id and speech up to eos. A voice prompt's text and
    speech tokens are interleaved into the same layout first; the first fill index follows the
    prompt speech length as in the reference. Each decode segment (up to a fill, or up to eos)
    is one call of core.decoding's loop; the cache, scores and RAS window carry over.
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
        sampling: SamplingMethod | None = None,
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
        self.out: list[int] = []  # drawn tokens including fill tokens (the RAS window sees them)
        self.text_len = 0
        self.fed = 0
        self.capacity = capacity
        with mesh_context(mesh):
            self.cache = model.init_cache(1, capacity)
            self.recent = jnp.full((1, max(1, self.sampling.recent_tokens)), -1, jnp.int32)
        self.scores = None
        self.finished = False

    def _flush(self) -> None:
        if not self.pending:
            return
        n = len(self.pending)
        t = round_up(n, 8)
        ids = np.zeros((1, t), np.int32)
        kinds = np.full((1, t), PAD, np.int32)
        ids[0, t - n :] = [i for i, _ in self.pending]
        kinds[0, t - n :] = [k for _, k in self.pending]
        self._reserve(t)
        with mesh_context(self.mesh):
            self.scores, self.cache = extend(self.graphdef, self.state, (jnp.asarray(ids), jnp.asarray(kinds)), self.cache, prompt=speech_prompt)
        self.fed += t
        self.pending = []

    def _reserve(self, n: int) -> None:
        """Grows the cache when `n` more slots would not fit (a copy and one new compile)."""
        if self.fed + n <= self.capacity:
            return
        grow = round_up(self.fed + n - self.capacity, 512)
        c = self.cache
        pad = lambda x, axis: jnp.concatenate([x, jnp.zeros(x.shape[:axis] + (grow,) + x.shape[axis + 1 :], x.dtype)], axis)
        self.cache = KVCache(pad(c.k, 2), pad(c.v, 2), pad(c.mask, 1), c.index)
        self.capacity += grow

    def _decode(self, final: bool) -> list[int]:
        """One segment: up to a fill token (streaming) or eos (final), within the length budget."""
        self._flush()
        limit = int(np.float32(self.text_len) * np.float32(self.max_ratio))
        budget = limit - sum(t < self.cfg.speech_token_size for t in self.out)  # counts fill/eos too
        if budget <= 0:
            return []
        max_tokens = self.cfg.mix_ratio[1] + 1 if not final else round_up(budget + 1, 64)
        self._reserve(max_tokens)
        self.key, sub = jax.random.split(self.key)
        with mesh_context(self.mesh):
            ds = initial_state(self.scores, self.cache, sub, max_steps=max_tokens, sampler=self.sampling, recent=self.recent, pad_id=-1)
            ds = decode(
                self.graphdef, self.state, ds, row_limits(1, force_step=self.next_fill - len(self.out)),
                jnp.asarray(min(budget, max_tokens), jnp.int32), rules=bistream_rules(self.cfg, final), sampler=self.sampling,
            )
        self.scores, self.cache, self.recent = ds.scores, ds.cache, ds.history.recent
        n_emitted, stop = int(ds.lengths[0]), int(ds.stop_token[0])
        speech = np.asarray(jax.device_get(ds.tokens))[0, :n_emitted].tolist()
        self.out += speech + ([stop] if stop >= 0 else [])
        if stop == self.cfg.fill:
            self.next_fill = len(self.out) + self.cfg.mix_ratio[1]
        self.fed += int(ds.step)  # every step wrote one cache slot (a stop token's slot masked out)
        return speech

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
