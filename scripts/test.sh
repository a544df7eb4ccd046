#!/usr/bin/env bash
# The test command: parity fixtures through `hellochat verify` on 1 device and on an 8-device
# mesh, then the test suite (slow tests excluded; run them with `pytest -m slow`).
set -euo pipefail
cd "$(dirname "$0")/.."
FIXTURES=$(ls -d tests/fixtures/*/)
echo "== hellochat verify, 1 device"
JAX_PLATFORMS=cpu hellochat verify $FIXTURES
echo "== hellochat verify, 8 devices (data=2,fsdp=2,tensor=2)"
JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=8 hellochat verify $FIXTURES --mesh data=2,fsdp=2,tensor=2
echo "== pytest"
python -m pytest -q -p no:cacheprovider --timeout=900
