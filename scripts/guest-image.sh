#!/bin/bash
# Build the Linux guest image for the QEMU tests (tests/qemu_*.rs): an uncompressed `vmlinux`
# (ELF with a PVH note: boots ~2.5 s faster under TCG than the bzImage) and `initrd.gz`
# (busybox-static, the virtio/virtio-net modules, iperf3 with its libraries, and our own /init
# from tests/qemu/init.sh).
#
# Usage: scripts/guest-image.sh [OUTDIR]       (default: <repo>/target/guest-image)
#
# Everything comes from Debian packages: the kernel package that `linux-image-amd64` depends on
# (downloaded with `apt-get download`, unpacked with `dpkg -x`), and the installed
# busybox-static and iperf3. Needs (apt): qemu-system-x86 busybox-static iperf3 python3 cpio
# (cpio is only a fallback; busybox has its own).
#
# Cached: OUTDIR/stamp holds a hash of this script, init.sh and the package versions. When it
# matches, nothing is done. Concurrent runs serialise on OUTDIR/.lock (flock).
# Prints the image directory on its last line of stdout.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-$ROOT/target/guest-image}
INIT=$ROOT/tests/qemu/init.sh
SELF=$ROOT/scripts/guest-image.sh
MODULES="virtio_ring virtio virtio_mmio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci \
failover net_failover virtio_net"

log() { echo "guest-image: $*" >&2; }
die() { log "error: $*"; exit 1; }

for tool in apt-cache apt-get dpkg dpkg-query busybox iperf3 sha256sum flock gzip ldd; do
  command -v "$tool" >/dev/null || die "missing tool: $tool (apt-get install busybox-static iperf3 util-linux)"
done
# The system python (pyenv shims may lack lzma).
PY=/usr/bin/python3; [ -x "$PY" ] || PY=$(command -v python3) || die "missing python3"
[ -f "$INIT" ] || die "missing $INIT"
BUSYBOX=$(command -v busybox)
# busybox-static is needed: the dynamic busybox has no libraries in the initramfs.
if ldd "$BUSYBOX" >/dev/null 2>&1; then die "$BUSYBOX is dynamic: apt-get install busybox-static"; fi

mkdir -p "$OUT"
exec 9>"$OUT/.lock"
flock 9

# The kernel package that linux-image-amd64 depends on, and its candidate version.
kpkg() { apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-/{print $2; exit}'; }
KPKG=$(kpkg)
if [ -z "$KPKG" ] && [ "$(id -u)" = 0 ]; then
  log "apt lists look empty; running apt-get update"
  apt-get update -qq >&2 || true
  KPKG=$(kpkg)
fi
[ -n "$KPKG" ] || die "cannot resolve linux-image-amd64 (run apt-get update)"
KVER=${KPKG#linux-image-}
KPKG_VER=$(apt-cache policy "$KPKG" | awk '/Candidate:/{print $2; exit}')
BB_VER=$(dpkg-query -W -f '${Version}' busybox-static)
IPERF_VER=$(dpkg-query -W -f '${Version}' iperf3)
LIBIPERF_VER=$(dpkg-query -W -f '${Version}' libiperf0 2>/dev/null || echo none)

KEY=$( { sha256sum "$SELF" "$INIT" | cut -d' ' -f1
         echo "$KPKG=$KPKG_VER busybox-static=$BB_VER iperf3=$IPERF_VER libiperf0=$LIBIPERF_VER"; } |
       sha256sum | cut -d' ' -f1)
if [ -f "$OUT/stamp" ] && [ "$(cat "$OUT/stamp")" = "$KEY" ] && [ -f "$OUT/vmlinux" ] && [ -f "$OUT/initrd.gz" ]; then
  log "up to date ($KPKG $KPKG_VER)"
  echo "$OUT"
  exit 0
fi
rm -f "$OUT/stamp"

# Kernel package: keep the .deb (by version) so that an init.sh change does not re-download it.
DEB=$OUT/cache/${KPKG}_${KPKG_VER//:/%3a}.deb
mkdir -p "$OUT/cache"
if [ ! -s "$DEB" ]; then
  rm -f "$OUT"/cache/*.deb
  log "downloading $KPKG=$KPKG_VER"
  (cd "$OUT/cache" && apt-get download -q "$KPKG=$KPKG_VER" >&2)
  found=$(ls "$OUT"/cache/"${KPKG}"_*.deb | head -n1)
  [ -n "$found" ] || die "apt-get download produced no .deb"
  [ "$found" = "$DEB" ] || mv "$found" "$DEB"
fi

WORK=$OUT/work.$$
trap 'rm -rf "$WORK"' EXIT
rm -rf "$OUT"/work.*
mkdir -p "$WORK"
dpkg -x "$DEB" "$WORK/kroot"
KD=$WORK/kroot/lib/modules/$KVER/kernel
[ -f "$WORK/kroot/boot/vmlinuz-$KVER" ] || die "no vmlinuz-$KVER in $DEB"

# Uncompressed ELF vmlinux from the bzImage's XZ payload.
"$PY" - "$WORK/kroot/boot/vmlinuz-$KVER" "$WORK/vmlinux" <<'PY'
import lzma, sys
data = open(sys.argv[1], "rb").read()
off = data.find(b"\xfd7zXZ\x00")
if off < 0:
    sys.exit("no XZ payload in the bzImage")
elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[off:])
if elf[:4] != b"\x7fELF":
    sys.exit("the XZ payload is not an ELF vmlinux")
open(sys.argv[2], "wb").write(elf)
PY

# initramfs tree.
IRD=$WORK/ird
mkdir -p "$IRD"/{bin,sbin,proc,sys,dev,tmp,run,etc,root,lib/modules,usr/bin}
cp "$BUSYBOX" "$IRD/bin/busybox"
for applet in $("$IRD/bin/busybox" --list); do
  [ "$applet" = busybox ] || ln -sf busybox "$IRD/bin/$applet"
done
for m in $MODULES; do
  f=$(find "$KD" -name "$m.ko" -print -quit)
  [ -n "$f" ] || die "module $m.ko not found in $KPKG (compressed modules are not supported)"
  cp "$f" "$IRD/lib/modules/"
done
echo "$MODULES" >"$IRD/etc/vt-modules"
cp /usr/bin/iperf3 "$IRD/usr/bin/"
for lib in $(ldd /usr/bin/iperf3 | grep -o '/[^ ]*'); do
  mkdir -p "$IRD$(dirname "$lib")"
  cp -L "$lib" "$IRD$lib"
done
# The ELF interpreter path is absolute in the binary; make sure both usual spellings resolve.
mkdir -p "$IRD/lib64"
[ -e "$IRD/lib64/ld-linux-x86-64.so.2" ] || cp -L /lib64/ld-linux-x86-64.so.2 "$IRD/lib64/"
echo "root:x:0:0:root:/root:/bin/sh" >"$IRD/etc/passwd"
echo "127.0.0.1 localhost" >"$IRD/etc/hosts"
install -m755 "$INIT" "$IRD/init"
(cd "$IRD" && find . | "$IRD/bin/busybox" cpio -o -H newc 2>/dev/null | gzip -1 >"$WORK/initrd.gz")

mv -f "$WORK/vmlinux" "$OUT/vmlinux"
mv -f "$WORK/initrd.gz" "$OUT/initrd.gz"
cat >"$OUT/manifest" <<EOF
kernel_package=$KPKG
kernel_version=$KPKG_VER
kernel_release=$KVER
busybox_static=$BB_VER
iperf3=$IPERF_VER
modules=$MODULES
EOF
echo "$KEY" >"$OUT/stamp"
log "built $OUT ($KPKG $KPKG_VER, initrd $(du -k "$OUT/initrd.gz" | cut -f1) KiB)"
echo "$OUT"
