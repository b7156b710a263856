#!/usr/bin/env bash
# Builds the CUDA targets here (nvcc 13, sm_90a) into build-cuda/ and copies them, with the shared
# libraries the GPU machine lacks (OpenBLAS's OpenMP build and its Fortran runtime, gRPC and
# friends via ../shared/tools/bundle-libs.sh when present; Open MPI's C++ bindings; minizip for
# PyTorch .bin checkpoints; prometheus-cpp for the metrics endpoint), into .bundle/, stripped and
# packed as .bundle.tar.xz — the file to name in the device tool's `carry`. On the GPU machine:
#   tar xJf .bundle.tar.xz
#   export LD_LIBRARY_PATH=$PWD/.bundle KVTP_BINARY=$PWD/.bundle/kvtp
#   .bundle/kvtp_cuda_tests; .bundle/kvtp_cuda_engine_tests; .bundle/kvtp bench --device cuda
#   mpirun --allow-run-as-root -np 2 -x LD_LIBRARY_PATH -x NCCL_NVLS_ENABLE=0 .bundle/kvtp_nccl_tests
# usage: [KVTP_BASELINE=path/to/kvtp] scripts/bundle-gpu.sh [more cmake targets...]
#   KVTP_BASELINE: another build's kvtp, bundled as .bundle/kvtp_old, so that one run can time the
#   two side by side (an A/B on one machine: lent GPUs of one kind differ by a few per cent).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.bundle/' .gitignore || { echo "add /.bundle/ to .gitignore first" >&2; exit 1; }
cmake -S . -B build-cuda -G Ninja -DCMAKE_BUILD_TYPE=Release -DKVTP_CUDA=ON > /dev/null
targets=(kvtp kvtp_cuda_tests kvtp_cuda_engine_tests kvtp_cuda_bench kvtp_nccl_tests kvtp_nccl_bench "$@")
cmake --build build-cuda -j"$(nproc)" --target "${targets[@]}"
rm -rf .bundle && mkdir -p .bundle
for t in "${targets[@]}"; do find build-cuda -maxdepth 2 -type f -name "$t" -exec cp {} .bundle/ \; ; done
if [ -n "${KVTP_BASELINE:-}" ]; then cp "$KVTP_BASELINE" .bundle/kvtp_old; fi
strip .bundle/kvtp*  # symbols would take the bundle past what the device tool carries
arch=$(gcc -print-multiarch)
for lib in "/usr/lib/$arch/openblas-openmp/libopenblas.so.0" "/lib/$arch/libgfortran.so.5" \
           "/lib/$arch/libquadmath.so.0" "/lib/$arch/libgomp.so.1" "/lib/$arch/libmpi_cxx.so.40" \
           "/lib/$arch/libminizip.so.1" "/lib/$arch/libprometheus-cpp-core.so.1.0"; do
  cp -L "$lib" .bundle/
done
if [ -x ../shared/tools/bundle-libs.sh ]; then ../shared/tools/bundle-libs.sh .bundle .bundle/kvtp .bundle/kvtp_*; fi
# The device tool carries at most 64 MiB, the tracked files included: send it packed, unpack there
# with `tar xJf .bundle.tar.xz`. The binaries go side by side, in a fixed order, into one xz
# stream whose window spans them all: their device code is mostly the same bytes, which xz then
# stores once (four binaries and the libraries: 54 MB in directory order, the 36 MB OpenBLAS
# between two binaries; 38.5 MB side by side).
tar cf - $(ls -d .bundle/kvtp* | sort) $(ls -d .bundle/* | grep -v '^.bundle/kvtp' | sort) |
  xz --lzma2=preset=9e,dict=256MiB -T1 > .bundle.tar.xz
echo "bundle: $(ls .bundle | wc -l) files, $(du -sh .bundle | cut -f1); packed $(du -h .bundle.tar.xz | cut -f1)"
