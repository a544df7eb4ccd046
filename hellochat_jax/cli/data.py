"""`hellochat data build synth [--size N]`, `hellochat data build manifest --manifest m.jsonl` and
`hellochat data clip --split test --index 0 --out clip.wav` (one record as a WAV, with its labels)
and `hellochat data tokens --model DIR` (the speech tokens of every record, from the model's
speech tokenizer, into a cache beside the dataset: hellochat_jax/data/speech_tokens.py).

Each build writes TFDS ArrayRecord files plus a `tokenizer/` folder (a byte-level BPE trained on
the dataset's text, with the Qwen chat special tokens) next to them, and prints where they went.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", required=True)
    build = sub.add_parser("build", help="build a dataset into ArrayRecord files")
    kinds = build.add_subparsers(dest="kind", required=True)

    s = kinds.add_parser("synth", help="the embedded synthetic speech corpus (espeak-ng, offline)")
    s.add_argument("--size", type=int, default=None, help="training utterances (default 2000; tiny = 48)")
    s.add_argument("--drills", type=int, default=None,
                   help="word drills (random words of the training texts) added to the train split (default 0)")
    s.add_argument("--tiny", action="store_true", help="the 48/12/12 corpus the tests use")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--workers", type=int, default=None, help="synthesis processes (default: CPUs, <= 4)")

    m = kinds.add_parser("manifest", help="your audio files, described by a JSONL manifest")
    m.add_argument("--manifest", required=True, help="JSONL file (see builders.read_manifest)")
    m.add_argument("--name", default=None, help="dataset config name (default: the manifest's file name)")
    m.add_argument("--skip_bad", action="store_true", help="leave out (and list) bad lines instead of failing")

    for p in (s, m):
        p.add_argument("--data_dir", default=None, help="default: $TFDS_DATA_DIR or ~/tensorflow_datasets")
        p.add_argument("--vocab_size", type=int, default=1024, help="vocabulary of the BPE trained on the text")
        p.add_argument("--overwrite", action="store_true", help="rebuild even if already built")

    c = sub.add_parser("clip", help="write one record's audio to a WAV file and print its labels")
    c.add_argument("--dataset", default="hellochat_synth", help="\"name[/config]\" under the data dir, or a built dataset folder")
    c.add_argument("--data_dir", default=None, help="default: $TFDS_DATA_DIR or ~/tensorflow_datasets")
    c.add_argument("--split", default="test")
    c.add_argument("--index", type=int, default=0, help="record index (among those of --kind, if given)")
    c.add_argument("--kind", default=None, help="only records of this kind (question, statement, request, dialogue)")
    c.add_argument("--out", required=True, help="WAV file to write (16 kHz mono)")

    t = sub.add_parser("tokens", help="fill a dataset's speech tokens with a model folder's speech tokenizer")
    t.add_argument("--model", required=True, help="model folder with a speech_tokenizer part")
    t.add_argument("--dataset", default="hellochat_synth", help="\"name[/config]\" under the data dir, or a built dataset folder")
    t.add_argument("--data_dir", default=None, help="default: $TFDS_DATA_DIR or ~/tensorflow_datasets")
    t.add_argument("--splits", default="train,validation,test", help="comma-separated splits")
    t.add_argument("--batch_size", type=int, default=32, help="clips per tokenizer call")


def _report(builder, tokenizer_dir: Path) -> None:
    print(f"ArrayRecord files in {builder.data_dir}:")
    for name, split in sorted(builder.info.splits.items()):
        files = sorted(Path(builder.data_dir).glob(f"*-{name}.array_record-*"))
        print(f"  {name:<12} {split.num_examples:>7} records in {len(files)} file(s)")
    print(f"tokenizer: {tokenizer_dir}")


def _train_tokenizer(builder, vocab_size: int, extra: list[str]) -> Path:
    from tqdm import tqdm

    from hellochat_jax.data.tokenizer import train_tokenizer

    source = builder.as_data_source(split="train")
    texts = list(extra)
    for i in tqdm(range(len(source)), desc="collecting tokenizer text", unit=" records"):
        texts += _record_texts(source[i])
    return train_tokenizer(texts, Path(builder.data_dir) / "tokenizer", vocab_size)


def _record_texts(record) -> list[str]:
    import json

    def t(x):
        return x.decode("utf-8") if isinstance(x, bytes) else str(x)

    out = [t(record[k]) for k in ("transcript", "reply", "caption", "emotion", "events")]
    out += [turn.get("text", "") for turn in json.loads(t(record["context"]) or "[]")]
    return [x for x in out if x]


def _mode(overwrite: bool):
    import tensorflow_datasets as tfds

    mode = tfds.download.GenerateMode
    return tfds.download.DownloadConfig(
        download_mode=mode.REUSE_CACHE_IF_EXISTS if overwrite else mode.REUSE_DATASET_IF_EXISTS
    )


def _instructions() -> list[str]:
    from hellochat_jax.data.pipeline import INSTRUCTIONS
    from hellochat_jax.data.synth import STYLE_FOR_EMOTION
    from hellochat_jax.data.tokenizer import with_style

    # the style tags the thinker writes, so they become a few tokens each
    return [i for options in INSTRUCTIONS.values() for i in options] + [with_style("", s) for s in STYLE_FOR_EMOTION.values()]


def build_synth(config, data_dir: str | None = None, *, workers: int | None = None,
                vocab_size: int = 1024, overwrite: bool = False):  # fmt: skip
    """Builds the synthetic corpus (a `builders.SynthConfig`) and its tokenizer; returns the builder."""
    from hellochat_jax.data import builders, synth

    data_dir = data_dir or builders.DEFAULT_DATA_DIR
    builder = builders.HellochatSynth(config=config, data_dir=data_dir, num_workers=workers)
    builder.download_and_prepare(download_config=_mode(overwrite))
    tokenizer_dir = Path(builder.data_dir) / "tokenizer"
    if overwrite or not (tokenizer_dir / "tokenizer.json").is_file():
        _train_tokenizer(builder, vocab_size, synth.corpus_texts("train") + _instructions())
    return builder


def build_manifest(manifest: str | Path, data_dir: str | None = None, *, name: str | None = None,
                   skip_bad: bool = False, vocab_size: int = 1024, overwrite: bool = False):  # fmt: skip
    """Builds a manifest dataset and its tokenizer; returns the builder (`.skipped` lists the
    lines left out). Raises builders.ManifestError listing every problem."""
    from hellochat_jax.data import builders

    builder = builders.HellochatManifest(
        manifest=manifest, name=name, skip_bad=skip_bad, data_dir=data_dir or builders.DEFAULT_DATA_DIR
    )
    builder.download_and_prepare(download_config=_mode(overwrite))
    tokenizer_dir = Path(builder.data_dir) / "tokenizer"
    if overwrite or not (tokenizer_dir / "tokenizer.json").is_file():
        _train_tokenizer(builder, vocab_size, _instructions())
    return builder


def write_clip(dataset: str, split: str, index: int, out: str | Path, data_dir: str | None = None, kind: str | None = None):
    """Writes record `index` of `split` (the index-th of `kind`, if given) as a 16 kHz WAV;
    returns the decoded record (its labels)."""
    import soundfile as sf

    from hellochat_jax.core.errors import UserError
    from hellochat_jax.data import builders, pipeline

    try:
        source = builders.open_source(dataset, split, data_dir)
    except ValueError as e:
        raise UserError(str(e)) from None
    if kind is not None:
        matching = [i for i in range(len(source)) if builders.text_field(source[i]["kind"]) == kind]
        if not 0 <= index < len(matching):
            raise UserError(f"--index {index}: the {split} split has {len(matching)} records of kind {kind!r}")
        index = matching[index]
    if not 0 <= index < len(source):
        raise UserError(f"--index {index}: the {split} split has {len(source)} records")
    example = pipeline.decode(source[index])
    if isinstance(example, pipeline.Skipped):
        raise UserError(f"record {index} of {split} is unusable: {example}")
    sf.write(str(out), example.audio, pipeline.SAMPLE_RATE)
    return example


def main(args: argparse.Namespace) -> int:
    from hellochat_jax.data import builders

    if args.data_command == "clip":
        ex = write_clip(args.dataset, args.split, args.index, args.out, args.data_dir, args.kind)
        print(f"wrote {args.out}: {args.split} record {ex.id} ({len(ex.audio) / 16000:.2f} s)")
        print(f"  transcript: {ex.transcript}\n  emotion:    {ex.emotion}\n  events:     {', '.join(ex.events)}")
        print(f"  reply:      {ex.reply}")
        return 0
    start = time.time()
    if args.data_command == "tokens":
        from hellochat_jax.data import speech_tokens

        splits = [s.strip() for s in args.splits.split(",") if s.strip()]
        result = speech_tokens.build_from_folder(args.model, args.dataset, args.data_dir, splits, batch_size=args.batch_size)
        for split in splits:
            print(f"  {split:<12} {'cached' if split in result.cached else 'tokenized'}")
        print(f"speech tokens {result.hash} in {result.root} (current); done in {time.time() - start:.1f} s")
        return 0
    if args.kind == "synth":
        if args.tiny:
            config = builders.SYNTH_TINY
        else:
            from hellochat_jax.core.errors import UserError

            try:
                size = builders.SYNTH_DEFAULT.num_train if args.size is None else args.size
                config = builders.synth_config(size, args.seed, args.drills)
            except ValueError as e:  # a size or drill count out of range
                raise UserError(str(e)) from None
        builder = build_synth(config, args.data_dir, workers=args.workers, vocab_size=args.vocab_size,
                              overwrite=args.overwrite)  # fmt: skip
    else:
        # A ManifestError (every problem listed) reaches the command line's error report.
        builder = build_manifest(args.manifest, args.data_dir, name=args.name, skip_bad=args.skip_bad,
                                 vocab_size=args.vocab_size, overwrite=args.overwrite)  # fmt: skip
        if builder.skipped:
            print(f"left out {len(builder.skipped)} manifest line(s) (--skip_bad):")
            for problem in builder.skipped:
                print(f"  {problem}")
    _report(builder, Path(builder.data_dir) / "tokenizer")
    print(f"done in {time.time() - start:.1f} s; train on it with data.dataset={builder.data_dir}")
    return 0
