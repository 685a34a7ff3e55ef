#!/usr/bin/env bash
# Installs, idempotently and only what is missing, every Debian package that
# zipwire's build, tests and demo need. Safe to run repeatedly.
set -euo pipefail

PACKAGES=(
  build-essential cmake ninja-build pkg-config
  libibverbs-dev librdmacm-dev ibverbs-providers rdma-core
  libucx-dev ucx-utils
  libboost-dev libboost-system-dev
  libgtest-dev libgmock-dev googletest libbenchmark-dev
  libopenblas-dev zlib1g-dev
  clang libclang-rt-14-dev
  dataset-fashion-mnist
  iperf3 qperf python3
  perftest qemu-system-x86 qemu-utils busybox kmod xz-utils iproute2
)

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

echo "install-deps: installing ${missing[*]}" >&2
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
# Refresh the package lists only when they are missing or a first attempt fails.
if ! $SUDO apt-get install -y --no-install-recommends "${missing[@]}" >/tmp/zipwire-apt.log 2>&1; then
  $SUDO apt-get update -q >/tmp/zipwire-apt-update.log 2>&1
  $SUDO apt-get install -y --no-install-recommends "${missing[@]}" >/tmp/zipwire-apt.log 2>&1 || {
    echo "install-deps: apt-get install failed; see /tmp/zipwire-apt.log" >&2
    tail -20 /tmp/zipwire-apt.log >&2
    exit 1
  }
fi
