"""Train-step throughput on CPU: our compiled train step vs a plain PyTorch loop, same run.

    python bench/train.py [--shape tiny|small|mid] [--batch 8] [--seq 256] [--steps 10]
                          [--json out.json] [--markdown] [--profile]

Both train the same Qwen2-shaped model (float32) on the same token batch with the same update
rule: next-token cross-entropy over every position, global-norm clipping at 1.0, AdamW.
    ours:    hellochat_jax.train.Trainer's compiled step (forward, backward, clipping, AdamW,
             non-finite check), one device
    PyTorch: transformers Qwen2ForCausalLM(labels=...) + clip_grad_norm_ + torch.optim.AdamW
Timed steps alternate between the two so both see the same machine load; the best step of
each counts (the least disturbed on a shared machine), the median is printed too.
`--profile` adds both sides' time per step by op class (see common.py); `--markdown` prints a
README-ready table with the date and this run's measured matmul peak.
"""

from __future__ import annotations

from hellochat_jax.core.host_memory import reuse_freed_memory

reuse_freed_memory()  # first, before any thread allocates; ours and the reference share the process

import os

import sys  # noqa: E402

from common import profile_dump_flags  # noqa: E402

# one device: the whole CPU (XLA flags already in the environment are kept, for trying them)
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=1"
                           + (profile_dump_flags() if "--profile" in sys.argv else ""))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from common import jax_op_profile, matmul_peak_gflops, op_class_table, torch_op_profile  # noqa: E402

SHAPES = {
    # the thinker of configs/tiny.yaml (the model the main job trains)
    "tiny": dict(vocab_size=1024, hidden_size=128, intermediate_size=384, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    # a larger small model, where the 8192-way LM head is a third of the FLOPs
    "small": dict(vocab_size=8192, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False),
    # 40.5M: a 32000-way tied head over 8 layers (issue 13's mid-size shape)
    "mid": dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True),
}


class FixedBatch:
    """A data source that always yields the same batch (the trainer's data interface)."""

    task_names = ("lm",)

    def __init__(self, tokens: np.ndarray):
        b, t1 = tokens.shape
        t = t1 - 1
        self.batch = {
            "input_ids": tokens[:, :t].astype(np.int32),
            "targets": tokens[:, 1:].astype(np.int32),
            "loss_mask": np.ones((b, t), np.float32),
            "segment_ids": np.ones((b, t), np.int32),
            "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
            "task_id": np.zeros((b, t), np.int32),
        }

    def local_spec(self):
        import jax

        return {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in self.batch.items()}

    def iterator(self):
        import grain

        return iter(grain.MapDataset.range(2**40).map(lambda _: self.batch).to_iter_dataset())


def ours(tokens: np.ndarray, shape: dict, remat: str):
    import jax
    from hellochat_jax.train.config import TrainConfig
    from hellochat_jax.train.trainer import Trainer

    from hellochat_jax.core.config import from_dict

    b, t1 = tokens.shape
    cfg = from_dict(TrainConfig, {
        "steps": 1000, "run_dir": "/tmp/bench_train",
        "model": {"thinker": shape, "remat": remat},
        "optim": {"lr": 1e-4, "warmup_steps": 0, "weight_decay": 0.1, "clip_norm": 1.0},
        "data": {"batch_size": b, "seq_len": t1 - 1},
    })
    t0 = time.perf_counter()
    trainer = Trainer(cfg, data=FixedBatch(tokens))
    compile_s = time.perf_counter() - t0
    state = trainer.init_state()
    batch = trainer.batch([FixedBatch(tokens).batch])

    def step():
        nonlocal state, batch
        state, metrics = trainer.step(state, batch)
        batch = trainer.batch([FixedBatch(tokens).batch])  # host -> device every step, as in training
        return float(jax.device_get(metrics["loss"]))

    return step, compile_s, trainer.flops_per_step, trainer.num_params


def pytorch(tokens: np.ndarray, shape: dict, threads: int):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = Qwen2Config(**shape, rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=4096)
    model = Qwen2ForCausalLM(config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ids = torch.from_numpy(tokens.astype(np.int64))

    def step():
        # transformers shifts the labels itself (t tokens -> t - 1 predictions; ours predicts t
        # from t inputs): a one-position difference, immaterial to the timing.
        out = model(input_ids=ids[:, :-1], labels=ids[:, :-1])
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        with torch.profiler.record_function("optimizer"):  # an op class of --profile
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        return out.loss.item()

    return step


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=10, help="timed steps of each")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (XLA uses all cores)")
    p.add_argument("--remat", default="none")
    p.add_argument("--shape", default="tiny", choices=sorted(SHAPES), help="model shape (see SHAPES)")
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", action="store_true", help="also print a README-ready table")
    p.add_argument("--profile", action="store_true", help="also print time per step by op class, both sides")
    args = p.parse_args()
    shape = SHAPES[args.shape]

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, shape["vocab_size"], (args.batch, args.seq + 1)).astype(np.int32)
    ours_step, compile_s, flops, params = ours(tokens, shape, args.remat)
    torch_step = pytorch(tokens, shape, args.threads)
    for _ in range(args.warmup):
        ours_step(), torch_step()
    times = {"ours": [], "pytorch": []}
    for _ in range(args.steps):
        for name, fn in (("ours", ours_step), ("pytorch", torch_step)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)

    tokens_per_step = args.batch * args.seq
    best = {k: min(v) for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    peak = matmul_peak_gflops()
    result = {
        "model": shape, "params": params, "batch": args.batch, "seq": args.seq,
        "step_s_best": best, "step_s_median": med,
        "tokens_per_s": {k: tokens_per_step / v for k, v in best.items()},
        "speedup": best["pytorch"] / best["ours"],
        "speedup_median": med["pytorch"] / med["ours"],
        "ours_gflop_per_step_xla": flops / 1e9,
        "ours_gflop_per_s": flops / best["ours"] / 1e9,
        "cpu_f32_matmul_peak_gflop_per_s": peak,
        "ours_compile_s": compile_s,
    }
    print(f"Qwen2-shaped model '{args.shape}', {params / 1e6:.1f}M params, batch {args.batch} x {args.seq} tokens, float32, CPU")
    print(f"{'':10s} {'best step (s)':>14s} {'median (s)':>11s} {'tokens/s':>10s}")
    for k in ("ours", "pytorch"):
        print(f"{k:10s} {best[k]:14.3f} {med[k]:11.3f} {result['tokens_per_s'][k]:10.0f}")
    print(f"speed-up (ours / PyTorch): {result['speedup']:.2f}x best, {result['speedup_median']:.2f}x median   (target >= 1.5x)")
    print(f"ours: {result['ours_gflop_per_s']:.1f} GFLOP/s achieved (XLA-counted), "
          f"measured f32 matmul peak {peak:.1f} GFLOP/s")
    if args.profile:
        result["profile_s_per_step"] = {"ours": jax_op_profile(ours_step, args.warmup + 1),
                                        "pytorch": torch_op_profile(torch_step, args.warmup + 1)}
        print(f"\ntime per step by op class (profiled, {args.warmup + 1} steps each)")
        print(op_class_table(result["profile_s_per_step"]["ours"], result["profile_s_per_step"]["pytorch"]))
    if args.markdown:
        print(f"\ntrain step, {datetime.date.today()}, {os.cpu_count()} cores, f32 matmul peak {peak:.1f} GFLOP/s (this run)\n")
        print("| shape | params | batch x seq | ours tok/s (best / median) | PyTorch tok/s (best / median) | ratio best | ratio median |")
        print("|---|---:|---|---:|---:|---:|---:|")
        tps = lambda v: tokens_per_step / v
        print(f"| {args.shape} | {params / 1e6:.1f}M | {args.batch}x{args.seq} | {tps(best['ours']):.0f} / {tps(med['ours']):.0f} | "
              f"{tps(best['pytorch']):.0f} / {tps(med['pytorch']):.0f} | {result['speedup']:.2f}x | {result['speedup_median']:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
