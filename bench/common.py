"""What every benchmark shares: the machine's measured f32 matmul roofline and best-of timing.
(Benchmarks run as scripts, so this folder is on sys.path: `from common import ...`.)"""

from __future__ import annotations

import time
from collections.abc import Callable


def matmul_peak_gflops(n: int = 2048, repeats: int = 10) -> float:
    """Best f32 GFLOP/s of a square matmul under XLA on this machine (the roofline we compare to)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    return 2 * n**3 / best_time(lambda: f(a).block_until_ready(), repeats) / 1e9


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """Minimum wall time over `repeats` calls: the least disturbed run on a shared machine."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best
