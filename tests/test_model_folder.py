"""One model class from training to serving, one model folder every command loads.

A tiny Hello-Chat (Dasheng encoder + adapter + Qwen2 thinker) trains two steps on the tiny
corpus; `hellochat export` turns the run into a model folder that `understand` and `generate`
load (tokenizer and prompt conventions included), training's `init_from` reads back, and that
exports to the MiDashengLM HF format bit-exactly, its decoder loadable by transformers.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import single_device_mesh
from data_corpus import tiny_corpus  # noqa: F401  (session fixture)
from flax import nnx
from hellochat_jax.train import config as train_config
from hellochat_jax.train.trainer import Trainer
from train_util import tiny_config

from hellochat_jax.checkpoint.folder import load_model_folder
from hellochat_jax.checkpoint.io import CheckpointError
from hellochat_jax.cli import main as hellochat
from hellochat_jax.components.hellochat.model import HelloChat
from hellochat_jax.core.config import from_dict

THINKER = dict(vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
               num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)


def run_config(tmp_path, corpus_dir, **model) -> dict:
    return tiny_config(
        tmp_path / "run", steps=2,
        model={"thinker": THINKER, "audio_token_id": 4, "encoder": {"preset": "tiny", "depth": 1, "target_length": 448},
               "adapter": {}, **model},
        data={"source": "corpus", "batch_size": 8, "seq_len": 128,
              "corpus": {"dataset": str(corpus_dir), "max_clips": 2, "max_audio_seconds": 4.5}},
        eval={"every": 0, "at_end": False},
        checkpoint={"every": 0},
    )


def flat(tree) -> dict[str, np.ndarray]:
    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(tree)}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_corpus):  # noqa: F811
    """(corpus dir, trained state, model folder) of a two-step run."""
    tmp = tmp_path_factory.mktemp("run")
    trainer = Trainer(from_dict(train_config.TrainConfig, run_config(tmp, tiny_corpus)))
    assert trainer.fit() == 0
    out = tmp / "model"
    assert hellochat(["export", "--run", str(tmp / "run"), "--out", str(out)]) == 0
    return tiny_corpus, trainer.final_state, out


def test_export_holds_exactly_the_trained_parameters_and_the_tokenizer(exported):
    _, state, folder = exported
    bundle = load_model_folder(folder, single_device_mesh())
    assert isinstance(bundle.model, HelloChat) and bundle.component == "hellochat"
    trained = {**flat(state["params"]), **flat(state["rest"])}
    served = flat(nnx.state(bundle.model))
    assert set(served) == set(trained)  # the same parameter names: no mapping in between
    for name, value in trained.items():
        np.testing.assert_array_equal(served[name], value, err_msg=name)
    meta = json.loads((folder / "hellochat.json").read_text())
    assert meta["parts"] == ["thinker"] and meta["tokenizers"] == {"thinker": "tokenizer"}
    assert bundle.system_prompt == ""  # the corpus trains without a system prompt
    assert bundle.thinker_tokenizer.convert_tokens_to_ids("<|AUDIO|>") == 4
    assert bundle.talker_tokenizer is None


def test_understand_asks_a_test_clip_as_training_asked_and_generate_answers_text(exported, tmp_path, capsys):
    corpus, _, folder = exported
    wav = tmp_path / "clip.wav"
    assert hellochat(["data", "clip", "--dataset", str(corpus), "--split", "test", "--index", "0", "--out", str(wav)]) == 0
    assert "transcript:" in capsys.readouterr().out
    rc = hellochat(["understand", "--model", str(folder), "--audio", str(wav), "--prompt", "Transcribe the speech.",
                    "--prompt", "What emotion does the speaker express?", "--max-new-tokens", "3"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and len(lines) == 2 and lines[0].startswith(f"{wav} [Transcribe the speech.]: ")
    assert hellochat(["generate", "--model", str(folder), "--prompt", "hello", "--max-new-tokens", "3"]) == 0


def test_the_understand_prompt_is_the_training_prompt(exported):
    from hellochat_jax.core import dsp
    from hellochat_jax.data import builders, pipeline
    from hellochat_jax.pipelines.thinker import MiDashengLMProcessor, user_turn

    corpus, _, folder = exported
    bundle = load_model_folder(folder, single_device_mesh())
    cfg = pipeline.DataConfig(dataset=str(corpus))
    ex = pipeline.decode(builders.open_source(str(corpus), "test")[0])
    messages = pipeline.build_messages(ex, "asr", np.random.default_rng(0), cfg, dict.fromkeys(pipeline.COUNTERS, 0))
    chat = pipeline._chat_tokens(pipeline.tokenizer_path(cfg))
    trained = list(chat.encode(messages[:-1]).ids) + [chat.im_start, *chat.text("assistant\n")]  # as train/corpus.py evaluates
    instruction = messages[-2].parts[1]
    processor = MiDashengLMProcessor(bundle.thinker_tokenizer, audio_token_id=4, system=bundle.system_prompt or None)
    ids, _ = processor.encode([user_turn(instruction, dsp.validate(ex.audio))])
    assert ids == trained


def test_init_from_reads_a_model_folder_by_path(exported, tmp_path):
    corpus, state, folder = exported
    init = {"thinker": str(folder), "encoder": str(folder), "adapter": str(folder)}
    raw = run_config(tmp_path, corpus, init_from=init)
    raw["seed"] = 7  # a different random start: everything must come from the folder
    fresh = Trainer(from_dict(train_config.TrainConfig, raw)).init_state()
    got = {**flat(fresh["params"]), **flat(fresh["rest"])}
    for name, value in {**flat(state["params"]), **flat(state["rest"])}.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)


def test_midashenglm_hf_export_round_trip_is_bit_exact(exported, tmp_path):
    _, _, folder = exported
    hf, back = tmp_path / "hf", tmp_path / "back"
    assert hellochat(["convert", "midashenglm-export", "--model", str(folder), "--out", str(hf)]) == 0
    assert (hf / "config.json").is_file() and (hf / "tokenizer.json").is_file()
    assert hellochat(["convert", "midashenglm", "--hf", str(hf), "--out", str(back)]) == 0
    mesh = single_device_mesh()
    ours, theirs = load_model_folder(folder, mesh), load_model_folder(back, mesh)
    a, b = flat(nnx.state(ours.model)), flat(nnx.state(theirs.model))
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert theirs.thinker_tokenizer.convert_tokens_to_ids("<|AUDIO|>") == 4


def test_transformers_loads_the_exported_decoder(exported, tmp_path):
    import torch
    from transformers import Qwen2ForCausalLM

    from hellochat_jax.components.qwen2 import weights as qwen2_weights

    _, _, folder = exported
    decoder = load_model_folder(folder, single_device_mesh()).model.thinker.decoder
    qwen2_weights.export(decoder, decoder.cfg, tmp_path / "qwen2")
    reference = Qwen2ForCausalLM.from_pretrained(tmp_path / "qwen2", torch_dtype=torch.float32).eval()
    ids = np.random.default_rng(0).integers(0, THINKER["vocab_size"], (2, 12))
    ours, _ = decoder(ids)
    with torch.no_grad():
        want = reference(torch.as_tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours), want, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("damage, why", [("missing", "no hellochat.json"), ("corrupt", "corrupt")])
def test_a_folder_with_a_bad_hellochat_json_is_one_line_naming_it(tmp_path, capsys, damage, why):
    folder = tmp_path / "model"
    (folder / "state").mkdir(parents=True)
    if damage == "corrupt":
        (folder / "hellochat.json").write_text('{"component": "hellochat", "config": ')
    with pytest.raises(CheckpointError, match=why):
        load_model_folder(folder, single_device_mesh())
    rc = hellochat(["generate", "--model", str(folder), "--tokenizer", str(tmp_path), "--prompt", "hi"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1 and err.startswith("error: ") and "hellochat.json" in err



@pytest.fixture(scope="module")
def talker_folder(tmp_path_factory):
    """(model folder with talker, flow and HiFT parts from a tiny converted release, those parts)."""
    from hellochat_jax.checkpoint.folder import save_model_folder
    from hellochat_jax.components.cosyvoice2 import weights as release
    from hellochat_jax.components.hellochat.model import HelloChatConfig
    from hellochat_jax.components.midashenglm.model import MiDashengLM
    from hellochat_jax.core import sharding as shd
    from hellochat_jax.testing import midashenglm as tiny_thinker
    from hellochat_jax.testing.talker import make_tiny_release

    tmp = tmp_path_factory.mktemp("talker")
    make_tiny_release(tmp / "release", campplus=False, speech_tokenizer=False)
    release.convert_release(tmp / "release", tmp / "talker", progress=False)
    mesh = single_device_mesh()
    parts = {p: release.load_part(tmp / "talker", name, mesh)[1] for p, name in (("talker", "llm"), ("flow", "flow"), ("hift", "hift"))}
    cfg = HelloChatConfig(thinker=tiny_thinker.tiny_config(), **{p: m.cfg for p, m in parts.items()})
    model = shd.abstract_model(lambda: HelloChat(cfg, rngs=nnx.Rngs(0)))  # parts are filled in: no random init
    model.thinker = MiDashengLM(cfg.thinker, rngs=nnx.Rngs(0))
    model.talker, model.flow, model.hift = parts["talker"], parts["flow"], parts["hift"]
    return save_model_folder(model, tmp / "model", talker_tokenizer=tmp / "release" / release.QWEN_FOLDER), parts


@pytest.mark.slow  # the tiny release and its conversion take minutes on 2 shared cores
def test_the_talker_loads_its_parts_from_a_model_folder(talker_folder):
    from hellochat_jax.pipelines.talker import Talker

    folder, parts = talker_folder
    talker = Talker.load(folder, single_device_mesh())
    for ours, want in ((talker.llm, parts["talker"]), (talker.flow, parts["flow"])):
        got, expected = flat(nnx.state(ours)), flat(nnx.state(want))
        assert got.keys() == expected.keys()
        for name, value in expected.items():
            np.testing.assert_array_equal(got[name], value, err_msg=name)
    assert "s3tokenizer" in talker.missing  # voice prompts need a speech tokenizer the folder lacks


@pytest.mark.slow  # compiles the speech LM, flow and HiFT (minutes on 2 shared cores)
def test_speak_from_a_model_folder(talker_folder, tmp_path):
    import soundfile as sf

    folder, _ = talker_folder
    out = tmp_path / "reply.wav"
    assert hellochat(["speak", "--model", str(folder), "--text", "Hi", "--out", str(out), "--greedy"]) == 0
    wav, rate = sf.read(str(out))
    assert rate == 24000 and len(wav) > 0 and np.isfinite(wav).all()


def test_export_folds_lora_adapters_into_their_kernels():
    import jax.numpy as jnp
    from hellochat_jax.train.export import _merged_variables
    from hellochat_jax.train.model import build, model_config

    from hellochat_jax.components.qwen2.model import Qwen2Config

    cfg = from_dict(train_config.ModelConfig, {"thinker": dict(THINKER, vocab_size=64), "lora": {"rank": 2}})
    adapted = build(cfg, seed=0)()
    lora = nnx.state(adapted, nnx.LoRAParam)
    for path, var in nnx.to_flat_state(lora):
        if path[-1] == "lora_b":  # B starts at zero; make the adapters matter
            var.set_value(0.1 * jnp.ones_like(var.get_value()))
    nnx.update(adapted, lora)
    plain = HelloChat(model_config(cfg), rngs=nnx.Rngs(1))
    values = _merged_variables(adapted)
    state = nnx.state(plain)
    for path, var in nnx.to_flat_state(state):
        var.set_value(values.pop(tuple(str(p) for p in path)))
    nnx.update(plain, state)
    assert not values and isinstance(plain.cfg.thinker.text, Qwen2Config)
    ids = np.arange(10)[None] % 64
    np.testing.assert_allclose(np.asarray(plain.thinker.decoder(ids)[0]), np.asarray(adapted.thinker.decoder(ids)[0]), atol=1e-5)
