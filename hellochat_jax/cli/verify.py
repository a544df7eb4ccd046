"""`hellochat verify FIXTURE_DIR...`: parity of our ports against recorded PyTorch outputs."""

from __future__ import annotations

import argparse

from hellochat_jax.core.parity import format_table, run_case


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("fixtures", nargs="+", help="fixture folders (each with fixture.json)")
    p.add_argument("--mesh", default=None, help="e.g. data=2,fsdp=2,tensor=2 (default: all devices on data)")


def main(args: argparse.Namespace) -> int:
    from hellochat_jax.core import sharding as shd

    mesh = shd.make_mesh(shd.parse_mesh_arg(args.mesh))
    print(f"mesh: {dict(mesh.shape)} over {mesh.devices.size} device(s)")
    failed = 0
    for path in args.fixtures:
        try:
            case, rows = run_case(path, mesh)
        except NotImplementedError as e:
            print(f"{path}: UNSUPPORTED: {e}")
            failed += 1
            continue
        except Exception as e:  # a broken case must not hide the others' results
            print(f"{path}: ERROR: {type(e).__name__}: {e}")
            failed += 1
            continue
        print(format_table(case, rows))
        failed += not all(r.ok for r in rows)
    print(f"{len(args.fixtures) - failed}/{len(args.fixtures)} fixture(s) passed")
    return 1 if failed else 0
