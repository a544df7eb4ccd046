"""Specification of the speech-token LM (CosyVoice 2's Qwen2LM), its converter and its loss.

The reference is FunAudioLLM/CosyVoice (cosyvoice/llm/llm.py); the fixture
tests/fixtures/cosyvoice2-llm-tiny holds its recorded outputs.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FIXTURES, full_mesh, single_device_mesh
from flax import nnx

from hellochat_jax.checkpoint.io import CheckpointError, DictSource, TorchSource
from hellochat_jax.checkpoint.load import load_from_source
from hellochat_jax.components.qwen2.model import Qwen2Config
from hellochat_jax.components.speech_lm import model as slm
from hellochat_jax.components.speech_lm import weights as cosyvoice2_llm
from hellochat_jax.core import decoding
from hellochat_jax.core import sharding as shd
from hellochat_jax.core.decoding import Greedy, History, Nucleus, RepetitionAware
from hellochat_jax.testing.talker import make_tiny_llm
from hellochat_jax.testing.state_dicts import assert_same_state_dict

torch = pytest.importorskip("torch")

FIXTURE = FIXTURES / "cosyvoice2-llm-tiny"
S = 97  # speech_token_size of the tiny models here


def tiny_config(**kw) -> slm.SpeechTokenLMConfig:
    qwen = Qwen2Config(vocab_size=120, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, precision="highest")
    return slm.SpeechTokenLMConfig(qwen2=qwen, speech_token_size=S, **kw)


def tiny_model(seed: int = 0, eos_bias: float = 0.0, **kw) -> slm.SpeechTokenLM:
    model = slm.SpeechTokenLM(tiny_config(**kw), rngs=nnx.Rngs(seed))
    # random biases so every table and the head matter; eos_bias steers when decoding stops
    bias = np.asarray(jax.random.normal(jax.random.key(seed + 1), (S + 3,))) * 0.5
    bias[S] += eos_bias
    model.llm_decoder.bias.set_value(jnp.asarray(bias))
    return model


def full_recompute_greedy(model, text, prompt_text, prompt_speech, min_len, max_len) -> list[int]:
    """Decoding without a cache: re-runs the whole sequence for every token."""
    layout = slm.inference_layout(text, prompt_text, prompt_speech)
    ids, kinds = list(layout.ids), list(layout.kinds)
    total = len(ids) + max_len + 1
    f = nnx.jit(lambda m, i, k: m(i, k)[0])
    out = []
    for i in range(max_len):
        n = len(ids)
        pid = np.zeros((1, total), np.int32)
        pk = np.zeros((1, total), np.int32)
        pid[0, :n], pk[0, :n] = ids, kinds
        logp = np.array(jax.nn.log_softmax(f(model, jnp.asarray(pid), jnp.asarray(pk))[0, n - 1]))
        if i < min_len:
            logp[S] = -np.inf
        tok = int(np.argmax(logp))
        if tok >= S:
            break
        out.append(tok)
        ids.append(tok)
        kinds.append(slm.SPEECH)
    return out


# ----------------------------------------------------------------------------- parity


# The fixture itself passes on 1 and 8 devices: tests/test_verify.py (every fixture).


# ----------------------------------------------------------------------------- converter


def test_export_reproduces_the_fixture_llm_pt_bit_exactly(tmp_path):
    cfg, model = cosyvoice2_llm.load(FIXTURE / "checkpoint", single_device_mesh())
    cosyvoice2_llm.export(model, cfg, tmp_path)
    theirs = torch.load(FIXTURE / "checkpoint" / "llm.pt", weights_only=True)
    assert_same_state_dict(torch.load(tmp_path / "llm.pt", weights_only=True), theirs)


@pytest.mark.parametrize("tied,dtype", [(True, "float32"), (False, "float32"), (True, "bfloat16")])
def test_tiny_release_round_trip_through_orbax(tmp_path, tied, dtype):
    from hellochat_jax.checkpoint.load import load_checkpoint, save_checkpoint

    make_tiny_llm(tmp_path / "rel", tied=tied, dtype=dtype, hidden=24, heads=3, kv_heads=1, layers=1)
    mesh = full_mesh()
    cfg, model = cosyvoice2_llm.load(tmp_path / "rel", mesh)
    assert cfg.keep_text_lm_head == (not tied) and cfg.qwen2.param_dtype == dtype
    save_checkpoint(model, cfg, tmp_path / "ckpt", cosyvoice2_llm.COMPONENT)
    component, cfg2, restored = load_checkpoint(tmp_path / "ckpt", single_device_mesh())
    assert component == "cosyvoice2-llm" and cfg2 == cfg
    cosyvoice2_llm.export(restored, cfg2, tmp_path / "out")
    a = torch.load(tmp_path / "rel" / "llm.pt", weights_only=True)
    b = torch.load(tmp_path / "out" / "llm.pt", weights_only=True)
    assert list(a) == list(b)
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def _fixture_tensors() -> dict[str, np.ndarray]:
    src = TorchSource(FIXTURE / "checkpoint" / "llm.pt")
    return {k: src.get(k) for k in src.keys()}


def test_refuses_mismatched_checkpoints_by_name():
    cfg = cosyvoice2_llm.read_config(FIXTURE / "checkpoint")
    mesh = single_device_mesh()
    good = _fixture_tensors()

    bad = dict(good)
    del bad["llm.model.model.layers.1.mlp.up_proj.weight"]
    bad["llm.extra.weight"] = np.zeros(3, np.float32)
    bad["speech_embedding.weight"] = np.zeros((7, 64), np.float32)
    with pytest.raises(CheckpointError) as e:
        load_from_source("cosyvoice2-llm", cfg, DictSource(bad), mesh)
    msg = str(e.value)
    assert "llm.model.model.layers.1.mlp.up_proj.weight" in msg and "llm.extra.weight" in msg and "speech_embedding.weight" in msg

    untied = dict(good)
    untied["llm.model.lm_head.weight"] = good["llm.model.lm_head.weight"] + 1
    with pytest.raises(CheckpointError, match="lm_head.weight differs"):
        load_from_source("cosyvoice2-llm", cfg, DictSource(untied), mesh)


def test_config_comes_from_the_yaml_and_backbone_config():
    cfg = cosyvoice2_llm.read_config(FIXTURE / "checkpoint")
    assert cfg.speech_token_size == 97 and cfg.mix_ratio == (5, 15) and cfg.hidden_size == 64
    assert cfg.sampling == RepetitionAware(Nucleus(top_p=0.8, top_k=25, full_mass=True), window=10, tau_r=0.1)
    assert (cfg.eos, cfg.fill, cfg.vocab) == (97, 99, 100)


def test_refuses_yaml_whose_sizes_disagree_with_the_backbone(tmp_path):
    make_tiny_llm(tmp_path, hidden=32)
    text = (tmp_path / "cosyvoice2.yaml").read_text().replace("llm_input_size: 32", "llm_input_size: 48")
    (tmp_path / "cosyvoice2.yaml").write_text(text)
    with pytest.raises(CheckpointError, match="llm_input_size=48"):
        cosyvoice2_llm.read_config(tmp_path)


# ----------------------------------------------------------------------------- layouts


def test_unistream_training_layout():
    lay = slm.training_layout([5, 6, 7], [10, 11], bistream=False, speech_token_size=S)
    assert lay.kinds.tolist() == [slm.SOS, slm.TEXT, slm.TEXT, slm.TEXT, slm.TASK, slm.SPEECH, slm.SPEECH]
    assert lay.targets.tolist() == [-1, -1, -1, -1, 10, 11, S]


def test_bistream_training_layout_with_an_empty_last_text_chunk():
    text = list(range(100, 110))  # 10 tokens: two full chunks, then an empty one
    speech = list(range(40))
    lay = slm.training_layout(text, speech, bistream=True, speech_token_size=S, mix_ratio=(5, 15))
    kinds = [slm.SOS] + ([slm.TEXT] * 5 + [slm.SPEECH] * 15) * 2 + [slm.TASK] + [slm.SPEECH] * 10
    assert lay.kinds.tolist() == kinds
    fill = S + 2
    targets = [-1] + [-1] * 4 + speech[:15] + [fill] + [-1] * 4 + speech[15:30] + [fill] + speech[30:] + [S]
    assert lay.targets.tolist() == targets
    assert lay.ids[1:6].tolist() == text[:5] and lay.ids[6:21].tolist() == speech[:15]


def test_bistream_choice_follows_the_draw_and_the_ratio():
    assert slm.use_bistream(0.3, 7, 25) and not slm.use_bistream(0.7, 7, 25)
    assert not slm.use_bistream(0.3, 5, 15)  # 15/5 == 3 is not > 3
    assert slm.use_bistream(0.3, 5, 16)


# ----------------------------------------------------------------------------- loss


@pytest.mark.parametrize("lsm,normalize", [(0.0, True), (0.1, True), (0.2, False)])
def test_loss_matches_the_reference_label_smoothing_loss(lsm, normalize):
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, 6, 11)).astype(np.float32)
    targets = rng.integers(0, 11, (3, 6)).astype(np.int32)
    targets[0, :2] = -1
    targets[2, 4:] = -1
    # LabelSmoothingLoss from cosyvoice/transformer/label_smoothing_loss.py, restated
    x = torch.tensor(logits).view(-1, 11)
    t = torch.tensor(targets, dtype=torch.long).view(-1)
    true = torch.full_like(x, lsm / 10)
    ignore = t == -1
    true.scatter_(1, t.masked_fill(ignore, 0).unsqueeze(1), 1 - lsm)
    kl = torch.nn.KLDivLoss(reduction="none")(torch.log_softmax(x, 1), true)
    want = kl.masked_fill(ignore.unsqueeze(1), 0).sum() / (int((~ignore).sum()) if normalize else 3)
    acc = (x.argmax(1)[~ignore] == t[~ignore]).float().mean()
    loss, got_acc = slm.speech_token_loss(jnp.asarray(logits), jnp.asarray(targets), lsm_weight=lsm, length_normalized=normalize)
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-5)
    np.testing.assert_allclose(float(got_acc), float(acc), rtol=1e-6)


def test_loss_is_jittable_differentiable_and_the_same_sharded():
    model = tiny_model()
    rng = np.random.default_rng(1)
    batch = slm.training_batch(
        rng.integers(0, 120, (4, 9)), np.asarray([9, 7, 4, 8]), rng.integers(0, S, (4, 40)), np.asarray([40, 30, 12, 33]),
        [0.1, 0.9, 0.2, 0.3], speech_token_size=S, length=64,
    )

    @nnx.jit
    def step(model, ids, kinds, targets):
        (loss, metrics), grads = nnx.value_and_grad(slm.loss_fn, has_aux=True)(model, ids, kinds, targets)
        return metrics, jax.tree.reduce(lambda a, g: a + jnp.sum(jnp.square(g)), nnx.to_pure_dict(grads), 0.0)

    m1, g1 = step(model, *map(jnp.asarray, (batch.ids, batch.kinds, batch.targets)))
    mesh = full_mesh()
    sharded = shd.shard_model(tiny_model(), mesh)
    with jax.set_mesh(mesh):
        m8, g8 = step(sharded, *shd.put_batch((batch.ids, batch.kinds, batch.targets), mesh))
    assert np.isfinite(float(m1["loss"])) and float(g1) > 0
    np.testing.assert_allclose(float(m8["loss"]), float(m1["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(g8), float(g1), rtol=1e-4)


# ----------------------------------------------------------------------------- decoding


ROWS = dict(
    texts=[[3, 4, 5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16, 17, 18, 19]],
    prompt_texts=[[20, 21], [], [22, 23, 24, 25]],
    prompt_speech=[[1, 2, 3, 4, 5], [], [6, 7]],
)


def test_greedy_batched_left_padded_decode_equals_full_recompute():
    model = tiny_model(seed=3)
    got = slm.generate(model, **ROWS, sampling=Greedy(), min_ratio=1.0, max_ratio=3.0)
    for i, (t, pt, ps) in enumerate(zip(*ROWS.values())):
        lo, hi = slm.length_limits(len(t), 1.0, 3.0)
        assert got[i] == full_recompute_greedy(model, t, pt, ps, lo, hi), i


def test_min_and_max_length_rule():
    # eos always wins when allowed: every row stops exactly at min_len
    model = tiny_model(eos_bias=50.0)
    got = slm.generate(model, **ROWS, sampling=Greedy(), min_ratio=2.3, max_ratio=5.0)
    assert [len(g) for g in got] == [slm.length_limits(len(t), 2.3, 5.0)[0] for t in ROWS["texts"]]
    # eos never wins: every row runs to max_len
    model = tiny_model(eos_bias=-50.0)
    got = slm.generate(model, **ROWS, sampling=Greedy(), min_ratio=2.3, max_ratio=5.0)
    assert [len(g) for g in got] == [int(np.float32(len(t)) * np.float32(5.0)) for t in ROWS["texts"]]
    assert all(0 <= tok < S for g in got for tok in g)


def test_sharded_decoding_equals_unsharded_and_is_seeded():
    key = jax.random.key(7)
    ref = slm.generate(tiny_model(seed=5), **ROWS, key=key, min_ratio=1.0, max_ratio=4.0)
    again = slm.generate(tiny_model(seed=5), **ROWS, key=key, min_ratio=1.0, max_ratio=4.0)
    mesh = full_mesh()
    sharded = shd.shard_model(tiny_model(seed=5), mesh)
    got = slm.generate(sharded, **ROWS, key=key, min_ratio=1.0, max_ratio=4.0, mesh=mesh)
    other = slm.generate(tiny_model(seed=5), **ROWS, key=jax.random.key(8), min_ratio=1.0, max_ratio=4.0)
    assert ref == again == got
    assert other != ref


def test_streaming_in_chunks_gives_the_same_tokens_as_one_call():
    model, key = tiny_model(seed=2), jax.random.key(1)
    whole = slm.generate(model, **ROWS, key=key, min_ratio=1.0, max_ratio=4.0)
    parts = [[] for _ in whole]
    for new in slm.stream(model, **ROWS, key=key, min_ratio=1.0, max_ratio=4.0, chunk=7):
        for row, toks in zip(parts, new):
            row += toks
    assert parts == whole


def test_decode_loop_compiles_once_per_shape_bucket():
    model = tiny_model()
    slm.generate(model, [[1, 2, 3, 4]], key=jax.random.key(0))
    before = decoding.decode._cache_size()
    # another text, prompt and key; same length buckets (prompt <= 32 positions, max_len <= 96)
    slm.generate(model, [[5, 6, 7, 8]], [[8]], [[9, 10]], key=jax.random.key(3))
    assert decoding.decode._cache_size() == before


def test_bad_ids_are_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match="text ids must lie in"):
        slm.generate(model, [[1, 500]])
    with pytest.raises(ValueError, match="prompt speech ids must lie in"):
        slm.generate(model, [[1, 2]], [[]], [[S]])


def test_empty_text_gives_no_tokens():
    assert slm.generate(tiny_model(), [[]], sampling=Greedy()) == [[]]


# ----------------------------------------------------------------------------- sampling


def _draws(logp, recent, method, n=200):
    keys = jax.random.split(jax.random.key(0), n)
    sample = jax.jit(jax.vmap(lambda k: method(logp, k, History(recent=recent))[0]))
    return np.asarray(sample(keys)).tolist()


def test_ras_keeps_to_the_nucleus_and_bans_recent_repeats():
    logp = jnp.log(jnp.asarray([[0.5, 0.3, 0.1, 0.05, 0.05]]))
    ras = RepetitionAware(Nucleus(top_p=0.75, top_k=25, full_mass=True), window=10, tau_r=0.1)
    empty = jnp.full((1, 10), -1, jnp.int32)
    draws = _draws(logp, empty, ras)
    assert set(draws) == {0, 1}  # 0.5 < 0.75 so token 1 joins; then 0.8 >= 0.75 stops
    assert abs(draws.count(0) / 200 - 0.5 / 0.8) < 0.1
    # top_k caps the nucleus
    top1 = dataclasses.replace(ras, inner=Nucleus(top_p=0.75, top_k=1, full_mass=True))
    assert set(_draws(logp, empty, top1)) == {0}
    # a token seen in the window is redrawn from the full distribution without it
    recent = jnp.asarray([[-1] * 9 + [0]], jnp.int32)
    redraws = _draws(logp, recent, top1)
    assert 0 not in redraws and set(redraws) >= {1, 2}
    assert int(RepetitionAware(Greedy())(logp, jax.random.key(0), History(recent=recent))[0]) in (1, 2, 3, 4)
    assert int(Greedy()(logp, jax.random.key(0), History(recent=recent))[0]) == 0


def test_cosyvoice_nucleus_measures_top_p_in_the_full_distribution():
    # top-2 of [0.5, 0.3, 0.2]: in the full distribution 0.5 < 0.6 keeps token 1 too; within
    # the renormalised top-2 (0.625, 0.375) 0.625 >= 0.6 keeps token 0 alone (transformers).
    logp = jnp.log(jnp.asarray([[0.5, 0.3, 0.2]]))
    empty = jnp.full((1, 1), -1, jnp.int32)
    assert set(_draws(logp, empty, Nucleus(top_k=2, top_p=0.6, full_mass=True))) == {0, 1}
    assert set(_draws(logp, empty, Nucleus(top_k=2, top_p=0.6))) == {0}


def test_sampling_config_round_trips_and_reads_the_older_form():
    cfg = tiny_config()
    assert slm.SpeechTokenLMConfig.from_dict(cfg.to_dict()) == cfg
    old = {**cfg.to_dict(), "sampling": {"greedy": False, "top_p": 0.7, "top_k": 20, "win_size": 8, "tau_r": 0.2}}
    assert slm.SpeechTokenLMConfig.from_dict(old).sampling == slm.cosyvoice_ras(top_p=0.7, top_k=20, win_size=8, tau_r=0.2)


# ----------------------------------------------------------------------------- bistream decoding


def naive_bistream(model, chunks, prompt_text, prompt_speech, max_ratio) -> list[int]:
    """The bistream rules restated with a full recompute per token (greedy)."""
    a, b = model.cfg.mix_ratio
    fill = S + 2
    seq = [(0, slm.SOS)]
    f = nnx.jit(lambda m, i, k: m(i, k)[0])

    def scores(banned):
        pid = np.zeros((1, 512), np.int32)
        pk = np.zeros((1, 512), np.int32)
        pid[0, : len(seq)] = [i for i, _ in seq]
        pk[0, : len(seq)] = [k for _, k in seq]
        logp = np.array(jax.nn.log_softmax(f(model, jnp.asarray(pid), jnp.asarray(pk))[0, len(seq) - 1]))
        logp[list(banned)] = -np.inf
        return logp

    text_cache, ps, out = list(prompt_text), list(prompt_speech), []
    next_fill = (len(ps) // b + 1) * b - len(ps)
    text_len = 0
    speech = lambda: sum(t < S for t in out)
    for chunk in chunks:
        text_cache += chunk
        text_len += len(chunk)
        while ps and len(text_cache) >= a:
            seq += [(t, slm.TEXT) for t in text_cache[:a]] + [(s, slm.SPEECH) for s in ps[:b]]
            text_cache, ps = text_cache[a:], ps[b:]
        if ps:
            continue
        while True:
            if (not out and len(seq) == 1) or (out and out[-1] == fill):
                if len(text_cache) < a:
                    break
                seq += [(t, slm.TEXT) for t in text_cache[:a]]
                text_cache = text_cache[a:]
            budget = int(np.float32(text_len) * np.float32(max_ratio)) - speech()
            if budget <= 0:
                break
            for i in range(min(budget, b + 1)):
                tok = fill if len(out) == next_fill else int(np.argmax(scores({S, S + 1})))
                if tok == fill:
                    next_fill = len(out) + b + 1
                out.append(tok)
                if tok == fill:
                    break
                seq.append((tok, slm.SPEECH))
    seq += [(t, slm.TEXT) for t in text_cache] + [(1, slm.TASK)] + [(s, slm.SPEECH) for s in ps]
    budget = int(np.float32(text_len) * np.float32(max_ratio)) - speech()
    for i in range(max(budget, 0)):
        tok = int(np.argmax(scores({fill, S + 1})))
        out.append(tok)
        if tok == S:
            break
        seq.append((tok, slm.SPEECH))
    return [t for t in out if t < S]


@pytest.mark.parametrize("prompt_text,prompt_speech", [([], []), ([30, 31, 32, 33], list(range(9)))])
def test_bistream_decoding_equals_full_recompute(prompt_text, prompt_speech):
    model = tiny_model(seed=4, eos_bias=2.0)
    chunks = [[40, 41, 42], [43, 44, 45, 46], [47, 48, 49, 50, 51, 52], [53, 54]]
    got = []
    for toks in slm.stream_bistream(model, chunks, prompt_text, prompt_speech, sampling=Greedy(), max_ratio=4.0, capacity=64):
        got += toks
    want = naive_bistream(model, chunks, prompt_text, prompt_speech, 4.0)
    assert got == want
    assert len(got) > 15  # the forced fill happened at least once
