#!/usr/bin/env bash
# Boots a throw-away Debian 12 kernel under QEMU (TCG: no KVM needed), loads the in-kernel
# soft-RoCE driver (rdma_rxe) on a dummy netdev, and runs host-built test commands inside it
# against the real libibverbs / librdmacm / rxe provider and kernel uverbs / rdma_cm.
#
#   scripts/rxe-vm/rxe-vm.sh [--workdir DIR] [--timeout SEC] [--cmd-timeout SEC]
#                            --bin FILE [--bin FILE...] [--extra FILE...] -- 'CMD' ['CMD'...]
#
#   --bin/--extra  files copied into the guest's /bin with every shared library ldd lists
#                  (build-tree libmyelin_*.so and libgtest included); --extra is the same, for
#                  helpers that are not run directly.
#   CMD            a shell command run in the guest, e.g. 'verbs_qp_test' or
#                  'MYELIN_VERBS_CM=rdmacm myelin_transport_conformance_test'. All run, in order.
#
# Kernel: the package linux-image-amd64 depends on, fetched with apt-get download once and kept
# in $MYELIN_RXE_CACHE (default ~/.cache/myelin/rxe-vm); build/rxe-vm-cache is used when present.
# UCX: when a binary links libucs, UCX's transport modules (libuct_ib etc., which ldd does not
# list) are copied too, so UCX_TLS=rc_verbs,ud_verbs,self runs over rxe0 in the guest.
# A gtest that reports [  SKIPPED ] inside the guest fails its command: the guest exists to
# provide the device, so a skip there means the harness or the code under test is broken.
# Exit status: 0 all commands passed; 1 a command failed or the guest misbehaved (the reason is
# printed last); 77 skipped — QEMU or the kernel package is unavailable and MYELIN_RXE_REQUIRE is
# not 1 (scripts/test.sh sets it, so in CI a missing piece is a failure).
set -euo pipefail

die() { echo "rxe-vm: FAILED: $*" >&2; exit 1; }
skip() {
  if [ "${MYELIN_RXE_REQUIRE:-0}" = 1 ]; then die "$* (MYELIN_RXE_REQUIRE=1)"; fi
  echo "rxe-vm: SKIPPED: $*" >&2; exit 77
}

workdir=""; timeout_s=1200; cmd_timeout=900; bins=(); cmds=()
while [ $# -gt 0 ]; do
  case "$1" in
    --workdir) workdir=$2; shift 2 ;;
    --timeout) timeout_s=$2; shift 2 ;;
    --cmd-timeout) cmd_timeout=$2; shift 2 ;;
    --bin|--extra) bins+=("$2"); shift 2 ;;
    --) shift; cmds=("$@"); break ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
[ ${#cmds[@]} -gt 0 ] || die "no command to run (give them after --)"
[ ${#bins[@]} -gt 0 ] || die "no --bin given"
for b in "${bins[@]}"; do [ -x "$b" ] || die "not an executable: $b"; done

command -v qemu-system-x86_64 >/dev/null || skip "qemu-system-x86_64 not installed (scripts/setup.sh --with vm)"
for tool in busybox cpio gzip ldd; do command -v $tool >/dev/null || skip "$tool not installed (scripts/setup.sh --with vm)"; done
[ -x /bin/busybox ] && file_busybox=/bin/busybox || file_busybox=$(command -v busybox)
provider=/usr/lib/x86_64-linux-gnu/libibverbs/librxe-rdmav34.so
[ -f "$provider" ] || skip "the rxe provider ($provider) is missing (ibverbs-providers)"
rdma_tool=$(command -v rdma || true)
[ -n "$rdma_tool" ] || skip "the rdma tool is missing (iproute2)"

repo=$(cd "$(dirname "$0")/../.." && pwd)
workdir=${workdir:-$repo/build/rxe-vm}
mkdir -p "$workdir"; workdir=$(cd "$workdir" && pwd)

# ---- 1. kernel (cached) -----------------------------------------------------------------------
cache=${MYELIN_RXE_CACHE:-}
if [ -z "$cache" ]; then
  if [ -d "$repo/build/rxe-vm-cache" ]; then cache=$repo/build/rxe-vm-cache; else cache=$HOME/.cache/myelin/rxe-vm; fi
fi
mkdir -p "$cache"
vmlinuz=$(ls "$cache"/kernel/boot/vmlinuz-* 2>/dev/null | head -1 || true)
if [ -z "$vmlinuz" ]; then
  pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
  [ -n "$pkg" ] || skip "cannot tell which kernel package linux-image-amd64 needs (apt-cache)"
  echo "rxe-vm: downloading $pkg into $cache (once)"
  deb=$(ls "$cache/${pkg}"_*.deb 2>/dev/null | head -1 || true)
  if [ -z "$deb" ]; then
    (cd "$cache" && timeout 600 apt-get download "$pkg" >/dev/null 2>&1) || skip "apt-get download $pkg failed (offline?)"
    deb=$(ls "$cache/${pkg}"_*.deb | head -1)
  fi
  rm -rf "$cache/kernel.tmp" && dpkg-deb -x "$deb" "$cache/kernel.tmp" && mv "$cache/kernel.tmp" "$cache/kernel" ||
    die "unpacking $deb failed"
  rm -f "$deb"
  vmlinuz=$(ls "$cache"/kernel/boot/vmlinuz-* | head -1)
fi
kver=${vmlinuz##*/vmlinuz-}
kmod=$cache/kernel/lib/modules/$kver/kernel

# ---- 2. initramfs -----------------------------------------------------------------------------
root=$workdir/root
rm -rf "$root"
mkdir -p "$root"/{bin,proc,sys,dev,tmp,lib/modules,etc/libibverbs.d,lib64}
cp "$file_busybox" "$root/bin/busybox"
for a in sh mount insmod ip cat sleep poweroff mkdir dmesg tail timeout env grep tee; do
  ln -s busybox "$root/bin/$a"
done
modules="crypto/crc32_generic net/ipv4/udp_tunnel net/ipv6/ip6_udp_tunnel
 drivers/infiniband/core/ib_core drivers/infiniband/core/ib_uverbs drivers/infiniband/sw/rxe/rdma_rxe
 fs/configfs/configfs drivers/infiniband/core/iw_cm drivers/infiniband/core/ib_cm
 drivers/infiniband/core/rdma_cm drivers/infiniband/core/rdma_ucm drivers/net/dummy"
order=""
for m in $modules; do
  f=$(ls "$kmod/$m".ko* 2>/dev/null | head -1 || true)
  [ -n "$f" ] || { [ "$m" = fs/configfs/configfs ] && continue; die "kernel $kver lacks module $m"; }
  case "$f" in
    *.ko.xz) xz -dc "$f" > "$root/lib/modules/$(basename "${f%.xz}")" ;;
    *.ko.zst) zstd -qdc "$f" > "$root/lib/modules/$(basename "${f%.zst}")" ;;
    *) cp "$f" "$root/lib/modules/" ;;
  esac
  order="$order $(basename "${f%%.ko*}")"
done
libs() { ldd "$1" 2>/dev/null | awk '/=> \//{print $3} /^\t\/lib64/{print $1}'; }
all=("${bins[@]}" "$rdma_tool")
for b in "${all[@]}"; do
  if ldd "$b" 2>/dev/null | grep -q "not found"; then die "$b: a shared library is not found: $(ldd "$b" | grep 'not found' | head -1)"; fi
  cp "$b" "$root/bin/"
done
# UCX loads its transports (libuct_ib.so.0, ...) at run time from <dir of libucs>/ucx.
ucx_modules=()
libucs=$( (for b in "${all[@]}"; do libs "$b"; done) | grep '/libucs\.so' | head -1 || true)
if [ -n "$libucs" ]; then
  ucx_dir=$(dirname "$libucs")/ucx
  [ -d "$ucx_dir" ] || die "$libucs is used but its module directory $ucx_dir is missing"
  for m in "$ucx_dir"/lib*.so.0; do [ -e "$m" ] && ucx_modules+=("$m"); done
  mkdir -p "$root$ucx_dir"
  for m in "${ucx_modules[@]}"; do cp -L "$m" "$root$m"; done
fi
for l in $( (for b in "${all[@]}" "$provider" "${ucx_modules[@]}"; do libs "$b"; done
            ls /lib/x86_64-linux-gnu/libgcc_s.so.1) | sort -u); do
  case "$l" in
    /lib/*|/lib64/*|/usr/*) mkdir -p "$root$(dirname "$l")"; cp -L "$l" "$root$l" ;;
    # The project's own libraries live in a build tree, which may sit under /tmp: the guest mounts
    # a tmpfs there, so they go to /lib/myelin, which LD_LIBRARY_PATH names (before RUNPATH).
    *) mkdir -p "$root/lib/myelin"; cp -L "$l" "$root/lib/myelin/" ;;
  esac
done
cp -L /lib64/ld-linux-x86-64.so.2 "$root/lib64/"
mkdir -p "$root$(dirname "$provider")"; cp "$provider" "$root$provider"
cp /etc/libibverbs.d/rxe.driver "$root/etc/libibverbs.d/"

{
  echo '#!/bin/sh'
  echo 'export PATH=/bin HOME=/tmp GTEST_COLOR=no LD_LIBRARY_PATH=/lib/myelin'
  echo 'mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev'
  echo 'mount -t tmpfs tmp /tmp; mkdir -p /dev/shm; mount -t tmpfs shm /dev/shm'
  echo "for m in $order; do insmod /lib/modules/\$m.ko || echo \"RXEVM: insmod \$m failed\"; done"
  echo 'ip link set lo up; ip link add dummy0 type dummy 2>/dev/null; ip link set dummy0 up'
  echo 'ip addr add 10.99.0.1/24 dev dummy0'
  echo 'if ! rdma link add rxe0 type rxe netdev dummy0; then echo "RXEVM: rdma link add failed"; dmesg | tail -20; echo "VMTEST-RC=3"; poweroff -f; fi'
  echo 'rc=0'
  i=0
  for c in "${cmds[@]}"; do
    i=$((i+1))
    q=${c//\'/\'\\\'\'}
    echo "echo '=== RXEVM[$i] $q'"
    echo "{ timeout $cmd_timeout sh -c '$q' 2>&1; echo \$? > /tmp/rc.$i; } | tee /tmp/out.$i; r=\$(cat /tmp/rc.$i)"
    echo "if [ \$r -eq 0 ] && grep -q '^\\[  SKIPPED \\]' /tmp/out.$i; then echo 'RXEVM: a test skipped inside the guest: counted as a failure'; r=99; fi"
    echo "echo \"=== RXEVM[$i] rc=\$r\"; [ \$rc -eq 0 ] && rc=\$r"
  done
  echo 'echo "VMTEST-RC=$rc"'
  echo 'poweroff -f'
} > "$root/init"
chmod +x "$root/init"
(cd "$root" && find . | cpio -o -H newc 2>/dev/null | gzip -1) > "$workdir/initrd.gz"

# ---- 3. boot ----------------------------------------------------------------------------------
# No NIC at all (-nic none): rxe loops back over dummy0 inside the guest.
# no_timer_check: under TCG on a loaded host the kernel's IO-APIC timer probe can misfire and
# panic; a boot that panics before running anything is retried once.
for attempt in 1 2; do
  echo "rxe-vm: booting $kver with ${#cmds[@]} command(s), timeout ${timeout_s}s (attempt $attempt)"
  set +e
  timeout --kill-after=10 "$timeout_s" qemu-system-x86_64 -accel tcg,thread=multi -cpu max -m 2048 \
    -smp 2 -nographic -no-reboot -nic none -kernel "$vmlinuz" -initrd "$workdir/initrd.gz" \
    -append "console=ttyS0 quiet panic=-1 no_timer_check" </dev/null | tee "$workdir/console.log"
  qrc=${PIPESTATUS[0]}
  set -e
  if grep -aq "Kernel panic" "$workdir/console.log" && ! grep -aq "=== RXEVM" "$workdir/console.log"; then
    echo "rxe-vm: the guest kernel panicked while booting; retrying" >&2
    continue
  fi
  break
done
[ "$qrc" = 124 ] || [ "$qrc" = 137 ] && die "the guest did not finish within ${timeout_s}s (see $workdir/console.log)"
rc=$(sed -n 's/.*VMTEST-RC=\([0-9]*\).*/\1/p' "$workdir/console.log" | tail -1)
[ -n "$rc" ] || die "the guest reported no result (qemu exit $qrc; see $workdir/console.log)"
echo "rxe-vm: per-command results:"
grep -a '=== RXEVM\[[0-9]*\] ' "$workdir/console.log" | tr -d '\r' | sed 's/^.*=== /  /'
[ "$rc" = 0 ] || die "a command failed in the guest (first failing status $rc)"
echo "rxe-vm: all ${#cmds[@]} command(s) passed"
