"""Parity of our ports against recorded PyTorch outputs (the engine of `hellochat verify`).

A fixture folder holds fixture.json (which computation), checkpoint/ (reference release
format), inputs.npz and outputs.npz. Each component's
`components/<folder>/parity.py` has ``run(case, mesh, rules) -> {output name: array}`` that loads the
checkpoint through our converter and runs our module as the fixture's ``call`` says.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np


@dataclasses.dataclass
class Case:
    """One fixture folder, loaded."""

    path: Path
    spec: dict[str, Any]
    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]

    @property
    def component(self) -> str:
        return self.spec["component"]

    @property
    def checkpoint(self) -> Path:
        return self.path / self.spec.get("checkpoint", "checkpoint")

    @property
    def config(self) -> dict[str, Any]:
        return self.spec.get("config", {})

    @classmethod
    def load(cls, path: str | Path) -> "Case":
        path = Path(path)
        spec_file = path / "fixture.json"
        if not spec_file.exists():
            raise FileNotFoundError(f"{path}: no fixture.json (not a fixture folder)")
        spec = json.loads(spec_file.read_text())
        with np.load(path / "inputs.npz") as f:
            inputs = {k: f[k] for k in f.files}
        with np.load(path / "outputs.npz") as f:
            outputs = {k: f[k] for k in f.files}
        return cls(path, spec, inputs, outputs)


@dataclasses.dataclass
class Row:
    output: str
    max_abs: float
    max_rel: float
    allowed: str
    ok: bool
    note: str = ""


def _where(case: Case, spec: dict, name: str, ref: np.ndarray, ours_all: dict[str, np.ndarray]) -> np.ndarray | None:
    where = spec.get("compare_where")
    if not where:
        return None
    mask = case.outputs.get(where, case.inputs.get(where))
    if mask is None:
        mask = ours_all.get(where)
    if mask is None:
        raise KeyError(f"{name}: compare_where {where!r} is neither an output nor an input")
    mask = np.asarray(mask).astype(bool)
    # A [B, T] mask selects rows of a [B, T, ...] output.
    mask = mask.reshape(mask.shape + (1,) * (ref.ndim - mask.ndim))
    return np.broadcast_to(mask, ref.shape)


def compare(case: Case, ours: dict[str, np.ndarray]) -> list[Row]:
    """Checks every declared output against ours, honouring the fixture's comparison rules.

    Every output fixture.json declares must be recorded in outputs.npz and produced by us,
    except a mask that only says where another output is compared (its `compare_where`): that
    one is read from the fixture, and compared too if we compute it. A case that compares
    nothing, or a mask that selects nothing, fails.
    """
    tol = case.spec.get("tolerance", {})
    masks = {spec["compare_where"] for spec in case.spec["outputs"].values() if spec.get("compare_where")}
    rows = []
    for name, spec in case.spec["outputs"].items():
        if name not in case.outputs:
            rows.append(Row(name, np.nan, np.nan, "-", False, "declared in fixture.json but missing from outputs.npz"))
            continue
        ref = np.asarray(case.outputs[name])
        if name not in ours:
            if name not in masks:
                rows.append(Row(name, np.nan, np.nan, "-", False, "not produced"))
            continue
        got = np.asarray(ours[name])
        if got.shape != ref.shape:
            rows.append(Row(name, np.nan, np.nan, "-", False, f"shape {got.shape} != {ref.shape}"))
            continue
        mask = _where(case, spec, name, ref, ours)
        if mask is not None and not mask.any():
            rows.append(Row(name, np.nan, np.nan, "-", False, f"compare_where {spec['compare_where']!r} selects nothing"))
            continue
        sel = (lambda a: a[mask]) if mask is not None else (lambda a: a.reshape(-1))
        r, g = sel(ref), sel(got)
        discrete = ref.dtype.kind in "biu" or spec.get("exact", False)
        if discrete:
            mismatch = float(np.mean(r != g)) if r.size else 0.0
            # Discrete outputs match exactly unless a mismatch budget is given (output first,
            # then case-wide; an output marked exact never takes the case-wide budget).
            default = 0.0 if spec.get("exact") else float(tol.get("max_mismatch_fraction", 0.0))
            frac = float(spec.get("max_mismatch_fraction", default))
            diff = np.abs(r.astype(np.float64) - g.astype(np.float64)) if r.size else np.zeros(1)
            ok = mismatch <= frac
            allowed = "exact" if frac == 0 else f"mismatch<={frac:g}"
            rows.append(Row(name, float(diff.max(initial=0)), float(mismatch), allowed, ok, f"{mismatch:.2%} differ" if mismatch else ""))
            continue
        rtol, atol = float(tol.get("rtol", 1e-5)), float(tol.get("atol", 1e-5))
        r64, g64 = r.astype(np.float64), g.astype(np.float64)
        if not np.all(np.isfinite(g64)):
            rows.append(Row(name, np.inf, np.inf, f"atol={atol:g} rtol={rtol:g}", False, "non-finite values"))
            continue
        diff = np.abs(g64 - r64)
        rel = diff / np.maximum(np.abs(r64), 1e-12)
        ok = bool(np.all(diff <= atol + rtol * np.abs(r64)))
        rows.append(Row(name, float(diff.max(initial=0)), float(rel.max(initial=0)), f"atol={atol:g} rtol={rtol:g}", ok))
    if not rows:
        rows.append(Row("(nothing)", np.nan, np.nan, "-", False, "the case compares no output"))
    return rows


def run_case(path: str | Path, mesh=None, rules=None) -> tuple[Case, list[Row]]:
    from hellochat_jax.core import sharding as shd

    case = Case.load(path)
    from hellochat_jax.components import REGISTRY

    component = REGISTRY.get(case.component)
    if component is None or not component.has_parity:
        raise NotImplementedError(f"{path}: unsupported component {case.component!r} (known: {sorted(REGISTRY)})")
    module = component.parity
    mesh = mesh if mesh is not None else shd.make_mesh()
    rules = rules if rules is not None else shd.DEFAULT_RULES
    import jax

    with jax.set_mesh(mesh), shd.use_rules(rules):
        ours = module.run(case, mesh, rules)
    ours = {k: np.asarray(jax.device_get(v)) for k, v in ours.items()}
    return case, compare(case, ours)


def format_table(case: Case, rows: list[Row]) -> str:
    lines = [f"{case.path} [{case.component}]", f"  {'output':<22} {'max abs err':>12} {'max rel err':>12}  {'allowed':<26} result"]
    for r in rows:
        lines.append(
            f"  {r.output:<22} {r.max_abs:>12.3e} {r.max_rel:>12.3e}  {r.allowed:<26} {'PASS' if r.ok else 'FAIL'}"
            + (f"  ({r.note})" if r.note else "")
        )
    return "\n".join(lines)


