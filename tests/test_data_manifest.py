"""Users' own data: a folder of audio files + a JSONL manifest -> the same records as the
synthetic corpus; every problem reported by line, nothing dropped silently."""

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from hellochat_jax.cli.data import build_manifest
from hellochat_jax.data import builders


def _tone(seconds, rate, channels=1):
    t = np.arange(int(seconds * rate)) / rate
    x = 0.3 * np.sin(2 * np.pi * 440 * t)
    return np.stack([x] * channels, axis=1) if channels > 1 else x


@pytest.fixture
def folder(tmp_path):
    audio = tmp_path / "audio"
    audio.mkdir()
    sf.write(audio / "a.wav", _tone(1.5, 16000), 16000)
    sf.write(audio / "b.flac", _tone(2.0, 8000, channels=2), 8000)  # resampled and mixed down
    sf.write(audio / "reply.wav", _tone(1.0, 24000), 24000)
    sf.write(audio / "turn.wav", _tone(0.5, 16000), 16000)
    (audio / "broken.wav").write_bytes(b"RIFF....WAVEthis is not audio")
    return tmp_path


def _write(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


GOOD = [
    {"audio": "audio/a.wav", "transcript": "hello there", "emotion": "happy", "events": ["rain", "beep"]},
    {
        "audio": "audio/b.flac", "transcript": "what time is it", "reply": "It is noon.",
        "reply_audio": "audio/reply.wav", "caption": "a man asks the time", "speech_tokens": [1, 2, 3],
        "conversation": [
            {"role": "user", "text": "hi", "audio": "audio/turn.wav"}, {"role": "assistant", "text": "hello"},
        ],
        "split": "validation",
    },
]  # fmt: skip


def test_manifest_builds_the_shared_record_format(folder):
    manifest = _write(folder / "m.jsonl", GOOD)
    builder = build_manifest(manifest, str(folder / "tfds"), vocab_size=300)
    assert builder.skipped == []
    train = builders.open_source(builder.data_dir, "train")
    val = builders.open_source(builder.data_dir, "validation")
    assert len(train) == 1 and len(val) == 1
    a, b = train[0], val[0]
    assert a["audio"].dtype == np.int16 and len(a["audio"]) == 24000
    assert a["events"] == b"rain,beep" and a["emotion"] == b"happy" and a["reply"] == b""
    assert len(b["audio"]) == 32000  # 2 s at 8 kHz stereo -> 16 kHz mono
    assert abs(np.abs(b["audio"] / 32768).max() - 0.3) < 0.02
    assert len(b["reply_audio"]) == 16000 and list(b["speech_tokens"]) == [1, 2, 3]
    assert json.loads(b["context"]) == [{"role": "user", "text": "hi"}, {"role": "assistant", "text": "hello"}]
    assert list(b["context_audio_lengths"]) == [8000, 0] and len(b["context_audio"]) == 8000
    assert (Path(builder.data_dir) / "tokenizer" / "tokenizer.json").is_file()


def test_every_problem_is_reported_with_its_line(folder):
    lines = GOOD + [
        '{"audio": "audio/a.wav", "transcript": ',  # line 3
        {"audio": "audio/missing.wav", "transcript": "x"},  # line 4
        {"audio": "audio/broken.wav", "transcript": "x"},  # line 5
        {"audio": "audio/a.wav"},  # line 6
        {"audio": "audio/a.wav", "transcript": "x", "colour": "red"},  # line 7
        {"audio": "audio/a.wav", "transcript": "x", "speech_tokens": [1, -2]},  # line 8
    ]
    manifest = _write(folder / "bad.jsonl", lines)
    entries, problems = builders.read_manifest(manifest)
    assert [e.line for e in entries] == [1, 2]
    assert [p.split(":")[0] for p in problems] == [f"line {n}" for n in (3, 4, 5, 6, 7, 8)]
    assert "bad JSON" in problems[0] and "missing.wav not found" in problems[1]
    assert "unreadable audio" in problems[2] and "transcript" in problems[3] and "colour" in problems[4]
    with pytest.raises(builders.ManifestError, match="6 problem") as err:
        build_manifest(manifest, str(folder / "tfds"))
    for n in (3, 4, 5, 6, 7, 8):
        assert f"line {n}:" in str(err.value)


def test_skip_bad_leaves_lines_out_and_lists_them(folder):
    manifest = _write(folder / "some_bad.jsonl", GOOD + ["not json", {"audio": "audio/broken.wav", "transcript": "x"}])
    builder = build_manifest(manifest, str(folder / "tfds"), skip_bad=True, vocab_size=300)
    assert len(builder.skipped) == 2 and builder.skipped[0].startswith("line 3:")
    assert builder.info.splits["train"].num_examples == 1
    assert builder.info.metadata["skipped"] == builder.skipped


def test_cli_fails_with_the_problem_list(folder, capsys):
    from hellochat_jax import cli

    manifest = _write(folder / "cli_bad.jsonl", [{"audio": "audio/nope.wav", "transcript": "x"}])
    argv = ["data", "build", "manifest", "--manifest", str(manifest), "--data_dir", str(folder / "tfds"), "--vocab_size", "300"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "line 1:" in err and "nope.wav not found" in err and "--skip_bad" in err
