#!/usr/bin/env bash
# A base image for docker/Dockerfile made from Debian's packages, for a Docker host that cannot pull from
# a registry (air-gapped, or behind a proxy that only lets package mirrors through):
#   docker/base-image.sh [TAG]          # default TAG: dlrm-pipeline/base:bookworm
#   docker build -f docker/Dockerfile --build-arg BASE_IMAGE=dlrm-pipeline/base:bookworm -t dlrm-pipeline .
# Debian bookworm (minbase) with python3.11, venv and libgomp1 (the OpenMP runtime numba's parallel kernels
# run on), made by debootstrap from the mirror apt uses here,
# imported with `docker import`. It also carries what this host's pip relies on and a build cannot see:
# the host's own CA certificates (/usr/local/share/ca-certificates, for a TLS-intercepting proxy) and the
# wheels in pip's find-links folders (e.g. a local torch +cpu wheel), as PIP_FIND_LINKS=/opt/wheels.
# An image with the same inputs (this script, the wheels, the CAs) is kept: the label
# org.dlrm-pipeline.base-key records them; REBUILD=1 forces a new one. Needs root and debootstrap.
set -euo pipefail

TAG="${1:-dlrm-pipeline/base:bookworm}"
SUITE=bookworm
die() { echo "[base-image] $*" >&2; exit 1; }

[[ $(id -u) == 0 ]] || die "needs root (debootstrap and chroot)."
command -v debootstrap >/dev/null || die "needs debootstrap: apt-get install debootstrap"
docker info >/dev/null 2>&1 || die "no Docker engine reachable (docker info failed)."

# The Debian mirror apt is configured with (deb822 or one-line sources), unless DEBIAN_MIRROR is set.
mirror="${DEBIAN_MIRROR:-}"
if [[ -z "$mirror" ]]; then
  mirror="$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '/^URIs:/ {print $2; exit}')"
  [[ -n "$mirror" ]] || mirror="$(grep -hE '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
    | grep -v security | awk '{print $2; exit}')"
  [[ -n "$mirror" ]] || mirror=http://deb.debian.org/debian
fi

# Wheels from pip's find-links (PIP_FIND_LINKS or `pip config`), folders only.
wheel_dirs=()
links="${PIP_FIND_LINKS:-$(pip config get global.find-links 2>/dev/null || true)}"
for d in $links; do
  d="${d#file://}"
  [[ -d "$d" ]] && compgen -G "$d/*.whl" >/dev/null && wheel_dirs+=("$d")
done
cas=(/usr/local/share/ca-certificates/*.crt)
[[ -e "${cas[0]}" ]] || cas=()

key="$( { cat "${BASH_SOURCE[0]}"; echo "$mirror"; for d in "${wheel_dirs[@]}"; do ls -l "$d"/*.whl; done;
  for c in "${cas[@]}"; do sha256sum "$c"; done; } | sha256sum | cut -c1-16)"
if [[ -z "${REBUILD:-}" ]] \
  && [[ "$(docker image inspect -f '{{index .Config.Labels "org.dlrm-pipeline.base-key"}}' "$TAG" 2>/dev/null)" == "$key" ]]; then
  echo "[base-image] $TAG is up to date (key $key)" >&2
  exit 0
fi

rootfs="$(mktemp -d /tmp/dlrm-base.XXXXXX)"
trap 'rm -rf "$rootfs"' EXIT
echo "[base-image] debootstrap $SUITE from $mirror" >&2
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,libgomp1 "$SUITE" "$rootfs" "$mirror" \
  >"$rootfs.log" 2>&1 || { tail -20 "$rootfs.log" >&2; die "debootstrap failed (log above)"; }
rm -f "$rootfs.log"
if ((${#cas[@]})); then
  cp "${cas[@]}" "$rootfs/usr/local/share/ca-certificates/"
  chroot "$rootfs" update-ca-certificates >/dev/null
fi
mkdir -p "$rootfs/opt/wheels"
for d in "${wheel_dirs[@]}"; do cp "$d"/*.whl "$rootfs/opt/wheels/"; done
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*

tar -C "$rootfs" -c . | docker import \
  --change "LABEL org.dlrm-pipeline.base-key=$key" \
  --change 'ENV LANG=C.UTF-8 PIP_FIND_LINKS=/opt/wheels PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
  --change 'CMD ["/bin/bash"]' \
  - "$TAG" >/dev/null
echo "[base-image] $TAG (key $key)" >&2
