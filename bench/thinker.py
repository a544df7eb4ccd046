"""Thinker speed, ours vs transformers-PyTorch on the same weights, in one run (float32, CPU).

    python bench/thinker.py                 # Qwen2.5-0.5B shape, prefill 512 tokens, decode 128
    python bench/thinker.py --layers 4      # quicker, fewer layers
    python bench/thinker.py --converter     # also: peak RSS and MB/s converting a ~1 GB checkpoint
    python bench/thinker.py --profile       # also: one prefill's time by op class, both sides
    python bench/thinker.py --markdown      # also: a README-ready table (date, this run's peak)

Prints tokens/s, the ratio ours/reference, and our achieved GFLOP/s against this machine's
measured f32 matmul peak.
"""

from __future__ import annotations

from hellochat_jax.core.host_memory import reuse_freed_memory

reuse_freed_memory()  # first, before any thread allocates; ours and the reference share the process

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import interleaved_times, jax_op_profile, matmul_peak_gflops, op_class_table, profile_dump_flags, torch_op_profile


def model_flops_per_token(cfg, context: int, head: bool = True) -> float:
    """Forward FLOPs per token: 2 x matmul parameters (+ the LM head if `head`) + attention scores/values."""
    d, f, l = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    qkvo = d * cfg.num_attention_heads * cfg.head_dim * 2 + d * cfg.num_key_value_heads * cfg.head_dim * 2
    per_layer = 2 * (qkvo + 3 * d * f) + 4 * context * cfg.num_attention_heads * cfg.head_dim
    return l * per_layer + (2 * d * cfg.vocab_size if head else 0)



def run(args) -> None:
    import jax
    import torch
    import transformers
    from flax import nnx

    from hellochat_jax.components.qwen2 import weights as hf_qwen2
    from hellochat_jax.components.qwen2.model import PRESETS
    from hellochat_jax.core import sharding as shd
    from hellochat_jax.core.decoding import Greedy, StepRules, decode, initial_state, prefill, row_limits, thinker_feed, thinker_prompt

    torch.set_num_threads(os.cpu_count() or 1)
    preset = dict(PRESETS["qwen2.5-0.5b"])
    if args.layers:
        preset["num_hidden_layers"] = args.layers
    hf_cfg = transformers.Qwen2Config(**preset, rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=4096)
    torch.manual_seed(0)
    ref = transformers.Qwen2ForCausalLM(hf_cfg).eval()
    tmp = Path(tempfile.mkdtemp())
    ref.save_pretrained(tmp / "hf")
    mesh = shd.make_mesh()
    cfg, ours = hf_qwen2.load(tmp / "hf", mesh)
    peak = matmul_peak_gflops()
    print(f"devices: {jax.devices()}  threads(torch): {torch.get_num_threads()}  f32 matmul peak: {peak:.1f} GFLOP/s")
    print(f"model: Qwen2.5-0.5B shape, {cfg.num_hidden_layers} layers, float32\n")
    rows = []
    rng = np.random.default_rng(0)
    graphdef, state = nnx.split(ours)
    for batch in args.batches:
        ids = rng.integers(0, cfg.vocab_size, (batch, args.prompt)).astype(np.int32)
        mask = np.ones_like(ids)
        inputs = {"input_ids": jax.numpy.asarray(ids), "attention_mask": jax.numpy.asarray(mask)}
        # --- prefill
        def ours_prefill():
            logits, cache = prefill(graphdef, state, inputs, prompt=thinker_prompt, cache_len=args.prompt + args.new)
            jax.block_until_ready(logits)

        ours_prefill()
        tids = torch.tensor(ids, dtype=torch.long)

        def ref_prefill():
            with torch.no_grad():
                ref(input_ids=tids, use_cache=True, logits_to_keep=1)

        ref_prefill()
        prefill_times = interleaved_times({"ours": ours_prefill, "ref": ref_prefill}, args.repeats)
        if args.profile:
            print(f"prefill, batch {batch}: time per call by op class (profiled, 1 call each)")
            print(op_class_table(jax_op_profile(ours_prefill, 1), torch_op_profile(ref_prefill, 1)) + "\n")
        tokens = batch * args.prompt
        # Both sides put only the last position through the LM head.
        flops = tokens * model_flops_per_token(cfg, args.prompt // 2, head=False) + batch * 2 * cfg.hidden_size * cfg.vocab_size
        t_ours, t_ref = min(prefill_times["ours"]), min(prefill_times["ref"])
        median_ratio = statistics.median(prefill_times["ref"]) / statistics.median(prefill_times["ours"])
        rows.append(("prefill", batch, tokens / t_ours, tokens / t_ref, flops / t_ours / 1e9, median_ratio))
        # --- decode: the compiled while_loop alone, from a prefilled cache
        logits0, cache0 = prefill(graphdef, state, inputs, prompt=thinker_prompt, cache_len=args.prompt + args.new)
        rules, limits, until = StepRules(thinker_feed), row_limits(batch), jax.numpy.asarray(args.new, jax.numpy.int32)

        def ours_decode():
            # decode donates its state, so each run starts from a copy of the prefill's output
            logits, cache = jax.tree.map(jax.numpy.copy, (logits0, cache0))
            ds = initial_state(logits, cache, jax.random.key(0), max_steps=args.new, sampler=Greedy())
            ds = decode(graphdef, state, ds, limits, until, rules=rules, sampler=Greedy())
            jax.block_until_ready(ds.tokens)

        ours_decode()

        def ref_generate():
            with torch.no_grad():
                ref.generate(tids, attention_mask=torch.ones_like(tids), max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False, eos_token_id=None, pad_token_id=0)

        ref_generate()
        decode_times = interleaved_times({"ours": ours_decode, "ref": ref_generate}, args.repeats)
        t_dec = min(decode_times["ours"])
        # The reference's decode = its generate minus its prefill.
        t_ref_dec = max(min(decode_times["ref"]) - t_ref, 1e-9)
        median_ratio = (statistics.median(decode_times["ref"]) - statistics.median(prefill_times["ref"])) / statistics.median(decode_times["ours"])
        new_tokens = batch * args.new
        dflops = new_tokens * model_flops_per_token(cfg, args.prompt + args.new // 2)
        rows.append(("decode", batch, new_tokens / t_dec, new_tokens / t_ref_dec, dflops / t_dec / 1e9, median_ratio))
        print_rows(rows[-2:], peak, header=batch == args.batches[0])
    if args.markdown:
        print(f"\nthinker, Qwen2.5-0.5B shape ({cfg.num_hidden_layers} layers), prompt {args.prompt}, {args.new} new tokens, "
              f"{datetime.date.today()}, {os.cpu_count()} cores, f32 matmul peak {peak:.1f} GFLOP/s (this run)\n")
        print("| phase | batch | ours tok/s (best) | PyTorch tok/s (best) | ratio best | ratio median | ours % of peak |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for phase, batch, ours_tps, ref_tps, gflops, median_ratio in rows:
            print(f"| {phase} | {batch} | {ours_tps:.1f} | {ref_tps:.1f} | {ours_tps / ref_tps:.2f}x | {median_ratio:.2f}x | {100 * gflops / peak:.0f}% |")
    if args.json:
        Path(args.json).write_text(json.dumps({"peak_gflops": peak, "rows": rows}, indent=2))


def print_rows(rows, peak, header=True):
    if header:
        print(f"{'phase':<8} {'batch':>5} {'ours tok/s':>11} {'torch tok/s':>12} {'ratio':>6} {'median':>7} {'ours GFLOP/s':>13} {'% peak':>7}")
    for phase, batch, ours, ref, gflops, median_ratio in rows:
        print(f"{phase:<8} {batch:>5} {ours:>11.1f} {ref:>12.1f} {ours / ref:>5.2f}x {median_ratio:>6.2f}x {gflops:>13.1f} {100 * gflops / peak:>6.1f}%")
    sys.stdout.flush()


# ----------------------------------------------------------------------------- converter


def write_checkpoint(path: Path, target_bytes: int) -> int:
    """A Qwen2-shaped HF folder of about `target_bytes`, written tensor by tensor."""
    from safetensors.numpy import save_file

    d, f, vocab = 1024, 2816, 32000
    per_layer = 4 * (d * d * 2 + d * 256 * 2 + 3 * d * f)
    layers = max(1, (target_bytes - 4 * vocab * d * 2) // per_layer)
    cfg = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=vocab, hidden_size=d, intermediate_size=f,
               num_hidden_layers=int(layers), num_attention_heads=16, num_key_value_heads=4, rope_theta=1e6, rms_norm_eps=1e-6,
               tie_word_embeddings=False, torch_dtype="float32")
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    rng = np.random.default_rng(0)
    t = {"model.embed_tokens.weight": rng.standard_normal((vocab, d), np.float32), "model.norm.weight": np.ones(d, np.float32), "lm_head.weight": rng.standard_normal((vocab, d), np.float32)}
    for i in range(int(layers)):
        p = f"model.layers.{i}."
        t.update({
            p + "input_layernorm.weight": np.ones(d, np.float32), p + "post_attention_layernorm.weight": np.ones(d, np.float32),
            p + "self_attn.q_proj.weight": rng.standard_normal((d, d), np.float32), p + "self_attn.q_proj.bias": np.zeros(d, np.float32),
            p + "self_attn.k_proj.weight": rng.standard_normal((256, d), np.float32), p + "self_attn.k_proj.bias": np.zeros(256, np.float32),
            p + "self_attn.v_proj.weight": rng.standard_normal((256, d), np.float32), p + "self_attn.v_proj.bias": np.zeros(256, np.float32),
            p + "self_attn.o_proj.weight": rng.standard_normal((d, d), np.float32),
            p + "mlp.gate_proj.weight": rng.standard_normal((f, d), np.float32), p + "mlp.up_proj.weight": rng.standard_normal((f, d), np.float32),
            p + "mlp.down_proj.weight": rng.standard_normal((d, f), np.float32),
        })
    save_file(t, str(path / "model.safetensors"))
    return (path / "model.safetensors").stat().st_size


def converter_bench(size_gb: float) -> None:
    tmp = Path(tempfile.mkdtemp())
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import thinker; print(thinker.write_checkpoint(__import__('pathlib').Path({str(tmp / 'hf')!r}), {int(size_gb * 2**30)}))"
    nbytes = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip())
    largest = 4 * 32000 * 1024
    # A fresh process, so ru_maxrss is the converter's own peak; it reports the peak after the
    # streaming load and after the Orbax save separately.
    probe = (
        "import resource, time, sys\n"
        "rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024\n"
        "import jax.numpy as jnp; jnp.zeros(1).block_until_ready()\n"
        "from hellochat_jax.components.qwen2 import weights as hf_qwen2\n"
        "from hellochat_jax.checkpoint.load import save_checkpoint\n"
        "base = rss(); t0 = time.perf_counter()\n"
        f"cfg, m = hf_qwen2.load({str(tmp / 'hf')!r})\n"
        "t1 = time.perf_counter(); after_load = rss()\n"
        f"save_checkpoint(m, cfg, {str(tmp / 'ckpt')!r}, 'qwen2')\n"
        "t2 = time.perf_counter()\n"
        "print(base, after_load, rss(), t1 - t0, t2 - t1)\n"
    )
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(r.stderr)
    base, after_load, after_save, t_load, t_save = map(float, r.stdout.split()[-5:])
    budget = 2 * largest + 2**30
    mib = 2**20
    print(f"\nconverter: {nbytes / mib:.0f} MiB safetensors; streaming load {t_load:.1f} s = {nbytes / mib / t_load:.0f} MB/s, "
          f"Orbax save {t_save:.1f} s = {nbytes / mib / t_save:.0f} MB/s")
    print(f"  peak RSS: baseline (python+jax) {base / mib:.0f} MiB, after load {after_load / mib:.0f} MiB, after save {after_save / mib:.0f} MiB")
    print(f"  load overhead beyond baseline + the model itself (CPU devices keep the model in host RAM): "
          f"{(after_load - base - nbytes) / mib:.0f} MiB; target 2 x largest tensor ({largest / mib:.0f} MiB) + 1 GiB = {budget / mib:.0f} MiB")
    print(f"  whole-process peak {after_save / mib:.0f} MiB vs target {budget / mib:.0f} MiB: "
          f"{'OK' if after_save < budget else 'OVER (Orbax stages a host copy of the model while saving)'}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=0, help="override the layer count (0 = the real 24)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--converter", action="store_true", help="also benchmark the converter on a ~1 GB checkpoint")
    p.add_argument("--converter-only", action="store_true")
    p.add_argument("--converter-gb", type=float, default=1.0)
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", action="store_true", help="also print a README-ready table")
    p.add_argument("--profile", action="store_true", help="also print one prefill's time by op class, both sides")
    args = p.parse_args()
    if args.profile:  # before jax starts: XLA reads its flags once
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + profile_dump_flags()
    if not args.converter_only:
        run(args)
    if args.converter or args.converter_only:
        converter_bench(args.converter_gb)


if __name__ == "__main__":
    main()
