"""Specification of the flow decoder (CosyVoice 2's CausalMaskedDiffWithXvec), its converter and
its flow-matching loss.

The reference is FunAudioLLM/CosyVoice (cosyvoice/flow/{flow,flow_matching,decoder}.py and
cosyvoice/transformer/upsample_encoder.py); tests/fixtures/cosyvoice2-flow-tiny holds its
recorded outputs. Everything else here uses random tiny configs of other sizes.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FIXTURES, full_mesh, single_device_mesh
from flax import nnx

from hellochat_jax.checkpoint.cosyvoice_yaml import load_cosyvoice_yaml
from hellochat_jax.checkpoint.io import CheckpointError, DictSource, TorchSource
from hellochat_jax.checkpoint.load import load_from_source
from hellochat_jax.components.flow import weights as cosyvoice2_flow
from hellochat_jax.components.flow.conformer import UpsampleEncoderConfig
from hellochat_jax.components.flow.model import (
    EstimatorConfig,
    FlowConfig,
    FlowDecoder,
    draw_loss_randomness,
    flow_matching_loss,
    jit_inference,
    time_schedule,
)
from hellochat_jax.core import sharding as shd
from hellochat_jax.testing.state_dicts import assert_same_state_dict

torch = pytest.importorskip("torch")

FIXTURE = FIXTURES / "cosyvoice2-flow-tiny"
MEL = 20  # mel bins of the tiny configs here (the release has 80)


def tiny_config(chunk: int = 4, channels: tuple[int, ...] = (16,), heads: int = 3, up_blocks: int = 1, **kw) -> FlowConfig:
    """up_blocks: the release format fixes 4 (the reference hard-codes them); 1 compiles faster."""
    d = 6 * heads
    encoder = UpsampleEncoderConfig(input_size=d, output_size=d, attention_heads=heads, linear_units=2 * d, num_blocks=1, num_up_blocks=up_blocks, static_chunk_size=chunk)
    estimator = EstimatorConfig(in_channels=4 * MEL, out_channels=MEL, channels=channels, attention_head_dim=8, n_blocks=1, num_mid_blocks=1, num_heads=2, static_chunk_size=2 * chunk)
    return FlowConfig(input_size=d, output_size=MEL, spk_embed_dim=12, vocab_size=50, encoder=encoder, estimator=estimator, n_timesteps=3, precision="highest", **kw)


def tiny_model(cfg: FlowConfig | None = None, seed: int = 0) -> FlowDecoder:
    """Random weights everywhere (biases and norms too), so every parameter matters; loaded
    through the converter from a host-drawn release-layout state dict."""
    cfg = cfg or tiny_config()
    _, model = load_from_source("cosyvoice2-flow", cfg, DictSource(cosyvoice2_flow.random_state_dict(cfg, seed)), single_device_mesh())
    return model


def rows(seed: int, token_lens, prompt_lens, n_tokens: int, n_prompt: int, cfg: FlowConfig) -> dict[str, np.ndarray]:
    """A right-padded inference batch: prompt tokens, prompt mel (2 frames per token), tokens."""
    rng = np.random.default_rng(seed)
    b = len(token_lens)
    return {
        "token": rng.integers(0, cfg.vocab_size, (b, n_tokens)).astype(np.int32),
        "token_len": np.asarray(token_lens, np.int32),
        "prompt_token": rng.integers(0, cfg.vocab_size, (b, n_prompt)).astype(np.int32),
        "prompt_token_len": np.asarray(prompt_lens, np.int32),
        "prompt_feat": rng.normal(-5, 2, (b, 2 * n_prompt, cfg.output_size)).astype(np.float32),
        "prompt_feat_len": 2 * np.asarray(prompt_lens, np.int32),
        "embedding": rng.normal(size=(b, cfg.spk_embed_dim)).astype(np.float32),
    }


@nnx.jit
def _infer(model, batch, noise, streaming, finalize):
    return model.inference(
        batch["token"], batch["token_len"], batch["prompt_token"], batch["prompt_token_len"], batch["prompt_feat"],
        batch["prompt_feat_len"], batch["embedding"], noise=noise, streaming=streaming, finalize=finalize,
    )


def infer(model, batch, noise, streaming=False, finalize=True):
    """The modes are traced flags, so every mode shares one compiled program per shape."""
    return _infer(model, batch, noise, np.asarray(streaming), np.asarray(finalize))


def row(batch: dict, i: int, n_tokens: int, n_prompt: int) -> dict:
    """Row i of a padded batch, cut to its own lengths (what a batch of one would hold)."""
    return {
        "token": batch["token"][i : i + 1, :n_tokens],
        "token_len": batch["token_len"][i : i + 1],
        "prompt_token": batch["prompt_token"][i : i + 1, :n_prompt],
        "prompt_token_len": batch["prompt_token_len"][i : i + 1],
        "prompt_feat": batch["prompt_feat"][i : i + 1, : 2 * n_prompt],
        "prompt_feat_len": batch["prompt_feat_len"][i : i + 1],
        "embedding": batch["embedding"][i : i + 1],
    }


# ----------------------------------------------------------------------------- parity


# The fixture itself passes on 1 and 8 devices: tests/test_verify.py (every fixture).


# ----------------------------------------------------------------------------- config


def test_config_comes_from_the_yaml_and_sizes_the_hardcoded_512_layers():
    cfg = cosyvoice2_flow.read_config(FIXTURE / "checkpoint")
    assert cfg.encoder.output_size == 40 and cfg.encoder.num_up_blocks == 4 and cfg.encoder.pre_lookahead_len == 3
    assert cfg.estimator.channels == (24,) and cfg.estimator.static_chunk_size == 50 and cfg.encoder.static_chunk_size == 25
    assert cfg.sigma_min == 1e-6 and cfg.inference_cfg_rate == 0.7 and cfg.t_scheduler == "cosine"
    model = nnx.eval_shape(lambda: FlowDecoder(cfg, rngs=nnx.Rngs(0)))
    # reference: PreLookaheadLayer(512, 512) and Upsample1D(512, 512) whatever the width
    assert model.encoder.pre_lookahead_layer.conv1.kernel.shape == (4, 40, 40)
    assert model.encoder.up_layer.conv.kernel.shape == (5, 40, 40)


def test_yaml_written_by_export_reads_back_to_the_same_config(tmp_path):
    for cfg in (cosyvoice2_flow.read_config(FIXTURE / "checkpoint"), tiny_config(channels=(16, 24), up_blocks=4)):
        cfg = dataclasses.replace(cfg, n_timesteps=10, precision=None)
        data = {"flow": cosyvoice2_flow.config_to_yaml(cfg)}
        from hellochat_jax.checkpoint.cosyvoice_yaml import dump_cosyvoice_yaml

        (tmp_path / "cosyvoice2.yaml").write_text(dump_cosyvoice_yaml(data))
        assert cosyvoice2_flow.read_config(tmp_path) == cfg


@pytest.mark.parametrize(
    "edit,needle",
    [
        (lambda f: f["encoder"].value.update(use_cnn_module=True), "use_cnn_module"),
        (lambda f: f["encoder"].value.update(pos_enc_layer_type="rel_pos"), "pos_enc_layer_type"),
        (lambda f: f["decoder"].value["estimator"].value.update(act_fn="snakebeta"), "act_fn"),
        (lambda f: f["decoder"].value["cfm_params"].value["content"].update(solver="midpoint"), "solver"),
        (lambda f: f.update(output_type="linear"), "output_type"),
        (lambda f: f.update(surprise=1), "surprise"),
    ],
)
def test_refuses_yaml_settings_it_does_not_implement(edit, needle):
    data = load_cosyvoice_yaml(FIXTURE / "checkpoint" / "cosyvoice2.yaml")
    edit(data["flow"].value)
    with pytest.raises(CheckpointError, match=needle):
        cosyvoice2_flow.config_from_yaml(data)


def test_each_style_speaker_is_a_one_hot_xvector_and_any_other_style_the_zero_one():
    """model.flow.style_speakers: one voice in several styles is several speakers to the flow;
    the i-th style's x-vector is e_i, and no style or one it does not know is the all-zero
    x-vector of a talker without a voice prompt."""
    cfg = tiny_config(style_speakers=("calm", "cheerful"))
    expected = np.zeros((5, cfg.spk_embed_dim), np.float32)
    expected[0, 1] = expected[1, 0] = expected[4, 0] = 1.0
    np.testing.assert_array_equal(cfg.style_xvectors(["cheerful", "calm", None, "shouting", " calm "]), expected)
    assert not tiny_config().style_xvectors(["calm"]).any()
    # it travels with the model folder's config (hellochat.json)
    from hellochat_jax.components.hellochat.model import HelloChatConfig

    assert HelloChatConfig.from_dict(HelloChatConfig(thinker=None, flow=cfg).to_dict()).flow == cfg


@pytest.mark.parametrize("styles", [("calm", "calm"), tuple(f"style {i}" for i in range(13)), "calm", ("calm", ""), ("calm", 3)])
def test_style_speakers_must_be_distinct_and_fit_in_the_xvector(styles):
    with pytest.raises(ValueError, match="style_speakers"):
        tiny_config(style_speakers=styles)


def test_cosine_time_schedule():
    t = time_schedule(10, "cosine")
    assert t.dtype == np.float32 and t[0] == 0 and t[-1] == 1
    np.testing.assert_allclose(t, 1 - np.cos(np.linspace(0, 1, 11) * np.pi / 2), atol=1e-7)


# ----------------------------------------------------------------------------- converter


def test_export_reproduces_the_fixture_flow_pt_bit_exactly(tmp_path):
    cfg, model = cosyvoice2_flow.load(FIXTURE / "checkpoint", single_device_mesh())
    cosyvoice2_flow.export(model, cfg, tmp_path)
    theirs = torch.load(FIXTURE / "checkpoint" / "flow.pt", weights_only=True)
    assert_same_state_dict(torch.load(tmp_path / "flow.pt", weights_only=True), theirs, ordered=False)
    assert cosyvoice2_flow.read_config(tmp_path) == cfg


def test_multi_level_unet_round_trips_through_release_format_and_orbax(tmp_path):
    from hellochat_jax.checkpoint.load import load_checkpoint, save_checkpoint

    cfg = tiny_config(channels=(16, 24), up_blocks=4)
    model = tiny_model(cfg)
    cosyvoice2_flow.export(model, cfg, tmp_path / "rel")
    sd = torch.load(tmp_path / "rel" / "flow.pt", weights_only=True)
    assert "decoder.estimator.down_blocks.0.2.conv.weight" in sd and "decoder.estimator.down_blocks.1.2.weight" in sd
    assert tuple(sd["decoder.estimator.up_blocks.0.2.conv.weight"].shape) == (16, 16, 4)  # ConvTranspose1d [in, out, k]
    cfg2, loaded = cosyvoice2_flow.load(tmp_path / "rel", full_mesh(), precision="highest", n_timesteps=3)
    assert cfg2 == cfg
    save_checkpoint(loaded, cfg2, tmp_path / "ckpt", cosyvoice2_flow.COMPONENT)
    component, cfg3, restored = load_checkpoint(tmp_path / "ckpt", single_device_mesh())
    assert component == "cosyvoice2-flow" and cfg3 == cfg
    cosyvoice2_flow.export(restored, cfg3, tmp_path / "out")
    again = torch.load(tmp_path / "out" / "flow.pt", weights_only=True)
    assert list(again) == list(sd) and all(torch.equal(again[k], sd[k]) for k in sd)


def test_refuses_mismatched_checkpoints_by_name():
    cfg = cosyvoice2_flow.read_config(FIXTURE / "checkpoint")
    src = TorchSource(FIXTURE / "checkpoint" / "flow.pt")
    bad = {k: src.get(k) for k in src.keys()}
    del bad["encoder.up_encoders.3.feed_forward.w_1.weight"]
    bad["decoder.rand_noise"] = np.zeros((1, 80, 15000), np.float32)
    bad["encoder.pre_lookahead_layer.conv1.weight"] = np.zeros((512, 512, 4), np.float32)
    with pytest.raises(CheckpointError) as e:
        load_from_source("cosyvoice2-flow", cfg, DictSource(bad), single_device_mesh())
    msg = str(e.value)
    for key in ("encoder.up_encoders.3.feed_forward.w_1.weight", "decoder.rand_noise", "encoder.pre_lookahead_layer.conv1.weight"):
        assert key in msg, key


# ----------------------------------------------------------------------------- inference


# Inference tests share these shapes (and so their compiled programs): a padded batch of two and
# single rows of 12 tokens after 2 prompt tokens, with 4-token (8-frame) streaming chunks.
N_TOKENS, N_PROMPT = 12, 2


@pytest.mark.parametrize("streaming,finalize", [(False, True), (True, False)])
def test_padded_batch_rows_equal_rows_alone(streaming, finalize):
    """Padding (tokens, prompt tokens and prompt mel) changes nothing for the valid frames."""
    cfg = tiny_config()
    model = tiny_model(cfg)
    token_lens, prompt_lens = [12, 7], [2, 1]
    batch = rows(0, token_lens, prompt_lens, N_TOKENS, N_PROMPT, cfg)
    noise = np.random.default_rng(1).normal(size=(1, 2 * (N_TOKENS + N_PROMPT), MEL)).astype(np.float32)
    mel, mel_len = infer(model, batch, noise, streaming=streaming, finalize=finalize)
    assert mel.shape == (2, 2 * N_TOKENS, MEL)
    drop = 0 if finalize else 2 * cfg.pre_lookahead_len
    np.testing.assert_array_equal(mel_len, 2 * np.asarray(token_lens) - drop)
    for i in range(2):
        alone, n = infer(model, row(batch, i, token_lens[i], prompt_lens[i]), noise, streaming=streaming, finalize=finalize)
        n = int(n[0])
        assert n == int(mel_len[i])
        np.testing.assert_allclose(mel[i, :n], alone[0, :n], atol=2e-5, rtol=1e-5)
        assert not np.any(np.asarray(mel[i, n:]))


def test_streaming_frames_do_not_depend_on_tokens_past_chunk_and_lookahead():
    cfg = tiny_config(chunk=4)
    model = tiny_model(cfg)
    batch = rows(2, [N_TOKENS], [N_PROMPT], N_TOKENS, N_PROMPT, cfg)
    noise = np.random.default_rng(3).normal(size=(1, 2 * (N_TOKENS + N_PROMPT), MEL)).astype(np.float32)
    # combined positions >= chunk + look-ahead = 7 are token positions >= 5
    later = {**batch, "token": batch["token"].copy()}
    later["token"][0, 5:] = (later["token"][0, 5:] + 1) % cfg.vocab_size
    stream = [np.asarray(infer(model, b, noise, streaming=True)[0]) for b in (batch, later)]
    full = [np.asarray(infer(model, b, noise, streaming=False)[0]) for b in (batch, later)]
    first = 8 - 2 * N_PROMPT  # output frames inside the first 8-frame mel chunk
    np.testing.assert_allclose(stream[0][:, :first], stream[1][:, :first], atol=1e-6)
    assert np.abs(stream[0][:, first:] - stream[1][:, first:]).max() > 1e-3
    assert np.abs(full[0][:, :first] - full[1][:, :first]).max() > 1e-3  # without chunk masks everything sees everything


def test_lookahead_context_gives_the_finalized_frames_of_complete_chunks():
    """finalize=False equals finalize=True on the mel of token chunks complete without the context."""
    cfg = tiny_config(chunk=4)
    model = tiny_model(cfg)
    batch = rows(4, [N_TOKENS], [N_PROMPT], N_TOKENS, N_PROMPT, cfg)
    noise = np.random.default_rng(5).normal(size=(1, 2 * (N_TOKENS + N_PROMPT), MEL)).astype(np.float32)
    ctx, n_ctx = infer(model, batch, noise, streaming=True, finalize=False)
    done, n_done = infer(model, batch, noise, streaming=True, finalize=True)
    assert int(n_ctx[0]) == int(n_done[0]) - 2 * cfg.pre_lookahead_len
    encoded = N_TOKENS + N_PROMPT - cfg.pre_lookahead_len  # 11 tokens: 2 complete chunks of 4
    complete = 2 * (encoded // 4 * 4) - 2 * N_PROMPT
    np.testing.assert_allclose(ctx[0, :complete], done[0, :complete], atol=1e-5)
    assert np.abs(np.asarray(ctx[0, complete : int(n_ctx[0])] - done[0, complete : int(n_ctx[0])])).max() > 1e-4

    # the low-overhead compiled entry point computes the same, in every mode
    fast = jit_inference(model)
    for flags, expected in (((True, False), ctx), ((True, True), done)):
        mel, _ = fast(**batch, noise=noise, streaming=flags[0], finalize=flags[1])
        np.testing.assert_allclose(mel, expected, atol=1e-6)


def test_key_noise_is_seeded_and_shapes_follow_the_inputs():
    cfg = tiny_config(channels=(16, 24))  # a two-level U-Net with down- and upsampling
    model = tiny_model(cfg)
    batch = rows(6, [9, 5, 8], [3, 3, 0], 9, 3, cfg)
    f = nnx.jit(lambda m, b, k: m.inference(*(b[n] for n in ("token", "token_len", "prompt_token", "prompt_token_len", "prompt_feat", "prompt_feat_len", "embedding")), key=k))
    a, la = f(model, batch, jax.random.key(0))
    b, _ = f(model, batch, jax.random.key(0))
    c, _ = f(model, batch, jax.random.key(1))
    assert a.shape == (3, 2 * 12 - 6, MEL) and np.all(np.isfinite(a))
    np.testing.assert_array_equal(la, [18, 10, 16])
    np.testing.assert_array_equal(a, b)
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-3


def test_noise_temperature_scales_the_start_noise():
    # the reference CFM's `temperature`: z = noise * temperature, the rest unchanged
    calm = tiny_model(tiny_config(noise_temperature=0.5))
    plain = tiny_model(tiny_config())
    batch = rows(3, [7, 4], [2, 0], 7, 2, plain.cfg)
    noise = np.random.default_rng(0).standard_normal((1, 40, MEL)).astype(np.float32)
    got, _ = jit_inference(calm)(**batch, noise=noise)
    want, _ = jit_inference(plain)(**batch, noise=0.5 * noise)
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_bad_inference_inputs_are_refused():
    cfg = tiny_config()
    model = tiny_model(cfg)
    batch = rows(0, [5], [2], 5, 2, cfg)
    args = [batch[n] for n in ("token", "token_len", "prompt_token", "prompt_token_len", "prompt_feat", "prompt_feat_len", "embedding")]
    with pytest.raises(ValueError, match="noise must be"):
        model.inference(*args, noise=np.zeros((1, 10, MEL), np.float32))  # 14 frames needed
    with pytest.raises(ValueError, match="noise=... or key"):
        model.inference(*args)
    with pytest.raises(ValueError, match="more than the"):
        model.inference(*args[:4], np.zeros((1, 20, MEL), np.float32), args[5], args[6], key=jax.random.key(0))
    with pytest.raises(ValueError, match="inconsistent flow config"):
        dataclasses.replace(cfg, output_size=MEL + 1)


# ----------------------------------------------------------------------------- loss


def loss_inputs(seed: int, token_lens, cfg: FlowConfig, n_tokens: int = 8) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    b = len(token_lens)
    lens = np.asarray(token_lens, np.int32)
    feat = rng.normal(-5, 2, (b, 2 * n_tokens, cfg.output_size)).astype(np.float32)
    feat *= (np.arange(2 * n_tokens)[None, :] < 2 * lens[:, None])[..., None]
    tokens = rng.integers(0, cfg.vocab_size, (b, n_tokens)).astype(np.int32) * (np.arange(n_tokens)[None] < lens[:, None])
    return {"speech_token": tokens, "speech_token_len": lens, "speech_feat": feat, "embedding": rng.normal(size=(b, cfg.spk_embed_dim)).astype(np.float32)}


@nnx.jit
def loss_fn(model, batch, draws):
    return flow_matching_loss(model, batch["speech_token"], batch["speech_token_len"], batch["speech_feat"], batch["embedding"], draws=draws)


def test_loss_draws_follow_the_reference_rules():
    cfg = tiny_config()
    feat_len = jnp.full((4000,), 40, jnp.int32)
    d = draw_loss_randomness(jax.random.key(0), feat_len, 40, cfg)
    assert d.z.shape == (4000, 40, MEL) and d.t.min() >= 0 and d.t.max() < 1
    assert abs(float(d.cfg_keep.mean()) - 0.8) < 0.03  # training_cfg_rate 0.2 drops the condition
    assert abs(float((d.cond_len > 0).mean()) - 0.5 * 12 / 13) < 0.03  # half get a prompt, of 0..12 frames
    assert int(d.cond_len.max()) == 12  # int(0.3 * 40), inclusive
    assert d.streaming.shape == () and d.streaming.dtype == jnp.bool_


def test_loss_is_jittable_differentiable_seeded_and_ignores_padding():
    cfg = tiny_config()
    model = tiny_model(cfg)
    batch = loss_inputs(0, [8, 5], cfg)

    @nnx.jit
    def loss_and_grad(model, batch, key):
        def f(m):
            return flow_matching_loss(m, batch["speech_token"], batch["speech_token_len"], batch["speech_feat"], batch["embedding"], key=key)[0]

        return nnx.value_and_grad(f)(model)

    l0, g0 = loss_and_grad(model, batch, jax.random.key(0))
    l1, _ = loss_and_grad(model, batch, jax.random.key(0))
    l2, _ = loss_and_grad(model, batch, jax.random.key(1))
    assert float(l0) == float(l1) and float(l0) != float(l2) and np.isfinite(float(l0))
    grads = jax.tree.leaves(g0)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)
    assert np.abs(np.asarray(g0["estimator"]["final_proj"]["kernel"][...])).max() > 0

    # what sits in padded token slots or padded mel frames does not matter
    draws = draw_loss_randomness(jax.random.key(2), 2 * batch["speech_token_len"], 16, cfg)
    noisy = dict(batch)
    noisy["speech_token"] = batch["speech_token"].copy()
    noisy["speech_token"][1, 5:] = 7
    noisy["speech_feat"] = batch["speech_feat"].copy()
    noisy["speech_feat"][1, 10:] = 3.0
    a, aux_a = loss_fn(model, batch, draws)
    b, aux_b = loss_fn(model, noisy, draws)
    np.testing.assert_allclose(float(a), float(b), rtol=1e-6)
    assert not np.any(np.asarray(aux_a["pred"])[1, 10:])


# ----------------------------------------------------------------------------- sharding


def test_sharded_equals_unsharded():
    """Same shapes as the tests above, so the unsharded programs are already compiled."""
    cfg = tiny_config()
    model = tiny_model(cfg)
    batch = rows(7, [12, 6], [2, 1], N_TOKENS, N_PROMPT, cfg)
    noise = np.random.default_rng(8).normal(size=(1, 2 * (N_TOKENS + N_PROMPT), MEL)).astype(np.float32)
    loss_batch = loss_inputs(9, [8, 3], cfg)
    draws = draw_loss_randomness(jax.random.key(3), 2 * loss_batch["speech_token_len"], 16, cfg)
    expected = (infer(model, batch, noise, streaming=True)[0], *loss_fn(model, loss_batch, draws))

    mesh = full_mesh()
    with jax.set_mesh(mesh), shd.use_rules(shd.DEFAULT_RULES):
        sharded = shd.shard_model(nnx.clone(model), mesh)
        kernel = sharded.estimator.mid_blocks[0].transformer_blocks[0].ff.proj.kernel[...]
        assert len(kernel.sharding.device_set) > 1  # the parameters really are spread over the mesh
        mel, _ = infer(sharded, shd.put_batch(batch, mesh), shd.put_batch(noise, mesh), streaming=True)
        loss, aux = loss_fn(sharded, shd.put_batch(loss_batch, mesh), shd.put_batch(draws, mesh))
    np.testing.assert_allclose(mel, expected[0], atol=2e-5)
    np.testing.assert_allclose(float(loss), float(expected[1]), rtol=1e-5)
    np.testing.assert_allclose(aux["pred"], expected[2]["pred"], atol=2e-5)


# ----------------------------------------------------------------------------- the flow stage's objective


@pytest.mark.parametrize("prior_weight", [0.0, 0.5])
def test_the_prior_loss_adds_the_encoders_mel_error_with_its_weight(prior_weight):
    """train/flow_stage.py: loss = (flow-matching sum + prior_weight x sum over valid frames of
    (mu - target mel)^2) / the step's frame-bins; the prior term is reported either way."""
    import types

    from hellochat_jax.components.hift.model import log_mel
    from hellochat_jax.train import flow_stage

    cfg = tiny_config()
    model = types.SimpleNamespace(flow=tiny_model(cfg))
    mel = dict(rate=16000, n_fft=1280, hop=320, n_mels=MEL, fmin=0.0, fmax=8000.0)
    data = types.SimpleNamespace(flow=cfg, mel=mel, opts=flow_stage.FlowOptions(max_tokens=8, prior_weight=prior_weight))
    objective = flow_stage.FlowObjective(None, data)
    rng = np.random.default_rng(0)
    micro = {"token": jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 8)), jnp.int32),
             "token_len": jnp.asarray([8, 5], jnp.int32),
             "wave": jnp.asarray(rng.normal(0, 0.1, (2, 8 * 2 * 320)), jnp.float32),
             "xvector": jnp.zeros((2, cfg.spk_embed_dim), jnp.float32)}
    norms = objective.normalizers(micro)
    loss, stats = objective(model, micro, jax.random.key(0), norms)

    mu, _ = model.flow.encode(micro["token"], micro["token_len"])
    valid = (np.arange(16)[None, :] < 2 * np.asarray(micro["token_len"])[:, None])[..., None]
    prior = np.sum(np.square(np.asarray(mu) - np.asarray(log_mel(micro["wave"], **mel))) * valid)
    np.testing.assert_allclose(float(stats["prior_mse_sum"]), prior, rtol=1e-4)
    expected = (float(stats["flow_mse_sum"]) + prior_weight * prior) / float(norms["frames"])
    np.testing.assert_allclose(float(loss), expected, rtol=1e-4)
    assert set(objective.record(jax.device_get(stats))) == {"flow_mse", "prior_mse"}


def test_a_negative_prior_weight_is_refused_by_name():
    from hellochat_jax.testing.stages import stage_config
    from hellochat_jax.train import flow_stage

    with pytest.raises(Exception, match="prior_weight"):
        flow_stage.FlowData(stage_config("flow", "unused", 2, {"prior_weight": -1.0}))
