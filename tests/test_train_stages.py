"""Training in stages (train/stages.py): one config file, one trainer, one run folder.

    hellochat train --config C                           # the thinker, in <run_dir>
    hellochat train --config C --stage speech_tokenizer  # in <run_dir>/speech_tokenizer
    hellochat export --run <run_dir> --out M && hellochat data tokens --model M
    hellochat train --config C --stage talker|flow|hift  # in <run_dir>/<stage>
    hellochat export --run <run_dir> --out M             # every stage's part, one model folder

A config's `stages.<stage>` section overrides the rest of the file for that stage only, and
its `options` are that stage's own (they replace the file's top-level ones, which belong to
the file's stage).
"""

from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest
from data_corpus import tiny_corpus_dir
from hellochat_jax.train import config as train_config
from hellochat_jax.train import stages
from hellochat_jax.train.metrics import read_jsonl
from train_util import device_env, losses, tiny_config, train_command, write_config

from hellochat_jax.core.config import ConfigError, from_dict

# ----------------------------------------------------------------------------- tiny parts

# Much smaller than configs/tiny.yaml: each stage compiles in seconds on a 2-core CPU.
TINY_TALKER = {
    "speech_token_size": 6561,  # the FSQ codebook (3^8)
    "qwen2": {"vocab_size": 1100, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
              "num_attention_heads": 2, "num_key_value_heads": 1, "tie_word_embeddings": False},
}
TINY_FLOW = {
    "input_size": 32, "output_size": 80, "spk_embed_dim": 16, "vocab_size": 6561,
    "style_speakers": ["neutral", "cheerful", "gentle", "calm"],
    "encoder": {"input_size": 32, "output_size": 32, "attention_heads": 2, "linear_units": 64, "num_blocks": 1,
                "num_up_blocks": 1},
    "estimator": {"in_channels": 320, "out_channels": 80, "channels": [32], "attention_head_dim": 16, "n_blocks": 1,
                  "num_mid_blocks": 1, "num_heads": 2},
}
TINY_HIFT = {  # 16 kHz, 320 samples per mel frame (the shape of configs/tiny.yaml's before it took a wider iSTFT), narrow
    "sampling_rate": 16000, "upsample_rates": [8, 5, 2], "upsample_kernel_sizes": [16, 11, 4], "n_fft": 16, "hop_len": 4,
    "base_channels": 16, "f0_cond_channels": 16, "nb_harmonics": 2, "resblock_kernel_sizes": [3],
    "resblock_dilation_sizes": [[1]], "source_resblock_kernel_sizes": [3, 3, 3],
    "source_resblock_dilation_sizes": [[1], [1], [1]],
}
TINY_SPEECH_TOKENIZER = {"n_audio_state": 64, "n_audio_head": 1, "n_audio_layer": 1}  # 64 per head: its fixed RoPE
TINY_HEADS = {"vocab_size": 1024, "tokenizer_ctc": True, "tokenizer_width": 32, "tokenizer_layers": 1, "emotions": 4}


def stage_sections(steps: int = 2) -> dict:
    """`stages:` for every stage after the thinker: few steps, small rows."""
    common = {"steps": steps, "optim": {"warmup_steps": 1}, "checkpoint": {"every": 0}}
    return {
        "speech_tokenizer": {**common, "options": {"max_seconds": 7.2, "max_text_tokens": 64}},
        "talker": {**common, "options": {"max_text_tokens": 40, "max_speech_tokens": 180}},
        "flow": {**common, "options": {"max_tokens": 16}},
        "hift": {**common, "options": {"segment_frames": 8, "use_user_audio": False,
                                       "resolutions": [[256, 64], [128, 32]]}},
    }


def staged_config(run_dir: Path, corpus: Path | None = None, **sections) -> dict:
    """A whole-model config: the thinker at the top level (on the corpus when one is given,
    else the synthetic task), every other part in its model section, `stages:` per stage."""
    model = {"speech_tokenizer": TINY_SPEECH_TOKENIZER, "heads": TINY_HEADS, "talker": TINY_TALKER,
             "flow": TINY_FLOW, "hift": TINY_HIFT}
    data = {"batch_size": 8, "seq_len": 32}
    if corpus is not None:
        model.update(
            thinker={"vocab_size": 1024, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "num_key_value_heads": 1, "tie_word_embeddings": True},
            audio_token_id=4, encoder={"preset": "tiny", "depth": 1, "target_length": 448}, adapter={},
        )
        data = {"source": "corpus", "batch_size": 8, "seq_len": 128,
                "corpus": {"dataset": str(corpus), "max_clips": 2, "max_audio_seconds": 4.5}}
    cfg = tiny_config(run_dir, steps=2, model=model, data=data, checkpoint={"every": 0},
                      eval={"every": 0, "at_end": False}, stages=stage_sections())
    for key, value in sections.items():
        cfg[key] = value
    return cfg


# ----------------------------------------------------------------------------- configuration


def test_a_stage_section_overrides_the_file_for_that_stage_only(tmp_path):
    raw = staged_config(tmp_path / "run")
    raw["stages"]["flow"].update(optim={"lr": 1e-4}, data={"batch_size": 16})
    path = write_config(tmp_path / "c.yaml", raw)

    flow = train_config.load(path, [], "flow")
    assert (flow.stage, flow.steps, flow.optim.lr, flow.data.batch_size) == ("flow", 2, 1e-4, 16)
    # merged key by key: the rest of the file still applies (the section's optim names only lr)
    assert flow.optim.warmup_steps == 2 and flow.data.seq_len == 32
    hift = train_config.load(path, [], "hift")
    assert (hift.optim.lr, hift.data.batch_size) == (3e-3, 8)  # flow's section is flow's alone
    thinker = train_config.load(path)
    assert (thinker.stage, thinker.optim.lr, thinker.data.batch_size) == ("thinker", 3e-3, 8)
    # the command line's overrides come last, over the stage's section
    assert train_config.load(path, ["optim.lr=5e-4"], "flow").optim.lr == 5e-4
    assert train_config.load(path, ["stage=flow"]).stage == "flow"  # `stage=` works as an override too
    # and `stages.<name>.key=value` on the command line edits that stage's section
    assert train_config.load(path, ["stages.flow.steps=7"], "flow").steps == 7
    assert train_config.load(path, ["stages.flow.steps=7"], "hift").steps == 2


def test_every_stage_but_the_thinker_runs_in_its_own_folder_of_the_run(tmp_path):
    path = write_config(tmp_path / "c.yaml", staged_config(tmp_path / "run"))
    assert Path(train_config.load(path).run_dir) == tmp_path / "run"
    for stage in stages.ORDER[1:]:
        cfg = train_config.load(path, [], stage)
        assert Path(cfg.run_dir) == tmp_path / "run" / stage
        assert cfg.checkpoint_dir == tmp_path / "run" / stage / "checkpoints"
    # a run_dir from the command line is the whole model's folder too
    assert Path(train_config.load(path, [f"run_dir={tmp_path / 'other'}"], "talker").run_dir) == tmp_path / "other" / "talker"
    # a stage section may name its own folder
    raw = staged_config(tmp_path / "run")
    raw["stages"]["hift"]["run_dir"] = str(tmp_path / "vocoder")
    path = write_config(tmp_path / "c2.yaml", raw)
    assert Path(train_config.load(path, [], "hift").run_dir) == tmp_path / "vocoder"


def test_a_stage_sections_options_replace_the_files_top_level_options(tmp_path):
    raw = staged_config(tmp_path / "run", options={"encoder_ctc_weight": 0.5})  # the thinker's (the file's stage)
    path = write_config(tmp_path / "c.yaml", raw)
    assert train_config.load(path).options == {"encoder_ctc_weight": 0.5}
    assert train_config.load(path, [], "flow").options == {"max_tokens": 16}
    assert stages.options(train_config.load(path, [], "flow"), stages.get("flow")).max_tokens == 16
    del raw["stages"]["flow"]["options"]
    path = write_config(tmp_path / "c2.yaml", raw)
    cfg = train_config.load(path, [], "flow")
    assert cfg.options == {}  # not the thinker's encoder_ctc_weight: the stage's defaults
    assert stages.options(cfg, stages.get("flow")).max_tokens == 100


def _cli_error(capsys, argv: list[str]) -> str:
    from hellochat_jax.cli import main

    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_an_unknown_stage_or_option_is_a_one_line_config_error(tmp_path, capsys):
    path = write_config(tmp_path / "c.yaml", staged_config(tmp_path / "run"))
    with pytest.raises(ConfigError, match="unknown stage 'vocoder'"):
        train_config.load(path, [], "vocoder")
    assert "unknown stage 'vocoder'" in _cli_error(capsys, ["train", "--config", str(path), "--stage", "vocoder"])
    assert "unknown stage" in _cli_error(capsys, ["train", "--config", str(path), "stage=vocoder"])

    with pytest.raises(ConfigError, match=r"stages\.flow\.options.*unknown key.*max_tokenz"):
        train_config.load(path, ["options.max_tokenz=3"], "flow")
    assert "max_tokenz" in _cli_error(capsys, ["train", "--config", str(path), "--stage", "flow", "options.max_tokenz=3"])

    raw = staged_config(tmp_path / "run")
    raw["stages"]["flwo"] = {"steps": 1}  # a misspelt section would silently never apply
    path = write_config(tmp_path / "c2.yaml", raw)
    with pytest.raises(ConfigError, match="stages: unknown stage.*flwo"):
        train_config.load(path, [], "flow")


def test_a_stage_whose_model_section_is_missing_is_refused(tmp_path):
    for stage in ("flow", "hift", "talker", "speech_tokenizer"):
        raw = staged_config(tmp_path / "run")
        raw["model"][stage] = None
        path = write_config(tmp_path / f"{stage}.yaml", raw)
        with pytest.raises(ConfigError, match=f"stage '{stage}' trains model.{stage}, but the config has no model.{stage}"):
            train_config.load(path, [], stage)
    raw = staged_config(tmp_path / "run")
    raw["model"]["flow"] = None
    train_config.load(write_config(tmp_path / "ok.yaml", raw), [], "hift")  # only the stage's own part counts


# ----------------------------------------------------------------------------- the corpus


@pytest.fixture(scope="session")
def corpus_with_tokens(tmp_path_factory) -> Path:
    """A private copy of the tiny corpus whose train split has speech tokens (from an untrained
    tiny speech tokenizer: the stages after it only need their shapes). The session's shared
    corpus keeps its empty tokens for other tests."""
    from flax import nnx

    from hellochat_jax.components.s3tokenizer.model import (
        S3Tokenizer,
        S3TokenizerConfig,
    )
    from hellochat_jax.data import speech_tokens

    corpus = shutil.copytree(tiny_corpus_dir(tmp_path_factory), tmp_path_factory.mktemp("tokens") / "corpus")
    model = S3Tokenizer(S3TokenizerConfig(**TINY_SPEECH_TOKENIZER), rngs=nnx.Rngs(0))
    speech_tokens.build(model, str(corpus), splits=("train",), batch_size=16, progress=False)
    return corpus


def test_flow_rows_are_spoken_by_the_style_of_their_reply(tmp_path, corpus_with_tokens):
    """The flow stage's speaker embedding is the x-vector of the reply's style (the one the
    talker gives the flow when it speaks that style): one-hot, by model.flow.style_speakers."""
    from hellochat_jax.data import builders
    from hellochat_jax.data.synth import STYLE_FOR_EMOTION
    from hellochat_jax.train.flow_stage import FlowData

    cfg = train_config.load(write_config(tmp_path / "c.yaml", staged_config(tmp_path / "run", corpus_with_tokens)), [], "flow")
    data, rng = FlowData(cfg), np.random.default_rng(0)
    styles = []
    for record in builders.open_source(str(corpus_with_tokens), "train"):
        row = data.row(record, rng)
        if row is None:
            continue
        style = STYLE_FOR_EMOTION[stages.text(record["emotion"]).strip()]
        expected = np.zeros(TINY_FLOW["spk_embed_dim"], np.float32)
        expected[TINY_FLOW["style_speakers"].index(style)] = 1.0
        np.testing.assert_array_equal(row["xvector"], expected)
        styles.append(style)
    assert len(set(styles)) >= 3


def test_each_process_reads_its_own_share_of_the_corpus_records(tmp_path_factory):
    """stages.corpus_records splits the records by process, then shuffles each share: the
    processes' rows are disjoint and together cover the corpus (so the global batch of a
    2-process run is not the one of a 1-process run with the same seed)."""
    from hellochat_jax.data import builders

    corpus = tiny_corpus_dir(tmp_path_factory)
    cfg = from_dict(train_config.TrainConfig,
                                 {"data": {"source": "corpus", "batch_size": 4, "corpus": {"dataset": str(corpus)}}})
    total = len(builders.open_source(str(corpus), "train"))

    def ids(index: int, count: int) -> list[str]:
        it = stages.corpus_records(cfg, lambda r, rng: {"id": np.asarray(stages.text(r["id"]))}, index, count)
        per_epoch = total // count
        return [str(x) for _ in range(math.ceil(per_epoch / (4 // count))) for x in next(it)["id"]][:per_epoch]

    first, second = ids(0, 2), ids(1, 2)
    assert len(first) == len(second) == total // 2 and not set(first) & set(second)
    assert set(first) | set(second) == set(ids(0, 1))


def test_a_stage_whose_limits_drop_every_record_stops_with_a_config_error(tmp_path_factory):
    """A stage's row maker may drop records (too long for its limits); when it drops a whole
    epoch in a row, no batch can ever be made: a one-line error instead of a silent hang."""
    corpus = tiny_corpus_dir(tmp_path_factory)
    cfg = from_dict(train_config.TrainConfig, {"stage": "talker", "data": {"source": "corpus", "batch_size": 4,
                                                                           "corpus": {"dataset": str(corpus)}}})
    it = stages.corpus_records(cfg, lambda r, rng: None, 0, 1)
    with pytest.raises(ConfigError, match="stage talker: no corpus record fits its limits"):
        next(it)


# ----------------------------------------------------------------------------- end to end


def _train(config: Path, stage: str, *overrides: str, resume: bool = False) -> int:
    from hellochat_jax.train.trainer import Trainer

    return Trainer(train_config.load(config, list(overrides), stage)).fit(resume=resume)


def _stage_metrics(run_dir: Path) -> list[dict]:
    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]


@pytest.mark.slow  # every stage compiles once: a few minutes on 2 shared cores
def test_every_stage_trains_and_export_composes_one_model_folder(tmp_path_factory, tmp_path, capsys):
    from hellochat_jax.train.export import export_run

    from hellochat_jax.checkpoint.folder import load_model_folder
    from hellochat_jax.data import speech_tokens

    corpus = shutil.copytree(tiny_corpus_dir(tmp_path_factory), tmp_path / "corpus")  # gets its own speech tokens
    run = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", staged_config(run, corpus))

    assert _train(config, "thinker") == 0
    assert _train(config, "speech_tokenizer") == 0
    first = export_run(run, tmp_path / "model")
    assert json.loads((first / "hellochat.json").read_text())["parts"] == ["thinker", "speech_tokenizer"]
    # the trained speech tokenizer fills the corpus's speech tokens (`hellochat data tokens`)
    result = speech_tokens.build_from_folder(first, str(corpus), splits=("train",), progress=False)
    assert result.built == ["train"] and speech_tokens.load(str(corpus), "train")

    for stage in ("talker", "flow", "hift"):
        assert _train(config, stage) == 0, stage
    model = export_run(run, tmp_path / "model")
    meta = json.loads((model / "hellochat.json").read_text())
    assert sorted(meta["parts"]) == sorted(["thinker", "talker", "flow", "hift", "speech_tokenizer"])
    assert "heads" not in meta["parts"] and meta["config"].get("heads") is None  # training-only heads are dropped
    loaded = load_model_folder(model)
    assert loaded.model.heads is None and loaded.model.speech_tokenizer is not None and loaded.model.hift is not None

    expected = {  # each stage's metrics.jsonl holds its own loss terms
        "thinker": (run, ("loss",)),
        "speech_tokenizer": (run / "speech_tokenizer", ("tokenizer_ctc", "tokenizer_ctc_accuracy", "tokenizer_codes_used")),
        "talker": (run / "talker", ("talker_loss", "talker_accuracy")),
        "flow": (run / "flow", ("flow_mse",)),
        "hift": (run / "hift", ("hift_stft", "hift_mel_l1", "hift_f0_l1")),
    }
    for stage, (folder, keys) in expected.items():
        records = _stage_metrics(folder)
        assert [r["step"] for r in records] == [1, 2], stage
        for key in keys + ("loss",):
            assert all(math.isfinite(r[key]) for r in records), (stage, key, records)
    assert "talker_loss" not in _stage_metrics(run / "flow")[-1] and "flow_mse" not in _stage_metrics(run / "talker")[-1]

    # a finished stage resumed does nothing
    capsys.readouterr()
    assert _train(config, "flow", resume=True) == 0
    assert "stage flow: already trained (2 of 2 steps" in capsys.readouterr().out
    assert len(_stage_metrics(run / "flow")) == 2


# ----------------------------------------------------------------------------- several processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_train_the_talker_on_the_corpus(tmp_path, corpus_with_tokens):
    """Two JAX processes (4 simulated CPU devices each, gloo, jax.distributed on localhost)
    train the talker stage on the corpus source, each reading its own rows.

    Unlike the synthetic task (tests/test_train_multiprocess.py) the corpus source cannot be
    matched loss for loss against one 8-device process: stages.corpus_records splits the
    records by process index before shuffling each share, so the global batch depends on the
    process count (see test_each_process_reads_its_own_share_of_the_corpus_records). So this
    checks that both processes train together (finite losses, one metrics stream) and both
    save their own data-iterator state in each checkpoint."""
    raw = staged_config(tmp_path / "run", corpus_with_tokens)
    raw["stages"]["talker"].update(steps=3, checkpoint={"every": 2})
    config = write_config(tmp_path / "c.yaml", raw)
    port = _free_port()
    procs = [
        subprocess.Popen(
            train_command(
                config, "stage=talker", f"run_dir={tmp_path / 'multi'}", f"distributed.coordinator=127.0.0.1:{port}",
                "distributed.num_processes=2", f"distributed.process_id={i}", "distributed.cpu_collectives=gloo",
            ),
            env=device_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(2)
    ]
    try:
        outs = [p.communicate(timeout=540) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "stage talker" in outs[0][0] and "2 process(es)" in outs[0][0]

    run = tmp_path / "multi" / "talker"
    two = losses(run)
    assert sorted(two) == [1, 2, 3] and all(math.isfinite(v) for v in two.values()), two
    assert all(math.isfinite(r["talker_loss"]) for r in _stage_metrics(run))
    for step in (2, 3):
        data_dir = run / "checkpoints" / str(step) / "data"
        assert sorted(p.name for p in data_dir.glob("*.json")) == ["process_0-of-2.json", "process_1-of-2.json"]
    # each holds that process's position in its own share of the records
    states = [json.loads((run / "checkpoints" / "3" / "data" / f"process_{i}-of-2.json").read_text()) for i in range(2)]
    assert all(states), states
