#!/usr/bin/env bash
# What tests/deploy/test_container.py needs to build the image and run the compose stack for
# real: podman, runc, debootstrap and iptables from Debian (about 20 s), podman-compose from
# PyPI into the project's venv (podman 4 has no `podman compose`). Run by .ci/run after the
# venv exists, and by a developer (as root, on Debian) who wants to run the container test.
# Every install is required: one that fails stops here with its error.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
for tool in podman runc debootstrap iptables; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
if [ "${#missing[@]}" -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc debootstrap iptables >/dev/null
fi
.venv/bin/python -m pip install --quiet podman-compose
