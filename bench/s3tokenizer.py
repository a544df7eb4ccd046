"""S3Tokenizer v2 throughput, ours vs the `s3tokenizer` package on the same weights, in one run
(float32, CPU unless JAX sees an accelerator).

    python bench/s3tokenizer.py                          # release shapes, 10 s clips, batch 1 and 4
    python bench/s3tokenizer.py --seconds 30 --batches 1 8 --long 120
    python bench/s3tokenizer.py --reference-path /tmp/s3t/src   # an unpacked s3tokenizer wheel

Times the whole pipeline (per-row log-mel, padding, encoder, FSQ) from waveforms to tokens and
prints audio seconds tokenised per second, tokens/s, the ratio ours/reference and our achieved
GFLOP/s against this machine's f32 matmul peak. Weights are random at the release sizes
(width 1280, 20 heads, 6 blocks). The reference runs when the package imports (torchaudio and
onnx are stubbed when absent: it needs them only for file loading and ONNX reading); otherwise
the run says so and times ours alone. `--long N` also times one N-second row (the 30 s window rule).
"""

from __future__ import annotations

from hellochat_jax.core.host_memory import reuse_freed_memory

reuse_freed_memory()  # first, before any thread allocates; ours and the reference share the process

import argparse
import importlib.util
import json
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
from common import best_time, matmul_peak_gflops

RELEASE = dict(n_mels=128, n_audio_ctx=1500, n_audio_state=1280, n_audio_head=20, n_audio_layer=6, n_codebook_size=6561, use_sdpa=False)



def flops_per_second_of_audio(cfg: dict, seconds: float) -> float:
    """Forward FLOPs per audio second: STFT + mel, the two convs, and per token and block the
    q/k/v/out and MLP matmuls (12 D^2 weights), attention over the clip, the 31-tap FSMN."""
    d, frames, tokens = cfg["n_audio_state"], 100, 25
    front = frames * (5 * 400 * np.log2(400) + 2 * 201 * 128)
    convs = 50 * 2 * 3 * 128 * d + 25 * 2 * 3 * d * d
    ctx = min(seconds, 30.0) * tokens
    block = 2 * 12 * d * d + 4 * ctx * d + 2 * 31 * d
    return front + convs + tokens * cfg["n_audio_layer"] * block + tokens * 2 * d * 8



def import_reference(extra_path: str | None):
    if extra_path:
        sys.path.insert(0, extra_path)
    if importlib.util.find_spec("s3tokenizer") is None:
        return None, "the s3tokenizer package is not importable (pip install s3tokenizer, or --reference-path to an unpacked wheel)"
    for name in ("torchaudio", "onnx"):
        if importlib.util.find_spec(name) is None:
            sys.modules.setdefault(name, types.ModuleType(name))
    try:
        import s3tokenizer
        from s3tokenizer.model_v2 import ModelConfig, S3TokenizerV2
    except Exception as e:  # a broken reference must not stop our numbers
        return None, f"the s3tokenizer package failed to import: {e}"
    return (s3tokenizer, ModelConfig, S3TokenizerV2), "s3tokenizer " + getattr(s3tokenizer, "__version__", "(version unknown)")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--long", type=float, default=0.0, help="also time one row of this many seconds (> 30 s: window rule)")
    p.add_argument("--reference-path", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args()

    import jax
    import torch

    from hellochat_jax.components.s3tokenizer import weights as convert
    from hellochat_jax.components.s3tokenizer.model import tokenize

    reference, ref_note = import_reference(args.reference_path)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        pt = Path(tmp) / "s3.pt"
        if reference is not None:
            s3tokenizer, ModelConfig, S3TokenizerV2 = reference
            ref_model = S3TokenizerV2("speech_tokenizer_v2_25hz", config=ModelConfig(**RELEASE)).eval()
            torch.save(ref_model.state_dict(), pt)
        else:
            from flax import nnx

            from hellochat_jax.components.s3tokenizer.model import (
                S3Tokenizer,
                S3TokenizerConfig,
            )

            cfg = S3TokenizerConfig(**{k: v for k, v in RELEASE.items()})
            model = S3Tokenizer(cfg, rngs=nnx.Rngs(0))
            torch.save(convert.export_state_dict(model), pt)
        (Path(tmp) / "config.json").write_text(json.dumps(RELEASE))
        _, ours = convert.load(pt)

    peak = matmul_peak_gflops()
    threads = torch.get_num_threads()
    print(f"devices: {jax.devices()}  torch threads: {threads}  f32 matmul peak: {peak:.0f} GFLOP/s")
    print(f"reference: {ref_note}")
    rng = np.random.default_rng(0)
    rows = []
    cases = [(b, args.seconds) for b in args.batches] + ([(1, args.long)] if args.long else [])
    for batch, seconds in cases:
        n = int(seconds * 16000)
        wave = (0.1 * rng.standard_normal((batch, n))).astype(np.float32)
        lengths = np.full((batch,), n, np.int32)
        tokens, _ = tokenize(ours, wave, lengths)  # compile
        t_ours = best_time(lambda: tokenize(ours, wave, lengths), args.repeats)
        audio = batch * seconds
        row = dict(batch=batch, seconds=seconds, ours_s=t_ours, ours_audio_s_per_s=audio / t_ours,
                   ours_tokens_per_s=tokens.shape[1] * batch / t_ours,
                   ours_gflops=flops_per_second_of_audio(RELEASE, seconds) * audio / t_ours / 1e9)
        if reference is not None:
            s3tokenizer = reference[0]

            def run_reference():
                mels = [s3tokenizer.log_mel_spectrogram(torch.from_numpy(w)) for w in wave]
                mel, mel_lens = s3tokenizer.padding(mels)
                with torch.inference_mode():
                    return ref_model.quantize(mel, mel_lens)

            want, _ = run_reference()
            row["ref_s"] = best_time(run_reference, args.repeats)
            row["speedup"] = row["ref_s"] / t_ours
            row["token_agreement"] = float(np.mean(want.numpy()[:, : tokens.shape[1]] == tokens))
        rows.append(row)
        line = (f"batch {batch} x {seconds:g} s: ours {t_ours:.3f} s ({row['ours_audio_s_per_s']:.1f} audio-s/s, "
                f"{row['ours_tokens_per_s']:.0f} tokens/s, {row['ours_gflops']:.0f} GFLOP/s = {row['ours_gflops'] / peak:.0%} of peak)")
        if "ref_s" in row:
            line += f"; reference {row['ref_s']:.3f} s; ours/reference speed {row['speedup']:.2f}x; tokens agree {row['token_agreement']:.2%}"
        print(line, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(peak_gflops=peak, torch_threads=threads, reference=ref_note, rows=rows), indent=2))


if __name__ == "__main__":
    main()
