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


def interleaved_times(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Wall times of each function over `repeats` rounds, the functions taking turns within a
    round so that all of them see the same machine load."""
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return times


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """Minimum wall time over `repeats` calls: the least disturbed run on a shared machine."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


# ----------------------------------------------------------------------------- op-class profiles
# Both sides' time per step by op class, for `--profile`. Ours: a jax.profiler trace (one event
# per executed XLA op) mapped onto the optimized HLO that XLA dumps (`profile_dump_flags`), whose
# metadata carries the model's named scopes ("attention", "cross_entropy", "optimizer").
# PyTorch: torch.profiler's self time per aten op. Host overhead = wall time not spent in ops.

OP_CLASSES = ("matmuls", "attention", "softmax/loss over vocab", "norms/elementwise", "optimizer update",
              "copies/transposes", "host overhead")
HLO_DUMP_DIR = "/tmp/hellochat_bench_hlo"


def profile_dump_flags() -> str:
    """XLA_FLAGS additions that make XLA write the optimized HLO the profile is mapped onto."""
    import shutil

    shutil.rmtree(HLO_DUMP_DIR, ignore_errors=True)
    return f" --xla_dump_to={HLO_DUMP_DIR} --xla_dump_hlo_as_text --xla_dump_hlo_pass_re=^$"


def _hlo_ops() -> dict[tuple[str, str], tuple[str, str]]:
    """(module, instruction) -> (opcode, op_name metadata) for every dumped optimized module."""
    import glob
    import re

    line_re = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*.*?\s([a-z][a-z0-9\-]*)\(")
    ops = {}
    for path in glob.glob(f"{HLO_DUMP_DIR}/*after_optimizations.txt"):
        module = None
        for line in open(path):
            if line.startswith("HloModule "):
                module = line.split()[1].rstrip(",")
            m = line_re.match(line)
            if m:
                name_meta = re.search(r'op_name="([^"]*)"', line)
                kind = "custom" if "kind=kCustom" in line else m.group(2)
                ops[(module, m.group(1))] = (kind, name_meta.group(1) if name_meta else "")
    return ops


def _jax_class(name: str, kind: str, op_name: str) -> str:
    if kind in ("copy", "transpose") or name.startswith(("copy", "transpose")):
        return "copies/transposes"
    for scope, cls in (("optimizer", "optimizer update"), ("attention", "attention"),
                       ("cross_entropy", "softmax/loss over vocab")):
        if scope in op_name:
            return cls
    if kind in ("dot", "custom", "custom-call", "convolution"):
        return "matmuls"
    return "norms/elementwise"


def jax_op_profile(fn: Callable[[], object], steps: int) -> dict[str, float]:
    """Seconds per call of `fn` (which must block on its result) by op class."""
    import collections
    import glob
    import tempfile

    import jax
    from jax._src.lib import _profile_data

    trace_dir = tempfile.mkdtemp()
    with jax.profiler.trace(trace_dir):
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        wall = time.perf_counter() - t0
    data = _profile_data.ProfileData.from_file(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)[0])
    ops = _hlo_ops()
    busy, executing = collections.Counter(), 0.0
    for plane in data.planes:
        for line in plane.lines:
            for ev in line.events:
                if ev.name == "ThunkExecutor::Execute (wait for completion)":
                    executing += ev.duration_ns * 1e-9
                    continue
                stats = dict(ev.stats)
                key = (stats.get("hlo_module"), stats.get("hlo_op"))
                if key in ops:
                    busy[_jax_class(key[1], *ops[key])] += ev.duration_ns * 1e-9
    # Op events on all threads sum to CPU time; share out the program's wall time by it.
    total = sum(busy.values()) or 1.0
    out = {c: executing * busy[c] / total / steps for c in OP_CLASSES[:-1]}
    out["host overhead"] = max(wall - executing, 0.0) / steps
    return out


def _torch_class(name: str) -> str:
    n = name.lower()
    if "scaled_dot_product" in n or "flash_attention" in n:
        return "attention"
    if any(w in n for w in ("_foreach", "adam", "optimizer.step")):
        return "optimizer update"
    if any(w in n for w in ("log_softmax", "nll_loss", "cross_entropy")):
        return "softmax/loss over vocab"
    if n.split("::")[-1] in ("mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "addmv", "mv", "dot"):
        return "matmuls"
    if n.split("::")[-1] in ("copy_", "clone", "contiguous", "cat", "_to_copy", "to", "repeat", "index_select", "t_", "transpose_"):
        return "copies/transposes"
    return "norms/elementwise"


def torch_op_profile(fn: Callable[[], object], steps: int) -> dict[str, float]:
    """Seconds per call of `fn` by op class (self time of each aten op; ops run under a
    `record_function("optimizer")` region, as the benches mark clipping + step, count there)."""
    import collections

    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        wall = time.perf_counter() - t0
    busy = collections.Counter()
    for e in prof.events():
        parent, in_optimizer = e, False
        while parent is not None and not in_optimizer:
            in_optimizer, parent = parent.name == "optimizer", parent.cpu_parent
        busy["optimizer update" if in_optimizer else _torch_class(e.name)] += e.self_cpu_time_total * 1e-6
    out = {c: busy[c] / steps for c in OP_CLASSES[:-1]}
    out["host overhead"] = max(wall - sum(busy.values()), 0.0) / steps
    return out


def op_class_table(ours: dict[str, float], torch: dict[str, float]) -> str:
    """Markdown table: ms per step by op class, ours next to PyTorch."""
    rows = ["| op class | ours ms | ours % | PyTorch ms | PyTorch % |", "|---|---:|---:|---:|---:|"]
    to, tt = sum(ours.values()), sum(torch.values())
    for c in OP_CLASSES:
        rows.append(f"| {c} | {1e3 * ours[c]:.1f} | {100 * ours[c] / to:.0f} | {1e3 * torch[c]:.1f} | {100 * torch[c] / tt:.0f} |")
    rows.append(f"| total | {1e3 * to:.1f} | | {1e3 * tt:.1f} | |")
    return "\n".join(rows)
