"""The trainer on the real data pipeline: the tiny synthetic corpus, the audio encoder path,
per-task losses, skipped-record counts and the held-out evaluation (WER/CER, emotion
accuracy, event F1 from greedy decoding)."""

from __future__ import annotations

import pytest
from data_corpus import tiny_corpus  # noqa: F401  (session fixture)
from hellochat_jax.train import config as train_config
from hellochat_jax.train.metrics import read_jsonl
from hellochat_jax.train.trainer import Trainer
from train_util import tiny_config

from hellochat_jax.core.config import ConfigError, from_dict


def corpus_config(tmp_path, corpus_dir, **model):
    return tiny_config(
        tmp_path / "run", steps=2,
        model={
            "thinker": dict(vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True),
            "audio_token_id": 4, "encoder": {"preset": "tiny", "depth": 1, "target_length": 448}, "adapter": {},
            **model,
        },
        data={"source": "corpus", "batch_size": 8, "seq_len": 128,
              "corpus": {"dataset": str(corpus_dir), "max_clips": 2, "max_audio_seconds": 4.5}},
        eval={"every": 0, "at_end": True, "num_examples": 4, "batch_size": 4, "max_new_tokens": 4},
        checkpoint={"every": 0},
    )


def test_trains_on_the_corpus_and_evaluates(tmp_path, tiny_corpus):  # noqa: F811
    cfg = from_dict(train_config.TrainConfig, corpus_config(tmp_path, tiny_corpus))
    assert Trainer(cfg).fit() == 0
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [1, 2]
    assert any(k.startswith("loss/") and k != "loss/none" for k in train[-1])
    assert "skipped_records" in train[-1]
    final = records[-1]
    for key in ("eval/wer", "eval/cer", "eval/emotion_accuracy", "eval/events_f1",
                "eval/emotion_accuracy_chance", "eval/events_f1_chance"):
        assert key in final, key
    assert 0 <= final["eval/emotion_accuracy"] <= 1 and 0 <= final["eval/events_f1"] <= 1


def test_tokenizer_and_model_must_agree(tmp_path, tiny_corpus):  # noqa: F811
    raw = corpus_config(tmp_path, tiny_corpus, audio_token_id=7)
    with pytest.raises(ConfigError, match="<|AUDIO|> id is 4"):
        Trainer(from_dict(train_config.TrainConfig, raw))
    raw = corpus_config(tmp_path, tiny_corpus)
    raw["data"]["corpus"]["batch_size"] = 4
    with pytest.raises(ConfigError, match="set data.batch_size instead"):
        train_config.check_static(from_dict(train_config.TrainConfig, raw))


@pytest.mark.parametrize("subsample", [5, 3])
def test_the_data_gives_the_adapter_one_placeholder_per_row_it_makes(tmp_path, tiny_corpus, subsample):  # noqa: F811
    # model.adapter.subsample alone sets the thinker's audio rate; the corpus's prompts follow it
    import numpy as np

    from hellochat_jax.components.midashenglm.model import audio_token_counts
    from hellochat_jax.data import pipeline
    from hellochat_jax.train import corpus
    from hellochat_jax.train.model import model_config

    cfg = from_dict(train_config.TrainConfig, corpus_config(tmp_path, tiny_corpus, adapter={"subsample": subsample}))
    data_cfg = corpus.pipeline_config(cfg)
    assert data_cfg.audio_subsample == subsample
    thinker = model_config(cfg.model, ("thinker",)).thinker
    assert thinker.subsample_factor == subsample
    batch = next(pipeline.make_iterator(data_cfg, process_index=0, process_count=1))
    placeholders = (batch["input_ids"] == cfg.model.audio_token_id).sum(axis=1)
    rows = np.asarray(audio_token_counts(batch["audio_lengths"].reshape(-1), thinker)).reshape(batch["audio_lengths"].shape).sum(axis=1)
    np.testing.assert_array_equal(placeholders, rows)

    raw = corpus_config(tmp_path, tiny_corpus)
    raw["data"]["corpus"]["audio_subsample"] = 3
    with pytest.raises(ConfigError, match="set model.adapter.subsample instead"):
        corpus.pipeline_config(from_dict(train_config.TrainConfig, raw))


def test_the_adapter_ctc_trains_beside_the_thinker_and_is_logged(tmp_path, tiny_corpus):  # noqa: F811
    import math

    raw = corpus_config(tmp_path, tiny_corpus)
    raw["data"]["corpus"]["ctc_label_len"] = 32
    raw["options"] = {"adapter_ctc_weight": 1.0}
    assert Trainer(from_dict(train_config.TrainConfig, raw)).fit() == 0
    train = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert all(math.isfinite(r["adapter_ctc"]) and r["adapter_ctc"] > 0 for r in train)
    assert all(r["loss"] > r["thinker_loss"] for r in train)  # the CTC term is part of the loss

    raw["options"] = {"adapter_ctc_weight": -1.0}
    with pytest.raises(ConfigError, match="adapter_ctc_weight=-1.0 must be >= 0"):
        Trainer(from_dict(train_config.TrainConfig, raw))
    raw["options"] = {"adapter_ctc_weight": 1.0}
    del raw["data"]["corpus"]["ctc_label_len"]
    with pytest.raises(ConfigError, match="adapter_ctc_weight needs data.corpus.ctc_label_len"):
        Trainer(from_dict(train_config.TrainConfig, raw))


def test_the_adapter_event_classifier_trains_beside_the_thinker_and_is_logged(tmp_path, tiny_corpus):  # noqa: F811
    import math

    from hellochat_jax.data import pipeline
    from hellochat_jax.data.synth import EVENTS
    from hellochat_jax.train.corpus import CorpusData

    raw = corpus_config(tmp_path, tiny_corpus)
    raw["data"]["corpus"]["clip_labels"] = True
    raw["options"] = {"adapter_event_weight": 0.25}
    cfg = from_dict(train_config.TrainConfig, raw)
    # each event by the token its name starts with in an answer; "silence" by none
    ids = CorpusData(cfg).event_token_ids()
    tok = pipeline._chat_tokens(pipeline.tokenizer_path(CorpusData(cfg).pipeline_cfg))
    assert ids[EVENTS.index("silence")] == -1
    assert all(name.startswith(tok.tokenizer.decode([i])) for name, i in zip(EVENTS, ids) if i >= 0)
    assert Trainer(cfg).fit() == 0
    train = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert all(math.isfinite(r["adapter_events_bce"]) and r["adapter_events_bce"] > 0 for r in train)
    assert all(r["loss"] > r["thinker_loss"] for r in train)

    raw["options"] = {"adapter_event_weight": -1.0}
    with pytest.raises(ConfigError, match="adapter_event_weight=-1.0 must be >= 0"):
        Trainer(from_dict(train_config.TrainConfig, raw))
    raw["options"] = {"adapter_event_weight": 0.25}
    del raw["data"]["corpus"]["clip_labels"]
    with pytest.raises(ConfigError, match="adapter_event_weight needs data.corpus.clip_labels"):
        Trainer(from_dict(train_config.TrainConfig, raw))
