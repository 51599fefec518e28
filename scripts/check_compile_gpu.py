#!/usr/bin/env python
"""ditaccel under ``torch.compile`` on full-size transformers (issue 16 §5), compiled vs eager.

(a) PixArt-Sigma-XL-2 2K (random weights from its config, 16,384 tokens, CFG batch 2) with the
    benchmarks' hand-made DiTFastAttn plan (every layer: full, wars, wars+asc, asc, ast, full, ast,
    asc over 8 steps) applied, then ``torch.compile``-d: per-step outputs against eager (max abs
    difference, relative error ||c - e|| / ||e||), per-step times, compile time, recompilations.
    For scale, last and only if time allows (``--dense-if-under``), the same numbers for the dense
    transformer compiled without ditaccel (bf16 Inductor-vs-eager noise).
(b) AdaSpa (s = 0.8, blocks of 64) on the full-size Wan2.1-T2V-1.3B transformer at 480p
    (21 x 60 x 104 latent = 32,760 tokens; ``--wan-frames`` fewer to shorten): a 3-step schedule
    (search at step 0, then two sparse steps), compiled vs eager.

Each compiled model runs two generations: the first compiles (its recompilations counted from
Dynamo's "recompiles" log), the second must compile nothing. Writes JSON to ``--json``.

    python scripts/check_compile_gpu.py --json compile_gpu.json                 # H200: < 6 min
    python scripts/check_compile_gpu.py --toy --json /tmp/compile_toy.json      # CPU, toy sizes

Exit status 1 if a part failed (its traceback is in the JSON) or a second generation recompiled.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import statistics
import sys
import time
import traceback

import torch
from torch._dynamo.utils import counters


class _Log(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def watch(out: dict):
    """Fill ``out`` with what Dynamo did inside the block: recompilations, graphs, graph breaks."""
    counters.clear()
    handler = _Log()
    logger = logging.getLogger("torch._dynamo.guards.__recompiles")
    torch._logging.set_logs(recompiles=True)
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield out
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
        torch._logging.set_logs()
        breaks = {}
        for k, v in counters["graph_break"].items():
            lines = [x.strip() for x in k.split("\n") if x.strip()]
            key = lines[1] if len(lines) > 1 else lines[0]
            breaks[key[:200]] = breaks.get(key[:200], 0) + v
        out.update(recompiles=len(handler.messages), recompile_reasons=[m[:400] for m in handler.messages[:6]],
                   graphs=counters["stats"]["unique_graphs"], graph_breaks=breaks)


def _sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def generation(model, calls, device: str) -> tuple[list[torch.Tensor], list[float]]:
    """Run ``calls`` (functions of the model), returning the outputs and each call's time in ms."""
    outs, times = [], []
    for call in calls:
        _sync(device)
        t0 = time.perf_counter()
        out = call(model)
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
        outs.append(out.detach().float().cpu())
    return outs, times


def compare(compiled: list[torch.Tensor], eager: list[torch.Tensor]) -> dict:
    rows = []
    for c, e in zip(compiled, eager, strict=True):
        d = (c.double() - e.double())
        rows.append({"max_abs": float(d.abs().max()), "rel": float(d.norm() / e.double().norm().clamp_min(1e-30)),
                     "max_abs_eager": float(e.abs().max()), "finite": bool(torch.isfinite(c).all())})
    return {"per_step": rows, "max_abs": max(r["max_abs"] for r in rows), "max_rel": max(r["rel"] for r in rows),
            "all_finite": all(r["finite"] for r in rows)}


def compiled_vs_eager(model, calls, device: str, *, apply=None, remove=None, stats=None) -> dict:
    """Eager (warm-up + timed), then ``torch.compile(model)``: compiling generation + timed one."""
    res = {}
    if apply:
        apply()
    try:
        generation(model, calls, device)  # warm-up: Triton autotuning, cuDNN plans
        eager, eager_ms = generation(model, calls, device)
        if stats:
            res["eager_stats"] = stats()
        torch._dynamo.reset()
        compiled = torch.compile(model)
        first = {}
        t0 = time.perf_counter()
        with watch(first):
            generation(compiled, calls, device)
        first["seconds"] = time.perf_counter() - t0
        second = {}
        with watch(second):
            outs, comp_ms = generation(compiled, calls, device)
        if stats:
            res["compiled_stats"] = stats()
    finally:
        if remove:
            remove()
    res.update(
        eager_step_ms=eager_ms, compiled_step_ms=comp_ms,
        eager_total_ms=sum(eager_ms), compiled_total_ms=sum(comp_ms), speedup=sum(eager_ms) / sum(comp_ms),
        first_generation=first, second_generation=second, diff=compare(outs, eager),
    )
    return res


def _stats_dict(model):
    import ditaccel

    st = ditaccel.stats(model)
    return {"attention_flops_ratio": st.attention_flops_ratio, "method_counts": st.method_counts}


def check_pixart(args, device: str, dtype, dense: bool = False) -> dict:
    import ditaccel
    from ditaccel.bench import STEP_METHODS, TOY_PIXART, build_transformer, model_inputs
    from ditaccel.plan import Plan

    tr = build_transformer("pixart-sigma-2k", device, dtype, overrides=TOY_PIXART if args.toy else None)
    inputs = model_inputs("pixart-sigma-2k", tr, 2, device, dtype)
    n_layers = len(tr.transformer_blocks)
    steps = len(STEP_METHODS)
    timesteps = torch.linspace(999, 1, steps).round()
    calls = [lambda m, t=float(t): m(timestep=torch.full((2,), t, device=device), **inputs).sample
             for t in timesteps]
    plan = Plan.from_methods(tr, [list(STEP_METHODS) for _ in range(n_layers)], cfg=True)
    grid = tr.config.sample_size // tr.config.patch_size
    res = {"model": "pixart-sigma-2k" + (" (toy)" if args.toy else ""), "layers": n_layers, "tokens": grid * grid,
           "batch": 2, "heads": tr.config.num_attention_heads, "head_dim": tr.config.attention_head_dim,
           "steps": steps, "plan_step_methods": list(STEP_METHODS)}
    if dense:  # the scale of bf16 Inductor-vs-eager differences, without ditaccel
        res["dense"] = compiled_vs_eager(tr, calls, device)
    else:
        res["ditfastattn"] = compiled_vs_eager(tr, calls, device, apply=lambda: ditaccel.apply(tr, plan),
                                               remove=lambda: ditaccel.remove(tr), stats=lambda: _stats_dict(tr))
    return res


def check_wan_adaspa(args, device: str, dtype) -> dict:
    from diffusers import WanTransformer3DModel

    import ditaccel
    from ditaccel.bench.model_cases import TOY_WAN, WAN_1_3B

    config = {**WAN_1_3B, **(TOY_WAN if args.toy else {})}
    frames, height, width = (2, 8, 8) if args.toy else (args.wan_frames, 60, 104)
    torch.manual_seed(0)
    with torch.device(device):
        tr = WanTransformer3DModel(**config)
    tr = tr.to(dtype).eval().requires_grad_(False)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(1, config["in_channels"], frames, height, width, device=device, dtype=dtype, generator=g)
    ctx = torch.randn(1, 512 if not args.toy else 7, config["text_dim"], device=device, dtype=dtype, generator=g)
    timesteps = [999.0, 666.0, 333.0]
    calls = [lambda m, t=t: m(x, timestep=torch.tensor([t], device=device), encoder_hidden_states=ctx).sample
             for t in timesteps]
    block = 16 if args.toy else 64
    cfg = ditaccel.AdaSpaConfig(sparsity=0.8, block_size=block, warmup=0.0, search_at=(0.0,))
    p = config["patch_size"]
    res = {"model": "wan2.1-t2v-1.3b" + (" (toy)" if args.toy else ""), "layers": config["num_layers"],
           "latent": [frames, height, width], "tokens": frames * (height // p[1]) * (width // p[2]),
           "heads": config["num_attention_heads"], "head_dim": config["attention_head_dim"],
           "sparsity": cfg.sparsity, "block_size": block, "schedule": cfg.schedule(len(timesteps))}
    res["adaspa"] = compiled_vs_eager(
        tr, calls, device, apply=lambda: ditaccel.apply(tr, cfg, num_inference_steps=len(timesteps)),
        remove=lambda: ditaccel.remove(tr), stats=lambda: _stats_dict(tr))
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", required=True, help="where to write the results (JSON)")
    ap.add_argument("--toy", action="store_true", help="toy sizes on the CPU (float32): checks the plumbing")
    ap.add_argument("--device", default=None, help="default: cuda if available (cpu with --toy)")
    ap.add_argument("--only", choices=("pixart", "wan", "pixart_dense"), default=None, help="run one part only")
    ap.add_argument("--dense-if-under", type=float, default=200.0,
                    help="run the dense PixArt reference (last) only if the other parts took less than this many "
                         "seconds (keeps the whole script under 6 minutes); 0: never")
    ap.add_argument("--wan-frames", type=int, default=21, help="Wan latent frames (21 = 81 video frames)")
    args = ap.parse_args(argv)
    device = args.device or ("cpu" if args.toy or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if args.toy else torch.bfloat16
    if args.toy:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    logging.getLogger("diffusers").setLevel(logging.ERROR)

    import triton

    from ditaccel.bench import dense_sdpa_context

    out = {"device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
           "torch": torch.__version__, "triton": triton.__version__, "date": datetime.datetime.now().isoformat(
               timespec="seconds"), "dtype": str(dtype).replace("torch.", ""), "toy": args.toy,
           "command": " ".join(sys.argv)}
    t_all = time.perf_counter()
    ok = True
    parts = [("pixart", check_pixart), ("wan", check_wan_adaspa),
             ("pixart_dense", lambda a, d, t: check_pixart(a, d, t, dense=True))]
    with torch.no_grad(), dense_sdpa_context():
        for name, fn in parts:
            if args.only and args.only != name:
                continue
            if name == "pixart_dense" and not args.only and time.perf_counter() - t_all > args.dense_if_under:
                out[name] = {"skipped": f"the other parts took {time.perf_counter() - t_all:.0f} s > "
                                        f"--dense-if-under {args.dense_if_under:.0f}"}
                print(f"[{name}] skipped: {out[name]['skipped']}")
                continue
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
            t0 = time.perf_counter()
            try:
                out[name] = fn(args, device, dtype)
            except Exception as e:  # noqa: BLE001 - record and go on with the other part
                ok = False
                out[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            out[name]["seconds"] = time.perf_counter() - t0
            _report(name, out[name])
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)
    out["seconds"] = time.perf_counter() - t_all
    for part in (out.get("pixart", {}), out.get("wan", {}), out.get("pixart_dense", {})):
        for case in ("ditfastattn", "dense", "adaspa"):
            if case in part and part[case]["second_generation"]["recompiles"]:
                ok = False
    out["ok"] = ok
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)
    print(f"total {out['seconds']:.0f} s, {'ok' if ok else 'FAILED'}; wrote {args.json}")
    return 0 if ok else 1


def _report(name: str, r: dict):
    if "error" in r:
        print(f"[{name}] FAILED: {r['error']}\n{r['traceback']}")
        return
    for case in ("ditfastattn", "dense", "adaspa"):
        if case not in r:
            continue
        c = r[case]
        print(f"[{name}/{case}] {r['model']}, {r['tokens']} tokens: eager {statistics.median(c['eager_step_ms']):.1f} ms "
              f"/ compiled {statistics.median(c['compiled_step_ms']):.1f} ms per step (median; total x{c['speedup']:.2f}); "
              f"compile {c['first_generation']['seconds']:.1f} s, recompiles {c['first_generation']['recompiles']} "
              f"then {c['second_generation']['recompiles']}, graphs {c['first_generation']['graphs']}; "
              f"max abs diff {c['diff']['max_abs']:.3g}, max rel err {c['diff']['max_rel']:.3g}")


if __name__ == "__main__":
    sys.exit(main())
