"""The train step: gradient accumulation equals one big batch; frozen groups and LoRA train
only what they should; bf16 compute keeps f32 master weights; remat changes no number; the
run writes JSONL, TensorBoard and a PNG curve."""

from __future__ import annotations

import grain
import jax
import numpy as np
from flax import nnx
from hellochat_jax.train import config as train_config
from hellochat_jax.train.data import SyntheticData
from hellochat_jax.train.metrics import read_jsonl
from hellochat_jax.train.trainer import Trainer
from train_util import TINY_THINKER, tiny_config

from hellochat_jax.components.hellochat.model import group_of
from hellochat_jax.core.config import from_dict


def make(tmp_path, **sections):
    return from_dict(train_config.TrainConfig, tiny_config(tmp_path / "run", **sections))


def leaves(tree):
    return [np.array(x, copy=True) for x in jax.tree.leaves(tree)]


def test_grad_accumulation_equals_one_big_batch(tmp_path):
    big = Trainer(make(tmp_path, data={"batch_size": 16}))
    accum = Trainer(make(tmp_path, data={"batch_size": 8}, optim={"grad_accum": 2}))
    rows = SyntheticData(big.cfg.data, seed=0).batch(0)  # 16 rows
    halves = [{k: v[:8] for k, v in rows.items()}, {k: v[8:] for k, v in rows.items()}]

    s1, m1 = big.step(big.init_state(), big.batch([rows]))
    s2, m2 = accum.step(accum.init_state(), accum.batch(halves))
    np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(m1["grad_norm"]), float(m2["grad_norm"]), rtol=1e-5)
    for a, b in zip(leaves(s1["params"]), leaves(s2["params"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_lora_trains_only_the_adapters(tmp_path):
    cfg = make(tmp_path, model={"thinker": TINY_THINKER, "lora": {"rank": 4, "targets": ["q_proj", "v_proj"]}})
    trainer = Trainer(cfg)
    state = trainer.init_state()
    trainable = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(state["params"])}
    assert trainable and all(p.split(".")[-1] in ("lora_a", "lora_b") for p in trainable), trainable
    assert len(trainable) == 2 * 2 * TINY_THINKER["num_hidden_layers"]
    before = leaves(state["rest"]), leaves(state["params"])
    data = iter(SyntheticData(cfg.data, seed=0).iterator())
    for _ in range(2):
        state, metrics = trainer.step(state, trainer.batch([next(data)]))
    assert np.isfinite(float(metrics["loss"]))
    for a, b in zip(before[0], leaves(state["rest"])):
        np.testing.assert_array_equal(a, b)  # base weights frozen
    assert any(not np.array_equal(a, b) for a, b in zip(before[1], leaves(state["params"])))


class AudioBatches:
    """Random audio with placeholder runs: enough to exercise the encoder path."""

    task_names = ("asr",)

    def __init__(self, rows, seq_len, samples, audio_id):
        rng = np.random.default_rng(0)
        n_tokens = ((1 + samples // 160) // 4) // 5
        ids = rng.integers(6, 64, (rows, seq_len)).astype(np.int32)
        ids[:, 1 : 1 + n_tokens] = audio_id
        self.batch = {
            "input_ids": ids, "targets": np.roll(ids, -1, axis=1), "loss_mask": np.ones((rows, seq_len), np.float32),
            "segment_ids": np.ones((rows, seq_len), np.int32),
            "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (rows, seq_len)).copy(),
            "task_id": np.zeros((rows, seq_len), np.int32),
            "audio": rng.normal(0, 0.1, (rows, 1, samples)).astype(np.float32),
            "audio_lengths": np.full((rows, 1), samples, np.int32),
        }

    def local_spec(self):
        return {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in self.batch.items()}

    def iterator(self):
        return iter(grain.MapDataset.range(2**40).map(lambda _: self.batch).to_iter_dataset())


def test_frozen_encoder_and_bf16_compute_on_f32_master_weights(tmp_path):
    model = {
        "thinker": TINY_THINKER, "audio_token_id": 4, "frozen": ["encoder"], "dtype": "bfloat16", "remat": "full",
        "encoder": {"preset": "tiny", "target_length": 64}, "adapter": {"subsample": 5},
    }
    cfg = make(tmp_path, model=model)
    data = AudioBatches(8, 32, 16000, 4)
    trainer = Trainer(cfg, data=data)
    state = trainer.init_state()
    groups = {group_of(p) for p, _ in nnx.to_flat_state(state["params"])}
    assert groups == {"adapter", "thinker"}  # the encoder is not trained, so not in the optimizer
    assert all(x.dtype == np.float32 for x in leaves(state["params"]))
    encoder_before = leaves(state["rest"])
    state, metrics = trainer.step(state, trainer.batch([data.batch]))
    assert np.isfinite(float(metrics["loss"]))
    assert all(x.dtype == np.float32 for x in leaves(state["params"]))
    for a, b in zip(encoder_before, leaves(state["rest"])):
        np.testing.assert_array_equal(a, b)

    bn = state["rest"]["thinker"]["audio_encoder"]["init_bn"]  # statistics taken from the data, not 0 / 1
    assert np.abs(np.asarray(bn["mean"].get_value())).max() > 1


def test_remat_recomputes_the_same_numbers(tmp_path):
    plain = Trainer(make(tmp_path, model={"thinker": TINY_THINKER, "remat": "none"}))
    remat = Trainer(make(tmp_path, model={"thinker": TINY_THINKER, "remat": "full"}))
    rows = SyntheticData(plain.cfg.data, seed=0).batch(0)
    _, a = plain.step(plain.init_state(), plain.batch([rows]))
    _, b = remat.step(remat.init_state(), remat.batch([rows]))
    np.testing.assert_allclose(float(a["loss"]), float(b["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(a["grad_norm"]), float(b["grad_norm"]), rtol=1e-5)


def test_a_run_writes_metrics_tensorboard_and_a_curve(tmp_path):
    cfg = make(tmp_path, steps=4, log={"tensorboard": True, "plot": True, "progress": True}, checkpoint={"every": 0})
    assert Trainer(cfg).fit() == 0
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for key in ("loss", "loss/copy", "tokens_per_s", "step_time_s", "data_wait_s", "flops_per_s", "mfu", "grad_norm", "lr"):
        assert key in records[-1], key
    assert records[-1]["flops_per_s"] > 0 and 0 < records[-1]["mfu"]
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "run" / "curves.png").stat().st_size > 1000


class TalkerBatches:
    """Synthetic thinker rows plus text -> speech-token pairs laid out by `talker_batch`."""

    task_names = SyntheticData.TASKS[:2]

    def __init__(self, cfg, talker_cfg):
        from hellochat_jax.train.corpus import talker_batch

        rows = SyntheticData(cfg.data, seed=0).batch(0)
        rng = np.random.default_rng(0)
        n = len(rows["input_ids"])
        pairs = {
            "speech_text": rng.integers(3, 60, (n, 8)).astype(np.int32),
            "speech_text_lengths": np.array([8, 5, 0, 8, 3, 8, 6, 8][:n], np.int32),  # row 2: no pair
            "speech_tokens": rng.integers(0, 30, (n, 40)).astype(np.int32),
            "speech_token_lengths": np.array([40, 30, 0, 12, 40, 25, 9, 40][:n], np.int32),
        }
        self.batch = {**rows, **talker_batch(pairs, talker_cfg, 8 + 40 + 2)}

    def local_spec(self):
        return {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in self.batch.items()}

    def iterator(self):
        return iter(grain.MapDataset.range(2**40).map(lambda _: self.batch).to_iter_dataset())


def test_talker_speech_token_loss(tmp_path):
    from hellochat_jax.train.model import talker_config

    talker = {"speech_token_size": 30, "qwen2": dict(TINY_THINKER, tie_word_embeddings=True)}
    cfg = make(tmp_path, model={"thinker": TINY_THINKER, "talker": talker})
    data = TalkerBatches(cfg, talker_config(cfg.model))
    targets = data.batch["speech_targets"]
    assert (targets[2] == -1).all()  # no pair, no loss
    assert (targets[0] >= 0).sum() in (41, 42)  # 40 tokens + EOS (+ a fill token when bistream)
    trainer = Trainer(cfg, data=data)
    state = trainer.init_state()
    before = leaves({k: v for k, v in state["params"].items() if k == "talker"})
    for _ in range(2):  # the first update has learning rate 0 (warmup)
        state, metrics = trainer.step(state, trainer.batch([data.batch]))
    assert float(metrics["talker_tokens"]) == float((targets != -1).sum())
    assert np.isfinite(float(metrics["talker_ce"])) and float(metrics["talker_ce"]) > 0
    # the step loss is the thinker's mean CE plus the talker's mean CE
    want = float(metrics["thinker_ce"] / metrics["thinker_tokens"] + metrics["talker_ce"] / metrics["talker_tokens"])
    np.testing.assert_allclose(float(metrics["loss"]), want, rtol=1e-5)
    after = leaves({k: v for k, v in state["params"].items() if k == "talker"})
    assert any(not np.array_equal(a, b) for a, b in zip(before, after))
