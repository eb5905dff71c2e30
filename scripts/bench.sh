#!/usr/bin/env bash
# Frame rates, virtnet vs DPDK vhost, side by side (issue 4).
#
# Builds virtnetd and virtnet-bench in release mode and runs the matrix with the tool's
# defaults: frames 64, 512, 1500 B and 64 KiB GSO; 1 and 2 queue pairs; frontends
# virtnet_guest and DPDK virtio_user; 3 interleaved virtnet/DPDK pairs × (1 s warm-up + 3 s)
# per point; backend on CPU 1, frontends on CPU 0. Writes target/bench/results.json and
# target/bench/plot.svg and prints the table. Extra arguments go to virtnet-bench, e.g.
#   scripts/bench.sh --quick
#   scripts/bench.sh --sizes 64,1500 --qps 1 --frontends guest --pairs 5
#
# Needs dpdk-testpmd with the vhost and virtio_user PMDs (Debian: apt-get install
# dpdk-dev librte-net-vhost23 librte-net-virtio23). Only unix sockets are used; every
# process it starts is stopped before it exits. Ratios within one run are the figures:
# this machine is noisy and bimodal, never compare absolute numbers across runs.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v dpdk-testpmd >/dev/null 2>&1; then
    echo "bench.sh: dpdk-testpmd not found (apt-get install dpdk-dev librte-net-vhost23 librte-net-virtio23)" >&2
    exit 1
fi

target="${CARGO_TARGET_DIR:-target}"
cargo build --release -p virtnet --bin virtnetd
cargo build --release -p virtnet-bench --bin virtnet-bench

mkdir -p target/bench
exec "$target/release/virtnet-bench" --virtnetd "$target/release/virtnetd" --out target/bench "$@"
