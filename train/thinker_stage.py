"""The thinker stage: the interleaved chat corpus (train/corpus.py) or the synthetic token task
(train/data.py), next-token cross-entropy on assistant tokens (train/losses.py), plus optional
auxiliary losses (ThinkerOptions): CTC, emotion and events on the audio encoder (training-only
heads, `model.heads`), CTC and events on the adapter's rows read through the thinker's own
embedding table."""

from __future__ import annotations

import dataclasses

from hellochat_jax.train.stages import Stage, require


@dataclasses.dataclass
class ThinkerOptions:
    encoder_ctc_weight: float = 0.0  # weight of the encoder's CTC loss (0: off)
    # weight of the encoder's emotion + event classifiers (0: off; needs model.heads
    # encoder_emotions / encoder_events and data.corpus.clip_labels)
    encoder_label_weight: float = 0.0
    # weight of a CTC loss on the adapter's rows read through the thinker's embedding table
    # (0: off; needs data.corpus.ctc_label_len): audio rows that look like the words said
    adapter_ctc_weight: float = 0.0
    # weight of the background-event classifier on the adapter's rows read through the
    # thinker's embedding table (0: off; needs data.corpus.clip_labels): a row where an event
    # sounds looks like the event's name
    adapter_event_weight: float = 0.0
    talker_weight: float = 1.0  # weight of a jointly trained talker's speech CE (a `tts` mixture)


def make_data(cfg, process_index: int = 0, process_count: int = 1):
    from hellochat_jax.train import data as data_lib

    if cfg.data.source == "synthetic":
        return data_lib.SyntheticData(cfg.data, cfg.seed, process_index, process_count)
    from hellochat_jax.train.corpus import CorpusData

    return CorpusData(cfg, process_index, process_count)


def make_objective(cfg, data):
    from hellochat_jax.train.losses import Objective
    from hellochat_jax.train.stages import options

    opts = options(cfg, STAGE) or ThinkerOptions()
    if opts.encoder_ctc_weight:
        heads = cfg.model.heads or {}
        require(bool(heads.get("encoder_ctc")), "options.encoder_ctc_weight needs model.heads.encoder_ctc: true")
        require(bool(cfg.data.corpus.get("ctc_label_len")), "options.encoder_ctc_weight needs data.corpus.ctc_label_len > 0")
    require(opts.adapter_ctc_weight >= 0, f"options.adapter_ctc_weight={opts.adapter_ctc_weight} must be >= 0")
    if opts.adapter_ctc_weight:
        require(bool(cfg.data.corpus.get("ctc_label_len")), "options.adapter_ctc_weight needs data.corpus.ctc_label_len > 0")
    if opts.encoder_label_weight:
        heads = cfg.model.heads or {}
        require(bool(heads.get("encoder_emotions")) and bool(heads.get("encoder_events")),
                "options.encoder_label_weight needs model.heads.encoder_emotions and encoder_events")
        require(bool(cfg.data.corpus.get("clip_labels")), "options.encoder_label_weight needs data.corpus.clip_labels: true")
    require(opts.adapter_event_weight >= 0, f"options.adapter_event_weight={opts.adapter_event_weight} must be >= 0")
    event_ids = ()
    if opts.adapter_event_weight:
        require(bool(cfg.data.corpus.get("clip_labels")), "options.adapter_event_weight needs data.corpus.clip_labels: true")
        event_ids = data.event_token_ids()
    return Objective(data.task_names, talker_weight=opts.talker_weight, remat=cfg.model.remat != "none",
                     encoder_ctc_weight=opts.encoder_ctc_weight, encoder_label_weight=opts.encoder_label_weight,
                     adapter_ctc_weight=opts.adapter_ctc_weight, adapter_event_weight=opts.adapter_event_weight,
                     event_token_ids=event_ids)


def parts(cfg) -> tuple[str, ...]:
    """The thinker (+ its encoder's CTC head), and the talker too when the config gives it no
    stage of its own (`stages.talker`): then both train together (a `tts` corpus mixture)."""
    joint = cfg.model.talker is not None and "talker" not in cfg.stages
    return ("thinker", "heads") + (("talker",) if joint else ())


STAGE = Stage("thinker", parts, make_data, make_objective, ThinkerOptions)
