"""Specification of MiDashengLM: encoder + adapter + Qwen2 thinker, its HF converter, the prompt
processor, generation and `hellochat understand`. The midashenglm-tiny fixture is the reference."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile as sf
from conftest import single_device_mesh
from flax import nnx

from hellochat_jax.checkpoint.io import CheckpointError, SafetensorsSource
from hellochat_jax.cli import main as hellochat
from hellochat_jax.components.adapter.model import AudioAdapter
from hellochat_jax.components.midashenglm import model as midashenglm
from hellochat_jax.components.midashenglm import weights as convert_midashenglm
from hellochat_jax.components.midashenglm.model import check_placeholders, splice_audio
from hellochat_jax.core import dsp as audio
from hellochat_jax.pipelines.thinker import (
    AUDIO_BOS,
    AUDIO_EOS,
    MiDashengLMProcessor,
    user_turn,
)
from hellochat_jax.testing.midashenglm import (
    make_tiny_midashenglm,
    tiny_config,
    write_random,
)

FIXTURE = Path(__file__).parent / "fixtures" / "midashenglm-tiny"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("midashenglm") / "tiny"
    make_tiny_midashenglm(folder, seed=0)
    return folder


@pytest.fixture(scope="module")
def tokenizer(tiny_folder):
    from hellochat_jax.cli.understand import load_tokenizer

    return load_tokenizer(str(tiny_folder))


def sine(seconds: float, freq: float = 440.0, rate: int = 16_000) -> np.ndarray:
    return (0.3 * np.sin(2 * np.pi * freq * np.arange(int(seconds * rate)) / rate)).astype(np.float32)


# ------------------------------------------------------------------------------ parity


# The fixture itself passes on 1 and 8 devices: tests/test_verify.py (every fixture).


# ------------------------------------------------------------------------------ adapter, splicing


def test_adapter_stacks_five_frames_in_time_order():
    adapter = AudioAdapter(3, 4, subsample=5, rngs=nnx.Rngs(0))
    features = jnp.arange(2 * 12 * 3, dtype=jnp.float32).reshape(2, 12, 3)  # 12 frames: 2 groups, 2 dropped
    out = adapter(features)
    assert out.shape == (2, 2, 4)
    stacked = features[:, :10].reshape(2, 2, 15)  # frames 0..4 concatenated, then 5..9
    fc1 = stacked @ adapter.fc1.kernel[...] + adapter.fc1.bias[...]
    expected = jax.nn.gelu(fc1, approximate=False) @ adapter.fc2.kernel[...] + adapter.fc2.bias[...]
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)


def test_splice_fills_placeholders_in_reading_order():
    aid = 9
    text = jnp.zeros((2, 6, 1))
    ids = jnp.array([[1, aid, aid, 2, aid, 3], [aid, aid, aid, 4, 0, 0]])
    audio_rows = jnp.array([[10.0, 11.0, 12.0], [20.0, 21.0, 22.0], [30.0, 31.0, 32.0]])[..., None]
    counts = jnp.array([2, 1, 3])  # clip 0 -> 2 rows, clip 1 -> 1 row, clip 2 -> 3 rows
    out = np.asarray(splice_audio(text, ids, audio_rows, counts, aid))[..., 0]
    np.testing.assert_array_equal(out, [[0, 10, 11, 0, 20, 0], [30, 31, 32, 0, 0, 0]])


def test_placeholder_count_mismatch_is_an_error():
    cfg = tiny_config()
    ids = np.full((1, 25), cfg.audio_token_id)
    check_placeholders(ids[:, :20], [64_000], cfg)  # 4 s -> 20 tokens
    with pytest.raises(ValueError, match="25 audio placeholder.*yield 20 audio token"):
        check_placeholders(ids, [64_000], cfg)


# ------------------------------------------------------------------------------ converter


def test_export_round_trip_is_bit_exact(tmp_path):
    cfg, model = convert_midashenglm.load(FIXTURE / "checkpoint", single_device_mesh())
    out = convert_midashenglm.export(model, cfg, tmp_path / "again", max_shard_bytes=200_000)
    assert (out / "model.safetensors.index.json").exists()  # sharded on request
    original, again = SafetensorsSource(FIXTURE / "checkpoint"), SafetensorsSource(out)
    assert sorted(again.keys()) == sorted(original.keys())
    for key in original.keys():
        a, b = original.get(key), again.get(key)
        assert a.dtype == b.dtype and a.shape == b.shape, key
        np.testing.assert_array_equal(a, b, err_msg=key)
    assert convert_midashenglm.read_config(out) == convert_midashenglm.read_config(FIXTURE / "checkpoint")


def test_tied_thinker_and_bf16_checkpoint(tmp_path):
    cfg = tiny_config(tie_word_embeddings=True)
    folder = write_random(tmp_path / "tied", cfg, seed=1)
    assert "decoder.lm_head.weight" not in SafetensorsSource(folder).keys()
    loaded_cfg, model = convert_midashenglm.load(folder, single_device_mesh(), param_dtype="bfloat16")
    assert loaded_cfg.text.tie_word_embeddings and model.decoder.lm_head is None
    assert model.decoder.model.embed_tokens.embedding.dtype == jnp.bfloat16
    out = convert_midashenglm.export(model, loaded_cfg, tmp_path / "bf16")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    again_cfg, again = convert_midashenglm.load(out, single_device_mesh())
    assert again_cfg.text.param_dtype == "bfloat16"  # the stored dtype is kept
    twice = convert_midashenglm.export(again, again_cfg, tmp_path / "bf16-again")
    first, second = SafetensorsSource(out), SafetensorsSource(twice)
    for key in first.keys():  # bf16 round trip: bit-exact, dtypes included
        assert first.dtype(key) == second.dtype(key) and first.get(key).tobytes() == second.get(key).tobytes(), key
    wav = sine(1.0)[None, :]
    ids = np.full((1, 7), cfg.audio_token_id, np.int32)
    ids[0, :2] = 1
    logits = nnx.jit(lambda m, i, w, l: m(i, w, l))(again, jnp.asarray(ids), jnp.asarray(wav), jnp.asarray([16_000]))
    assert logits.dtype == jnp.bfloat16 and np.isfinite(np.asarray(logits, np.float32)).all()


def test_missing_and_foreign_keys_are_refused_by_name(tmp_path):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(FIXTURE / "checkpoint" / "model.safetensors")
    tensors.pop("audio_projector.net.2.bias")
    tensors["audio_encoder.front_end.0.mel_scale.fb"] = np.zeros((257, 64), np.float32)
    folder = tmp_path / "broken"
    folder.mkdir()
    save_file(tensors, folder / "model.safetensors")
    (folder / "config.json").write_text((FIXTURE / "checkpoint" / "config.json").read_text())
    with pytest.raises(CheckpointError) as err:
        convert_midashenglm.load(folder, single_device_mesh())
    assert "audio_projector.net.2.bias" in str(err.value) and "audio_encoder.front_end.0.mel_scale.fb" in str(err.value)


def test_not_a_midashenglm_config(tmp_path):
    folder = tmp_path / "qwen"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2", "vocab_size": 10}))
    with pytest.raises(CheckpointError, match="expected a midashenglm config"):
        convert_midashenglm.load(folder, single_device_mesh())


# ------------------------------------------------------------------------------ processor


def test_prompt_has_one_placeholder_per_audio_token(tokenizer):
    processor = MiDashengLMProcessor(tokenizer)
    clip = sine(2.0)
    ids, clips = processor.encode([user_turn("Caption the audio.", clip)])
    n = audio.num_audio_tokens(len(clip))
    assert n == 10 and ids.count(processor.audio_token_id) == n
    start = ids.index(processor.audio_token_id)
    assert ids[start - 1] == tokenizer.convert_tokens_to_ids(AUDIO_BOS)
    assert ids[start + n] == tokenizer.convert_tokens_to_ids(AUDIO_EOS)
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful language and speech assistant.<|im_end|>\n<|im_start|>user\n<|audio_bos|>")
    assert text.endswith("<|audio_eos|>Caption the audio.<|im_end|>\n<|im_start|>assistant\n")


def test_batch_of_conversations_with_several_clips(tokenizer):
    processor = MiDashengLMProcessor(tokenizer)
    conversations = [
        [user_turn("What is this?", sine(1.0))],
        [{"role": "user", "content": [{"type": "audio", "audio": sine(3.0)}, {"type": "text", "text": "and"},
                                      {"type": "audio", "audio": sine(0.5)}]}],
    ]
    batch = processor(conversations)
    assert batch.audio_per_row == [1, 2]
    assert batch.lengths.tolist() == [16_000, 48_000, 8_000] and batch.waveform.shape == (3, 48_000)
    assert batch.input_ids.shape[1] % 16 == 0
    assert (batch.attention_mask[:, -1] == 1).all()  # left-padded for generation
    check_placeholders(batch.input_ids, batch.lengths, tiny_config(audio_token_id=processor.audio_token_id))


def test_placeholders_follow_the_adapters_rate(tokenizer):
    # an adapter that stacks 3 encoder frames makes 8.3 audio tokens a second; the prompt holds as many
    processor = MiDashengLMProcessor(tokenizer, subsample=3)
    batch = processor([[user_turn("What is this?", sine(3.0))]])
    assert int((batch.input_ids == processor.audio_token_id).sum()) == audio.num_audio_tokens(48_000, 3) == 25
    cfg = tiny_config(audio_token_id=processor.audio_token_id)
    check_placeholders(batch.input_ids, batch.lengths, dataclasses.replace(cfg, subsample_factor=3))
    with pytest.raises(ValueError, match="yield 15 audio token"):
        check_placeholders(batch.input_ids, batch.lengths, cfg)
    # a clip long enough at 5 frames per token but not at 10: refused by name, not silently empty
    with pytest.raises(audio.AudioError, match="too short.*minimum is 6240 samples"):
        MiDashengLMProcessor(tokenizer, subsample=10)([[user_turn("hi", sine(0.25))]])


def test_processor_refuses_bad_audio_and_text_placeholders(tokenizer, tmp_path):
    processor = MiDashengLMProcessor(tokenizer)
    with pytest.raises(audio.AudioError, match="too short"):
        processor([[user_turn("hi", sine(0.1))]])
    with pytest.raises(ValueError, match="must not contain"):
        processor([[{"role": "user", "content": "<|AUDIO|> sneaky"}]])
    with pytest.raises(ValueError, match="expects audio_token_id 7"):
        MiDashengLMProcessor(tokenizer, audio_token_id=7)


# ------------------------------------------------------------------------------ generation, CLI


def test_generate_matches_step_by_step_argmax(tiny_folder, tokenizer):
    cfg, model = convert_midashenglm.load(tiny_folder, single_device_mesh(), precision="highest")
    processor = MiDashengLMProcessor(tokenizer, audio_token_id=cfg.audio_token_id)
    batch = processor([[user_turn("Caption.", sine(1.5))], [user_turn("Transcribe this please.", sine(2.5, 220))]])
    steps = 4
    tokens, _ = midashenglm.generate(model, batch.input_ids, batch.attention_mask, batch.waveform, batch.lengths,
                                     max_new_tokens=steps, stop_tokens=())

    # Reference: no cache, the whole (left-padded) sequence re-run for every new token.
    embeds = midashenglm.prompt_embeddings(model, batch.input_ids, batch.waveform, batch.lengths)
    mask = jnp.asarray(batch.attention_mask)

    @nnx.jit
    def full(model, embeds, mask):
        return model.decoder(inputs_embeds=embeds, attention_mask=mask)[0][:, -1]

    expected = []
    for _ in range(steps):
        nxt = jnp.argmax(full(model, embeds, mask), axis=-1)
        expected.append(np.asarray(nxt))
        embeds = jnp.concatenate([embeds, model.decoder.model.embed_tokens(nxt[:, None])], axis=1)
        mask = jnp.concatenate([mask, jnp.ones((mask.shape[0], 1), mask.dtype)], axis=1)
    np.testing.assert_array_equal(tokens, np.stack(expected, axis=1))


def test_long_audio_prompt_uses_segments_and_agrees(tiny_folder):
    cfg, model = convert_midashenglm.load(tiny_folder, single_device_mesh(), precision="highest")
    wav = sine(25.0)[None, :]
    lengths = np.array([wav.shape[1]], np.int32)
    ids = np.full((1, cfg.num_audio_tokens(wav.shape[1]) + 2), cfg.audio_token_id, np.int32)
    ids[0, 0], ids[0, -1] = 1, 2
    one_shot = midashenglm.prompt_embeddings(model, ids, wav, lengths)
    segmented = midashenglm.prompt_embeddings(model, ids, wav, lengths, long_audio_seconds=10.0)
    np.testing.assert_allclose(np.asarray(segmented), np.asarray(one_shot), rtol=1e-5, atol=1e-5)


def test_understand_end_to_end(tiny_folder, tmp_path, capsys):
    sf.write(tmp_path / "a.wav", sine(2.0), 16_000)
    stereo_44k = np.stack([sine(3.0, 300, 44_100), sine(3.0, 500, 44_100)], axis=1)
    sf.write(tmp_path / "b.flac", stereo_44k, 44_100)
    (tmp_path / "broken.wav").write_bytes(b"RIFF....WAVEfmt nonsense")
    ckpt = tmp_path / "ckpt"
    assert hellochat(["convert", "midashenglm", "--hf", str(tiny_folder), "--out", str(ckpt)]) == 0
    capsys.readouterr()
    rc = hellochat(["understand", "--checkpoint", str(ckpt), "--tokenizer", str(tiny_folder), "--audio",
                    str(tmp_path / "a.wav"), str(tmp_path / "broken.wav"), str(tmp_path / "b.flac"),
                    "--prompt", "What do you hear?", "--max-new-tokens", "6", "--batch-size", "2"])
    out, err = capsys.readouterr()
    assert rc == 1  # one file was refused; the others were answered
    lines = out.strip().splitlines()
    assert [line.split(": ")[0] for line in lines] == [str(tmp_path / "a.wav"), str(tmp_path / "b.flac")]
    assert "broken.wav: not a readable audio file" in err


def test_per_sample_top_db_option(tiny_folder):
    cfg, model = convert_midashenglm.load(tiny_folder, single_device_mesh())
    assert not cfg.audio_encoder.top_db_per_sample  # the fixture's (reference) convention
    new = midashenglm.with_encoder_options(model, top_db_per_sample=True)
    assert new.audio_encoder.top_db_per_sample and model.audio_encoder.cfg.top_db_per_sample
