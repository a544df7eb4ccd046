"""Input-pipeline throughput: batches/s and audio-seconds/s of the whole data pipeline
(TFDS ArrayRecord -> grain: shuffle, decode, task mixture, interleaving, chat template, packing,
batching) on a fixed number of CPU cores.

    python bench/data.py [--config configs/tiny.yaml] [--batches 60] [--cores 2] [--workers 0 2]
                         [--step_time SECONDS] [--json out.json]

The pipeline is configured as the trainer configures it from the config's `data` section
(batch_size, seq_len and the `corpus` fields; the whole batch on one process). For each number of
prefetch processes, the first batch (opening files, loading the tokenizer, starting workers) is
timed apart from the next `--batches`. Audio seconds count the real samples of the clips in the
batches, not padding. With --step_time (seconds per train step of that config, from the trainer's
log) it prints how many times faster the pipeline produces batches than training consumes them
(the target is >= 10x).
"""

from __future__ import annotations

from hellochat_jax.core.host_memory import reuse_freed_memory

reuse_freed_memory()  # first, before any thread allocates; ours and the reference share the process

import argparse
import json
import os
import time
from pathlib import Path

import yaml


def pipeline_config(path: str, workers: int, data_dir: str | None):
    from hellochat_jax.core.config import from_dict
    from hellochat_jax.data import pipeline

    data = (yaml.safe_load(Path(path).read_text()) or {}).get("data", {})
    fields = dict(data.get("corpus", {}))
    fields.update(batch_size=data.get("batch_size", 8), seq_len=data.get("seq_len", 256), workers=workers)
    if data_dir:
        fields["data_dir"] = data_dir
    return from_dict(pipeline.DataConfig, fields, where=f"{path}: data")


def measure(cfg, batches: int) -> dict:
    from hellochat_jax.data import pipeline

    start = time.perf_counter()
    it = pipeline.make_iterator(cfg, process_index=0, process_count=1)
    first = next(it)
    startup = time.perf_counter() - start
    audio_s = tokens = skipped = 0.0
    t0 = time.perf_counter()
    for _ in range(batches):
        b = next(it)
        audio_s += float(b["audio_lengths"].sum()) / pipeline.SAMPLE_RATE
        tokens += float((b["segment_ids"] > 0).sum())
        skipped += float(b["bad_records"].sum() + b["too_long"].sum())
    elapsed = time.perf_counter() - t0
    if hasattr(it, "close"):
        it.close()
    del first
    return {
        "workers": cfg.workers,
        "startup_s": round(startup, 2),
        "batches_per_s": round(batches / elapsed, 2),
        "audio_seconds_per_s": round(audio_s / elapsed, 1),
        "tokens_per_s": round(tokens / elapsed),
        "fill": round(tokens / (batches * cfg.batch_size * cfg.seq_len), 3),
        "audio_seconds_per_batch": round(audio_s / batches, 1),
        "skipped_per_batch": round(skipped / batches, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(Path(__file__).parents[1] / "configs" / "tiny.yaml"))
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--cores", type=int, default=2, help="pin this process and its workers to N cores")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="prefetch processes to try")
    parser.add_argument("--step_time", type=float, default=None, help="seconds per train step of this config")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    available = sorted(os.sched_getaffinity(0))
    cores = available[: args.cores]
    os.sched_setaffinity(0, cores)  # prefetch processes inherit it
    print(f"cores: {cores} of {len(available)}; load average {os.getloadavg()[0]:.1f}")
    results = []
    for workers in args.workers:
        cfg = pipeline_config(args.config, workers, args.data_dir)
        r = measure(cfg, args.batches)
        r["batch_shape"] = [cfg.batch_size, cfg.seq_len, cfg.max_clips, cfg.max_audio_samples]
        if args.step_time:
            r["x_train_step"] = round(r["batches_per_s"] * args.step_time, 1)
        results.append(r)
        print(json.dumps(r))
    if args.json:
        Path(args.json).write_text(json.dumps({"cores": len(cores), "results": results}, indent=2))


if __name__ == "__main__":
    main()
