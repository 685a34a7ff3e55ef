#!/bin/bash
# guest.sh [--veth] CMD [ARGS...]
#
# Runs CMD inside a QEMU guest (TCG) that has real soft-RoCE (rdma_rxe) and
# returns CMD's exit status. The host has no InfiniBand stack at all, so this
# is the only place the verbs backend meets a real verbs provider.
#
# The guest boots Debian's own kernel (fetched once with `apt-get download`
# into $ZIPWIRE_SOFTROCE_CACHE, default ${XDG_CACHE_HOME:-$HOME/.cache}/zipwire-softroce)
# and mounts the host's root filesystem read-only over virtio-9p with a tmpfs
# overlay, so host-built binaries run unchanged at the same paths. CMD runs in
# the caller's working directory.
#
# Devices in the guest:
#   rxe0  on dummy0 (10.11.0.1/24); loopback within the device.
#   --veth: also rxe1 on veth0 (10.12.0.1) and rxe2 on veth1 (10.12.0.2), with
#           policy routing so traffic between them crosses the veth pair
#           (without it the kernel would short-cut 10.12.0.2 -> 10.12.0.1 via lo).
#
# Environment passed into the guest: every ZIPWIRE_*, GTEST_* and UCX_*
# variable. Tunables: SOFTROCE_TIMEOUT (s, default 300), SOFTROCE_SMP (2),
# SOFTROCE_QEMU (the qemu-system-x86_64 binary), SOFTROCE_BOOT_TIMEOUT (s until
# userspace, default 120; one retry),
# SOFTROCE_MEM (2G), SOFTROCE_RW_DIR (a host directory shared read-write at
# the same path, e.g. for result files).
#
# Exit 77 (ctest SKIP_RETURN_CODE) with one line on stderr when the guest
# cannot be started at all: no qemu/busybox/depmod, or the kernel package
# cannot be downloaded. Exit 125 when the guest died without reporting.
set -euo pipefail

SELF=$(readlink -f "${BASH_SOURCE[0]}")
skip() { echo "softroce: SKIPPED: $*" >&2; exit 77; }

VETH=0
if [ "${1:-}" = --veth ]; then VETH=1; shift; fi
[ $# -gt 0 ] || { echo "usage: $0 [--veth] CMD [ARGS...]" >&2; exit 2; }

CACHE=${ZIPWIRE_SOFTROCE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/zipwire-softroce}
TIMEOUT=${SOFTROCE_TIMEOUT:-300}
SMP=${SOFTROCE_SMP:-2}
MEM=${SOFTROCE_MEM:-2G}

QEMU=${SOFTROCE_QEMU:-$(command -v qemu-system-x86_64 || true)}
[ -n "$QEMU" ] && [ -x "$QEMU" ] ||
  skip "qemu-system-x86_64 not found (scripts/install-deps.sh installs qemu-system-x86)"
BUSYBOX=$(command -v busybox || true)
[ -n "$BUSYBOX" ] || skip "busybox not found (scripts/install-deps.sh installs it)"
for tool in depmod modprobe xz dpkg apt-get; do
  PATH=$PATH:/usr/sbin:/sbin command -v $tool >/dev/null || skip "$tool not found"
done
export PATH=$PATH:/usr/sbin:/sbin

CACHE_VERSION=2  # bump when the initrd recipe changes

# --- one-time kernel + initrd build, serialised across parallel ctest runs ---
build_cache() {
  local tmp="$CACHE.tmp.$$"
  rm -rf "$tmp"
  mkdir -p "$tmp/ird"/{bin,dev,proc,sys,mods}
  local pkg
  pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-/{print $2; exit}')
  [ -n "$pkg" ] || { rm -rf "$tmp"; skip "no linux-image package known to apt (apt-get update?)"; }
  if ! (cd "$tmp" && apt-get download "$pkg" >"$tmp/download.log" 2>&1); then
    local why; why=$(tail -1 "$tmp/download.log")
    rm -rf "$tmp"; skip "cannot download kernel package $pkg: $why"
  fi
  dpkg -x "$tmp/$pkg"_*.deb "$tmp/k" && rm "$tmp/$pkg"_*.deb
  local kver; kver=$(ls "$tmp/k/lib/modules")
  depmod -b "$tmp/k" "$kver"
  echo "$kver" >"$tmp/kver"
  # An uncompressed vmlinux boots via PVH and saves the in-guest XZ
  # decompression, which costs seconds under TCG.
  local off
  off=$(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "$tmp"/k/boot/vmlinuz-* | head -1 | cut -d: -f1 || true)
  if [ -n "$off" ]; then tail -c +$((off + 1)) "$tmp"/k/boot/vmlinuz-* | xz -dcq >"$tmp/vmlinux" 2>/dev/null || true; fi
  if [ "$(head -c4 "$tmp/vmlinux" 2>/dev/null | tail -c3)" != ELF ]; then cp "$tmp"/k/boot/vmlinuz-* "$tmp/vmlinux"; fi
  cp "$BUSYBOX" "$tmp/ird/bin/busybox"
  # Debian's busybox is dynamically linked (busybox-static is not): carry its
  # loader and libraries into the initrd at their own paths.
  local lib
  for lib in $(ldd "$BUSYBOX" 2>/dev/null | grep -oE '/[^ ]+' || true); do
    mkdir -p "$tmp/ird$(dirname "$lib")"; cp -L "$lib" "$tmp/ird$lib"
  done
  for m in virtio_pci 9pnet_virtio 9p overlay; do modprobe -d "$tmp/k" -S "$kver" --show-depends $m; done |
    awk '$1=="insmod" && !seen[$2]++ {print $2}' | while read -r f; do
      cp "$f" "$tmp/ird/mods/"; basename "$f"
    done >"$tmp/ird/modlist"
  # Stage 1 (busybox): mount the host root read-only under a tmpfs overlay,
  # the kernel's modules, and the per-run exchange folder, then switch_root.
  cat >"$tmp/ird/init" <<'EOF'
#!/bin/busybox sh
B=/bin/busybox; O=trans=virtio,version=9p2000.L,msize=262144
$B mount -t proc proc /proc; $B mount -t sysfs sys /sys; $B mount -t devtmpfs dev /dev
for m in $($B cat /modlist); do $B insmod /mods/$m; done
$B mkdir -p /lower /upper /newroot
$B mount -t 9p -o $O,ro,cache=loose hostroot /lower
$B mount -t tmpfs -o size=50% tmpfs /upper; $B mkdir /upper/u /upper/w
$B mount -t overlay -o lowerdir=/lower,upperdir=/upper/u,workdir=/upper/w overlay /newroot
$B mkdir -p /newroot/lib/modules /newroot/mnt/zwx
$B mount -t 9p -o $O,ro,cache=loose kmods /newroot/lib/modules
$B mount -t 9p -o $O zwx /newroot/mnt/zwx
for d in proc sys dev; do $B mount --move /$d /newroot/$d; done
exec $B switch_root /newroot /bin/bash /mnt/zwx/init2
EOF
  chmod +x "$tmp/ird/init"
  (cd "$tmp/ird" && find . | "$BUSYBOX" cpio -o -H newc 2>/dev/null) >"$tmp/initrd.cpio"
  echo "$CACHE_VERSION" >"$tmp/version"
  rm -rf "$CACHE"
  mv "$tmp" "$CACHE"
}

mkdir -p "$(dirname "$CACHE")"
exec 9>"$CACHE.lock"
flock 9
if [ ! -s "$CACHE/initrd.cpio" ] || [ ! -s "$CACHE/vmlinux" ] ||
  [ "$(cat "$CACHE/version" 2>/dev/null)" != "$CACHE_VERSION" ]; then
  echo "softroce: first run, fetching the kernel into $CACHE" >&2
  build_cache
fi
flock -u 9

# --- per-run exchange folder: command, environment, exit status ---
X=$(mktemp -d /tmp/zipwire-softroce.XXXXXX)
trap 'rm -rf "$X"' EXIT
{
  while IFS= read -r name; do printf 'export %s=%q\n' "$name" "${!name}"; done \
    < <(compgen -e | grep -E '^(ZIPWIRE_|GTEST_|UCX_)' || true)
  printf 'cd %q 2>/dev/null || cd /\n' "$PWD"
  printf '%q ' "$@"; echo
} >"$X/cmd"
RW=()
if [ -n "${SOFTROCE_RW_DIR:-}" ]; then
  RW_DIR=$(readlink -f "$SOFTROCE_RW_DIR")
  RW=(-virtfs "local,path=$RW_DIR,mount_tag=zwrw,security_model=none")
  # mkdir: the guest's /tmp is a fresh tmpfs, so a directory under /tmp needs its mount point.
  printf 'mkdir -p %q && mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 zwrw %q\n' \
    "$RW_DIR" "$RW_DIR" >"$X/pre"
fi
echo "$VETH" >"$X/veth"

# Stage 2 (the host's bash): devices, then the command; rc goes back via 9p.
cat >"$X/init2" <<'EOF'
: >/mnt/zwx/started
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TERM=dumb
mkdir -p /dev/pts /dev/shm; mount -t devpts devpts /dev/pts; mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run; mount -t tmpfs tmpfs /tmp
[ -f /mnt/zwx/pre ] && . /mnt/zwx/pre
stty -F /dev/console -onlcr 2>/dev/null
ulimit -l unlimited
ip link set lo up
ok=1
modprobe -a rdma_rxe rdma_ucm veth || ok=0
# Without modprobe.d options, loading dummy creates dummy0 itself.
modprobe dummy numdummies=0 || ok=0
{ ip link show dummy0 >/dev/null 2>&1 || ip link add dummy0 type dummy; } &&
  ip addr add 10.11.0.1/24 dev dummy0 && ip link set dummy0 up &&
  rdma link add rxe0 type rxe netdev dummy0 || ok=0
if [ "$(cat /mnt/zwx/veth)" = 1 ]; then
  ip link add veth0 type veth peer name veth1 &&
    ip addr add 10.12.0.1/24 dev veth0 && ip addr add 10.12.0.2/24 dev veth1 &&
    ip link set veth0 up && ip link set veth1 up &&
    rdma link add rxe1 type rxe netdev veth0 && rdma link add rxe2 type rxe netdev veth1 || ok=0
  # Both addresses are local, so the kernel would deliver via lo; route each
  # direction out of its own veth end and accept "local" sources on arrival.
  for k in all veth0 veth1; do
    sysctl -qw net.ipv4.conf.$k.accept_local=1 net.ipv4.conf.$k.rp_filter=0
  done
  ip rule add pref 10 to 10.12.0.2 iif lo lookup 100 && ip route add 10.12.0.2 dev veth0 src 10.12.0.1 table 100 &&
    ip rule add pref 11 to 10.12.0.1 iif lo lookup 101 && ip route add 10.12.0.1 dev veth1 src 10.12.0.2 table 101 &&
    ip rule del pref 0 lookup local && ip rule add pref 1000 lookup local || ok=0
fi
if [ $ok = 1 ]; then
  echo "softroce: guest up at $(cut -d' ' -f1 /proc/uptime)s: $(rdma link show | awk '{print $2}' | tr '\n' ' ')"
  bash /mnt/zwx/cmd </dev/null >/dev/console 2>&1; echo $? >/mnt/zwx/rc
else
  echo "softroce: device setup FAILED in the guest"; rdma link show; echo 125 >/mnt/zwx/rc
fi
sync
echo o >/proc/sysrq-trigger; sleep 10
EOF

BIOS=()
[ -e /usr/share/qemu/qboot.rom ] && BIOS=(-bios /usr/share/qemu/qboot.rom)
# KVM is present but unusable on this machine kind: TCG unless asked.
ACCEL=${SOFTROCE_ACCEL:-tcg}
CPU=max
[ "$ACCEL" = kvm ] && CPU=host
# Under heavy host load a TCG boot has been seen to stall before userspace:
# give the boot its own watchdog and retry once.
BOOT_TIMEOUT=${SOFTROCE_BOOT_TIMEOUT:-120}
# Under TCG the kernel distrusts the TSC and falls back to the HPET, whose
# every read is an emulated MMIO access under QEMU's global lock: then each
# clock_gettime() is a syscall of several microseconds that stalls the other
# vCPU too. A trusted TSC keeps clock_gettime() in the vDSO, as on real
# hardware (perftest reads the TSC directly, so it never paid this).
KAPPEND=${SOFTROCE_KAPPEND-clocksource=tsc tsc=reliable}
boot() {
  rm -f "$X/started" "$X/rc"
  timeout -k 5 "$TIMEOUT" "$QEMU" -accel "$ACCEL" -cpu "$CPU" -smp "$SMP" -m "$MEM" \
    -M q35 "${BIOS[@]}" -nodefaults -no-user-config -nographic -no-reboot -serial stdio \
    -kernel "$CACHE/vmlinux" -initrd "$CACHE/initrd.cpio" -append "console=ttyS0 quiet panic=-1 $KAPPEND" \
    -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap \
    -virtfs "local,path=$CACHE/k/lib/modules,mount_tag=kmods,security_model=none,readonly=on" \
    -virtfs "local,path=$X,mount_tag=zwx,security_model=none" "${RW[@]}" </dev/null 2>"$X/qemu.err" &
  local qp=$! waited=0
  while [ ! -e "$X/started" ] && kill -0 $qp 2>/dev/null; do
    sleep 1
    waited=$((waited + 1))
    if [ $waited -ge "$BOOT_TIMEOUT" ]; then
      kill $qp 2>/dev/null
      wait $qp 2>/dev/null
      return 200
    fi
  done
  wait $qp
}
rc_qemu=0
boot || rc_qemu=$?
if [ $rc_qemu = 200 ]; then
  echo "softroce: guest did not reach userspace in ${BOOT_TIMEOUT}s; retrying once" >&2
  rc_qemu=0
  boot || rc_qemu=$?
  if [ $rc_qemu = 200 ]; then
    echo "softroce: guest did not reach userspace in ${BOOT_TIMEOUT}s (twice)" >&2
    exit 125
  fi
fi
if [ ! -e "$X/started" ] && [ $rc_qemu != 0 ] && [ $rc_qemu != 124 ] && [ $rc_qemu != 137 ]; then
  skip "qemu could not start the guest (exit $rc_qemu): $(grep -v '^$' "$X/qemu.err" | tail -1)"
fi
cat "$X/qemu.err" >&2
if [ ! -s "$X/rc" ]; then
  if [ $rc_qemu = 124 ] || [ $rc_qemu = 137 ]; then
    echo "softroce: guest timed out after ${TIMEOUT}s" >&2
  else
    echo "softroce: guest gave no exit status (qemu exit $rc_qemu)" >&2
  fi
  exit 125
fi
exit "$(cat "$X/rc")"
