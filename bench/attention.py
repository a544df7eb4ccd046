"""Causal self-attention forward + backward on CPU: ours (full masked vs query-blocked) next to
PyTorch's fused `scaled_dot_product_attention(is_causal=True)`, same inputs, same run.

    python bench/attention.py [--repeats 7] [--markdown]

Shapes: the train bench's tiny and mid models (8 x 256 tokens) and the Qwen2.5-0.5B prefill
(1 x 512). Loss = sum of squared outputs; gradients for q, k and v.
"""

from __future__ import annotations

from hellochat_jax.core.host_memory import reuse_freed_memory

reuse_freed_memory()  # first, before any thread allocates; ours and the reference share the process

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import datetime  # noqa: E402

import numpy as np  # noqa: E402
from common import best_time  # noqa: E402

SHAPES = {  # (B, T, H, KV, D)
    "tiny": (8, 256, 4, 2, 32),
    "mid": (8, 256, 8, 2, 64),
    "prefill-0.5B": (1, 512, 14, 2, 64),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args()

    import jax
    import jax.numpy as jnp
    import torch

    from hellochat_jax.components.qwen2.model import causal_attention, grouped_attention

    torch.set_num_threads(os.cpu_count())
    rows = []
    for name, (b, t, h, kvh, d) in SHAPES.items():
        rng = np.random.default_rng(0)
        q, k, v = (rng.standard_normal((b, t, n, d)).astype(np.float32) for n in (h, kvh, kvh))
        slot = np.arange(t)
        allowed = jnp.asarray(np.broadcast_to(slot[None, :] <= slot[:, None], (b, t, t)))
        times = {}
        for label, fn in (("full", grouped_attention), ("blocked", causal_attention)):
            step = jax.jit(jax.grad(lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v, allowed, None) ** 2), argnums=(0, 1, 2)))
            jax.block_until_ready(step(q, k, v))
            times[label] = best_time(lambda: jax.block_until_ready(step(q, k, v)), args.repeats)
        tq, tk, tv = (torch.tensor(x).transpose(1, 2).requires_grad_() for x in (q, k, v))

        def torch_step():
            out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True, enable_gqa=True)
            (out**2).sum().backward()

        torch_step()
        times["pytorch"] = best_time(torch_step, args.repeats)
        rows.append((name, (b, t, h, kvh, d), times))
        print(f"{name:14s} full {times['full'] * 1e3:7.1f} ms  blocked {times['blocked'] * 1e3:7.1f} ms  "
              f"PyTorch SDPA {times['pytorch'] * 1e3:7.1f} ms  (blocked / PyTorch {times['pytorch'] / times['blocked']:.2f}x)")
    if args.markdown:
        print(f"\ncausal attention forward + backward, {datetime.date.today()}, {os.cpu_count()} cores, f32, best of {args.repeats}\n")
        print("| shape | (B, T, H, KV, D) | ours full ms | ours blocked ms | PyTorch SDPA ms | blocked vs PyTorch |")
        print("|---|---|---:|---:|---:|---:|")
        for name, shape, t in rows:
            print(f"| {name} | {shape} | {t['full'] * 1e3:.1f} | {t['blocked'] * 1e3:.1f} | {t['pytorch'] * 1e3:.1f} | {t['pytorch'] / t['blocked']:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
