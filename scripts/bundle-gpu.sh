#!/usr/bin/env bash
# Builds the CUDA targets here (nvcc 13, sm_90a) into build-cuda/ and copies them, with the shared
# libraries the GPU machine lacks (OpenBLAS's OpenMP build and its Fortran runtime, gRPC and
# friends via ../shared/tools/bundle-libs.sh when present; Open MPI's C++ bindings), into .bundle/ — the folder to name in
# the device tool's `carry`. On the GPU machine:
#   export LD_LIBRARY_PATH=$PWD/.bundle; .bundle/kvtp_cuda_tests; .bundle/kvtp_cuda_bench
#   mpirun --allow-run-as-root -np 2 -x LD_LIBRARY_PATH -x NCCL_NVLS_ENABLE=0 .bundle/kvtp_nccl_tests
# usage: scripts/bundle-gpu.sh [more cmake targets...]
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.bundle/' .gitignore || { echo "add /.bundle/ to .gitignore first" >&2; exit 1; }
cmake -S . -B build-cuda -G Ninja -DCMAKE_BUILD_TYPE=Release -DKVTP_CUDA=ON > /dev/null
targets=(kvtp_cuda_tests kvtp_cuda_bench kvtp_nccl_tests kvtp_nccl_bench "$@")
cmake --build build-cuda -j"$(nproc)" --target "${targets[@]}"
rm -rf .bundle && mkdir -p .bundle
for t in "${targets[@]}"; do find build-cuda -maxdepth 2 -type f -name "$t" -exec cp {} .bundle/ \; ; done
arch=$(gcc -print-multiarch)
for lib in "/usr/lib/$arch/openblas-openmp/libopenblas.so.0" "/lib/$arch/libgfortran.so.5" \
           "/lib/$arch/libquadmath.so.0" "/lib/$arch/libgomp.so.1" "/lib/$arch/libmpi_cxx.so.40"; do
  cp -L "$lib" .bundle/
done
if [ -x ../shared/tools/bundle-libs.sh ]; then ../shared/tools/bundle-libs.sh .bundle .bundle/kvtp_cuda_*; fi
echo "bundle: $(ls .bundle | wc -l) files, $(du -sh .bundle | cut -f1)"
