"""Specification of the chat pipeline (speech in, speech out), `hellochat chat`, `hellochat serve`
and `hellochat convert hellochat`, on tiny random-weight releases composed into one model folder.
The replies of random models are noise; the pipeline around them is what is checked."""

from __future__ import annotations

import json
import socket
import time

import jax
import numpy as np
import pytest
import soundfile as sf

from hellochat_jax.cli import main as cli
from hellochat_jax.core import decoding
from hellochat_jax.pipelines import chat as chat_lib
from hellochat_jax.pipelines.chat import ChatPipeline, Conversation, split_style
from hellochat_jax.testing.chat import make_tiny_chat_folders, noise

pytest.importorskip("torch")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

RATE = 24000
OPTIONS = {"max_new_tokens": 12, "speech_sampling": decoding.Greedy(), "speech_max_ratio": 4.0}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return make_tiny_chat_folders(tmp_path_factory.mktemp("chat"))


@pytest.fixture(scope="module")
def pipeline(folders):
    return ChatPipeline.load(folders / "model", **OPTIONS)


def variant(pipeline: ChatPipeline, **changes) -> ChatPipeline:
    """The same loaded models with other options."""
    options = {**OPTIONS, "mesh": pipeline.mesh, **changes}
    return ChatPipeline(pipeline.thinker, pipeline.tokenizer, pipeline.talker, **options)


# ----------------------------------------------------------------------------- style tags


def test_style_tag_is_split_off_and_held_until_settled():
    assert split_style("<style>Speak calmly.</style> Sure thing.") == ("Speak calmly.", "Sure thing.", True)
    assert split_style("Sure thing.") == (None, "Sure thing.", True)
    assert split_style("<sty", final=False) == (None, "", False)  # could still become a tag
    assert split_style("<style>calm", final=False) == (None, "", False)
    assert split_style("<style>never closed", final=True) == (None, "<style>never closed", True)
    assert split_style("<b>bold</b>", final=False) == (None, "<b>bold</b>", True)


def test_style_becomes_the_instruct_prompt_of_the_speech_lm(pipeline, monkeypatch):
    from hellochat_jax.components.speech_lm import model as slm

    seen = {}

    class Recording(slm.BistreamDecoder):
        def __init__(self, model, prompt_text=(), prompt_speech=(), **kw):
            seen["prompt"] = (list(prompt_text), list(prompt_speech))
            super().__init__(model, prompt_text, prompt_speech, **kw)

    monkeypatch.setattr(slm, "BistreamDecoder", Recording)
    reply = chat_lib.Reply(text="Sure.", style="Speak calmly.")
    chat_lib._Speaker(pipeline, reply, jax.random.key(0), False, lambda c: None).finish(reply.text)
    talker = pipeline.talker
    eop = talker.tokenizer.convert_tokens_to_ids("<|endofprompt|>")
    assert seen["prompt"] == (talker.encode_text("Speak calmly.") + [eop], [])  # CosyVoice2 instruct2: no prompt speech
    assert reply.speech_tokens


# ----------------------------------------------------------------------------- answering


def test_batched_chat_answers_each_conversation_as_it_would_alone(pipeline):
    """Noise, silence and a typed turn in one batch: every one answered, as when alone."""
    convs = [Conversation().add_user(audio=noise(2.0)), Conversation().add_user(audio=np.zeros(24000, np.float32)),
             Conversation().add_user(text="Hello there")]
    texts = []
    batched = pipeline.respond(convs, on_text=lambda i, piece: texts.append((i, piece)))
    for i, reply in enumerate(batched):
        assert reply.error is None and reply.thinker_tokens and reply.speech_tokens
        assert len(reply.waveform) == len(reply.speech_tokens) * 2 * 480 and np.isfinite(reply.waveform).all()
        assert "".join(p for j, p in texts if j == i) == reply.text  # streamed out piece by piece
        [alone] = pipeline.respond([convs[i]])
        assert alone.thinker_tokens == reply.thinker_tokens and alone.speech_tokens == reply.speech_tokens


def test_streamed_reply_equals_the_non_streamed_one(pipeline):
    """Text fed to the talker as it is decoded gives the speech tokens of the whole text fed at
    once, and the audio streamed during the reply is the talker's chunked synthesis of those
    tokens. (The non-streamed audio runs the flow without chunk masks: same length, other
    samples; with random weights the two flow modes differ by as much as the signal.)"""
    conv = Conversation().add_user(audio=noise(1.5, seed=1))
    chunks = []
    start = time.perf_counter()
    [streamed] = pipeline.respond([conv], stream=True, on_audio=lambda i, c: chunks.append(c))
    total = time.perf_counter() - start
    [whole] = pipeline.respond([conv], stream=False)
    assert streamed.thinker_tokens == whole.thinker_tokens and streamed.text == whole.text
    assert streamed.speech_tokens == whole.speech_tokens and len(streamed.speech_tokens) >= 28
    assert len(chunks) >= 2 and streamed.first_audio_s < total  # audio came out before the end
    assert len(streamed.waveform) == len(whole.waveform) and np.isfinite(whole.waveform).all()
    k_talk = jax.random.split(jax.random.key(0))[1]  # respond's default key, row 0
    offline = pipeline.talker.stream(None, key=jax.random.fold_in(k_talk, 0))
    want = np.concatenate(offline.push(streamed.speech_tokens) + offline.finish())
    np.testing.assert_allclose(streamed.waveform, want, atol=1e-5)


# ----------------------------------------------------------------------------- awkward input


def test_clip_too_long_is_refused_while_the_rest_is_answered(pipeline):
    short = variant(pipeline, max_context=128)
    replies = short.respond([Conversation().add_user(audio=noise(10.0)), Conversation().add_user(audio=noise(1.0))])
    assert replies[0].error and "context of 128 tokens" in replies[0].error and not replies[0].audio
    assert replies[1].error is None and replies[1].thinker_tokens


def test_thinker_that_ends_at_once_means_no_talker_call(pipeline, monkeypatch):
    from hellochat_jax.components.speech_lm import model as slm

    monkeypatch.setattr(slm, "BistreamDecoder", None)  # calling the talker would fail
    every = range(pipeline.thinker.cfg.text.vocab_size)
    [reply] = variant(pipeline, stop_ids=every).respond([Conversation().add_user(audio=noise(1.0))], stream=True)
    assert reply.text == "" and not reply.audio and not reply.speech_tokens
    assert any("ended its reply at once" in n for n in reply.notes) and any("talker not called" in n for n in reply.notes)


def test_talker_without_tokens_gives_an_empty_reply_audio(pipeline):
    [reply] = variant(pipeline, speech_max_ratio=0.0).respond([Conversation().add_user(audio=noise(1.0))])
    assert reply.text and not reply.audio and not reply.speech_tokens
    assert any("no speech tokens" in n for n in reply.notes)


def test_model_without_talker_replies_in_text_and_says_so_once(folders, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli(["chat", "--model", str(folders / "text_model"), "--audio", str(folders / "q1.wav"), "--text", "hi",
                "--out-dir", str(out), "--max-new-tokens", "6", "--no-compilation-cache"]) == 0
    err = capsys.readouterr().err
    assert err.count("no talker") == 1
    assert (out / "q1.txt").exists() and (out / "text_0.txt").exists() and not list(out.glob("*.wav"))


@pytest.mark.parametrize("damage", ["bad_json", "stray_file", "missing_audio", "not_a_folder"])
def test_broken_conversation_folder_is_one_line_error(folders, tmp_path, capsys, damage):
    conv = tmp_path / "conv"
    if damage == "not_a_folder":
        conv.write_text("x")
    else:
        conv.mkdir()
        if damage == "bad_json":
            (conv / "conversation.json").write_text("{not json")
        elif damage == "stray_file":
            (conv / "notes.txt").write_text("hello")
        else:
            (conv / "conversation.json").write_text(json.dumps({"format": 1, "turns": [{"role": "user", "audio": "turn_000_user.wav"}]}))
    code = cli(["chat", "--model", str(folders / "model"), "--text", "hi", "--conversation", str(conv), "--out-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.startswith("error: ") and len(err.splitlines()) == 1 and "Traceback" not in err
    assert str(conv) in err


# ----------------------------------------------------------------------------- the command line


def test_chat_cli_streams_a_batch_from_the_composed_folder(folders, tmp_path, capsys):
    out = tmp_path / "replies"
    assert cli(["chat", "--model", str(folders / "model"), "--audio", str(folders / "q1.wav"), "--audio", str(folders / "q2.wav"),
                "--out-dir", str(out), "--stream", "--max-new-tokens", "12", "--no-compilation-cache"]) == 0
    for name in ("q1", "q2"):
        wav, rate = sf.read(str(out / f"{name}.wav"))
        assert rate == RATE and len(wav) > 0 and (out / f"{name}.txt").exists()


def test_multi_turn_conversation_keeps_audio_turns(folders, tmp_path):
    conv_dir = tmp_path / "talk"
    base = ["chat", "--model", str(folders / "model"), "--out-dir", str(tmp_path / "o"), "--conversation", str(conv_dir),
            "--max-new-tokens", "6", "--no-compilation-cache"]
    assert cli(base + ["--audio", str(folders / "q1.wav")]) == 0
    assert cli(base + ["--text", "And then?"]) == 0
    meta = json.loads((conv_dir / "conversation.json").read_text())
    assert [t["role"] for t in meta["turns"]] == ["user", "assistant", "user", "assistant"]
    assert (conv_dir / meta["turns"][0]["audio"]).exists() and meta["turns"][2]["text"] == "And then?"
    conv = Conversation.load(conv_dir)
    np.testing.assert_allclose(conv.turns[0].audio, sf.read(str(folders / "q1.wav"), dtype="float32")[0], atol=1e-7)
    # the next prompt still hears the first turn's audio
    pipeline = ChatPipeline.load(folders / "model", **OPTIONS)
    ids, clips = pipeline._encode(conv)
    assert len(clips) == 1 and ids.count(pipeline.thinker.cfg.audio_token_id) > 0


# ----------------------------------------------------------------------------- serve


def test_serve_answers_a_gradio_client(pipeline, folders):
    gradio_client = pytest.importorskip("gradio_client")
    from hellochat_jax.cli import build_parser
    from hellochat_jax.cli.serve import build_app

    args = build_parser(["serve"]).parse_args(["serve", "--model", "m"])
    assert args.host == "127.0.0.1"  # local only unless asked
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = build_app(pipeline)
    app.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False)
        history, _, full = client.predict(gradio_client.handle_file(str(folders / "q1.wav")), "", [], api_name="/respond")
        [want] = pipeline.respond([Conversation().add_user(audio=sf.read(str(folders / "q1.wav"), dtype="float32")[0])])
        content = history[-1]["content"]  # Gradio 6 sends message content as a list of parts
        shown = content if isinstance(content, str) else "".join(p.get("text", "") for p in content if isinstance(p, dict))
        assert history[-1]["role"] == "assistant" and shown.startswith(want.text)
        wav, rate = sf.read(full)
        assert rate == RATE and len(wav) == len(want.waveform)
    finally:
        app.close()
