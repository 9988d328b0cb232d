#!/usr/bin/env bash
# Installs exactly the Debian packages myelin needs that are missing; idempotent.
#
#   scripts/setup.sh                 build + test dependencies
#   scripts/setup.sh --with vm       + QEMU and the soft-RoCE guest's userspace (verbs tests)
#   scripts/setup.sh --with slurm    + Slurm and munge (launch-script tests)
#   scripts/setup.sh --with peers    + the peers benchmarks compare against
#   scripts/setup.sh --all           everything above
set -euo pipefail

build_pkgs=(
  build-essential cmake ninja-build pkg-config git clang-format
  libhwloc-dev hwloc                     # topology and NUMA placement
  libibverbs-dev librdmacm-dev rdma-core ibverbs-providers ibverbs-utils  # verbs backend
  libucx-dev ucx-utils                   # UCX backend and ucx_info
  libcli11-dev                           # command-line parsing for tools
  nlohmann-json3-dev                     # --json output and config
  libgtest-dev libgmock-dev libbenchmark-dev
  libboost-dev libconcurrentqueue-dev libreaderwriterqueue-dev  # peer rings in the ring benchmark
  libssl-dev                             # HMAC-SHA256 for broker authentication
  libtomlplusplus-dev                    # myelin-broker configuration file
  clang libclang-rt-14-dev               # libFuzzer targets (tests/fuzz/run.sh)
  python3 curl
)
vm_pkgs=(qemu-system-x86 busybox-static cpio iproute2 libibverbs1 librdmacm1 ibverbs-providers
         rdmacm-utils kmod)
slurm_pkgs=(slurm-wlm munge iperf3 iproute2)
peer_pkgs=(sockperf iperf3 nats-server libnats-dev openmpi-bin libopenmpi-dev libgloo-dev)

want=("${build_pkgs[@]}")
while [ $# -gt 0 ]; do
  case "$1" in
    --with)
      IFS=, read -ra groups <<<"${2:?--with needs a list: vm,slurm,peers}"; shift
      for g in "${groups[@]}"; do
        case "$g" in
          vm) want+=("${vm_pkgs[@]}") ;;
          slurm) want+=("${slurm_pkgs[@]}") ;;
          peers) want+=("${peer_pkgs[@]}") ;;
          *) echo "setup.sh: unknown group '$g' (vm, slurm, peers)" >&2; exit 2 ;;
        esac
      done ;;
    --all) want+=("${vm_pkgs[@]}" "${slurm_pkgs[@]}" "${peer_pkgs[@]}") ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
  shift
done

missing=()
for p in $(printf '%s\n' "${want[@]}" | sort -u); do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "setup.sh: all ${#want[@]} packages present"
  exit 0
fi
echo "setup.sh: installing ${missing[*]}"
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get -o DPkg::Lock::Timeout=900 update -qq
$SUDO apt-get -o DPkg::Lock::Timeout=900 install -y -qq --no-install-recommends "${missing[@]}"
