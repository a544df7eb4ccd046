"""`hellochat verify` checks can fail: a doctored copy of a fixture (tmp_path) must fail it.

compare() is given the fixture's own reference outputs as "ours" (a perfect port) unless a
test says otherwise, so every failure below comes from the doctoring alone.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import FIXTURES, full_mesh, single_device_mesh

from hellochat_jax import cli
from hellochat_jax.core.parity import Case, compare, format_table, run_case

QWEN2 = FIXTURES / "qwen2-tiny"


def doctored_copy(tmp_path, *, outputs=None, spec=None):
    """A copy of the qwen2-tiny fixture with outputs.npz and/or fixture.json changed."""
    folder = tmp_path / "qwen2-tiny"
    shutil.copytree(QWEN2, folder)
    case = Case.load(folder)
    if outputs is not None:
        np.savez(folder / "outputs.npz", **outputs(dict(case.outputs)))
    if spec is not None:
        (folder / "fixture.json").write_text(json.dumps(spec(json.loads(json.dumps(case.spec)))))
    return Case.load(folder)


def perfect_port(case: Case) -> dict[str, np.ndarray]:
    """What a perfect port computes: every recorded output except the masks."""
    return {k: v for k, v in case.outputs.items() if k != "valid"}


def failures(rows) -> dict[str, str]:
    return {r.output: r.note for r in rows if not r.ok}


def test_the_undoctored_fixture_passes_with_its_mask_taken_from_the_fixture():
    case = Case.load(QWEN2)
    rows = compare(case, perfect_port(case))
    assert failures(rows) == {} and {r.output for r in rows} == {"logits", "greedy_tokens"}


def test_a_wrong_value_fails_only_where_the_mask_compares():
    case = Case.load(QWEN2)
    ours = perfect_port(case)
    padded = np.argwhere(~case.outputs["valid"])[0]
    ours["logits"] = ours["logits"].copy()
    ours["logits"][tuple(padded)] += 1.0  # at a padding position: not compared
    assert failures(compare(case, ours)) == {}
    ours["logits"][0, -1, 0] += 1e-3  # row 0 has no padding
    assert set(failures(compare(case, ours))) == {"logits"}


def test_an_output_missing_from_outputs_npz_fails(tmp_path):
    case = doctored_copy(tmp_path, outputs=lambda o: {k: v for k, v in o.items() if k != "greedy_tokens"})
    assert "missing from outputs.npz" in failures(compare(case, perfect_port(Case.load(QWEN2))))["greedy_tokens"]


def test_an_output_we_do_not_produce_fails():
    case = Case.load(QWEN2)
    ours = perfect_port(case)
    del ours["greedy_tokens"]
    assert failures(compare(case, ours)) == {"greedy_tokens": "not produced"}


def test_a_case_that_compares_nothing_fails(tmp_path):
    case = doctored_copy(tmp_path, spec=lambda s: {**s, "outputs": {}})
    rows = compare(case, perfect_port(case))
    assert [r.ok for r in rows] == [False] and "compares no output" in rows[0].note


def test_a_mask_that_selects_nothing_fails(tmp_path):
    case = doctored_copy(tmp_path, outputs=lambda o: {**o, "valid": np.zeros_like(o["valid"])})
    assert "selects nothing" in failures(compare(case, perfect_port(case)))["logits"]


def test_verify_command_fails_on_a_doctored_fixture(tmp_path, capsys):
    def shift_valid_logits(o):
        logits = o["logits"].copy()
        logits[0, 3] += 0.01
        return {**o, "logits": logits}

    case = doctored_copy(tmp_path, outputs=shift_valid_logits)
    assert cli.main(["verify", str(case.path)]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "0/1 fixture(s) passed" in out


FIXTURE_NAMES = sorted(p.name for p in FIXTURES.iterdir() if (p / "fixture.json").exists())


@pytest.mark.parametrize("mesh", ["1 device", "data=2,fsdp=2,tensor=2"])
@pytest.mark.parametrize("fixture", FIXTURE_NAMES)
def test_every_fixture_passes(fixture, mesh):
    """What `hellochat verify` checks, per fixture, on one device and on the 8-device mesh."""
    chosen = single_device_mesh() if mesh == "1 device" else full_mesh()
    case, rows = run_case(FIXTURES / fixture, chosen)
    assert all(r.ok for r in rows), format_table(case, rows)


@pytest.mark.parametrize("fixture", FIXTURE_NAMES)
def test_every_fixture_declares_what_it_records(fixture):
    """fixture.json and outputs.npz list the same outputs, and each compare_where names a mask."""
    case = Case.load(FIXTURES / fixture)
    assert set(case.spec["outputs"]) == set(case.outputs)
    for spec in case.spec["outputs"].values():
        where = spec.get("compare_where")
        assert where is None or where in case.outputs or where in case.inputs
