#!/usr/bin/env bash
# The whole test suite, from a fresh Debian 12 machine: installs the real peers the tests use
# (QEMU, DPDK testpmd with its vhost/virtio_user PMDs, busybox, iperf3), then runs the format
# and lint gates, every unit and integration test (including the QEMU guests), and a short fuzz
# smoke run. Run as root (apt-get, network namespaces). Usage: scripts/test.sh [--no-fuzz]
set -euo pipefail
cd "$(dirname "$0")/.."

FUZZ=1
for a in "$@"; do
  case "$a" in
    --no-fuzz) FUZZ=0 ;;
    *) echo "usage: scripts/test.sh [--no-fuzz]" >&2; exit 2 ;;
  esac
done

PKGS=(qemu-system-x86 busybox-static iperf3 python3 cpio gzip xz-utils iproute2
      dpdk-dev librte-net-vhost23 librte-net-virtio23 dnsmasq-base tcpdump passt g++)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "==> installing test peers: ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "==> cargo test"
cargo test --workspace --locked -- --test-threads=2
if [ "$FUZZ" = 1 ] && [ -f fuzz/smoke.sh ]; then
  echo "==> fuzz smoke"
  bash fuzz/smoke.sh "${FUZZ_SECONDS:-20}"
fi
echo "==> all tests passed"
