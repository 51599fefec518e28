#!/bin/bash
# For scripts/peer_flashinfer.py: builds DEST/flashinfer_slim.tar.xz (DEST default .whl/fi, ignored) from the unpacked flashinfer-python 0.7.2 wheel (SRC, default /tmp/fiw),
# the prebuilt sm_90a batch-prefill modules (AOT, default /tmp/fi_ws/.cache/flashinfer/0.7.2/90a/cached_ops)
# and cuRAND's headers (CURAND, default /tmp/curand/nvidia/cu13/include).
# The two .so were built on CPU with nvcc 13.0 (FLASHINFER_CUDA_ARCH_LIST=9.0a, CUDA_HOME=/usr/local/cuda,
# FLASHINFER_EXTRA_CUDAFLAGS="-isystem <curand include>") via gen_batch_prefill_module("fa3", bf16x3, i32, 128, 128, 0,
# False, False, False).build() and _gen_batch_prefill_primary_module("fa2", ...).build(); linked by hand without -lcuda
# (no stub here; they use only cudart): c++ *.cuda.o -shared -L/usr/local/cuda/lib64 -lcudart -o NAME.so
set -euo pipefail
SRC=${SRC:-/tmp/fiw}; AOT=${AOT:-/tmp/fi_ws/.cache/flashinfer/0.7.2/90a/cached_ops}
CURAND=${CURAND:-/tmp/curand/nvidia/cu13/include}; IMPORTED=${IMPORTED:-/tmp/imported.txt}
mkdir -p "${DEST:-.whl/fi}"; OUT=$(cd "${DEST:-.whl/fi}" && pwd); STAGE=$(mktemp -d)
cd "$SRC"
{
  # python: everything except the heavy subpackages, of which only what `import flashinfer` loads
  find flashinfer -name '*.py' -not -path 'flashinfer/data/*' \
    | grep -v -E '^flashinfer/(experimental|fused_moe|gdn_kernels|kda_kernels|cute_dsl|prims_ts|moe_ep)/'
  grep -E '^flashinfer/(experimental|fused_moe|gdn_kernels|kda_kernels|cute_dsl|prims_ts|moe_ep)/' "$IMPORTED"
  find flashinfer -name py.typed -not -path 'flashinfer/data/*'
  # headers the JIT build reads (whole trees: they compress to ~3.5 MB) and the top-level csrc files
  find flashinfer/data/include flashinfer/data/cutlass/include flashinfer/data/cutlass/tools/util/include \
       flashinfer/data/cccl/cub flashinfer/data/cccl/libcudacxx/include flashinfer/data/cccl/thrust \
       flashinfer/data/spdlog/include -type f
  find flashinfer/data/csrc -maxdepth 1 -type f
  find flashinfer_python-0.7.2.dist-info -maxdepth 1 -type f -not -name RECORD
} | sort -u > "$STAGE/files.txt"
tar -cf "$STAGE/t.tar" -T "$STAGE/files.txt"
mkdir -p "$STAGE/x" && tar -xf "$STAGE/t.tar" -C "$STAGE/x"
for d in "$AOT"/batch_prefill_*; do
  n=$(basename "$d"); [ -f "$d/$n.so" ] || continue
  mkdir -p "$STAGE/x/flashinfer/data/aot/$n" && cp "$d/$n.so" "$STAGE/x/flashinfer/data/aot/$n/"
done
mkdir -p "$STAGE/x/curand_include" && cp "$CURAND"/curand*.h "$STAGE/x/curand_include/"
cd "$STAGE/x" && tar -cf - --owner=0 --group=0 --sort=name * | xz -9e -T2 > "$OUT/flashinfer_slim.tar.xz"
echo "files: $(find . -type f | wc -l)"; ls -la "$OUT"; rm -rf "$STAGE"
