#!/usr/bin/env bash
# Installs every Debian package kvtp needs (idempotent) and builds into build/.
# usage: scripts/setup.sh [--deps-only] [extra cmake args...]
set -euo pipefail
cd "$(dirname "$0")/.."

pkgs=(build-essential cmake ninja-build pkg-config
      libopenblas-openmp-dev libopenmpi-dev openmpi-bin
      libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
      libsentencepiece-dev nlohmann-json3-dev libcli11-dev zlib1g-dev libsqlite3-dev
      libgtest-dev libgmock-dev libpcre2-dev gnuplot-nox openssl
      python3-grpcio python3-protobuf prometheus-cpp-dev iproute2
      slurmctld slurmd slurm-client libminizip-dev)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "setup: installing ${missing[*]}" >&2
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

[ "${1:-}" = "--deps-only" ] && exit 0
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release "$@"
cmake --build build -j"$(nproc)"
