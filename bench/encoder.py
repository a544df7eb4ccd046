"""Dasheng encoder speed, ours vs the PyTorch reference on the same weights, in one run (f32, CPU).

    python bench/encoder.py                    # dasheng-base shape, 10 s clips, batch 1 and 8
    python bench/encoder.py --seconds 30 --batches 1 4 --long 600

Prints audio-seconds encoded per second (front end + encoder), the ratio ours/reference, and
our achieved GFLOP/s against this machine's measured f32 matmul peak. The reference is the
`dasheng` 0.0.9 package with torchaudio stubbed (hellochat_jax/testing/torch_dasheng.py) when it is installed,
else that file's plain-torch transcription of the same forward pass; the run says which.
`--long N` also times `encode_long` (bounded-memory segments) on N seconds of audio.
"""

from __future__ import annotations

from hellochat_jax.core.host_memory import reuse_freed_memory

reuse_freed_memory()  # first, before any thread allocates; ours and the reference share the process

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import best_time, matmul_peak_gflops


def flops_per_second_of_audio(cfg) -> float:
    """Forward FLOPs for one second of audio: front end (DFT as FFT + mel matmul) and, per
    40 ms patch, patch embedding + blocks (12 D^2 matmul weights, attention over its chunk)."""
    frames, patches = 100, 25
    n_fft, d = cfg.n_fft, cfg.embed_dim
    front = frames * (5 * n_fft * np.log2(n_fft) + 2 * (n_fft // 2 + 1) * cfg.n_mels)
    per_patch = 2 * cfg.n_mels * 4 * d + cfg.depth * (2 * (3 * d * d + d * d + 2 * d * cfg.mlp_dim) + 4 * cfg.chunk_patches * d)
    return front + patches * per_patch



def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="dasheng-base")
    p.add_argument("--seconds", type=float, default=10.0, help="clip length (10.08 s = one encoder chunk)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--long", type=float, default=0.0, help="also time encode_long on this many seconds")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx
    from hellochat_jax.testing.torch_dasheng import load_reference

    from hellochat_jax.components.dasheng import weights as convert_dasheng
    from hellochat_jax.components.dasheng.model import (
        DashengConfig,
        DashengEncoder,
        encode_long,
    )

    torch.set_num_threads(os.cpu_count() or 1)
    cfg = DashengConfig.preset(args.preset)
    path = Path(tempfile.mkdtemp()) / "dasheng.pt"
    convert_dasheng.export(DashengEncoder(cfg, rngs=nnx.Rngs(0)), cfg, path)
    _, ours = convert_dasheng.load(path)
    reference, which = load_reference(path)
    peak = matmul_peak_gflops()
    print(f"devices: {jax.devices()}  threads(torch): {torch.get_num_threads()}  f32 matmul peak: {peak:.1f} GFLOP/s")
    print(f"model: {args.preset} ({cfg.embed_dim}/{cfg.depth}/{cfg.num_heads}), float32, {args.seconds:g} s clips")
    print(f"reference: {which}\n")
    print(f"{'batch':>5} {'ours audio-s/s':>15} {'torch audio-s/s':>16} {'ratio':>6} {'ours GFLOP/s':>13} {'% peak':>7}")

    forward = nnx.jit(lambda m, w, l: m(w, l)[0])
    per_second = flops_per_second_of_audio(cfg)
    rows = []
    rng = np.random.default_rng(0)
    for batch in args.batches:
        samples = int(args.seconds * 16_000)
        wav = (0.1 * rng.standard_normal((batch, samples))).astype(np.float32)
        lengths = np.full((batch,), samples, np.int32)
        wav_d, len_d = jnp.asarray(wav), jnp.asarray(lengths)
        run_ours = lambda: forward(ours, wav_d, len_d).block_until_ready()
        run_ours()
        t_ours = best_time(run_ours, args.repeats)
        wav_t, len_t = torch.from_numpy(wav), torch.from_numpy(lengths)

        def run_ref():
            with torch.no_grad():
                reference(wav_t, x_length=len_t)

        run_ref()
        t_ref = best_time(run_ref, args.repeats)
        audio_s = batch * args.seconds
        gflops = audio_s * per_second / t_ours / 1e9
        rows.append(dict(batch=batch, ours=audio_s / t_ours, torch=audio_s / t_ref, gflops=gflops))
        print(f"{batch:>5} {audio_s / t_ours:>15.1f} {audio_s / t_ref:>16.1f} {t_ref / t_ours:>5.2f}x {gflops:>13.1f} {100 * gflops / peak:>6.1f}%")
        sys.stdout.flush()

    if args.long:
        wav = (0.1 * rng.standard_normal((1, int(args.long * 16_000)))).astype(np.float32)
        encode_long(ours, wav[:, : 16_000 * 70])  # compile the segment functions
        t = time.perf_counter()
        encode_long(ours, wav)
        t = time.perf_counter() - t
        print(f"\nencode_long, {args.long:g} s of audio at batch 1: {args.long / t:.1f} audio-s/s "
              f"({args.long * per_second / t / 1e9:.1f} GFLOP/s)")
        rows.append(dict(long_seconds=args.long, ours=args.long / t))
    if args.json:
        Path(args.json).write_text(json.dumps({"peak_gflops": peak, "reference": which, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
