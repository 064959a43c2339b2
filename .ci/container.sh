#!/usr/bin/env bash
# CI: what tests/deploy/test_container.py needs to build the image and run the compose stack
# for real: podman, runc and debootstrap from Debian (about 20 s), podman-compose from PyPI
# into the project's venv (podman 4 has no `podman compose`). Run by .ci/run after the venv
# exists; as root on Debian. Anything that does not install makes the container test skip,
# which CI (CI=true) counts as a failure, so a broken install cannot pass by not testing.
set -uo pipefail
cd "$(dirname "$0")/.."

if command -v apt-get >/dev/null; then
    missing=()
    for tool in podman runc debootstrap iptables; do
        command -v "$tool" >/dev/null || missing+=("$tool")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        { apt-get update -qq \
            && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
                podman runc debootstrap iptables >/dev/null; } \
            || echo "ci: podman, runc or debootstrap did not install; the container test will skip"
    fi
else
    echo "ci: no apt-get; the container test will skip"
fi
.venv/bin/python -m pip install --quiet podman-compose \
    || echo "ci: podman-compose did not install; the container test will skip"
