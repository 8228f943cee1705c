#!/usr/bin/env bash
# Installs the system packages one README command needs (Debian/Ubuntu, as root), and nothing more:
#   scripts/setup.sh demo   iptables nftables iproute2 (namespaces, capture rules)
#   scripts/setup.sh test   the above, plus what the test tiers drive for real:
#                           containernetworking-plugins (the CNI chain tests), containerd + runc +
#                           busybox-static (containers run with `ctr run --cni`), systemd
#                           (systemd-analyze checks the unit `zmesh-node join` writes), dash (the ECS
#                           health check as ECS's CMD-SHELL runs it), kubernetes-client (`kubectl
#                           kustomize`), dnsutils (`dig` against the DNS proxy) and
#                           kubernetes-validate from PyPI (manifest validation).
# The Rust toolchain comes from rustup and is expected to be on PATH.
set -euo pipefail
what=${1:-test}
# Each entry is a Debian package and what shows it (or an equivalent) is already here: a command,
# a file, or `dpkg` (that very package; the static busybox, not the dynamic one, runs in a bare
# container rootfs). A machine whose kubectl comes from elsewhere (a cloud SDK) must not get
# Debian's on top of it.
case "$what" in
  demo) NEEDS=(iptables:iptables nftables:nft iproute2:ip) ;;
  test) NEEDS=(iptables:iptables nftables:nft iproute2:ip
               containernetworking-plugins:/usr/lib/cni/bridge containerd:containerd runc:runc
               busybox-static:dpkg systemd:systemd-analyze dash:dash
               kubernetes-client:kubectl dnsutils:dig) ;;
  *) echo "usage: scripts/setup.sh demo|test" >&2; exit 64 ;;
esac
missing=()
for need in "${NEEDS[@]}"; do
  pkg=${need%%:*} probe=${need#*:}
  case "$probe" in
    dpkg) dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" ;;
    /*) [ -e "$probe" ] ;;
    *) command -v "$probe" >/dev/null ;;
  esac || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup ($what): installing ${missing[*]}"
  apt-get update -qq
  # Only what is missing, nothing upgraded, no recommends (systemd's would replace /sbin/init).
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-upgrade --no-install-recommends \
    "${missing[@]}" >/dev/null
fi
if [ "$what" = test ] && ! python3 -c 'import kubernetes_validate' 2>/dev/null; then
  echo "setup (test): installing kubernetes-validate (PyPI)"
  python3 -m pip --version >/dev/null 2>&1 || {
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-upgrade python3-pip >/dev/null
  }
  python3 -m pip install -q kubernetes-validate 2>/dev/null \
    || python3 -m pip install -q --break-system-packages kubernetes-validate
fi
command -v cargo >/dev/null || { echo "setup: cargo not found; install Rust with rustup" >&2; exit 1; }
