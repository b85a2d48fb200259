#!/usr/bin/env bash
# Installs everything lockfs, its tests and its benchmark need on Debian 12/13, as root:
# system packages, a virtual environment in .venv with lockfs and its test tools, and
# /usr/local/bin/lockfs (mount(8) runs fstab helpers with a fixed PATH; see docs/deploy.md).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "setup: run as root (it installs Debian packages and mounts filesystems)" >&2
    exit 1
fi

packages=(fuse3 libfuse3-dev pkg-config gcc python3 python3-dev python3-venv util-linux
          postgresql docker.io bindfs fio dbench systemd glusterfs-server
          iproute2 strace e2fsprogs git)
missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$package")
done
if [ "${#missing[@]}" -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian's postgresql package starts a cluster; lockfs's tests run their own servers.
systemctl disable --now postgresql >/dev/null 2>&1 || true
pg_ctlcluster --mode fast 15 main stop >/dev/null 2>&1 || true

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip 2>/dev/null || true
.venv/bin/pip install -q -e '.[test]'
ln -sf "$PWD/.venv/bin/lockfs" /usr/local/bin/lockfs
echo "setup: done ($(.venv/bin/lockfs --help >/dev/null && echo lockfs ok))"
