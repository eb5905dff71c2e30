#!/bin/sh
# /init of the virtnet QEMU test guest (packed by scripts/guest-image.sh; busybox only).
#
# Kernel command line (all optional):
#   vt.name=NAME      a label, printed in the boot marker
#   vt.ip=ADDR/NN     eth0's address; without it eth0 stays down; "dhcp": eth0 up without an
#                     address (get one with the vt_dhcp command)
#   vt.role=ROLE      cmd (default): run commands read from the console, one per line
#                     ping:   vt_ping $vt.peer $vt.count, then power off
#                     iperfs: iperf3 server for one test, then power off
#                     iperfc: vt_wait $vt.peer; vt_ping; vt_iperf $vt.peer $vt.time; power off
#                     idle:   sleep $vt.time, then power off
#   vt.peer=IP  vt.count=N (pings, default 10)  vt.time=S (iperf3/idle seconds, default 5)
#   vt.ipv6=1         keep IPv6 on (SLAAC from router advertisements; see vt_slaac); default off
#
# Command mode: the host writes lines "ID COMMAND ARGS..." to the console (the serial port);
# each COMMAND (usually one of the vt_* functions below) runs in the foreground and is followed
# by "VT: end ID rc=N". Lines are not echoed.
#
# Markers: every machine-readable line starts with "VT: ", then a word, then key=value pairs:
#   VT: boot name=NAME uptime=S
#   VT: link carrier=0|1 mac=MAC uptime=S
#   VT: ready
#   VT: reach dst=IP ok=0|1 tries=N
#   VT: ping dst=IP tx=N rx=N dup=N avg_ms=F
#   VT: iperf3 dst=IP bytes=N bps=F retrans=N
#   VT: netdev rx_packets=N rx_bytes=N tx_packets=N tx_bytes=N
#   VT: slaac ip=ADDR|none router=ADDR|none
#   VT: end ID rc=N
#   VT: poweroff uptime=S

mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1
export PATH=/bin:/sbin:/usr/bin

up() { cut -d' ' -f1 /proc/uptime; }

vt_name=guest vt_ip= vt_role=cmd vt_peer= vt_count=10 vt_time=5 vt_ipv6=0
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    vt.*=*)
      key=${arg%%=*}; key=${key#vt.}; val=${arg#*=}
      case "$key" in
        name|ip|role|peer|count|time|ipv6) eval "vt_$key=\$val" ;;
        *) echo "VT: warning unknown=$key" ;;
      esac ;;
  esac
done
echo "VT: boot name=$vt_name uptime=$(up)"

# No IPv6 unless asked for: its router solicitations and MLD reports would be noise in the
# switch counters.
if [ "$vt_ipv6" != 1 ]; then
  echo 1 >/proc/sys/net/ipv6/conf/default/disable_ipv6 2>/dev/null
  echo 1 >/proc/sys/net/ipv6/conf/all/disable_ipv6 2>/dev/null
fi
# Answer pings to the broadcast address (the tests use them to prove flooding).
echo 0 >/proc/sys/net/ipv4/icmp_echo_ignore_broadcasts

for m in $(cat /etc/vt-modules); do
  insmod /lib/modules/$m.ko || echo "VT: warning insmod=$m"
done
ip link set lo up

vt_carrier() {
  echo "VT: link carrier=$(cat /sys/class/net/eth0/carrier 2>/dev/null || echo 0)" \
    "mac=$(cat /sys/class/net/eth0/address 2>/dev/null) uptime=$(up)"
}

if [ -n "$vt_ip" ]; then
  i=0
  while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 50 ]; do usleep 100000; i=$((i + 1)); done
  [ "$vt_ip" = dhcp ] || ip addr add "$vt_ip" brd + dev eth0
  ip link set eth0 up
  i=0
  while [ "$(cat /sys/class/net/eth0/carrier 2>/dev/null)" != 1 ] && [ $i -lt 100 ]; do
    usleep 100000; i=$((i + 1))
  done
  vt_carrier
fi

# vt_wait DST [TRIES]: ping once a second until DST answers.
vt_wait() {
  n=0 ok=0
  while [ $n -lt "${2:-60}" ]; do
    n=$((n + 1))
    if ping -c 1 -W 1 "$1" >/dev/null 2>&1; then ok=1; break; fi
  done
  echo "VT: reach dst=$1 ok=$ok tries=$n"
  [ $ok = 1 ]
}

# vt_ping DST [COUNT] [INTERVAL]: ping, print every reply, then the summary marker.
vt_ping() {
  { ping -c "${2:-10}" -i "${3:-0.2}" -W 2 "$1" 2>&1; echo $? >/tmp/ping.rc; } | tee /tmp/ping.out
  rc=$(cat /tmp/ping.rc)
  awk -v dst="$1" '
    /packets transmitted/ { tx = $1; rx = $4 }
    /duplicates/ { for (i = 1; i <= NF; i++) if ($i ~ /duplicates/) dup = $(i - 1) }
    /round-trip/ { split($4, t, "/"); avg = t[2] }
    END { printf "VT: ping dst=%s tx=%d rx=%d dup=%d avg_ms=%s\n", dst, tx, rx, dup, (avg == "" ? "nan" : avg) }
  ' /tmp/ping.out
  return $rc
}

# vt_iperfs: start an iperf3 server in the background.
vt_iperfs() {
  iperf3 -s -D --logfile /tmp/iperf3-server.log
}

# vt_iperf DST [SECONDS] [EXTRA...]: TCP iperf3 client, JSON summarised into one marker.
vt_iperf() {
  dst=$1 secs=${2:-5}
  shift; [ $# -gt 0 ] && shift
  n=0
  while :; do
    iperf3 -c "$dst" -t "$secs" -J "$@" >/tmp/iperf.json 2>&1 && break
    n=$((n + 1))
    if [ $n -ge 10 ]; then tail -n 5 /tmp/iperf.json; echo "VT: iperf3 dst=$dst bytes=0 bps=0 retrans=0"; return 1; fi
    sleep 1
  done
  awk -v dst="$dst" '
    /"sum_sent"/ { s = 1; r = 0 }
    /"sum_received"/ { r = 1; s = 0 }
    s && /"retransmits"/ { gsub(/[^0-9]/, "", $2); retr = $2 }
    r && /"bytes"/ && bytes == "" { gsub(/[^0-9]/, "", $2); bytes = $2 }
    r && /"bits_per_second"/ && bps == "" { gsub(/[^0-9.e+]/, "", $2); bps = $2 }
    END { printf "VT: iperf3 dst=%s bytes=%.0f bps=%.0f retrans=%d\n", dst, bytes + 0, bps + 0, retr + 0 }
  ' /tmp/iperf.json
}

# vt_dhcp [UDHCPC ARGS...]: busybox udhcpc on eth0 until one lease is bound (then exit);
# the lease is applied and reported as "VT: dhcp event=bound ip=A mask=N router=R ...".
cat >/tmp/vt-udhcpc.sh <<'EOS'
#!/bin/sh
case "$1" in
  deconfig) ip addr flush dev "$interface" ;;
  bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/$mask" brd + dev "$interface"
    echo "VT: dhcp event=$1 ip=$ip mask=$mask router=${router:-none} dns=${dns:-none}" \
      "lease=$lease mtu=${mtu:-none} server=$serverid" ;;
  nak) echo "VT: dhcp event=nak" ;;
esac
EOS
chmod +x /tmp/vt-udhcpc.sh
vt_dhcp() {
  udhcpc -i eth0 -f -q -n -t 5 -T 2 -s /tmp/vt-udhcpc.sh "$@"
}

# vt_slaac [SECONDS]: wait for a global IPv6 address on eth0 (SLAAC, duplicate address
# detection done) and a default route; print both.
vt_slaac() {
  n=0 a= r=
  while [ $n -lt "${1:-60}" ]; do
    a=$(ip -6 addr show dev eth0 | awk '/inet6/ && /scope global/ && !/tentative/ { sub(/\/.*/, "", $2); print $2; exit }')
    r=$(ip -6 route show default 2>/dev/null | awk '/^default via/ { print $3; exit }')
    [ -n "$a" ] && [ -n "$r" ] && break
    sleep 1; n=$((n + 1))
  done
  echo "VT: slaac ip=${a:-none} router=${r:-none}"
  [ -n "$a" ] && [ -n "$r" ]
}

# vt_netdev: eth0's packet counters.
vt_netdev() {
  awk '/eth0:/ { sub(/.*eth0:/, ""); print "VT: netdev rx_packets=" $2 " rx_bytes=" $1 " tx_packets=" $10 " tx_bytes=" $9 }' /proc/net/dev
}

vt_off() {
  echo "VT: poweroff uptime=$(up)"
  poweroff -f
}

case "$vt_role" in
  ping) vt_ping "$vt_peer" "$vt_count" ;;
  iperfs) iperf3 -s -1 >/dev/null 2>&1 ;;
  iperfc) vt_wait "$vt_peer" && vt_ping "$vt_peer" "$vt_count" && vt_iperf "$vt_peer" "$vt_time" ;;
  idle) sleep "$vt_time" ;;
  cmd)
    stty -echo 2>/dev/null
    echo "VT: ready"
    while read -r id cmd; do
      [ -n "$id" ] || continue
      eval "$cmd"
      echo "VT: end $id rc=$?"
    done
    ;;
  *) echo "VT: warning role=$vt_role" ;;
esac
[ -n "$vt_ip" ] && vt_netdev
vt_off
