"""Peer comparison on a GPU: FlashInfer's block-sparse attention (flashinfer-python 0.7.2, FA3 and
FA2 prefill kernels on sm_90) beside ours and dense cuDNN SDPA, same masks, same inputs, same run.

Random per-(head, query-block) masks with the diagonal always kept, at 10% and 20% of the blocks
(64-token blocks, and 128 with ``--blocks 64,128``), 1 x 24 x 118,784 x 128 bf16
(``structured_qkv``); the masks of the 64-token blocks are those of ``peer_fastvideo_vsa.py`` (same
generator, same seed, same order). Every output is spot-checked against an fp32 reference on
sampled rows before it is timed; FlashInfer's ``plan()`` is done once, outside the timed region.
Writes DIR/peer_flashinfer.json (and prints one JSON line per measurement as it goes).

How FlashInfer is driven (read from its sparse.py):

* ``BlockSparseAttentionWrapper`` (``flashinfer_bsr_*``) takes one BSR mask (``indptr``,
  ``indices``, block ``R x C``) shared by all heads. Our masks differ per head, so the heads are
  folded into the rows: q/k/v ``(1, H, L, D)`` are viewed (no copy) as ``(H*L, 1, D)``, the BSR row
  of (head h, query block i) is ``h*NB + i`` and its columns are ``h*NB + j``; one plan, one call,
  one head, K/V read in place as ``(H*L/C, C, 1, D)`` pages of C tokens. This is FlashInfer's
  cheapest route for per-head masks (block-level indices, one launch).
* ``VariableBlockSparseAttentionWrapper`` (``flashinfer_var_*``) is FlashInfer's own per-head API
  (``block_mask_map (H, NB, NB)``, block sizes); it expands the mask to per-token KV indices
  (page size 1), which costs ~4 bytes x H x NB x kept keys of index memory (2-4 GB here) and a
  per-token gather; timed for completeness.
* backends: ``auto`` (resolves to fa3 on sm_90 for bf16, head dim 128), ``fa3`` and ``fa2``
  explicitly; ``cake`` (VariableBlockSparse's SM90 kernel, at most 64 kept KV blocks per query
  block) is tried at 64-token blocks and is expected to refuse these densities. BSR's ``cake``
  and ``vsa_*`` backends are SM100/SM120 only and ``cutile`` needs cuda-tile: not tried.

JIT: the only kernels used are the batch-prefill modules for bf16, head dim 128, no pos-enc / soft
cap / sliding window, int32 indices (FA3: 8 kernel files + 2 host files; FA2 likewise). The slim
bundle (``.whl/fi/flashinfer_slim.tar.xz``) ships them prebuilt for sm_90a under
``flashinfer/data/aot/<uri>/<uri>.so``, which FlashInfer loads before trying to compile; if they
fail to load it falls back to nvcc (several minutes; ``MAX_JOBS`` = all cores, arch list "9.0a",
cache under ``FLASHINFER_WORKSPACE_BASE=/tmp/fi_jit``). The bundle also carries cuRAND's headers
(``curand_include/``): CUTLASS's utilities that FlashInfer includes need ``curand_kernel.h``,
which a pip-assembled CUDA toolkit lacks; they are added with ``-isystem`` (toolkit's own win).
The first ``plan()`` per backend (module load or build) is reported separately as ``jit``.

The bundle is built by ``scripts/flashinfer_bundle.sh`` (its header says how the two modules were
compiled); with apache-tvm-ffi's wheel for the GPU machine's Python (``pip download --no-deps
--only-binary=:all: --python-version 3.12 apache-tvm-ffi==0.1.15.post2``) it is 11 MB, against the
wheel's 62 MB plus dependencies that are not needed for these kernels.

Device run (repo root; ``--bundle`` is the folder the slim bundle was unpacked to, default /tmp/fi):

    mkdir -p /tmp/fi && tar -xJf .whl/fi/flashinfer_slim.tar.xz -C /tmp/fi && \
    python3 -m pip install -q --no-index --no-deps --target /tmp/fi .whl/fi/apache_tvm_ffi*.whl && \
    PYTHONPATH=/tmp/fi:$PYTHONPATH python3 scripts/peer_flashinfer.py --out $OUT

CPU check of the bundle and of the plan inputs (no GPU): ``python scripts/peer_flashinfer.py --dry``.
"""

import argparse
import functools
import importlib.util
import json
import math
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def setup_env(bundle: str | None) -> dict:
    """FlashInfer's JIT settings; must run before ``import flashinfer`` (its paths are read then)."""
    os.environ.setdefault("FLASHINFER_WORKSPACE_BASE", "/tmp/fi_jit")  # cache: $BASE/.cache/flashinfer
    os.environ.setdefault("FLASHINFER_CUDA_ARCH_LIST", "9.0a")  # sm_90a only
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 8))  # ninja -j
    os.environ.setdefault("FLASHINFER_DISABLE_VERSION_CHECK", "1")
    if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")):
        # FlashInfer takes CUDA_HOME from nvcc's folder; a wrapper in /usr/local/bin would give
        # /usr/local, which has no lib64/libcudart.so to link against
        for c in ("/usr/local/cuda", "/usr/local/cuda-13.0"):
            if os.path.isfile(os.path.join(c, "bin", "nvcc")):
                os.environ["CUDA_HOME"] = c
                break
    spec = importlib.util.find_spec("flashinfer")
    root = bundle or (os.path.dirname(os.path.dirname(spec.origin)) if spec and spec.origin else None)
    inc = os.path.join(root, "curand_include") if root else None
    if inc and os.path.isfile(os.path.join(inc, "curand_kernel.h")):
        flags = os.environ.get("FLASHINFER_EXTRA_CUDAFLAGS", "")
        if inc not in flags:
            os.environ["FLASHINFER_EXTRA_CUDAFLAGS"] = f"{flags} -isystem {inc}".strip()
    # the JIT link line has -lcuda; a toolkit without lib64/stubs needs a libcuda.so to find
    for lib in ("/usr/lib/x86_64-linux-gnu/libcuda.so.1", "/usr/lib64/libcuda.so.1", "/usr/lib/wsl/lib/libcuda.so.1"):
        home = os.environ.get("CUDA_HOME", "")
        if os.path.isfile(lib) and not any(os.path.exists(os.path.join(home, d, "libcuda.so"))
                                           for d in ("lib64", "lib64/stubs", "lib", "lib/stubs")):
            stub = os.path.join(os.environ["FLASHINFER_WORKSPACE_BASE"], "libcuda_link")
            try:
                os.makedirs(stub, exist_ok=True)
                if not os.path.exists(os.path.join(stub, "libcuda.so")):
                    os.symlink(lib, os.path.join(stub, "libcuda.so"))
                flags = os.environ.get("FLASHINFER_EXTRA_LDFLAGS", "")
                if stub not in flags:
                    os.environ["FLASHINFER_EXTRA_LDFLAGS"] = f"{flags} -L{stub}".strip()
            except OSError:
                pass
            break
    keys = ("FLASHINFER_WORKSPACE_BASE", "FLASHINFER_CUDA_ARCH_LIST", "MAX_JOBS", "FLASHINFER_EXTRA_CUDAFLAGS",
            "FLASHINFER_EXTRA_LDFLAGS", "CUDA_HOME")
    return {k: os.environ.get(k) for k in keys}


def bsr_fold(mask: torch.Tensor):
    """Per-head block mask (1, H, NB, NB) -> one BSR over H*NB block rows (heads folded into rows):
    ``indptr`` (H*NB+1,) and ``indices`` (nnz,) int32, column ``h*NB + j``."""
    m = mask[0]
    H, NB, _ = m.shape
    counts = m.sum(-1, dtype=torch.int32).flatten()
    indptr = torch.zeros(H * NB + 1, dtype=torch.int32, device=m.device)
    indptr[1:] = torch.cumsum(counts, 0)
    nz = m.nonzero()  # row-major: (h, i, j) ascending, i.e. BSR order
    indices = (nz[:, 0] * NB + nz[:, 2]).to(torch.int32)
    return indptr, indices


def module_args():
    bf = torch.bfloat16
    return (bf, bf, bf, torch.int32, 128, 128, 0, False, False, False)


def aot_status(load: bool = False) -> dict:
    """Name of the batch-prefill module each backend builds, whether a prebuilt .so is present (and,
    with ``load``, whether it loads)."""
    from flashinfer.jit import env as jit_env
    from flashinfer.jit.attention import modules as m

    out = {}
    for be, gen in (("fa3", m.gen_batch_prefill_module), ("fa2", m._gen_batch_prefill_primary_module)):
        try:
            spec = gen(be, *module_args())
            arts = jit_env.get_aot_artifacts(spec.name)
            out[be] = {"module": spec.name, "aot": [str(a.path) for a in arts]}
            if load and arts:
                try:
                    spec.load(arts[0].path)
                    out[be]["loads"] = True
                except Exception as e:  # noqa: BLE001
                    out[be]["loads"] = repr(e)[:300]
        except Exception as e:  # noqa: BLE001
            out[be] = {"error": repr(e)[:300]}
    return out


def dry(a):
    """CPU: import flashinfer.sparse, check the folded BSR and the variable-block inputs on a small mask."""
    t = time.time()
    import flashinfer
    import flashinfer.sparse as fs

    info = {"flashinfer": flashinfer.__version__, "import_s": round(time.time() - t, 2),
            "wrappers": [fs.BlockSparseAttentionWrapper.__name__, fs.VariableBlockSparseAttentionWrapper.__name__],
            "missing": [m for m in ("cuda.tile", "nccl4py", "cudnn", "cutlass") if _absent(m)],
            "env": a.env, "aot": aot_status(load=True)}
    H, NB, bs = 3, 8, 64
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(1, H, NB, NB, generator=g) < 0.3) | torch.eye(NB, dtype=torch.bool)
    indptr, indices = bsr_fold(mask)
    rebuilt = torch.zeros(H * NB, H * NB, dtype=torch.bool)
    for r in range(H * NB):
        rebuilt[r, indices[indptr[r]:indptr[r + 1]].long()] = True
    want = torch.block_diag(*[mask[0, h] for h in range(H)])
    assert torch.equal(rebuilt, want), "folded BSR does not match the per-head mask"
    assert int(indptr[-1]) == int(mask.sum())
    sizes = torch.full((H, NB), bs, dtype=torch.int32)
    info["bsr"] = {"M": H * NB * bs, "rows": H * NB, "nnz": int(indptr[-1]), "ok": True}
    info["variable"] = {"block_mask_map": list(mask[0].shape), "block_row_sz": list(sizes.shape)}
    try:
        from ditaccel.kernels.block_sparse import mask_to_indices

        _, cnt = mask_to_indices(mask)
        assert torch.equal(cnt.flatten(), indptr[1:] - indptr[:-1])
        info["ditaccel_indices"] = "match"
    except Exception as e:  # noqa: BLE001
        info["ditaccel_indices"] = repr(e)[:200]
    print(json.dumps(info, indent=1))


def ours_case(q, k, v, idx, cnt, bs):
    from ditaccel.kernels.block_sparse import block_sparse_attention

    return (lambda: block_sparse_attention(q, k, v, idx, cnt, block_size=bs, validate=False)), None


def bsr_case(fi, be, ws, int_ws, indptr, indices, qkv, shape, bs, scale, plan_timed):
    """BlockSparseAttentionWrapper on the head-folded BSR: plan once, return the timed call."""
    (qf, kf, vf), (H, L, D) = qkv, shape

    def make():
        w = fi.BlockSparseAttentionWrapper(ws, backend=be)
        w.reset_workspace_buffer(ws, int_ws)
        return w

    def plan(w):
        w.plan(indptr, indices, H * L, H * L, bs, bs, 1, 1, D, sm_scale=scale,
               q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16, o_data_type=torch.bfloat16)

    w, s, resolved = plan_timed(f"bsr_{be}", make, plan)
    return (lambda: w.run(qf, kf, vf).view(1, H, L, D)), {"plan_s": s, "resolved": resolved}


def var_case(fi, be, ws, int_ws, mask, qkv, shape, bs, scale, plan_timed):
    """VariableBlockSparseAttentionWrapper with the per-head mask (H, NB, NB): plan once, return the call."""
    (qh, kh, vh), (H, L, D) = qkv, shape
    sizes = torch.full((H, L // bs), bs, dtype=torch.int32, device=mask.device)

    def make():
        w = fi.VariableBlockSparseAttentionWrapper(ws, backend=be)
        if be not in ("cake", "cake_cute"):
            w.reset_workspace_buffer(ws, int_ws)
        return w

    def plan(w):
        w.plan(mask[0], sizes, sizes, H, H, D, sm_scale=scale,
               q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16)

    w, s, resolved = plan_timed(f"var_{be}", make, plan)
    return (lambda: w.run(qh, kh, vh).view(1, H, L, D)), {"plan_s": s, "resolved": resolved}


def _absent(name):
    try:
        return importlib.util.find_spec(name) is None
    except ModuleNotFoundError:
        return True


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--tokens", type=int, default=118784)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--blocks", default="64", help="comma list of block sizes, e.g. 64,128")
    ap.add_argument("--keeps", default="0.1,0.2")
    ap.add_argument("--backends", default="auto,fa3,fa2", help="BlockSparseAttentionWrapper backends")
    ap.add_argument("--var-backends", default="fa3,fa2,cake",
                    help="VariableBlockSparseAttentionWrapper backends ('' to skip)")
    ap.add_argument("--bundle", default=None, help="folder the slim bundle was unpacked to (default: "
                    "the folder holding the flashinfer package)")
    ap.add_argument("--dry", action="store_true", help="CPU only: import and plan-input checks")
    a = ap.parse_args()
    a.env = setup_env(a.bundle)
    if a.dry:
        return dry(a)

    from tune_tiles import block_rows_mask, spot_check, timed

    from ditaccel.bench import dense_sdpa_context, structured_qkv
    from ditaccel.kernels.block_sparse import mask_to_indices

    H, D, L = 24, 128, a.tokens
    q, k, v = structured_qkv(L // 4096, 64, 64, H, D, "cuda", torch.bfloat16)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    scale = 1 / math.sqrt(D)
    rows = torch.randint(0, L, (64,), device="cuda")
    with dense_sdpa_context():
        dense = timed(lambda: F.scaled_dot_product_attention(q, k, v), a.reps)
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "shape": [1, H, L, D], "dtype": "bfloat16", "blocks": [int(b) for b in a.blocks.split(",")],
           "dense_sdpa_ms": dense, "env": a.env, "jit": {}, "rows": []}
    print(json.dumps({"dense_sdpa_ms": dense}), flush=True)

    fi = None
    try:
        t = time.time()
        import flashinfer as fi

        out["flashinfer"] = fi.__version__
        out["flashinfer_import_s"] = time.time() - t
        out["aot"] = aot_status()
    except Exception as e:  # noqa: BLE001 - ours still gets timed
        out["flashinfer_error"] = repr(e)[:500]
        traceback.print_exc()
    print(json.dumps({k: out.get(k) for k in ("flashinfer", "flashinfer_error", "aot", "env")}), flush=True)

    qf, kf, vf = (x.view(H * L, 1, D) for x in (q, k, v))  # heads folded into rows, no copy
    qh, kh, vh = q[0], k[0], v[0]  # (H, L, D) for the variable-block wrapper
    ws = torch.empty(512 << 20, dtype=torch.uint8, device="cuda") if fi is not None else None
    int_ws = torch.empty(64 << 20, dtype=torch.uint8, device="cuda") if fi is not None else None

    def plan_timed(key, make, plan):
        """Construct + plan; the first plan of a backend (module load / JIT build) goes to out['jit']."""
        t = time.time()
        w = make()
        plan(w)
        torch.cuda.synchronize()
        s = time.time() - t
        resolved = getattr(w, "_backend", None)
        if key not in out["jit"]:
            out["jit"][key] = {"first_plan_s": s, "resolved": resolved}
            print(json.dumps({"jit": key, **out["jit"][key]}), flush=True)
        return w, s, resolved

    for bs in out["blocks"]:
        nb = L // bs
        g = torch.Generator(device="cuda").manual_seed(0)
        for keep in (float(x) for x in a.keeps.split(",")):
            mask = (torch.rand(1, H, nb, nb, device="cuda", generator=g) < keep) | torch.eye(
                nb, dtype=torch.bool, device="cuda")
            idx, cnt = mask_to_indices(mask)
            tm = block_rows_mask(mask, rows, bs, L)
            row = {"block": bs, "keep": keep, "density": float(mask.float().mean())}
            cases = [("ditaccel", functools.partial(ours_case, q, k, v, idx, cnt, bs))]
            if fi is not None:
                indptr, indices = bsr_fold(mask)
                for be in filter(None, a.backends.split(",")):
                    cases.append((f"flashinfer_bsr_{be}", functools.partial(
                        bsr_case, fi, be, ws, int_ws, indptr, indices, (qf, kf, vf), (H, L, D), bs, scale, plan_timed)))
                for be in filter(None, a.var_backends.split(",")):
                    if be != "cake" or bs == 64:
                        cases.append((f"flashinfer_var_{be}", functools.partial(
                            var_case, fi, be, ws, int_ws, mask, (qh, kh, vh), (H, L, D), bs, scale, plan_timed)))
            for name, setup in cases:
                try:
                    fn, plan_info = setup()
                    if plan_info is not None:
                        row[f"{name}_plan"] = plan_info
                    t = time.time()
                    o = fn()
                    torch.cuda.synchronize()
                    first = time.time() - t
                    err = spot_check(o, q, k, v, tm, rows, scale)
                    del o
                    ms = timed(fn, a.reps)
                    row[name] = {"ms": ms, "speedup": dense / ms, "max_err": err, "first_call_s": first}
                except Exception as e:  # noqa: BLE001 - report it
                    row[name] = {"error": repr(e)[:400]}
                    traceback.print_exc()
                fn = None
                torch.cuda.empty_cache()
                print(json.dumps({"block": bs, "keep": keep, name: row[name]}), flush=True)
            out["rows"].append(row)
            with open(os.path.join(a.out, "peer_flashinfer.json"), "w") as f:
                json.dump(out, f, indent=1)
    with open(os.path.join(a.out, "peer_flashinfer.json"), "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
