"""HiFT vocoder real-time factor on CPU, float32, release shapes, random weights: ours vs the
PyTorch reference (CosyVoice's HiFTGenerator) on the same weights, in the same run.

    python bench/hift.py [--seconds 4] [--repeats 5] [--threads 2] [--cosyvoice-src DIR]

The reference is imported from a CosyVoice checkout (--cosyvoice-src, or $COSYVOICE_SRC, or an
installed `cosyvoice`); its vocoder needs only torch and scipy (no torchaudio). Timed calls
alternate between the two so that both see the same machine load. The sizes come from the
release's cosyvoice2.yaml `hift:` section (--yaml), or the defaults below, which are that section.
"""

from __future__ import annotations

from hellochat_jax.core.host_memory import reuse_freed_memory

reuse_freed_memory()  # first, before any thread allocates; ours and the reference share the process

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

# The release's `hift:` section (FunAudioLLM/CosyVoice examples/libritts/cosyvoice2/conf/cosyvoice2.yaml).
RELEASE_HIFT = {
    "in_channels": 80, "base_channels": 512, "nb_harmonics": 8, "sampling_rate": 24000,
    "nsf_alpha": 0.1, "nsf_sigma": 0.003, "nsf_voiced_threshold": 10,
    "upsample_rates": [8, 5, 3], "upsample_kernel_sizes": [16, 11, 7],
    "istft_params": {"n_fft": 16, "hop_len": 4},
    "resblock_kernel_sizes": [3, 7, 11], "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]],
    "source_resblock_kernel_sizes": [7, 7, 11], "source_resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]],
    "lrelu_slope": 0.1, "audio_limit": 0.99,
    "f0_predictor": {"num_class": 1, "in_channels": 80, "cond_channels": 512},
}


def reference_model(src: str | None, hift_args: dict):
    """CosyVoice's HiFTGenerator built from the same arguments, or (None, why)."""
    if src:
        sys.path.insert(0, str(Path(src).absolute()))
    try:
        from cosyvoice.hifigan.f0_predictor import ConvRNNF0Predictor
        from cosyvoice.hifigan.generator import HiFTGenerator
    except Exception as e:  # noqa: BLE001 - any import failure is reported, not fatal
        return None, f"reference not importable ({type(e).__name__}: {e}); pass --cosyvoice-src DIR (a CosyVoice checkout)"
    args = dict(hift_args)
    f0 = args.pop("f0_predictor")
    f0 = dict(getattr(f0, "value", f0))
    return HiFTGenerator(**args, f0_predictor=ConvRNNF0Predictor(**f0)).eval(), None


def unit_gains(model) -> None:
    """Weight-norm gains g = 1, i.e. kernels with ~1/sqrt(fan_in) entries, so activations keep
    the unit scale of a trained model (the reference's N(0, 0.01) init leaves them ~1e-2 to
    1e-6, where sine evaluations take shortcuts that real inputs do not)."""
    import jax.numpy as jnp
    from flax import nnx

    for path, var in nnx.iter_graph(model):
        if path and path[-1] == "g" and isinstance(var, nnx.Param):
            var[...] = jnp.ones_like(var[...])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=4.0, help="speech length (mel frames = 50 per second)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2, help="torch threads; 1 also makes XLA single-threaded (otherwise it uses every core)")
    p.add_argument("--cosyvoice-src", default=os.environ.get("COSYVOICE_SRC"), help="CosyVoice checkout for the reference")
    p.add_argument("--yaml", default=None, help="a cosyvoice2.yaml to take the hift sizes from")
    p.add_argument("--weights", choices=["unit-gain", "reference-init"], default="unit-gain",
                   help="unit-gain: weight-norm gains 1, activations O(1) as in a trained model (default); "
                        "reference-init: the reference's N(0, 0.01) init, whose shrinking activations hit float32 "
                        "denormals, which slow PyTorch on CPU (XLA flushes them to zero)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    if args.threads == 1:  # XLA's CPU backend otherwise uses every core
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"

    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx

    from hellochat_jax.components.hift import weights as cosyvoice2_hift
    from hellochat_jax.components.hift.model import HiFTConfig, HiFTVocoder, synthesize

    torch.set_num_threads(args.threads)
    if args.yaml:
        from hellochat_jax.checkpoint.cosyvoice_yaml import load_cosyvoice_yaml

        hift_args = dict(load_cosyvoice_yaml(args.yaml)["hift"].value)
    else:
        hift_args = RELEASE_HIFT
    cfg = HiFTConfig.from_yaml(hift_args)
    frames = int(round(args.seconds * 50))
    audio_seconds = frames * cfg.samples_per_frame / cfg.sampling_rate

    ours = HiFTVocoder(cfg, rngs=nnx.Rngs(0))
    if args.weights == "unit-gain":
        unit_gains(ours)
    n_params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(ours, nnx.Param)))
    rng = np.random.default_rng(0)
    mel = (rng.standard_normal((1, cfg.in_channels, frames)) - 5.0).astype(np.float32)
    key = jax.random.key(0)

    folded = ours.fold_weight_norm()  # what inference runs: kernels computed once at load

    def run_ours():
        wav, _ = synthesize(folded, mel, key=key)
        return wav.block_until_ready()

    def run_ours_unfolded():
        wav, _ = synthesize(ours, mel, key=key)
        return wav.block_until_ready()

    t0 = time.perf_counter()
    run_ours()
    compile_s = time.perf_counter() - t0
    run_ours_unfolded()

    ref, why = reference_model(args.cosyvoice_src, hift_args)
    check = None
    if ref is not None:
        ref.load_state_dict(cosyvoice2_hift.export_state_dict(ours, cfg), strict=True)
        mel_t = torch.from_numpy(mel)

        def run_ref():
            return ref.inference(speech_feat=mel_t)

        run_ref()
        # Same weights, same arithmetic: the decoder on one shared source must agree.
        with torch.inference_mode():
            _, source = ref.inference(speech_feat=mel_t)
            want = ref.decode(x=mel_t, s=source).numpy()
        got = np.asarray(nnx.jit(lambda m, x, s: m.decode(x, s))(ours, jnp.asarray(mel), jnp.asarray(source.numpy()[:, 0])))
        check = float(np.abs(got - want).max())

    def timed(fn, into):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        into.append((time.perf_counter() - wall, time.process_time() - cpu))

    times_ours, times_unfolded, times_ref = [], [], []
    for _ in range(args.repeats):
        timed(run_ours, times_ours)
        timed(run_ours_unfolded, times_unfolded)
        if ref is not None:
            timed(run_ref, times_ref)

    def summary(ts):
        wall = [w for w, _ in ts]
        return {
            "min_s": min(wall), "median_s": statistics.median(wall), "rtf_median": statistics.median(wall) / audio_seconds,
            "cpu_s_median": statistics.median(c for _, c in ts),  # process CPU time: robust to other load
        }

    result = {
        "device": jax.devices()[0].device_kind,
        "cpu_count": os.cpu_count(),
        "torch_threads": args.threads,
        "frames": frames,
        "weights": args.weights,
        "audio_seconds": audio_seconds,
        "params_million": n_params / 1e6,
        "ours": {**summary(times_ours), "compile_s": compile_s},
        "ours_weight_norm_unfolded": summary(times_unfolded),
    }
    print(f"HiFT vocoder, {n_params / 1e6:.1f}M params ({args.weights} random weights), {frames} mel frames -> {audio_seconds:.2f} s of 24 kHz audio, float32, {jax.devices()[0].device_kind}")
    print(f"  load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (timings alternate ours / reference)")
    print(f"  ours (JAX, jit, folded) median {result['ours']['median_s']:.3f} s  min {result['ours']['min_s']:.3f} s  RTF {result['ours']['rtf_median']:.3f}  CPU {result['ours']['cpu_s_median']:.3f} s  (first call with compile {compile_s:.1f} s)")
    print(f"  ours, weight norm folding in every call: median {result['ours_weight_norm_unfolded']['median_s']:.3f} s  CPU {result['ours_weight_norm_unfolded']['cpu_s_median']:.3f} s")
    if ref is not None:
        result["reference"] = summary(times_ref)
        result["speedup_median"] = result["reference"]["median_s"] / result["ours"]["median_s"]
        result["speedup_min"] = result["reference"]["min_s"] / result["ours"]["min_s"]
        result["decoder_max_abs_diff"] = check
        result["speedup_cpu"] = result["reference"]["cpu_s_median"] / result["ours"]["cpu_s_median"]
        print(f"  reference (PyTorch, {args.threads} threads) median {result['reference']['median_s']:.3f} s  min {result['reference']['min_s']:.3f} s  RTF {result['reference']['rtf_median']:.3f}  CPU {result['reference']['cpu_s_median']:.3f} s")
        print(f"  speedup: {result['speedup_median']:.2f}x (wall medians), {result['speedup_min']:.2f}x (wall minima), {result['speedup_cpu']:.2f}x (CPU time); target >= 1.3x")
        print(f"  decoder agreement on a shared source: max |diff| {check:.2e}")
    else:
        result["reference"] = None
        result["reference_missing"] = why
        print(f"  reference: {why}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
