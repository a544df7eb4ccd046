"""Speech tokens of a built dataset, kept in a sidecar cache beside its ArrayRecord files.

The corpus stores `speech_tokens` / `reply_speech_tokens` empty: they depend on a speech
tokenizer that is trained after the corpus is built (the speech_tokenizer stage). `hellochat
data tokens --model DIR` tokenizes every record's `audio` and `reply_audio` with the model
folder's speech_tokenizer and writes

    <dataset dir>/speech_tokens/
      <hash>/tokenizer.json   the tokenizer's config and where it came from
      <hash>/<split>.npz      ids [N], tokens + offsets [N + 1], reply_tokens + reply_offsets
      current                 the hash the data pipeline reads

where <hash> covers the tokenizer's config and parameters: an unchanged tokenizer finds its
cache and is skipped, a retrained one gets a new folder. `decode` in the data pipeline (and
`load` here, for other training stages) fills the records' tokens from the current cache,
by record id (a TFDS split's ids are unique).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hellochat_jax.core.errors import UserError

CACHE_DIR = "speech_tokens"
CURRENT = "current"
SPLITS = ("train", "validation", "test")
BUCKET_SAMPLES = 16000  # clips are padded to whole seconds: few shapes, few compilations
MIN_SAMPLES = 201  # the log-mel's reflect padding needs more than 200 samples; shorter clips get no tokens


class SpeechTokensError(UserError):
    """A model folder without a speech tokenizer, or a dataset / split that is not there."""


def cache_dir(dataset: str, data_dir: str | None = None) -> Path:
    """<dataset dir>/speech_tokens of a built dataset ("name[/config]" or its folder)."""
    from hellochat_jax.data import builders

    try:
        return builders.dataset_dir(dataset, data_dir) / CACHE_DIR
    except FileNotFoundError as e:
        raise SpeechTokensError(str(e)) from None


def tokenizer_hash(model: Any) -> str:
    """16 hex digits over an S3Tokenizer's config and parameters (names, shapes, dtypes, values)."""
    import jax
    from flax import nnx

    h = hashlib.sha256(json.dumps(dataclasses.asdict(model.cfg), sort_keys=True).encode())
    for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param)):
        value = np.asarray(jax.device_get(leaf))
        h.update(f"{jax.tree_util.keystr(path)}:{value.dtype}:{value.shape}".encode())
        h.update(np.ascontiguousarray(value).tobytes())
    return h.hexdigest()[:16]


def current(dataset: str, data_dir: str | None = None) -> str | None:
    """The hash the pipeline reads, or None if the dataset has no speech tokens yet."""
    pointer = cache_dir(dataset, data_dir) / CURRENT
    return pointer.read_text().strip() if pointer.is_file() else None


def load(dataset: str, split: str, data_dir: str | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
    """Record id -> (speech_tokens, reply_speech_tokens) int32 of the current cache's `split`,
    or None when there is none (no `hellochat data tokens` run, or not for this split)."""
    return load_dir(cache_dir(dataset, data_dir), split)


def load_dir(root: Path, split: str) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
    """`load` for a resolved cache folder (<dataset dir>/speech_tokens)."""
    pointer = Path(root) / CURRENT
    if not pointer.is_file():
        return None
    path = Path(root) / pointer.read_text().strip() / f"{split}.npz"
    if not path.is_file():
        return None
    return _read(str(path), path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _read(path: str, mtime_ns: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    del mtime_ns  # part of the cache key only: a rewritten file is read again
    with np.load(path) as f:
        ids = [str(i) for i in f["ids"]]
        tokens, offsets = f["tokens"], f["offsets"]
        reply, reply_offsets = f["reply_tokens"], f["reply_offsets"]
    return {
        rid: (tokens[offsets[i] : offsets[i + 1]], reply[reply_offsets[i] : reply_offsets[i + 1]])
        for i, rid in enumerate(ids)
    }


# ----------------------------------------------------------------------------- building


@dataclasses.dataclass
class BuildResult:
    root: Path  # <dataset dir>/speech_tokens
    hash: str
    built: list[str]  # splits tokenized now
    cached: list[str]  # splits whose cache for this hash already existed


def build(model: Any, dataset: str = "hellochat_synth", data_dir: str | None = None,
          splits: Sequence[str] = SPLITS, *, batch_size: int = 32, source_note: str = "",
          progress: bool = True) -> BuildResult:  # fmt: skip
    """Tokenizes every record's audio and reply_audio of `splits` with `model` (an S3Tokenizer)
    into the cache for its hash, skipping splits already there, and points `current` at it."""
    from hellochat_jax.data import builders

    root = cache_dir(dataset, data_dir)
    digest = tokenizer_hash(model)
    folder = root / digest
    folder.mkdir(parents=True, exist_ok=True)
    _write_atomic(folder / "tokenizer.json", json.dumps({"config": dataclasses.asdict(model.cfg), "source": source_note}, indent=2).encode())
    built, cached = [], []
    for split in splits:
        out = folder / f"{split}.npz"
        if out.is_file():
            cached.append(split)
            continue
        try:
            source = builders.open_source(dataset, split, data_dir)
        except ValueError as e:  # no such split
            raise SpeechTokensError(str(e)) from None
        arrays = tokenize_source(model, source, batch_size=batch_size, desc=f"{split} speech tokens" if progress else None)
        buffer = _npz_bytes(arrays)
        _write_atomic(out, buffer)
        built.append(split)
    _write_atomic(root / CURRENT, (digest + "\n").encode())
    return BuildResult(root, digest, built, cached)


def build_from_folder(model_dir: str | Path, dataset: str = "hellochat_synth", data_dir: str | None = None,
                      splits: Sequence[str] = SPLITS, *, batch_size: int = 32, progress: bool = True) -> BuildResult:  # fmt: skip
    """`build` with the speech_tokenizer of a model folder."""
    from hellochat_jax.checkpoint.folder import load_model_folder

    cache_dir(dataset, data_dir)  # a missing dataset fails before the model loads
    bundle = load_model_folder(model_dir)
    model = getattr(bundle.model, "speech_tokenizer", None)
    if model is None:
        raise SpeechTokensError(f"{model_dir}: the model folder has no speech_tokenizer (train the speech_tokenizer stage and export it)")
    return build(model, dataset, data_dir, splits, batch_size=batch_size, source_note=str(Path(model_dir).resolve()),
                 progress=progress)  # fmt: skip


def tokenize_source(model: Any, source: Any, *, batch_size: int = 32, desc: str | None = None,
                    chunk_records: int = 1024) -> dict[str, np.ndarray]:  # fmt: skip
    """Every record's speech tokens, as the arrays of a <split>.npz.

    Records are read `chunk_records` at a time (bounded memory); a chunk's clips are sorted by
    length and tokenized in batches of `batch_size` rows padded to whole seconds, so the jit
    sees few shapes and little padding.
    """
    import jax
    from tqdm import tqdm

    from hellochat_jax.components.s3tokenizer.model import tokenize

    # rows must split evenly over the model's devices (a multiple of all devices always does)
    rows = -(-max(1, batch_size) // jax.device_count()) * jax.device_count()
    n = len(source)
    ids: list[str] = []
    per_clip: dict[tuple[int, int], np.ndarray] = {}  # (record, 0 = audio / 1 = reply) -> tokens
    bar = tqdm(total=n, desc=desc, unit=" records", disable=desc is None)
    for first in range(0, n, chunk_records):
        clips = []
        for index in range(first, min(n, first + chunk_records)):
            record = source[index]
            rid = record["id"]
            ids.append(rid.decode("utf-8") if isinstance(rid, bytes) else str(rid))
            for which, key in enumerate(("audio", "reply_audio")):
                pcm = np.asarray(record[key], np.int16)
                if len(pcm) >= MIN_SAMPLES:
                    clips.append(((index, which), pcm))
        clips.sort(key=lambda c: len(c[1]))
        for start in range(0, len(clips), rows):
            batch = clips[start : start + rows]
            width = -(-len(batch[-1][1]) // BUCKET_SAMPLES) * BUCKET_SAMPLES
            waves = np.zeros((rows, width), np.float32)
            lengths = np.full((rows,), len(batch[0][1]), np.int32)
            for j in range(rows):  # padding rows repeat the first clip (every row needs valid audio)
                pcm = batch[j][1] if j < len(batch) else batch[0][1]
                waves[j, : len(pcm)] = pcm.astype(np.float32) / 32768.0
                lengths[j] = len(pcm)
            tokens, token_lens = tokenize(model, waves, lengths)
            for j, (key, _) in enumerate(batch):
                per_clip[key] = tokens[j, : token_lens[j]].astype(np.int32)
        bar.update(min(n, first + chunk_records) - first)
    bar.close()
    if len(set(ids)) != len(ids):
        raise SpeechTokensError("the split's record ids are not unique; speech tokens are stored by id")
    empty = np.zeros(0, np.int32)
    out = {"ids": np.asarray(ids, dtype=str)}
    for which, name in enumerate(("tokens", "reply_tokens")):
        parts = [per_clip.get((i, which), empty) for i in range(n)]
        out[name] = np.concatenate(parts).astype(np.int32) if parts else empty
        out["offsets" if which == 0 else "reply_offsets"] = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)
    return out


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    import io

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _write_atomic(path: Path, data: bytes) -> None:
    """Readers never see a half-written file: write beside it, then rename over it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
