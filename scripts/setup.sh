#!/usr/bin/env bash
# Installs the system packages zmesh's demo and tests need (Debian/Ubuntu, as root).
# The Rust toolchain itself comes from rustup and is expected to be on PATH.
set -euo pipefail
# containerd (1.6 on Debian 12, with ctr), runc and busybox-static: tests/netns_containerd.rs runs
# containers through `ctr run --cni` from a rootfs holding only the static busybox (it replaces a
# dynamic `busybox` package, which could not run there).
PACKAGES=(iptables nftables iproute2 containernetworking-plugins containerd runc busybox-static)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${CI:-}" = "true" ] || [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${PACKAGES[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${PACKAGES[@]}" >/dev/null
fi
# systemd-analyze checks the unit `zmesh-node join` writes.
if ! command -v systemd-analyze >/dev/null; then
  echo "setup: installing systemd (systemd-analyze)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd >/dev/null
fi
# dash (Debian's /bin/sh, as in the debian-slim images) runs the ECS example's health check in
# tests/manifests.rs exactly as ECS's CMD-SHELL would.
if ! command -v dash >/dev/null; then
  echo "setup: installing dash"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dash >/dev/null
fi
# Manifest rendering and validation (daemonset/): kubectl for `kustomize`, and the schema
# validator from PyPI.
if ! command -v kubectl >/dev/null; then
  echo "setup: installing kubernetes-client (kubectl)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq kubernetes-client >/dev/null
fi
if ! python3 -c 'import kubernetes_validate' 2>/dev/null; then
  echo "setup: installing kubernetes-validate"
  command -v pip3 >/dev/null || python3 -m pip --version >/dev/null 2>&1 || {
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pip >/dev/null
  }
  python3 -m pip install -q kubernetes-validate 2>/dev/null \
    || python3 -m pip install -q --break-system-packages kubernetes-validate
fi
command -v cargo >/dev/null || { echo "setup: cargo not found; install Rust with rustup" >&2; exit 1; }
