#!/usr/bin/env bash
# Installs the system packages one README command needs (Debian/Ubuntu, as root), and nothing more:
#   scripts/setup.sh demo   iptables nftables iproute2 (namespaces, capture rules)
#   scripts/setup.sh test   the above, plus what the test tiers drive for real:
#                           containernetworking-plugins (the CNI chain tests), containerd + runc +
#                           busybox-static (containers run with `ctr run --cni`), systemd
#                           (systemd-analyze checks the unit `zmesh-node join` writes), dash (the ECS
#                           health check as ECS's CMD-SHELL runs it), kubernetes-client (`kubectl
#                           kustomize`) and kubernetes-validate from PyPI (manifest validation).
# Under CI (CI=true) the package index is always refreshed first. The Rust toolchain comes from
# rustup and is expected to be on PATH.
set -euo pipefail
what=${1:-test}
case "$what" in
  demo) PACKAGES=(iptables nftables iproute2) ;;
  test) PACKAGES=(iptables nftables iproute2 containernetworking-plugins containerd runc
                  busybox-static systemd dash kubernetes-client python3-pip) ;;
  *) echo "usage: scripts/setup.sh demo|test" >&2; exit 64 ;;
esac
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${CI:-}" = "true" ] || [ ${#missing[@]} -gt 0 ]; then
  echo "setup ($what): installing ${missing[*]:-${PACKAGES[*]}}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${PACKAGES[@]}" >/dev/null
fi
if [ "$what" = test ] && ! python3 -c 'import kubernetes_validate' 2>/dev/null; then
  echo "setup (test): installing kubernetes-validate (PyPI)"
  python3 -m pip install -q kubernetes-validate 2>/dev/null \
    || python3 -m pip install -q --break-system-packages kubernetes-validate
fi
command -v cargo >/dev/null || { echo "setup: cargo not found; install Rust with rustup" >&2; exit 1; }
