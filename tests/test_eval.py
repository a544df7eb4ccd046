"""`hellochat eval understand` and `hellochat eval tts` on a tiny random model folder and the tiny
corpus (the numbers of random models are noise; every metric must be there), and the scoring
they share with the trainer's held-out evaluation."""

from __future__ import annotations

import json

import numpy as np
import pytest
from data_corpus import tiny_corpus  # noqa: F401  (session fixture)

from hellochat_jax.cli import main as cli
from hellochat_jax.data import pipeline
from hellochat_jax.pipelines import evaluate

UNDERSTAND = ("wer", "cer", "emotion_accuracy", "events_f1", "reply_word_accuracy", "reply_word_accuracy_facts")
TTS = ("tts_wer", "tts_cer", "tts_wer_floor", "tts_wer_noise")


# ----------------------------------------------------------------------------- scoring


def test_wer_of_identical_texts_is_zero_whatever_the_case_and_punctuation():
    assert evaluate.wer(["Turn on the lights."], ["turn on the lights"]) == 0.0
    assert evaluate.cer(["It's nine."], ["it's nine"]) == 0.0
    assert evaluate.wer(["turn on the lights"], ["turn off the lights"]) == 0.25
    assert evaluate.wer([""], [""]) == 1.0  # an empty reference is one word nobody said


def test_the_style_tag_is_stripped_before_scoring_and_scored_on_its_own(monkeypatch):
    from hellochat_jax.data import synth

    assert evaluate.reply_text("<style>Speak gently.</style> Sure, done.") == ("Speak gently.", "Sure, done.")
    assert evaluate.reply_text("Sure, done.") == (None, "Sure, done.")
    monkeypatch.setattr(synth, "STYLE_FOR_EMOTION", {"sad": "Speak gently."})

    def record(kind, emotion):
        ex = pipeline.Example(id="x", audio=np.zeros(1, np.float32), transcript="hi", emotion=emotion, events=(), caption="",
                              reply="", reply_audio=np.zeros(0, np.float32), context=[], speech_tokens=np.zeros(0, np.int32),
                              reply_speech_tokens=np.zeros(0, np.int32))
        return evaluate.Record(ex, kind)

    records = [record("request", "sad"), record("question", "neutral"), record("dialogue", "sad")]
    preds = ["<style>Speak gently.</style>The lights are on.", "Four.", "Okay then."]
    answers = ["The lights are on.", "<style>Speak brightly.</style>Five.", "Okay."]
    got = evaluate.reply_scores(preds, answers, records)
    assert got["reply_word_accuracy"] == pytest.approx(1 - 1 / 5)  # "then" inserted in 5 reference words
    assert got["reply_word_accuracy_facts"] == 0.0
    assert got["reply_style_accuracy"] == 0.5  # neutral has no style: not counted


def test_events_f1_is_micro_over_event_sets():
    gold = [evaluate.event_set("rain, siren"), evaluate.event_set("beep")]
    assert evaluate.f1([evaluate.event_set("Siren, rain.")] + [{"beep"}], gold) == 1.0
    assert evaluate.f1([{"rain"}, {"knock"}], gold) == pytest.approx(2 * 1 / (2 + 3))
    assert evaluate.f1([set()], [set()]) == 1.0


def test_the_noise_ceiling_has_the_length_and_loudness_of_the_recording():
    speech = 0.2 * np.sin(np.linspace(0, 2000, 16000)).astype(np.float32)
    [noise] = evaluate.noise_like([speech])
    assert len(noise) == len(speech) and np.sqrt(np.mean(noise**2)) == pytest.approx(np.sqrt(np.mean(speech**2)), rel=0.05)


def test_the_recogniser_asks_as_training_asks(tiny_corpus):  # noqa: F811
    """audio_prompt's layout is build_messages' for the same instruction."""
    cfg = pipeline.DataConfig(dataset=str(tiny_corpus), system_prompt="Be brief.")
    chat = pipeline._chat_tokens(pipeline.tokenizer_path(cfg))
    [record] = evaluate.load_records(str(tiny_corpus), "test", 1)
    [trained] = evaluate.understanding_prompts([record], ["asr"], chat, cfg)["asr"]
    messages = pipeline.build_messages(record.example, "asr", np.random.default_rng(0), cfg, dict.fromkeys(pipeline.COUNTERS, 0))
    asked = evaluate.audio_prompt(chat, record.example.audio, messages[-2].parts[1], "Be brief.", subsample=cfg.audio_subsample)
    assert asked.ids == trained.ids and trained.answer == record.example.transcript
    np.testing.assert_array_equal(asked.clips[0], trained.clips[0])


# ----------------------------------------------------------------------------- the commands


@pytest.fixture(scope="module")
def thinker_folder(tmp_path_factory):
    """A model folder with a tiny random thinker and no talker."""
    from hellochat_jax.convert.hellochat import compose

    from hellochat_jax.testing.midashenglm import make_tiny_midashenglm

    root = tmp_path_factory.mktemp("eval")
    make_tiny_midashenglm(root / "thinker")
    return compose(root / "thinker", None, root / "thinker_only")


@pytest.fixture(scope="module")
def talker_folder(thinker_folder):
    """The same thinker with a tiny random talker (no voice-prompt parts: eval speaks without one)."""
    from hellochat_jax.convert.hellochat import compose

    from hellochat_jax.testing.talker import make_tiny_release

    root = thinker_folder.parent
    make_tiny_release(root / "release", campplus=False, speech_tokenizer=False)
    return compose(root / "thinker", root / "release", root / "model")


def metrics_of(out: str) -> dict[str, float]:
    lines = [line.split() for line in out.strip().splitlines()]
    assert all(len(parts) == 2 for parts in lines), out
    return {name: float(value) for name, value in lines}


@pytest.mark.slow
def test_eval_understand_prints_every_metric(thinker_folder, tiny_corpus, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "understand.json"
    rc = cli(["eval", "understand", "--model", str(thinker_folder), "--dataset", str(tiny_corpus), "--num", "12",
              "--batch-size", "8", "--max-new-tokens", "3", "--json", str(out), "--no-compilation-cache"])
    metrics = metrics_of(capsys.readouterr().out)
    assert rc == 0 and set(metrics) == {*UNDERSTAND, "reply_style_accuracy"}
    assert all(np.isfinite(v) for v in metrics.values())
    report = json.loads(out.read_text())
    assert report["metrics"] == pytest.approx(metrics, abs=1e-4) and report["counts"]["asr"] == 12


@pytest.mark.slow
def test_eval_tts_prints_every_metric(talker_folder, tiny_corpus, capsys):  # noqa: F811
    # A random talker talks until its limit: 2 speech tokens per text token keeps the flow short.
    rc = cli(["eval", "tts", "--model", str(talker_folder), "--dataset", str(tiny_corpus), "--num", "4", "--batch-size", "4",
              "--max-new-tokens", "3", "--speech-max-ratio", "2", "--no-compilation-cache"])
    metrics = metrics_of(capsys.readouterr().out)
    assert rc == 0 and set(metrics) == {*TTS, "style_accuracy", "style_accuracy_floor"}
    assert all(np.isfinite(v) for v in metrics.values())


def test_eval_tts_of_a_folder_without_a_talker_is_one_line_naming_it(thinker_folder, tiny_corpus, capsys):  # noqa: F811
    rc = cli(["eval", "tts", "--model", str(thinker_folder), "--dataset", str(tiny_corpus), "--no-compilation-cache"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1 and "thinker_only" in err and "no talker" in err
