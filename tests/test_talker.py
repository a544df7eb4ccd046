"""Specification of the talker bundle, `hellochat convert cosyvoice2` and `hellochat speak`,
on a tiny random-weight release folder (hellochat_jax/talker_testing.py)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import shutil

import jax
import numpy as np
import pytest
import soundfile as sf

from hellochat_jax.cli import main as cli
from hellochat_jax.components.cosyvoice2 import weights as release_lib
from hellochat_jax.core.decoding import Greedy
from hellochat_jax.core.dsp import AudioError
from hellochat_jax.pipelines.talker import Talker, TalkerError, VoicePrompt, flow_mel
from hellochat_jax.testing.talker import make_tiny_release

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("kaldi_native_fbank")

RATE = 24000
FRAME = 480  # samples per mel frame at 24 kHz


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("talker")
    make_tiny_release(root / "release")
    assert cli(["convert", "cosyvoice2", "--release", str(root / "release"), "--out", str(root / "talker")]) == 0
    return root


@pytest.fixture(scope="module")
def talker(folders):
    return Talker.load(folders / "talker")


def voice(seconds: float, rate: int, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * 180 * t) * (1 + 0.5 * np.sin(2 * np.pi * 4 * t))).astype(np.float32)


# ----------------------------------------------------------------------------- conversion


def test_release_round_trip_is_bit_exact(folders):
    back = folders / "back"
    assert cli(["convert", "cosyvoice2", "--talker", str(folders / "talker"), "--export", "--out", str(back)]) == 0
    for name in ("llm.pt", "flow.pt", "hift.pt", "speech_tokenizer_v2_25hz.pt"):
        a = torch.load(folders / "release" / name, weights_only=True)
        b = torch.load(back / name, weights_only=True)
        assert list(a) == list(b), name
        assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a), name
    for name in ("cosyvoice2.yaml", "campplus.onnx", "CosyVoice-BlankEN/config.json", "CosyVoice-BlankEN/tokenizer.json"):
        assert (folders / "release" / name).read_bytes() == (back / name).read_bytes(), name


def test_incomplete_release_is_refused_by_name(tmp_path, folders):
    shutil.copytree(folders / "release", tmp_path / "rel")
    (tmp_path / "rel" / "flow.pt").unlink()
    with pytest.raises(release_lib.CheckpointError, match="missing flow.pt"):
        release_lib.convert_release(tmp_path / "rel", tmp_path / "out", progress=False)


# ----------------------------------------------------------------------------- speaking


# The tests below share shapes (a batch of two 2-token texts without prompt; one 2-token
# text with the 1 s prompt below) so that each compiled program is built once.
TEXTS = ["Hi", "Yo"]


@pytest.fixture(scope="module")
def prompt_wav(folders):
    path = folders / "voice.wav"
    sf.write(str(path), voice(1.0, 16000), 16000)  # 25 prompt tokens: no padding to the first 25-token hop
    return path


def test_speak_cli_writes_wavs_for_a_batch(folders, tmp_path):
    out = tmp_path / "reply.wav"
    assert cli(["speak", "--talker", str(folders / "talker"), "--text", TEXTS[0], "--text", TEXTS[1], "--out", str(out), "--greedy"]) == 0
    for name in ("reply_0.wav", "reply_1.wav"):
        wav, rate = sf.read(str(tmp_path / name))
        assert rate == RATE and wav.ndim == 1 and len(wav) > 0 and len(wav) % FRAME == 0


def test_speak_cli_speaks_as_instructed_in_a_batch_and_streaming(folders, tmp_path):
    """--instruct: CosyVoice 2 instruct mode, the instruction is the speech LM's prompt text (and
    a styled flow's speaker); the stream speaks the same tokens as the batch."""
    def speak(name: str, *extra: str) -> np.ndarray:
        out = tmp_path / f"{name}.wav"
        assert cli(["speak", "--talker", str(folders / "talker"), "--text", TEXTS[0], "--out", str(out), "--greedy", *extra]) == 0
        return sf.read(str(out))[0]

    plain, instructed = speak("plain"), speak("instructed", "--instruct", TEXTS[1])
    assert len(plain) != len(instructed) or not np.allclose(plain, instructed)
    assert len(speak("streamed", "--instruct", TEXTS[1], "--stream")) == len(instructed)


def test_speak_cli_streams_into_a_wav_with_a_voice_prompt(folders, prompt_wav, tmp_path):
    out = tmp_path / "s.wav"
    args = ["speak", "--talker", str(folders / "talker"), "--text", TEXTS[0], "--out", str(out), "--stream",
            "--prompt-wav", str(prompt_wav), "--prompt-text", "a voice", "--greedy"]
    assert cli(args) == 0
    wav, rate = sf.read(str(out))
    assert rate == RATE and len(wav) > 0 and np.isfinite(wav).all()


def test_batched_speech_tokens_equal_one_by_one(talker):
    texts = [talker.encode_text(t) for t in ("Hi", "Hey you")]
    key = jax.random.key(0)
    batched = talker.speech_decoder(texts, None, key, Greedy()).advance().result()
    for i, t in enumerate(texts):
        one = talker.speech_decoder([t], None, key, Greedy()).advance().result()
        assert batched[0][i, : batched[1][i]].tolist() == one[0][0, : one[1][0]].tolist()


def test_audio_length_follows_the_tokens(talker, prompt_wav):
    key = jax.random.key(1)
    k_lm = jax.random.split(key, 3)[0]
    tokens, lengths = talker.speech_decoder([talker.encode_text(t) for t in TEXTS], None, k_lm, Greedy()).advance().result()
    waves = talker.speak(TEXTS, key=key, sampling=Greedy())
    assert [len(w) for w in waves] == [int(n) * 2 * FRAME for n in lengths]
    # streaming: the chunks add up to the utterance (here with a voice prompt)
    prompt = talker.make_prompt(prompt_wav, "a voice")
    _, n = talker.speech_decoder([talker.encode_text(TEXTS[0])], prompt, k_lm, Greedy()).advance().result()
    chunks = list(talker.speak_stream(TEXTS[0], prompt, key=key, sampling=Greedy()))
    assert sum(len(c) for c in chunks) == int(n[0]) * 2 * FRAME and len(chunks) >= 2
    assert all(np.isfinite(c).all() for c in chunks)  # cross-fades may pass the 0.99 clamp, as in the reference


def test_streaming_chunks_do_not_recompile(talker):
    """Flow rows and vocoder chunks are padded to a few shape buckets and the noise buffer has
    one shape: once a first stream has built its programs, another stream compiles nothing."""
    text = "Hello there"  # at most 220 speech tokens: chunks after 28, 78 and 178 tokens, then the rest
    first = list(talker.speak_stream(text, key=jax.random.key(3), sampling=Greedy()))
    with count_compiles() as compiled:
        again = list(talker.speak_stream(text.replace("H", "J"), key=jax.random.key(4), sampling=Greedy()))
    assert len(first) >= 3 and len(again) >= 3
    assert compiled == []


@contextlib.contextmanager
def count_compiles():
    """Names of the XLA programs compiled inside the block (eager ops included)."""
    from jax._src import dispatch

    names: list[str] = []

    def listen(event, duration, **kwargs):
        if event == dispatch.BACKEND_COMPILE_EVENT:
            names.append(kwargs.get("fun_name", "?"))

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield names
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


def test_without_a_voice_each_row_speaks_with_its_styles_xvector(talker):
    """A flow that knows styles (model.flow.style_speakers) hears a reply's style instruction as
    its speaker: the same tokens give another mel in another style, batched or streamed, and an
    unknown style is no style at all."""
    tokens, noise = [list(range(1, 41))], talker._noise(jax.random.key(5))
    plain = talker.flow.cfg
    talker.flow.cfg = dataclasses.replace(plain, style_speakers=("calm", "cheerful"))
    try:
        def mel(*styles):
            return talker.tokens_to_mel(tokens * len(styles), None, noise, styles=list(styles))[0]

        calm, cheerful, unknown, none = mel("calm", "cheerful", "whispered", None)
        assert not np.allclose(calm, cheerful) and not np.allclose(calm, none)
        np.testing.assert_array_equal(unknown, none)
        np.testing.assert_allclose(talker.tokens_to_mel(tokens, None, noise)[0][0], none, atol=1e-5)

        def streamed(style):
            stream = talker.stream(None, key=jax.random.key(5), style=style)
            return np.concatenate(stream.push(tokens[0]) + stream.finish())

        assert not np.allclose(streamed("calm"), streamed("cheerful"))
        with pytest.raises(TalkerError, match="1 token rows but 2 styles"):
            talker.tokens_to_mel(tokens, None, noise, styles=["calm", "calm"])
    finally:
        talker.flow.cfg = plain


def test_zero_shot_prompt_features(talker):
    prompt = talker.make_prompt(voice(1.0, 16000), "a voice", sample_rate=16000)
    assert prompt.speech_tokens.ndim == 1 and 20 <= len(prompt.speech_tokens) <= 25
    assert prompt.mel.shape == (2 * len(prompt.speech_tokens), 80)
    assert prompt.xvector.shape == (192,) and np.abs(prompt.xvector).sum() > 0
    assert prompt.text_tokens == talker.encode_text("a voice")


@pytest.mark.parametrize("rate", [8000, 44100])
def test_prompt_at_another_sample_rate_is_resampled(talker, rate):
    ref = talker.make_prompt(voice(1.0, 16000), "a voice", sample_rate=16000)
    got = talker.make_prompt(voice(1.0, rate), "a voice", sample_rate=rate)
    assert abs(len(got.speech_tokens) - len(ref.speech_tokens)) <= 1
    assert got.mel.shape[1] == 80 and got.mel.shape[0] == 2 * len(got.speech_tokens)


def test_flow_mel_frames():
    # matcha's mel_spectrogram (center=False, reflect pad 720): one frame per 480 samples
    mel = flow_mel(voice(1.0, RATE))
    assert mel.shape == (50, 80) and np.isfinite(mel).all()
    assert flow_mel(np.zeros(RATE, np.float32)).max() == pytest.approx(np.log(1e-5), abs=1e-3)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("text", ["", "   \n"])
def test_empty_text_is_refused(talker, text):
    with pytest.raises(TalkerError, match="empty"):
        talker.speak(text)


def test_text_outside_the_vocabulary_is_refused(talker):
    t = copy.copy(talker)
    t.tokenizer = copy.deepcopy(talker.tokenizer)
    t.tokenizer.add_tokens([f"pad{i}" for i in range(60)] + ["zzfoo"])  # "zzfoo" gets an id past the LM's 320
    with pytest.raises(TalkerError, match="outside the LM's text vocabulary"):
        t.encode_text("say zzfoo")


def test_text_the_tokenizer_cannot_encode_is_refused(talker, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    t = copy.copy(talker)
    t.tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    assert t.encode_text("hello") == [1]
    with pytest.raises(TalkerError, match="cannot encode"):
        t.encode_text("hello wörld")


def test_silent_prompt_is_refused(talker):
    with pytest.raises(AudioError, match="silent"):
        talker.make_prompt(np.zeros(16000, np.float32), "a voice", sample_rate=16000)


def test_too_short_prompt_is_refused(talker):
    with pytest.raises(AudioError, match="too short"):
        talker.make_prompt(voice(0.3, 16000), "a voice", sample_rate=16000)


def test_prompt_with_nan_samples_is_refused(talker):
    wav = voice(1.0, 16000)
    wav[100] = np.nan
    with pytest.raises(AudioError, match="NaN"):
        talker.make_prompt(wav, "a voice", sample_rate=16000)


def test_prompt_without_its_text_is_refused(talker):
    with pytest.raises(TalkerError, match="transcript"):
        talker.make_prompt(voice(1.0, 16000), None, sample_rate=16000)


def test_release_folder_without_campplus_speaks_with_the_default_voice(folders, tmp_path):
    # a release folder is read as is (converted in memory); no campplus.onnx: no voice prompts
    shutil.copytree(folders / "release", tmp_path / "rel")
    (tmp_path / "rel" / "campplus.onnx").unlink()
    t = Talker.load(tmp_path / "rel")
    with pytest.raises(TalkerError, match="campplus.onnx"):
        t.make_prompt(voice(1.0, 16000), "a voice", sample_rate=16000)
    waves = t.speak(TEXTS, key=jax.random.key(0), sampling=Greedy())
    assert all(len(w) > 0 for w in waves)


def test_nan_in_a_mel_is_refused(talker):
    prompt = talker.make_prompt(voice(1.0, 16000), "a voice", sample_rate=16000)
    bad = VoicePrompt(prompt.text_tokens, prompt.speech_tokens, prompt.mel.copy(), prompt.xvector)
    bad.mel[3, 7] = np.nan
    with pytest.raises(TalkerError, match="NaN"):
        talker.speak("Hi", bad)
    mel = np.zeros((1, 20, 80), np.float32)
    mel[0, 5, 5] = np.inf
    with pytest.raises(TalkerError, match="NaN/inf"):
        talker.vocode(mel, np.asarray([20]), jax.random.key(0))
