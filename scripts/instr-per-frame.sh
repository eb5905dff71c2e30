#!/usr/bin/env bash
# Instructions per forwarded frame: virtnetd vs DPDK's vhost backend under callgrind, both
# driven by the same native frontend (issue 4).
#
# Wall-clock frame rates on this machine swing with the host (see scripts/bench.sh); the
# number of instructions a backend spends per frame does not. For each frame size and each
# backend this script:
#   - starts the backend (virtnetd with an internal network of two ports, or dpdk-testpmd
#     with two net_vhost ports in io forwarding) under valgrind --tool=callgrind, on CPU 1,
#     with instrumentation off;
#   - starts the frontend natively on CPU 0: one dpdk-testpmd with two virtio_user ports in
#     mac forwarding after --tx-first (the bench's default virtio_user load), so the backend,
#     slowed ~50x by callgrind, always has full rings;
#   - turns instrumentation on for a window (callgrind_control -i on/off), and counts the
#     frames the frontend received in that window from its timestamped per-second counters;
#   - adds up the instructions of the backend's busy threads (virtnetd: the two vring
#     workers; testpmd: the forwarding lcore) and divides by those frames.
# The backend's work per frame is TX of one port + switch + RX of the other; the frontend's
# own work is not counted.
#
#   scripts/instr-per-frame.sh              # 64 and 1500 B, 15 s windows, 3 runs each
#   scripts/instr-per-frame.sh 64 10 5      # sizes (comma-separated), window seconds, runs
#
# The count is steady but not exact from run to run (how full the rings are when the backend
# looks decides how many polls come back empty, and idle polls count too): each backend runs
# `runs` times, alternating, and the medians are compared. About 45 s per run.
#
# Needs valgrind, perl and dpdk-testpmd with the vhost and virtio_user PMDs. Only unix
# sockets are used; every process it starts is stopped before it exits.
set -euo pipefail
cd "$(dirname "$0")/.."

sizes="${1:-64,1500}"
secs="${2:-15}"
runs="${3:-3}"
for t in valgrind callgrind_control perl dpdk-testpmd taskset; do
    command -v "$t" >/dev/null 2>&1 || {
        echo "instr-per-frame.sh: $t not found (apt-get install valgrind perl dpdk-dev librte-net-vhost23 librte-net-virtio23)" >&2
        exit 1
    }
done

target="${CARGO_TARGET_DIR:-target}"
cargo build --release -p virtnet --bin virtnetd >&2
virtnetd="$(pwd)/$target/release/virtnetd"

work="$(mktemp -d /tmp/virtnet-instr.XXXXXX)"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

seq_no=0
now() { perl -MTime::HiRes=time -e 'printf "%.3f", time'; }

# Exclusive Ir of one callgrind output file. After instrumentation toggles the file's
# "summary:" line is 0, so the cost lines are added up (the inclusive cost line after each
# "calls=" line is skipped).
ir_of() {
    awk '/^calls=/ { skip = 1; next }
         /^[0-9+*-]/ { if (skip) { skip = 0; next } s += $2; next }
         { skip = 0 }
         END { printf "%.0f\n", s }' "$1"
}

# measure KIND LEN: prints "instructions frames threads"
measure() {
    local kind=$1 len=$2
    seq_no=$((seq_no + 1))
    local d="$work/$kind-$len-$seq_no"
    mkdir -p "$d"
    local vg=(valgrind --tool=callgrind --separate-threads=yes --instr-atstart=no
        "--callgrind-out-file=$d/cg.out")
    local prefix="vnin$$${kind:0:1}$len"
    # testpmd quits when its stdin reaches end of file: give it a FIFO this script holds open.
    mkfifo "$d/stdin"
    exec 3<> "$d/stdin"
    if [ "$kind" = virtnet ]; then
        cat > "$d/virtnetd.toml" <<EOF
control_socket = "$d/control.sock"
log_level = "warn"

[[network]]
name = "instr"
mode = "internal"

[[network.port]]
socket = "$d/p0.sock"

[[network.port]]
socket = "$d/p1.sock"
EOF
        taskset -c 1 "${vg[@]}" "$virtnetd" --config "$d/virtnetd.toml" \
            > "$d/backend.log" 2>&1 < /dev/null &
    else
        taskset -c 1 "${vg[@]}" dpdk-testpmd --lcores 0@1,1@1 --no-huge -m 1024 \
            --no-pci --file-prefix "${prefix}b" --log-level lib.eal:error \
            --vdev "net_vhost0,iface=$d/p0.sock,queues=1,client=0" \
            --vdev "net_vhost1,iface=$d/p1.sock,queues=1,client=0" \
            -- --forward-mode=io --auto-start --stats-period 5 --nb-cores=1 \
            --total-num-mbufs=32768 --rxq=1 --txq=1 > "$d/backend.log" 2>&1 < "$d/stdin" &
    fi
    # taskset and valgrind exec, so this is the backend's pid.
    local bpid=$!
    pids+=("$bpid")
    for _ in $(seq 120); do
        [ -S "$d/p0.sock" ] && [ -S "$d/p1.sock" ] && break
        sleep 1
    done
    sleep 2
    # The frontend: its per-second counters, timestamped as they are printed.
    (timeout -k 10 -s INT $((secs + 8)) taskset -c 0 stdbuf -oL dpdk-testpmd \
        --lcores 0@0,1@0 --no-huge -m 1024 --no-pci --file-prefix "${prefix}f" --log-level lib.eal:error \
        --vdev "net_virtio_user0,path=$d/p0.sock,mac=02:00:00:00:00:01,queues=1,queue_size=256" \
        --vdev "net_virtio_user1,path=$d/p1.sock,mac=02:00:00:00:00:02,queues=1,queue_size=256" \
        -- --forward-mode=mac --tx-first --burst=256 --txpkts="$len" \
        --eth-peer=0,02:00:00:00:00:02 --eth-peer=1,02:00:00:00:00:01 \
        --auto-start --stats-period 1 --nb-cores=1 --total-num-mbufs=32768 --rxq=1 --txq=1 \
        < "$d/stdin" 2>&1 | perl -MTime::HiRes=time -ne '$|=1; printf "%.3f %s", time, $_' > "$d/frontend.log") &
    local fpid=$!
    sleep 4
    local t_on t_off
    t_on=$(now)
    callgrind_control -i on "$bpid" > /dev/null
    sleep "$secs"
    callgrind_control -i off "$bpid" > /dev/null
    t_off=$(now)
    wait "$fpid" || true
    kill -INT "$bpid" 2>/dev/null || true
    sleep 3
    kill -TERM "$bpid" 2>/dev/null || true
    for _ in $(seq 150); do
        kill -0 "$bpid" 2>/dev/null || break
        sleep 0.2
    done
    exec 3>&-
    # Frames both frontend ports received between t_on and t_off, interpolated between the
    # per-second cumulative counters around each instant.
    local frames
    frames=$(awk -v on="$t_on" -v off="$t_off" '
        /NIC statistics for port 0/ { p = 0 } /NIC statistics for port 1/ { p = 1 }
        /RX-packets:/ && p >= 0 { c[p] = $3; if (p == 1) { n++; t[n] = $1; s[n] = c[0] + c[1] } p = -1 }
        function at(x,   i) {
            for (i = 2; i <= n; i++) if (t[i] >= x) return s[i-1] + (s[i] - s[i-1]) * (x - t[i-1]) / (t[i] - t[i-1])
            return s[n]
        }
        END { printf "%.0f", at(off) - at(on) }' "$d/frontend.log")
    # The backend's busy threads: every thread with more than 1 % of the largest count.
    local f
    for f in "$d"/cg.out-*; do ir_of "$f"; done | sort -rn | awk -v frames="$frames" '
        NR == 1 { max = $1 }
        $1 > max / 100 { total += $1; threads++ }
        END { printf "%.0f %s %d\n", total, frames, threads }'
}

median() { sort -n | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else printf "%.1f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

printf '%-6s  %-3s  %-8s  %14s  %12s  %7s  %12s\n' size run backend instructions frames threads "instr/frame"
for len in ${sizes//,/ }; do
    : > "$work/virtnet.per"
    : > "$work/dpdk.per"
    for run in $(seq "$runs"); do
        # A B, then B A: drift in the machine falls on both backends alike.
        order="virtnet dpdk"
        [ $((run % 2)) -eq 0 ] && order="dpdk virtnet"
        for kind in $order; do
            measure "$kind" "$len" > "$work/result"
            read -r ir frames threads < "$work/result"
            if [ "${frames:-0}" -le 0 ]; then
                echo "instr-per-frame.sh: no frames counted for $kind at $len B (logs in $work)" >&2
                exit 1
            fi
            per=$(awk -v a="$ir" -v b="$frames" 'BEGIN { printf "%.1f", a / b }')
            echo "$per" >> "$work/$kind.per"
            printf '%-6s  %-3s  %-8s  %14s  %12s  %7s  %12s\n' "$len" "$run" "$kind" "$ir" "$frames" "$threads" "$per"
        done
    done
    v=$(median < "$work/virtnet.per")
    d=$(median < "$work/dpdk.per")
    awk -v v="$v" -v d="$d" -v l="$len" -v r="$runs" 'BEGIN {
        printf "%-6s  medians over %d runs: virtnet %.1f, DPDK %.1f instructions per frame; virtnet / DPDK %.2f (below 1: virtnet does less work)\n", l, r, v, d, v / d }'
done
rm -rf "$work"
