"""The speech_tokenizer stage (straight-through FSQ codes, CTC through the bottleneck) and the
sidecar cache of speech tokens that `hellochat data tokens` fills (hellochat_jax/data/speech_tokens.py)."""

from __future__ import annotations

import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from data_corpus import tiny_corpus  # noqa: F401  (the session's tiny corpus fixture)
from flax import nnx

from hellochat_jax.components.hellochat.heads import HeadsConfig
from hellochat_jax.components.hellochat.model import HelloChat, HelloChatConfig
from hellochat_jax.components.s3tokenizer.model import S3Tokenizer, S3TokenizerConfig, log_mel_128, tokenize
from hellochat_jax.data import builders, pipeline, speech_tokens
from hellochat_jax.testing.stages import first_batch_matching_spec, stage_config
from hellochat_jax.train import tokenizer_stage

TINY = S3TokenizerConfig(n_audio_state=64, n_audio_head=1, n_audio_layer=2)


def _tokenizer(seed: int = 0) -> S3Tokenizer:
    return S3Tokenizer(TINY, rngs=nnx.Rngs(seed))


def _audio(rows: int = 2, seconds: float = 1.5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    n = int(seconds * 16000)
    waves = np.random.default_rng(seed).normal(0, 0.1, (rows, n)).astype(np.float32)
    lengths = np.linspace(n // 2, n, rows).astype(np.int32)
    return waves * (np.arange(n)[None, :] < lengths[:, None]), lengths


# ----------------------------------------------------------------------------- straight-through codes


def test_straight_through_codes_equal_the_inference_tokens_and_pass_gradients():
    model = _tokenizer()
    mel, mel_lens = jax.jit(log_mel_128)(*_audio())
    codes, tokens, valid, _ = nnx.jit(S3Tokenizer.codes)(model, mel, mel_lens)
    expected, token_lens = nnx.jit(S3Tokenizer.__call__)(model, mel, mel_lens)
    np.testing.assert_array_equal(np.asarray(valid), np.arange(tokens.shape[1])[None, :] < np.asarray(token_lens)[:, None])
    np.testing.assert_array_equal(np.asarray(tokens), np.asarray(expected))
    assert set(np.unique(np.asarray(codes))) <= {-1.0, 0.0, 1.0}
    assert len(np.unique(np.asarray(tokens)[np.asarray(valid)])) > 1  # a random encoder spreads over codes

    weights = jnp.asarray(np.random.default_rng(1).normal(size=codes.shape), jnp.float32)
    grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m.codes(mel, mel_lens).codes * weights)))(model)
    for name in ("fsq_proj", "conv1"):
        g = np.asarray(getattr(grads, name).kernel[...])
        assert np.all(np.isfinite(g)) and np.abs(g).max() > 0, name


# ----------------------------------------------------------------------------- the stage


def _cfg(corpus, batch_size: int = 4, **options) -> types.SimpleNamespace:
    return stage_config("speech_tokenizer", corpus, batch_size, options)


@pytest.fixture(scope="module")
def stage_data(tiny_corpus):  # noqa: F811
    return tokenizer_stage.TokenizerData(_cfg(tiny_corpus, reply_fraction=0.5))


def test_rows_follow_the_local_spec(stage_data):
    batch = first_batch_matching_spec(stage_data)
    assert np.all(batch["text_lengths"] > 0) and np.all(batch["audio_lengths"] > 200)
    assert np.all(batch["emotion"] < len(tokenizer_stage.EMOTIONS))


@pytest.mark.slow  # ~25-40 s on 2 shared cores, nearly all of it compiling the step
def test_ctc_training_steps_reduce_the_loss(stage_data, tiny_corpus):  # noqa: F811
    source = builders.open_source(str(tiny_corpus), "train")
    rng = np.random.default_rng(0)
    rows = [r for r in (stage_data.make_row(source[i], rng) for i in range(8)) if r is not None][:4]
    batch = {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}
    heads = HeadsConfig(vocab_size=stage_data.vocab_size, tokenizer_ctc=True, emotions=len(tokenizer_stage.EMOTIONS))
    model = HelloChat(HelloChatConfig(thinker=None, speech_tokenizer=TINY, heads=heads), rngs=nnx.Rngs(0))
    objective = tokenizer_stage.TokenizerObjective(None, stage_data)
    norms = objective.normalizers(jax.tree.map(lambda x: x[None], batch))
    optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, batch):
        def loss_fn(m):
            return objective(m, batch, jax.random.key(0), norms)

        (loss, stats), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        optimizer.update(model, grads)
        return loss, stats

    losses = []
    for _ in range(8):
        loss, stats = step(model, optimizer, batch)
        losses.append(float(loss))
    record = objective.record(jax.device_get(stats))
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.7 * losses[0], losses
    assert {"tokenizer_ctc", "tokenizer_ctc_accuracy", "tokenizer_codes_used", "tokenizer_emotion_acc"} <= set(record)
    assert record["tokenizer_codes_used"] >= 1 and 0.0 <= record["tokenizer_ctc_accuracy"] <= 1.0


def test_greedy_ctc_edit_distance_matches_a_python_levenshtein():
    def lev(a, b):
        d = list(range(len(b) + 1))
        for i, x in enumerate(a, 1):
            prev, d[0] = d[:], i
            for j, y in enumerate(b, 1):
                d[j] = min(prev[j] + 1, d[j - 1] + 1, prev[j - 1] + (x != y))
        return d[-1]

    rng = np.random.default_rng(0)
    hyp, ref = rng.integers(1, 4, (32, 10)), rng.integers(1, 4, (32, 7))
    hl, rl = rng.integers(0, 11, 32), rng.integers(0, 8, 32)
    got = tokenizer_stage.edit_distance(*(jnp.asarray(x, jnp.int32) for x in (hyp, hl, ref, rl)))
    assert np.asarray(got).tolist() == [lev(list(hyp[b, : hl[b]]), list(ref[b, : rl[b]])) for b in range(32)]
    logits = jnp.asarray(np.eye(4)[[[0, 2, 2, 0, 2, 3, 3, 1], [1, 1, 0, 1, 0, 0, 0, 3]]])
    hyp, lens = tokenizer_stage.greedy_ctc(logits, jnp.asarray([[True] * 8, [True] * 7 + [False]]))
    assert np.asarray(lens).tolist() == [4, 2] and np.asarray(hyp)[:, :4].tolist() == [[2, 2, 3, 1], [1, 1, 0, 0]]


# ----------------------------------------------------------------------------- sidecar cache


@pytest.fixture
def corpus_copy(tiny_corpus, tmp_path):  # noqa: F811
    """A private copy: the session's corpus must keep its empty speech tokens for other tests."""
    return shutil.copytree(tiny_corpus, tmp_path / "corpus")


def _expected_tokens(model: S3Tokenizer, clips: list[np.ndarray]) -> list[list[int]]:
    """Each int16 clip's tokens, tokenized alone (one padded batch: one compilation)."""
    waves = np.zeros((len(clips), 5 * 16000), np.float32)
    for i, c in enumerate(clips):
        waves[i, : len(c)] = np.asarray(c, np.float32) / 32768.0
    tokens, lens = tokenize(model, waves, np.asarray([len(c) for c in clips], np.int32))
    return [tokens[i, : lens[i]].tolist() for i in range(len(clips))]


def _id(record) -> str:
    return record["id"].decode() if isinstance(record["id"], bytes) else str(record["id"])


def test_sidecar_tokens_reach_the_pipeline_records(corpus_copy):
    model = _tokenizer()
    result = speech_tokens.build(model, str(corpus_copy), splits=("validation",), batch_size=8, progress=False)
    assert result.built == ["validation"] and speech_tokens.current(str(corpus_copy)) == result.hash

    cfg = pipeline.DataConfig(dataset=str(corpus_copy), split="validation", num_epochs=1)
    examples = list(pipeline.record_dataset(cfg, process_index=0, process_count=1))
    source = builders.open_source(str(corpus_copy), "validation")
    assert len(examples) == len(source)
    stored = {ex.id: ex for ex in examples}
    records = [source[0], source[len(source) - 1]]
    expected = _expected_tokens(model, [r[k] for r in records for k in ("audio", "reply_audio")])
    for i, record in enumerate(records):
        ex = stored[_id(record)]
        assert len(ex.speech_tokens) > 0 and len(ex.reply_speech_tokens) > 0
        assert ex.speech_tokens.tolist() == expected[2 * i]
        assert ex.reply_speech_tokens.tolist() == expected[2 * i + 1]
    # the public helper gives the same table
    table = speech_tokens.load(str(corpus_copy), "validation")
    assert all(table[ex.id][0].tolist() == ex.speech_tokens.tolist() for ex in examples)
    assert speech_tokens.load(str(corpus_copy), "test") is None  # not built for that split


def test_sidecar_is_skipped_when_unchanged_and_rebuilt_when_the_tokenizer_changes(corpus_copy, monkeypatch):
    calls = []
    real = speech_tokens.tokenize_source
    monkeypatch.setattr(speech_tokens, "tokenize_source", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = _tokenizer()
    first = speech_tokens.build(model, str(corpus_copy), splits=("test",), progress=False)
    again = speech_tokens.build(model, str(corpus_copy), splits=("test",), progress=False)
    assert (first.built, again.built, again.cached, len(calls)) == (["test"], [], ["test"], 1)
    assert again.hash == first.hash

    model.fsq_proj.kernel[...] = model.fsq_proj.kernel[...] * -1.0  # a retrained tokenizer
    changed = speech_tokens.build(model, str(corpus_copy), splits=("test",), progress=False)
    assert changed.hash != first.hash and changed.built == ["test"] and len(calls) == 2
    assert speech_tokens.current(str(corpus_copy)) == changed.hash
    source = builders.open_source(str(corpus_copy), "test")
    record = source[0]
    assert speech_tokens.load(str(corpus_copy), "test")[_id(record)][0].tolist() == _expected_tokens(model, [record["audio"]])[0]


def test_data_tokens_command_and_its_user_errors(corpus_copy, tmp_path, capsys):
    from hellochat_jax.checkpoint.folder import save_model_folder
    from hellochat_jax.cli import main

    folder = tmp_path / "model"
    save_model_folder(HelloChat(HelloChatConfig(thinker=None, speech_tokenizer=TINY), rngs=nnx.Rngs(0)), folder)
    args = ["data", "tokens", "--model", str(folder), "--dataset", str(corpus_copy), "--splits", "test"]
    assert main(args) == 0
    assert "tokenized" in capsys.readouterr().out
    assert main(args) == 0
    assert "cached" in capsys.readouterr().out
    assert speech_tokens.load(str(corpus_copy), "test")

    with pytest.raises(speech_tokens.SpeechTokensError, match="no built dataset"):
        speech_tokens.build_from_folder(folder, str(tmp_path / "nowhere"))
    with pytest.raises(speech_tokens.SpeechTokensError, match="no split"):
        speech_tokens.build_from_folder(folder, str(corpus_copy), splits=("nosuch",))
    no_tokenizer = types.SimpleNamespace(model=types.SimpleNamespace(speech_tokenizer=None))
    import hellochat_jax.checkpoint.folder as folder_lib

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(folder_lib, "load_model_folder", lambda path: no_tokenizer)
        with pytest.raises(speech_tokens.SpeechTokensError, match="no speech_tokenizer"):
            speech_tokens.build_from_folder(folder, str(corpus_copy))
