"""Training metrics: per-task losses, throughput, FLOP/s and MFU, to JSONL, TensorBoard and a
progress bar.

FLOPs per step come from XLA's cost analysis of the compiled train step (forward, backward
and optimizer, with any remat recomputation), not from a formula. MFU divides the achieved
FLOP/s by the devices' peak: a table for known accelerators (dense bf16, or f32 where stated),
a short measured f32 matmul on CPU, or `log.peak_flops` when given.
"""

from __future__ import annotations

import json
import re
import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# device_kind substring -> peak dense FLOP/s per device (bf16 / f32-via-TF32 where no bf16)
PEAK_FLOPS = {
    "TPU v5p": 459e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v4": 275e12,
    "TPU v6": 918e12,
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L4": 121e12,
}


def measured_cpu_peak(seconds: float = 0.5, n: int = 1024) -> float:
    """f32 matmul FLOP/s this host reaches with XLA (all its cores on one device)."""
    cpu = jax.devices("cpu")[0]
    a = jax.device_put(jnp.ones((n, n), jnp.float32), cpu)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        f(a).block_until_ready()
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def peak_flops_per_device(declared: float | None = None) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the number comes from)."""
    if declared:
        return float(declared), "declared in log.peak_flops"
    dev = jax.devices()[0]
    if dev.platform == "cpu":
        # Simulated CPU devices share the host's cores: the host peak is split between them.
        return measured_cpu_peak() / jax.local_device_count(), "measured f32 matmul on this host"
    for name, peak in PEAK_FLOPS.items():
        if name.lower() in dev.device_kind.lower():
            return peak, f"table ({dev.device_kind}, dense bf16)"
    return float("nan"), f"unknown device {dev.device_kind!r}: set log.peak_flops"


def compiled_flops(compiled) -> float:
    """FLOPs of one call of a compiled function, all devices together."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # some backends do not report
        return float("nan")
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    flops = float((cost or {}).get("flops", float("nan")))
    # An SPMD program's cost is that of one device's partition.
    return flops * jax.device_count()


class MetricsLogger:
    """Writes one record per logged step; only the first process writes files."""

    def __init__(self, run_dir: str | Path, task_names: tuple[str, ...], *, flops_per_step: float,
                 peak_flops: float, total_steps: int, start_step: int, tensorboard: bool = True,
                 jsonl: bool = True, progress: bool = True):
        self.task_names = task_names
        self.flops_per_step = flops_per_step
        self.peak_total = peak_flops * jax.device_count()
        self.primary = jax.process_index() == 0
        self.run_dir = Path(run_dir)
        self.skipped_records = 0  # since this process started
        self.jsonl = None
        self.tb = None
        self.bar = None
        if self.primary:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if jsonl:
                self.jsonl = open(self.run_dir / "metrics.jsonl", "a")
            if tensorboard:
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(str(self.run_dir / "tensorboard"))
            if progress:
                from tqdm import tqdm

                self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def train_record(self, step: int, stats: dict[str, np.ndarray], *, step_time: float, data_wait: float,
                     stage_record: Any = None) -> dict[str, Any]:
        """`stage_record(stats)`: the stage objective's own entries (its `record`)."""
        rec: dict[str, Any] = {"step": step, "loss": float(stats["loss"])}
        if stage_record is not None:
            rec.update(stage_record(stats))
        rec["grad_norm"] = float(stats["grad_norm"])
        rec["lr"] = float(stats["lr"])
        rec["skipped_steps"] = int(stats["skipped"])
        rec["bad_in_row"] = int(stats["bad_in_row"])
        rec["tokens"] = float(stats.get("input_tokens", float("nan")))  # the stage's unit: tokens, frames
        rec["step_time_s"] = step_time
        rec["data_wait_s"] = data_wait
        rec["tokens_per_s"] = rec["tokens"] / step_time if step_time > 0 else float("nan")
        rec["flops_per_s"] = self.flops_per_step / step_time if step_time > 0 else float("nan")
        rec["mfu"] = rec["flops_per_s"] / self.peak_total if self.peak_total > 0 else float("nan")
        if "skipped_records" in stats:
            rec["skipped_records"] = self.skipped_records
        return rec

    def observe(self, stats: dict[str, np.ndarray]) -> None:
        """Every step, logged or not: running totals."""
        if "skipped_records" in stats:
            self.skipped_records += int(stats["skipped_records"])

    def write(self, rec: dict[str, Any]) -> None:
        if not self.primary:
            return
        if self.jsonl:
            self.jsonl.write(json.dumps({k: _jsonable(v) for k, v in rec.items()}) + "\n")
            self.jsonl.flush()
        if self.tb:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, rec["step"])
        if self.bar:
            if "loss" in rec:
                self.bar.update(rec["step"] - self.bar.n)
                self.bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec.get('tokens_per_s', 0):.0f}",
                                     mfu=f"{rec.get('mfu', float('nan')):.1%}", refresh=False)
            else:
                self.bar.write("eval " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()))

    def message(self, text: str) -> None:
        if not self.primary:
            return
        if self.bar:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar:
            self.bar.close()
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    return v


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _smooth(values: list[float], window: int) -> np.ndarray:
    """Trailing mean over `window` points (noisy per-step losses become readable)."""
    x = np.asarray(values, np.float64)
    c = np.cumsum(np.insert(x, 0, 0.0))
    n = np.minimum(np.arange(1, len(x) + 1), window)
    return (c[1:] - c[np.arange(1, len(x) + 1) - n]) / n


def plot_curves(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Training losses (per task, smoothed) and held-out scores (with the constant-guess
    baselines dashed) from metrics.jsonl to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_jsonl(run_dir / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if any(k.startswith("eval/") for k in r)]
    fig, axes = plt.subplots(1, 2 if evals else 1, figsize=(12 if evals else 6, 4), squeeze=False)
    ax = axes[0][0]
    keys = sorted({k for r in train for k in r if k.startswith("loss/")})
    # Every stage's loss terms (thinker CE, talker CE, CTC, flow MSE, vocoder L1s), else the total.
    terms = sorted({k for r in train for k in r if re.match(r"^(thinker|talker|flow|hift|tokenizer|encoder|adapter)_.*(loss|ctc|l1|mse|stft|bce)$", k)})
    terms = [k for k in ["thinker_loss"] if k in terms] + keys + [k for k in terms if k != "thinker_loss"]
    for key in terms or ["loss"]:
        pts = [(r["step"], r[key]) for r in train if isinstance(r.get(key), (int, float))]
        if pts:
            steps, values = zip(*pts)
            ax.plot(steps, _smooth(list(values), 10), label=key.removeprefix("loss/"), linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean of 10 logged steps)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.set_title("training loss")
    if evals:
        ax = axes[0][1]
        ekeys = sorted({k for r in evals for k, v in r.items() if k.startswith("eval/") and isinstance(v, float)
                        and not k.endswith("_chance")})
        for i, key in enumerate(ekeys):
            color = f"C{i}"
            pts = [(r["step"], r[key]) for r in evals if isinstance(r.get(key), float)]
            ax.plot(*zip(*pts), marker="o", color=color, label=key.removeprefix("eval/"))
            chance = [r[key + "_chance"] for r in evals if isinstance(r.get(key + "_chance"), float)]
            if chance:
                ax.axhline(chance[-1], color=color, linestyle="--", linewidth=1,
                           label=key.removeprefix("eval/") + " (constant guess)")
        ax.set_xlabel("step")
        ax.set_ylim(0, max(1.05, ax.get_ylim()[1]))
        ax.set_title("held-out evaluation (greedy decoding)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(out) if out else run_dir / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
