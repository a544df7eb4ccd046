"""TFDS builders writing ArrayRecord files (no TensorFlow needed): the embedded synthetic corpus
(`HellochatSynth`) and users' own audio + JSONL manifest (`HellochatManifest`).

Both write the same features (`FEATURES`), so the pipeline reads either the same way. PCM audio
is stored as int16 at 16 kHz in a raw-bytes Tensor (tfds.features.Audio needs TensorFlow).
Labels are text: "" means "not known" (the pipeline then does not sample tasks that need them).

Open a built dataset with `open_source(dataset, split, data_dir)`.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from hellochat_jax.core.errors import UserError
from hellochat_jax.data import synth

SAMPLE_RATE = synth.SAMPLE_RATE
DEFAULT_DATA_DIR = os.environ.get("TFDS_DATA_DIR", str(Path("~/tensorflow_datasets").expanduser()))


def _pcm() -> tfds.features.Tensor:
    return tfds.features.Tensor(shape=(None,), dtype=np.int16, encoding=tfds.features.Encoding.BYTES)


def _ints() -> tfds.features.Tensor:
    return tfds.features.Tensor(shape=(None,), dtype=np.int32, encoding=tfds.features.Encoding.BYTES)


def features() -> tfds.features.FeaturesDict:
    text = tfds.features.Text
    return tfds.features.FeaturesDict(
        {
            "id": text(),
            "audio": _pcm(),  # the user's utterance, 16 kHz int16
            "transcript": text(),
            "emotion": text(),  # one of synth.EMOTIONS for the synthetic corpus
            "events": text(),  # comma-separated event names; "silence" = none
            "caption": text(),
            "voice": text(),  # speaker / voice description
            "kind": text(),  # question / statement / request / dialogue / ""
            "reply": text(),  # the assistant's answer
            "reply_audio": _pcm(),  # the reply spoken by a fixed voice (talker pairs)
            "context": text(),  # JSON list of earlier turns [{"role", "text"}]
            "context_audio": _pcm(),  # earlier turns' audio, concatenated
            "context_audio_lengths": _ints(),  # samples per context turn (0 = no audio)
            "speech_tokens": _ints(),  # speech tokens of `audio` ([] = unknown)
            "reply_speech_tokens": _ints(),  # speech tokens of `reply_audio` ([] = unknown)
        }
    )


# --------------------------------------------------------------------------- synthetic corpus


class SynthConfig(tfds.core.BuilderConfig):
    """Corpus size and seed. Records are a pure function of (seed, split, index)."""

    def __init__(self, *, num_train: int, num_validation: int, num_test: int, seed: int = 0, num_drills: int = 0,
                 **kwargs):  # fmt: skip
        super().__init__(**kwargs)
        self.num_train = num_train
        self.num_validation = num_validation
        self.num_test = num_test
        self.seed = seed
        self.num_drills = num_drills  # word drills (synth.drill_prompt) after the train split's utterances

    def sizes(self) -> dict[str, int]:
        return {"train": self.num_train + self.num_drills, "validation": self.num_validation, "test": self.num_test}


def synth_config(size: int, seed: int = 0, drills: int | None = None) -> SynthConfig:
    """A config for `size` training utterances (validation and test get a tenth each, >= 8) and
    `drills` word drills in the train split (synth.drill_prompt; default none)."""
    if size < 1:
        raise ValueError(f"--size must be positive, got {size}")
    drills = 0 if drills is None else drills
    if drills < 0:
        raise ValueError(f"--drills must be >= 0, got {drills}")
    if size == SYNTH_DEFAULT.num_train and drills == SYNTH_DEFAULT.num_drills and seed == 0:
        return SYNTH_DEFAULT
    held_out = max(8, size // 10)
    return SynthConfig(
        name=f"n{size}_s{seed}" if not drills else f"n{size}_d{drills}_s{seed}",
        description=f"{size} training utterances + {drills} word drills, seed {seed}",
        num_train=size, num_validation=held_out, num_test=held_out, seed=seed, num_drills=drills,
    )  # fmt: skip


SYNTH_DEFAULT = SynthConfig(
    name="default", description="the embedded default corpus", num_train=2000, num_validation=200, num_test=200
)
SYNTH_TINY = SynthConfig(name="tiny", description="for tests", num_train=48, num_validation=12, num_test=12)


def synth_jobs(cfg: SynthConfig, split: str) -> list[tuple[synth.Prompt, int, str, int]]:
    """(prompt, seed, split, index) of each record of a split: the split's prompts in a seeded
    order (cycled), then, in the train split, the word drills."""
    drills = cfg.num_drills if split == "train" else 0
    prompts = synth.prompts_for(split)
    order = np.random.default_rng([cfg.seed, synth.SPLITS.index(split)]).permutation(len(prompts))
    jobs = [(prompts[order[i % len(prompts)]], cfg.seed, split, i) for i in range(cfg.sizes()[split] - drills)]
    return jobs + [(synth.drill_prompt(cfg.seed, i), cfg.seed, split, len(jobs) + i) for i in range(drills)]


def _make_job(job: tuple[synth.Prompt, int, str, int]) -> dict[str, Any]:
    return synth.make_utterance(*job)


class HellochatSynth(tfds.core.GeneratorBasedBuilder):
    """Spoken questions, statements, requests and two-turn dialogues made with espeak-ng: several
    voices and accents, emotion prosody, procedural background events, captions, and each reply
    spoken by a fixed voice. Train/validation/test never share a text."""

    # 1.1.0: replies spoken in the style that fits the speaker's emotion (synth.STYLE_FOR_EMOTION)
    VERSION = tfds.core.Version("1.1.0")
    BUILDER_CONFIGS = [SYNTH_DEFAULT, SYNTH_TINY]
    url_infos = None  # nothing to download (and TFDS's lookup would need importlib_resources)

    def __init__(self, *, num_workers: int | None = None, **kwargs):
        self._num_workers = num_workers
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.__doc__,
            features=features(),
            metadata=tfds.core.MetadataDict(
                emotions=list(synth.EMOTIONS), events=list(synth.EVENTS), reply_voice=synth.REPLY_VOICE
            ),
        )

    def _split_generators(self, dl_manager):
        cfg = self.builder_config
        return {split: self._generate_examples(split) for split in cfg.sizes()}

    def _generate_examples(self, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
        cfg = self.builder_config
        jobs = synth_jobs(cfg, split)
        workers = self._num_workers if self._num_workers is not None else min(4, os.cpu_count() or 1)
        if workers <= 1 or len(jobs) < 64:
            for job in jobs:
                record = _make_job(job)
                yield record["id"], record
            return
        # espeak-ng keeps global state: one library instance per process. Fork is quickest and
        # needs no `if __name__ == "__main__"` guard in the caller's script, but forking a
        # process that runs JAX's threads is unsafe: then spawn.
        method = "spawn" if "jax" in sys.modules else "fork"
        with multiprocessing.get_context(method).Pool(workers) as pool:
            for record in pool.imap(_make_job, jobs, chunksize=16):
                yield record["id"], record


# --------------------------------------------------------------------------- users' manifests


class ManifestError(UserError):
    """A manifest that cannot be built as given; the message lists every problem found."""


@dataclasses.dataclass
class ManifestEntry:
    line: int
    record: dict[str, Any]  # the JSON object, audio paths resolved
    split: str


_TEXT_FIELDS = ("transcript", "emotion", "caption", "voice", "kind", "reply", "id")


def load_audio(path: str | Path) -> np.ndarray:
    """Any file soundfile reads -> validated mono float32 at 16 kHz (hellochat_jax.core.dsp)."""
    from hellochat_jax.core import dsp as audio

    return audio.load(path)


def read_manifest(path: str | Path) -> tuple[list[ManifestEntry], list[str]]:
    """Parses and checks a JSONL manifest. Returns (good entries, problems), each problem naming
    its line; audio files are checked to exist and to be readable as audio (header only).

    Each line is an object with "audio" (path, relative to the manifest's folder or absolute) and
    "transcript"; optional: "id", "emotion", "events" (list or comma-separated string),
    "caption", "voice", "kind", "reply", "reply_audio" (path), "conversation" (earlier turns,
    [{"role": "user"|"assistant", "text": ..., "audio": optional path}]), "speech_tokens",
    "reply_speech_tokens" (lists of ints) and "split" (default "train").
    """
    import soundfile as sf

    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest {path} not found")
    root = path.parent
    entries, problems = [], []

    def check_audio(value: Any, where: str) -> str:
        if not isinstance(value, str) or not value:
            raise ValueError(f"{where} must be a file path")
        p = Path(value) if Path(value).is_absolute() else root / value
        if not p.is_file():
            raise ValueError(f"{where}: file {p} not found")
        try:
            sf.info(str(p))
        except Exception as e:  # soundfile raises several types
            raise ValueError(f"{where}: unreadable audio {p} ({e})") from None
        return str(p)

    for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            problems.append(f"line {n}: bad JSON ({e.msg} at column {e.colno})")
            continue
        try:
            if not isinstance(obj, dict):
                raise ValueError("expected a JSON object")
            known = {"audio", "events", "conversation", "reply_audio", "speech_tokens", "reply_speech_tokens", "split"}
            unknown = sorted(set(obj) - known - set(_TEXT_FIELDS))
            if unknown:
                raise ValueError(f"unknown field(s) {unknown}")
            if not isinstance(obj.get("transcript"), str) or not obj["transcript"].strip():
                raise ValueError('"transcript" must be a non-empty string')
            for k in _TEXT_FIELDS:
                if k in obj and not isinstance(obj[k], str):
                    raise ValueError(f'"{k}" must be a string')
            rec = dict(obj)
            rec["audio"] = check_audio(obj.get("audio"), '"audio"')
            if "reply_audio" in obj:
                rec["reply_audio"] = check_audio(obj["reply_audio"], '"reply_audio"')
            events = obj.get("events", "")
            if isinstance(events, list) and all(isinstance(e, str) for e in events):
                events = ",".join(events)
            if not isinstance(events, str):
                raise ValueError('"events" must be a list of strings or a comma-separated string')
            rec["events"] = events
            turns = obj.get("conversation", [])
            if not isinstance(turns, list):
                raise ValueError('"conversation" must be a list of turns')
            for i, turn in enumerate(turns):
                if not isinstance(turn, dict) or turn.get("role") not in ("user", "assistant"):
                    raise ValueError(f'"conversation"[{i}] needs "role": "user" or "assistant"')
                if not isinstance(turn.get("text", ""), str):
                    raise ValueError(f'"conversation"[{i}].text must be a string')
                if "audio" in turn:
                    turn["audio"] = check_audio(turn["audio"], f'"conversation"[{i}].audio')
            for k in ("speech_tokens", "reply_speech_tokens"):
                tokens = obj.get(k, [])
                if not isinstance(tokens, list) or not all(isinstance(t, int) and t >= 0 for t in tokens):
                    raise ValueError(f'"{k}" must be a list of non-negative integers')
            split = obj.get("split", "train")
            if not isinstance(split, str) or not split.isidentifier():
                raise ValueError(f'"split" must be a name like "train", got {split!r}')
        except ValueError as e:
            problems.append(f"line {n}: {e}")
            continue
        entries.append(ManifestEntry(line=n, record=rec, split=split))
    if not entries and not problems:
        problems.append("the manifest has no entries")
    return entries, problems


def manifest_record(entry: ManifestEntry) -> dict[str, Any]:
    """Reads the audio of one manifest entry -> the feature dict (raises on unreadable audio)."""
    r = entry.record
    to16 = synth.to_int16
    turns = r.get("conversation", [])
    context_audio = [load_audio(t["audio"]) if "audio" in t else np.zeros(0, np.float32) for t in turns]
    return {
        "id": r.get("id", f"line{entry.line}"),
        "audio": to16(load_audio(r["audio"])),
        "transcript": r["transcript"],
        "emotion": r.get("emotion", ""),
        "events": r.get("events", ""),
        "caption": r.get("caption", ""),
        "voice": r.get("voice", ""),
        "kind": r.get("kind", ""),
        "reply": r.get("reply", ""),
        "reply_audio": to16(load_audio(r["reply_audio"])) if "reply_audio" in r else np.zeros(0, np.int16),
        "context": json.dumps([{"role": t["role"], "text": t.get("text", "")} for t in turns]),
        "context_audio": to16(np.concatenate(context_audio)) if turns else np.zeros(0, np.int16),
        "context_audio_lengths": np.asarray([len(a) for a in context_audio], np.int32),
        "speech_tokens": np.asarray(r.get("speech_tokens", []), np.int32),
        "reply_speech_tokens": np.asarray(r.get("reply_speech_tokens", []), np.int32),
    }


class HellochatManifest(tfds.core.GeneratorBasedBuilder):
    """A folder of audio files described by a JSONL manifest (see `read_manifest`).

    Problems (bad JSON, missing fields or files, unreadable audio) stop the build with a list of
    every one of them, by line; with skip_bad=True those lines are left out instead, and the
    list is kept in `self.skipped` and in the dataset's metadata. Nothing is dropped silently.
    """

    VERSION = tfds.core.Version("1.0.0")
    url_infos = None

    def __init__(self, *, manifest: str | Path, name: str | None = None, skip_bad: bool = False, **kwargs):
        self._manifest = Path(manifest)
        self._skip_bad = skip_bad
        self.skipped: list[str] = []
        kwargs.setdefault("file_format", "array_record")
        config_name = name or self._manifest.stem.replace("-", "_").replace(".", "_")
        super().__init__(config=tfds.core.BuilderConfig(name=config_name, description=str(manifest)), **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, description=self.__doc__, features=features(),
            metadata=tfds.core.MetadataDict(manifest=str(self._manifest), skipped=self.skipped),
        )  # fmt: skip

    def _split_generators(self, dl_manager):
        entries, problems = read_manifest(self._manifest)
        if problems and not self._skip_bad:
            raise ManifestError(_problem_report(self._manifest, problems))
        self.skipped.extend(problems)
        by_split: dict[str, list[ManifestEntry]] = {}
        for e in entries:
            by_split.setdefault(e.split, []).append(e)
        if not by_split:
            raise ManifestError(_problem_report(self._manifest, problems or ["no usable entries"]))
        return {split: self._generate_examples(es) for split, es in by_split.items()}

    def _generate_examples(self, entries: list[ManifestEntry]) -> Iterator[tuple[str, dict[str, Any]]]:
        for entry in entries:
            try:
                record = manifest_record(entry)
            except Exception as e:  # decoding can fail past a readable header
                problem = f"line {entry.line}: unreadable audio ({type(e).__name__}: {e})"
                if not self._skip_bad:
                    raise ManifestError(_problem_report(self._manifest, [problem])) from e
                self.skipped.append(problem)
                continue
            yield f"{entry.line:09d}", record


def _problem_report(manifest: Path, problems: list[str], show: int = 50) -> str:
    lines = [f"manifest {manifest}: {len(problems)} problem(s)"] + [f"  {p}" for p in problems[:show]]
    if len(problems) > show:
        lines.append(f"  ... and {len(problems) - show} more")
    lines.append("fix them, or pass --skip_bad to leave those lines out (they are listed, never dropped silently)")
    return "\n".join(lines)


# --------------------------------------------------------------------------- reading


def dataset_dir(dataset: str, data_dir: str | None = None) -> Path:
    """Where a built dataset lives: `dataset` is a folder holding dataset_info.json, or
    "name[/config[/version]]" under `data_dir` (default config "default", newest version)."""
    direct = Path(dataset).expanduser()
    if (direct / "dataset_info.json").is_file():
        return direct
    root = Path(data_dir or DEFAULT_DATA_DIR).expanduser()
    parts = dataset.split("/")
    if len(parts) == 1:
        parts.append("default")
    candidates = [root.joinpath(*parts)]
    if len(parts) == 2:  # no version given: newest one that finished building
        base = root.joinpath(*parts)
        versions = sorted(
            (d for d in base.glob("*") if (d / "dataset_info.json").is_file()),
            key=lambda d: tuple(int(x) if x.isdigit() else 0 for x in d.name.split(".")),
        ) if base.is_dir() else []  # fmt: skip
        candidates = versions[-1:] or candidates
    if not (candidates[0] / "dataset_info.json").is_file():
        raise FileNotFoundError(
            f"no built dataset {dataset!r} under {root} (looked for {candidates[0]}); "
            "build it with `hellochat data build synth` or `hellochat data build manifest`"
        )
    return candidates[0]


def text_field(x) -> str:
    """A stored string feature (bytes) as text."""
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def open_source(dataset: str, split: str, data_dir: str | None = None):
    """A random-access source (len, [i] -> feature dict of numpy arrays / bytes)."""
    builder = tfds.builder_from_directory(str(dataset_dir(dataset, data_dir)))
    if split not in builder.info.splits:
        raise ValueError(f"dataset {dataset!r} has no split {split!r}; it has {sorted(builder.info.splits)}")
    return builder.as_data_source(split=split)
