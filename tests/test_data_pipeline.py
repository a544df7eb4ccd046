"""The Grain pipeline as the trainer sees it: fixed shapes, determinism, resumption, modality
interleaving rates, loss masks, packing, per-process shards and bad records."""

import collections
import dataclasses

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
from data_corpus import tiny_corpus  # noqa: F401  (session fixture)

from hellochat_jax.data import builders
from hellochat_jax.data import pipeline as P
from hellochat_jax.data.tokenizer import load_tokenizer

SMALL = dict(batch_size=4, seq_len=192, max_clips=3, max_segments=6)


def make_cfg(corpus, **overrides) -> P.DataConfig:
    return P.DataConfig(dataset=str(corpus), **{**SMALL, **overrides})


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def all_batches(cfg, **kwargs):
    kwargs = {"process_index": 0, "process_count": 1, **kwargs}
    return list(P.make_dataset(cfg, **kwargs))


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def segments(batch):
    """(row, segment id) -> token positions, in order."""
    out = {}
    for row in range(batch["input_ids"].shape[0]):
        for seg in np.unique(batch["segment_ids"][row]):
            if seg:
                out[row, int(seg)] = np.flatnonzero(batch["segment_ids"][row] == seg)
    return out


def test_batches_have_the_documented_fixed_shapes(tiny_corpus):  # noqa: F811
    cfg = make_cfg(tiny_corpus, mixture=P.Mixture(tts=1.0))
    shapes = P.batch_shapes(cfg)
    for batch in take(P.make_iterator(cfg, process_index=0, process_count=1), 4):
        got = {k: (v.shape, v.dtype) for k, v in batch.items()}
        assert got == {k: (s, np.dtype(d)) for k, (s, d) in shapes.items()}
        # positions restart per segment; padding is segment 0 with pad ids and no loss
        for (row, _), pos in segments(batch).items():
            np.testing.assert_array_equal(batch["positions"][row, pos], np.arange(len(pos)))
        pad = batch["segment_ids"] == 0
        assert np.all(batch["loss_mask"][pad] == 0) and np.all(batch["task_id"][pad] == 0)


def test_same_seed_same_batches_and_another_seed_others(tiny_corpus):  # noqa: F811
    first = take(P.make_iterator(make_cfg(tiny_corpus), process_index=0, process_count=1), 5)
    again = take(P.make_iterator(make_cfg(tiny_corpus), process_index=0, process_count=1), 5)
    other = take(P.make_iterator(make_cfg(tiny_corpus, seed=1), process_index=0, process_count=1), 5)
    for a, b in zip(first, again):
        assert_same(a, b)
    assert not all(np.array_equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, other))


def _checkpoint_roundtrip(cfg, tmp_path, before: int, after: int):
    it = P.make_iterator(cfg, process_index=0, process_count=1)
    take(it, before)
    with ocp.CheckpointManager(tmp_path, item_handlers={"data": grain.checkpoint.CheckpointHandler()}) as mngr:
        mngr.save(before, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
        expected = take(it, after)
        resumed = P.make_iterator(cfg, process_index=0, process_count=1)
        mngr.restore(before, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
        got = take(resumed, after)
    for a, b in zip(expected, got):
        assert_same(a, b)
    for i in (it, resumed):
        if hasattr(i, "close"):
            i.close()


def test_restoring_a_saved_iterator_state_continues_identically(tiny_corpus, tmp_path):  # noqa: F811
    # 7 batches in: mid-epoch (48 records ~ 12 batches), packing bins half consumed or not.
    _checkpoint_roundtrip(make_cfg(tiny_corpus, mixture=P.Mixture(tts=0.5)), tmp_path, before=7, after=4)


@pytest.mark.slow  # starting prefetch processes takes ~10-50 s on 2 busy cores
def test_restoring_with_prefetch_processes(tiny_corpus, tmp_path):  # noqa: F811
    _checkpoint_roundtrip(make_cfg(tiny_corpus, workers=2, worker_buffer_size=1), tmp_path, before=3, after=3)


def test_loss_mask_covers_exactly_the_assistant_tokens(tiny_corpus):  # noqa: F811
    cfg = make_cfg(tiny_corpus, system_prompt="You are a helpful assistant.")
    tok = load_tokenizer(P.tokenizer_path(cfg))
    chat = P._chat_tokens(P.tokenizer_path(cfg))
    header = [chat.im_start, *chat.text("assistant\n")]
    tasks_seen = set()
    for batch in take(P.make_iterator(cfg, process_index=0, process_count=1), 6):
        for (row, _), pos in segments(batch).items():
            ids = batch["input_ids"][row, pos]
            # independently of the pipeline: every token after an assistant header up to and
            # including its <|im_end|> is an assistant token
            assistant = np.zeros(len(ids), bool)
            i = 0
            while i < len(ids):
                if list(ids[i : i + len(header)]) == header:
                    j = i + len(header)
                    while ids[j] != chat.im_end:
                        assistant[j] = True
                        j += 1
                    assistant[j] = True
                    i = j
                i += 1
            assert assistant.any()
            # position t is trained on predicting token t + 1
            np.testing.assert_array_equal(batch["loss_mask"][row, pos][:-1], assistant[1:])
            assert batch["loss_mask"][row, pos][-1] == 0
            np.testing.assert_array_equal(batch["targets"][row, pos][:-1], ids[1:])
            tasks_seen.add(int(batch["task_id"][row, pos[0]]))
            assert tok.decode(ids[:30]).startswith("<|im_start|>system\nYou are")
    assert {P.TASK_IDS[t] for t in ("asr", "qa")} <= tasks_seen


@pytest.mark.parametrize("subsample", [5, 3])
def test_audio_placeholders_match_the_clips(tiny_corpus, subsample):  # noqa: F811
    # one placeholder per row the model's adapter makes (5 Hz at the release's subsample 5)
    cfg = make_cfg(tiny_corpus, audio_subsample=subsample)
    chat = P._chat_tokens(P.tokenizer_path(cfg))
    for batch in take(P.make_iterator(cfg, process_index=0, process_count=1), 6):
        for row in range(cfg.batch_size):
            ids = batch["input_ids"][row]
            runs = [int((ids[b + 1 : e] == chat.audio).sum()) for b, e in
                    zip(np.flatnonzero(ids == chat.audio_bos), np.flatnonzero(ids == chat.audio_eos))]  # fmt: skip
            lengths = batch["audio_lengths"][row]
            assert runs == [P.num_audio_tokens(int(n), subsample) for n in lengths if n > 0]
            assert int((ids == chat.audio).sum()) == sum(runs)
            for a, n in enumerate(lengths):
                assert not batch["audio"][row, a, n:].any()
                assert (n == 0) or batch["audio"][row, a, :n].any()


def test_packing_keeps_every_token_once(tiny_corpus):  # noqa: F811
    cfg = make_cfg(tiny_corpus, num_epochs=1)
    samples = list(P.sample_dataset(cfg, process_index=0, process_count=1))
    batches = all_batches(cfg)
    packed = []
    for batch in batches:
        clips = {row: [batch["audio"][row, a, :n] for a, n in enumerate(batch["audio_lengths"][row]) if n]
                 for row in range(cfg.batch_size)}  # fmt: skip
        for (row, _), pos in sorted(segments(batch).items()):
            ids = batch["input_ids"][row, pos]
            n_clips = int((ids == P._chat_tokens(P.tokenizer_path(cfg)).audio_bos).sum())
            seg_clips, clips[row] = clips[row][:n_clips], clips[row][n_clips:]
            # batches hold float32 = int16 / 2^15 exactly; samples still hold the int16
            packed.append((tuple(ids), tuple(int(np.round(c * 32768).astype(np.int64).sum()) for c in seg_clips)))
    unpacked = []
    for s in samples:
        clip_sums = tuple(int(c[:n].astype(np.int64).sum()) for c, n in zip(s["audio"], s["audio_lengths"]))
        unpacked.append((tuple(s["input_ids"]), clip_sums))
    assert len(unpacked) == 48
    assert collections.Counter(packed) == collections.Counter(unpacked)
    real = sum(int((b["segment_ids"] > 0).sum()) for b in batches)
    assert real == sum(len(s["input_ids"]) for s in samples)


def _assistant_texts(batch, tok):
    out = []
    for (row, _), pos in segments(batch).items():
        mask = batch["loss_mask"][row, pos] > 0
        out.append(tok.decode(batch["targets"][row, pos][mask]).replace("<|im_end|>", ""))
    return out


def test_process_shards_are_disjoint_and_together_complete(tiny_corpus):  # noqa: F811
    cfg = make_cfg(tiny_corpus, num_epochs=1, mixture=P.Mixture(asr=1, emotion=0, events=0, caption=0, qa=0))
    ids = [[ex.id for ex in P.record_dataset(cfg, process_index=i, process_count=3)] for i in range(3)]
    assert all(len(x) == 16 for x in ids)
    assert len(set().union(*map(set, ids))) == 48
    # end to end: the transcripts each process trains on
    tok = load_tokenizer(P.tokenizer_path(cfg))
    seen = []
    for i in range(2):
        for batch in P.make_dataset(cfg, process_index=i, process_count=2):
            seen.append(_assistant_texts(batch, tok))
    source = builders.open_source(str(tiny_corpus), "train")
    everything = sorted(source[i]["transcript"].decode() for i in range(len(source)))
    assert sorted(t for part in seen for t in part) == everything


def test_swap_rates_match_p_and_q(tiny_corpus):  # noqa: F811
    p, q = 0.3, 0.6
    mixture = P.Mixture(asr=0, emotion=0, events=0, caption=0, qa=1)
    cfg = make_cfg(tiny_corpus, num_epochs=25, mixture=mixture, audio_to_text_p=p, text_to_audio_q=q)
    totals = np.zeros(len(P.COUNTERS), np.int64)
    for sample in P.sample_dataset(cfg, process_index=0, process_count=1):
        totals += sample["counters"][0]
    c = dict(zip(P.COUNTERS, totals))
    assert c["audio_spans"] == 25 * 48 and c["text_spans"] >= 100
    for swapped, spans, rate in ((c["audio_to_text"], c["audio_spans"], p), (c["text_to_audio"], c["text_spans"], q)):
        sigma = np.sqrt(rate * (1 - rate) / spans)
        assert abs(swapped / spans - rate) < 4 * sigma, (swapped, spans, rate)
    # the same counts reach the trainer through the batch counters
    batches = all_batches(make_cfg(tiny_corpus, num_epochs=2, mixture=mixture, audio_to_text_p=p))
    assert sum(int(b["audio_spans"].sum()) for b in batches) == 2 * 48


class Corrupting:
    """A TFDS source with some records that fail to deserialize and some that make no sense."""

    def __init__(self, source, garbage, empty_audio):
        self.source, self.garbage, self.empty_audio = source, set(garbage), set(empty_audio)

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        if i in self.garbage:
            return self.source.dataset_info.features.deserialize_example_np(b"\x0agarbage")
        record = self.source[i]
        return {**record, "audio": np.zeros(0, np.int16)} if i in self.empty_audio else record


def test_bad_records_are_skipped_and_counted(tiny_corpus):  # noqa: F811
    cfg = make_cfg(tiny_corpus, num_epochs=1, mixture=P.Mixture(asr=1, emotion=0, events=0, caption=0, qa=0))
    source = Corrupting(builders.open_source(str(tiny_corpus), "train"), garbage=[3, 10, 47], empty_audio=[0, 20])
    batches = all_batches(cfg, source=source)
    assert sum(int(b["bad_records"].sum()) for b in batches) == 5
    assert sum(len(segments(b)) for b in batches) == 48 - 5


def test_too_long_samples_are_skipped_and_counted(tiny_corpus):  # noqa: F811
    cfg = make_cfg(tiny_corpus, num_epochs=1, max_audio_seconds=2.0)
    batches = all_batches(cfg)
    skipped = sum(int(b["too_long"].sum()) for b in batches)
    assert 0 < skipped < 48 and sum(len(segments(b)) for b in batches) == 48 - skipped


def test_talker_pairs_carry_the_reply_in_the_fixed_voice(tiny_corpus):  # noqa: F811
    cfg = make_cfg(tiny_corpus, mixture=P.Mixture(asr=1, emotion=0, events=0, caption=0, qa=0, tts=1))
    tok = load_tokenizer(P.tokenizer_path(cfg))
    pairs = 0
    for batch in take(P.make_iterator(cfg, process_index=0, process_count=1), 6):
        for row in range(cfg.batch_size):
            seg = batch["speech_segment"][row]
            if not seg:
                assert batch["speech_audio_lengths"][row] == 0 and batch["speech_text_lengths"][row] == 0
                continue
            pairs += 1
            assert batch["task_id"][row][batch["segment_ids"][row] == seg][0] == P.TASK_IDS["tts"]
            text = tok.decode(batch["speech_text"][row, : batch["speech_text_lengths"][row]])
            pos = batch["segment_ids"][row] == seg
            reply = tok.decode(batch["targets"][row][pos][batch["loss_mask"][row][pos] > 0]).replace("<|im_end|>", "")
            assert text == reply  # the thinker says it, the talker speaks it
            n = batch["speech_audio_lengths"][row]
            assert n > 0.5 * 16000 and batch["speech_audio"][row, :n].any() and not batch["speech_audio"][row, n:].any()
            assert batch["speech_token_lengths"][row] == 0  # the synthetic corpus has no speech tokens
    assert pairs >= 6


def test_config_errors_are_clear(tiny_corpus):  # noqa: F811
    with pytest.raises(ValueError, match="audio_to_text_p must be a probability"):
        P.DataConfig(audio_to_text_p=1.5)
    with pytest.raises(ValueError, match="mixture"):
        P.DataConfig(mixture=P.Mixture(0, 0, 0, 0, 0, 0))
    with pytest.raises(FileNotFoundError, match="hellochat data build"):
        missing = P.DataConfig(dataset="nothing_here", data_dir=str(tiny_corpus))
        P.make_dataset(missing, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="no split"):
        P.make_dataset(make_cfg(tiny_corpus, split="dev"), process_index=0, process_count=1)


# ----------------------------------------------------------------------------- encoder labels


def _examples(corpus, n=12):
    source = builders.open_source(str(corpus), "train")
    return [P.decode(source[i]) for i in range(n)]


def test_each_clip_carries_the_words_said_in_it_for_the_encoder_ctc(tiny_corpus):  # noqa: F811
    """ctc_label_len > 0: a clip's label row is its own transcript (the utterance's, a reply's
    or a context turn's) in text tokens; padding clips have none."""
    cfg = make_cfg(tiny_corpus, ctc_label_len=48, clip_labels=True, reply_asr_p=0.5, mixture=P.Mixture(asr=1.0, qa=1.0))
    tok = load_tokenizer(P.tokenizer_path(cfg))
    texts = {tuple(tok.encode(t, add_special_tokens=False)) for ex in _examples(tiny_corpus, 48)
             for t in [ex.transcript, ex.reply] + [turn.text for turn in ex.context]}
    batch = next(P.make_iterator(cfg, process_index=0, process_count=1))
    real = batch["audio_lengths"] > 0
    assert real.any()
    for labels, n in zip(batch["ctc_labels"][real], batch["ctc_label_lengths"][real]):
        assert n > 0 and tuple(labels[:n]) in texts and not labels[n:].any()
    assert not batch["ctc_label_lengths"][~real].any()


def test_clip_labels_are_the_utterances_emotion_and_events_and_the_replys_style():
    """The utterance's clip: its emotion and events; a context turn (same speaker, no mixed-in
    sounds): its emotion and 'silence'; the spoken reply: the emotion its style realises."""
    from hellochat_jax.data import synth

    audio, reply, turn_audio = np.ones(800, np.float32), np.ones(900, np.float32), np.ones(700, np.float32)
    ex = P.Example(id="x", audio=audio, transcript="t", emotion="angry", events=("music", "rain"), caption="c",
                   reply="r", reply_audio=reply, context=[P.Turn("user", "u", turn_audio)],
                   speech_tokens=np.zeros(0, np.int32), reply_speech_tokens=np.zeros(0, np.int32))
    out = P.clip_labels(ex, [audio, turn_audio, reply])
    E = list(synth.EVENTS)
    assert list(out["clip_emotion"]) == [synth.EMOTIONS.index("angry")] * 2 + [
        synth.EMOTIONS.index(synth.STYLE_EMOTION[synth.STYLE_FOR_EMOTION["angry"]])]
    assert [E[i] for i in np.flatnonzero(out["clip_events"][0])] == ["music", "rain"]
    assert [E[i] for i in np.flatnonzero(out["clip_events"][1])] == ["silence"]


def test_spoken_replies_start_with_the_style_that_fits_the_speakers_emotion(tiny_corpus):  # noqa: F811
    from hellochat_jax.data import synth
    from hellochat_jax.data.tokenizer import with_style

    cfg = make_cfg(tiny_corpus, audio_to_text_p=0.0)
    ex = _examples(tiny_corpus, 1)[0]
    counts = dict.fromkeys(P.COUNTERS, 0)
    messages = P.build_messages(ex, "qa", np.random.default_rng(0), cfg, counts)
    assert messages[-1].parts == (with_style(ex.reply, synth.STYLE_FOR_EMOTION[ex.emotion]),)
    plain = P.build_messages(ex, "qa", np.random.default_rng(0), make_cfg(tiny_corpus, reply_style=False), counts)
    assert plain[-1].parts == (ex.reply,)


def test_reply_emotion_samples_ask_how_the_spoken_reply_sounds():
    """reply_emotion_p: an emotion sample may ask about the assistant's spoken reply, answered
    with the emotion its style realises (what the style evaluation asks of the talker's speech)."""
    from hellochat_jax.data import synth

    audio, reply = np.ones(8000, np.float32), np.full(9000, 0.5, np.float32)
    ex = P.Example(id="x", audio=audio, transcript="t", emotion="angry", events=("music",), caption="c",
                   reply="r", reply_audio=reply, context=[],
                   speech_tokens=np.zeros(0, np.int32), reply_speech_tokens=np.zeros(0, np.int32))
    counts = dict.fromkeys(P.COUNTERS, 0)
    always = P.build_messages(ex, "emotion", np.random.default_rng(0), P.DataConfig(reply_emotion_p=1.0), counts)
    assert always[-2].parts[0].samples is reply
    assert always[-1].parts == (synth.STYLE_EMOTION[synth.STYLE_FOR_EMOTION["angry"]],)
    never = P.build_messages(ex, "emotion", np.random.default_rng(0), P.DataConfig(), counts)
    assert never[-2].parts[0].samples is audio and never[-1].parts == ("angry",)


def _speech_example(events: tuple[str, ...]) -> P.Example:
    rng = np.random.default_rng(0)
    audio = (0.1 * rng.standard_normal(24000)).astype(np.float32)
    return P.Example(id="x", audio=audio, transcript="t", emotion="calm", events=events, caption="c",
                     reply="", reply_audio=np.zeros(0, np.float32), context=[],
                     speech_tokens=np.zeros(0, np.int32), reply_speech_tokens=np.zeros(0, np.int32))


def test_a_new_event_is_mixed_into_the_clip_and_named_in_its_events():
    """event_mix_p: a sample's clip may get one more background event, made afresh, so what is
    learnt follows the sound and not the clip (the corpus has a few thousand clips)."""
    from hellochat_jax.data import synth

    quiet = _speech_example(("silence",))
    one = P.with_new_event(quiet, np.random.default_rng(1))
    (name,) = one.events
    assert name in synth.EVENTS and name != "silence"
    assert one.audio.shape == quiet.audio.shape and not np.allclose(one.audio, quiet.audio)
    assert quiet.events == ("silence",) and quiet.audio is not one.audio  # the record itself is kept

    two = P.with_new_event(one, np.random.default_rng(2))
    assert len(two.events) == 2 and name in two.events and list(two.events) == sorted(two.events)
    # two events is the corpus's most; unknown events are left alone
    assert P.with_new_event(two, np.random.default_rng(3)) is two
    odd = _speech_example(("doorbell",))
    assert P.with_new_event(odd, np.random.default_rng(3)) is odd


def test_event_samples_carry_the_new_event_in_answer_and_clip_labels(tiny_corpus):  # noqa: F811
    from hellochat_jax.data import synth

    cfg = make_cfg(tiny_corpus, event_mix_p=1.0, clip_labels=True, mixture=P.Mixture(asr=0, emotion=0, events=1, caption=0, qa=0))
    tokenizer = load_tokenizer(P.tokenizer_path(cfg))
    make = P.MakeSample(cfg, P.tokenizer_path(cfg))
    ex = next(e for e in _examples(tiny_corpus) if e.events == ("silence",))
    sample = make.random_map(ex, np.random.default_rng(0))
    answer = tokenizer.decode(sample["targets"][sample["loss_mask"] == 1])  # what the thinker is taught to say
    labelled = [synth.EVENTS[i] for i in np.flatnonzero(sample["clip_events"][0])]
    assert len(labelled) == 1 and labelled[0] != "silence" and labelled[0] in answer
    assert not np.array_equal(sample["audio"][0, : len(ex.audio)], P._pcm16(ex.audio))


@pytest.mark.parametrize("name", ["audio_to_text_p", "reply_asr_p", "event_mix_p"])
def test_probabilities_outside_0_1_are_refused(name):
    with pytest.raises(ValueError, match=f"{name} must be a probability"):
        P.DataConfig(**{name: 1.5})


def test_caption_samples_keep_the_records_own_background(tiny_corpus):  # noqa: F811
    cfg = make_cfg(tiny_corpus, event_mix_p=1.0, mixture=P.Mixture(asr=0, emotion=0, events=0, caption=1, qa=0))
    make = P.MakeSample(cfg, P.tokenizer_path(cfg))
    ex = next(e for e in _examples(tiny_corpus) if e.events == ("silence",))
    sample = make.random_map(ex, np.random.default_rng(0))
    assert np.array_equal(sample["audio"][0, : len(ex.audio)], P._pcm16(ex.audio))


def test_a_clip_too_short_for_an_event_is_not_broken_by_one():
    empty = dataclasses.replace(_speech_example(("silence",)), audio=np.zeros(0, np.float32))
    assert P.with_new_event(empty, np.random.default_rng(0)) is empty
    from hellochat_jax.data import synth

    for name in synth.EVENTS[:-1]:  # an event cut to no samples adds nothing
        assert synth.add_event(np.zeros(0, np.float32), name, np.random.default_rng(0)).size == 0
        assert np.all(np.isfinite(synth.add_event(np.full(3, 0.1, np.float32), name, np.random.default_rng(0))))
