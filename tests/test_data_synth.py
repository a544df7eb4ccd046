"""The embedded corpus: espeak-ng offline, emotion prosody, procedural events, captions, disjoint
splits, the TFDS build, the CLI and the tokenizer built with it."""

import argparse
import json

import numpy as np
import pytest
from data_corpus import tiny_corpus  # noqa: F401  (session fixture)

from hellochat_jax.data import builders, synth
from hellochat_jax.data.tokenizer import (
    SPECIAL_TOKENS,
    AudioPart,
    ChatTokens,
    Message,
    load_tokenizer,
)


def _rms(x):
    return float(np.sqrt(np.mean(np.square(x))))


def test_espeak_speaks_offline_at_16khz():
    wav = synth.speak("Hello there, how are you?", "en-us+m1", synth.EMOTION_PROSODY["neutral"])
    assert wav.dtype == np.float32
    assert 0.8 * synth.SAMPLE_RATE < len(wav) < 3.0 * synth.SAMPLE_RATE
    assert 0.01 < _rms(wav) and np.abs(wav).max() <= 1.0


def test_emotions_are_realised_through_prosody():
    text = "I went to the market this morning."
    sad = synth.speak(text, "en+f3", synth.EMOTION_PROSODY["sad"])
    angry = synth.speak(text, "en+f3", synth.EMOTION_PROSODY["angry"])
    assert len(sad) > 1.3 * len(angry)  # slower
    assert _rms(sad) < 0.7 * _rms(angry)  # softer


def test_unknown_voice_is_a_clear_error():
    with pytest.raises(synth.EspeakError, match="no voice"):
        synth.speak("hi", "xx-nowhere+m1", synth.EMOTION_PROSODY["neutral"])


def test_utterances_are_a_function_of_seed_split_and_index():
    prompt = synth.prompts_for("train")[0]
    a = synth.make_utterance(prompt, 0, "train", 5)
    b = synth.make_utterance(prompt, 0, "train", 5)
    c = synth.make_utterance(prompt, 1, "train", 5)
    for k in a:
        assert np.array_equal(np.asarray(a[k]), np.asarray(b[k])), k
    assert not np.array_equal(a["audio"], c["audio"])


def test_splits_never_share_a_text():
    def user_texts(p):
        return [p.text] + [t for role, t in p.context if role == "user"]

    texts = {s: {t for p in synth.prompts_for(s) for t in user_texts(p)} for s in synth.SPLITS}
    assert all(len(t) > 50 for t in texts.values())
    assert not texts["train"] & texts["validation"]
    assert not texts["train"] & texts["test"]
    assert not texts["validation"] & texts["test"]
    for split in synth.SPLITS:
        assert {p.kind for p in synth.prompts_for(split)} == set(synth.KINDS)


@pytest.mark.parametrize("name", synth.EVENTS)
def test_events_are_procedural_and_bounded(name):
    x = synth.make_event(name, np.random.default_rng(0), 4 * synth.SAMPLE_RATE)
    assert x.dtype == np.float32 and np.all(np.isfinite(x))
    if name == "silence":
        assert x.size == 0
    else:
        assert x.size > 0.05 * synth.SAMPLE_RATE and np.isclose(np.abs(x).max(), 1.0)


def test_events_are_mixed_at_the_reported_snr():
    t = np.arange(3 * synth.SAMPLE_RATE) / synth.SAMPLE_RATE
    speech = (0.1 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    checked = 0
    for seed in range(40):
        mixed, events = synth.mix_events(speech, np.random.default_rng(seed))
        if len(events) != 1:
            continue
        added = mixed - speech
        audible = added[np.abs(added) > 1e-3 * np.abs(added).max()]
        snr = 20 * np.log10(_rms(speech) / _rms(audible))
        assert abs(snr - events[0][1]) < 0.5, (seed, events)
        checked += 1
    assert checked >= 5


def test_caption_describes_speaker_emotion_prosody_and_scene():
    cap = synth.caption("en-gb-scotland+m3", "sad", synth.EMOTION_PROSODY["sad"], [("siren", 3.0), ("rain", 15.0)])
    assert cap.startswith("A Scottish man speaks slowly and softly in a low, flat voice, sounding sad.")
    assert "loud a wailing siren" in cap and "faint rain" in cap
    assert "quiet" in synth.caption("en-us+f1", "happy", synth.EMOTION_PROSODY["happy"], [])


def test_tiny_corpus_records(tiny_corpus):  # noqa: F811
    counts = {"train": 48, "validation": 12, "test": 12}
    texts = {}
    for split, n in counts.items():
        src = builders.open_source(str(tiny_corpus), split)
        assert len(src) == n
        records = [src[i] for i in range(n)]
        texts[split] = {r["transcript"] for r in records}
        for r in records:
            assert r["audio"].dtype == np.int16
            assert 1.0 <= len(r["audio"]) / synth.SAMPLE_RATE <= 4.5
            emotion = r["emotion"].decode()
            assert emotion in synth.EMOTIONS and synth._EMOTION_WORDS[emotion] in r["caption"].decode()
            assert set(r["events"].decode().split(",")) <= set(synth.EVENTS)
            assert r["reply"] and len(r["reply_audio"]) > 0.5 * synth.SAMPLE_RATE
            turns = json.loads(r["context"])
            assert len(r["context_audio_lengths"]) == len(turns)
            assert r["context_audio_lengths"].sum() == len(r["context_audio"])
            assert (r["kind"] == b"dialogue") == bool(turns)
    assert not texts["train"] & texts["test"] and not texts["train"] & texts["validation"]


def test_cli_reports_files_and_counts(tiny_corpus, capsys):  # noqa: F811
    from hellochat_jax.cli import data as cli

    data_dir = str(tiny_corpus.parents[2])  # .../<data_dir>/hellochat_synth/tiny/1.0.0
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["build", "synth", "--tiny", "--workers", "1", "--data_dir", data_dir])
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert str(tiny_corpus) in out
    assert "train" in out and "48 records" in out and "12 records" in out and "tokenizer" in out


def test_tokenizer_is_an_hf_folder_with_the_qwen_chat_tokens(tiny_corpus):  # noqa: F811
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_corpus / "tokenizer"))
    assert len(tok) == 1024
    for t in SPECIAL_TOKENS:
        assert tok.convert_ids_to_tokens(tok.convert_tokens_to_ids(t)) == t
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"
    text = "What is three plus four?"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_chat_encoding_matches_the_chat_template(tiny_corpus):  # noqa: F811
    tok = load_tokenizer(str(tiny_corpus / "tokenizer"))
    chat = ChatTokens(tok)
    messages = [
        Message("system", ("You are a helpful assistant.",)),
        Message("user", ("I am visiting Paris on Monday.",)),
        Message("assistant", ("How exciting. How can I help?",)),
        Message("user", (AudioPart(None, 7), "Transcribe the speech.")),
        Message("assistant", ("What should I pack?",)),
    ]
    enc = chat.encode(messages)
    rendered = tok.apply_chat_template(chat.template_messages(messages), tokenize=False)
    expected = tok.encode(rendered.replace("<|AUDIO|>", "<|AUDIO|>" * 7), add_special_tokens=False)
    assert enc.ids == expected
    # The assistant mask covers exactly each reply and its closing <|im_end|>.
    spans, current = [], []
    for i, m in zip(enc.ids, enc.assistant):
        if m:
            current.append(i)
        elif current:
            spans.append(tok.decode(current))
            current = []
    assert spans == ["How exciting. How can I help?<|im_end|>", "What should I pack?<|im_end|>"]


def test_word_drills_are_training_words_in_no_sentence_of_any_split():
    """Drills: random words of the training vocabulary, said by the speaker and (as the "reply")
    by the reply voice; never a held-out sentence; a pure function of (seed, index)."""
    vocab = {w.lower() for w in synth._drill_vocabulary()}
    held_out = {p.text.lower().rstrip(".?") for s in ("validation", "test") for p in synth.prompts_for(s)}
    drills = [synth.drill_prompt(0, i) for i in range(200)]
    assert drills[5] == synth.drill_prompt(0, 5) and drills[5] != synth.drill_prompt(1, 5)
    for d in drills:
        assert d.kind == synth.DRILL_KIND and not d.context
        for text in (d.text, d.reply):
            words = text.rstrip(".").lower().split()
            assert 3 <= len(words) <= 8 and set(words) <= vocab
            assert text.lower().rstrip(".") not in held_out
    assert len({w for d in drills for w in d.text.lower().rstrip(".").split()}) > len(vocab) // 2


def test_a_drill_teaches_listening_but_never_an_answer():
    from hellochat_jax.data import pipeline as P

    drill = P.decode(synth.make_utterance(synth.drill_prompt(0, 3), 0, "train", 7))
    assert drill.kind == synth.DRILL_KIND and drill.reply and drill.reply_audio.size
    assert set(P.available_tasks(drill)) == {"asr", "tts", "emotion", "events", "caption"}
    prompt = P.decode(synth.make_utterance(synth.prompts_for("train")[0], 0, "train", 7))
    assert "qa" in P.available_tasks(prompt)


def test_drills_follow_the_train_splits_utterances():
    config = builders.SynthConfig(name="drills", num_train=3, num_validation=2, num_test=2, num_drills=2)
    assert config.sizes() == {"train": 5, "validation": 2, "test": 2}
    train = builders.synth_jobs(config, "train")
    assert [p.kind == synth.DRILL_KIND for p, *_ in train] == [False, False, False, True, True]
    assert [index for *_, index in train] == [0, 1, 2, 3, 4]
    assert not any(p.kind == synth.DRILL_KIND for s in ("validation", "test") for p, *_ in builders.synth_jobs(config, s))
    assert builders.synth_config(2000) is builders.SYNTH_DEFAULT and builders.SYNTH_DEFAULT.num_drills == 0
    assert builders.synth_config(2000, drills=1000).sizes()["train"] == 3000
    with pytest.raises(ValueError, match="--drills"):
        builders.synth_config(100, drills=-1)
