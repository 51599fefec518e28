"""Do the 6-layer testbeds have the attention structure AdaSpa and DiTFastAttn exploit in real DiTs?

A recording "method" plugged into ditaccel's runtime (``ditaccel.runtime.install``) sees every
self-attention call of a dense generation (its output is the unmodified dense attention, so the
trajectory is the dense one) and measures, per layer, step, head and batch row:

* **Oracle block top-k recall** (both testbeds), AdaSpa's selection without head tiers: block
  mass W from the exact LSE (``attention_with_lse`` + ``block_mass``, block 64), every query
  block keeps its top k = ceil((1 - s) * budget) key blocks (``select_mask``), text blocks always
  kept and not in the budget (``text_blocks``); recall = kept mass / total mass, at the
  ``--stat-steps``. ``recall_video`` is the same on the non-text blocks only (the budgeted part).
  ``chance`` is the recall of the same selection on uniform attention.
* **Band mass** (image): the share of softmax mass inside the paper's 1D band (|i - j| <= N/8,
  the ``band1d`` window DiTFastAttn uses at ``window_size=0.25``) and, for comparison, inside the
  ``neighborhood2d`` window of the same area, at the ``--stat-steps`` (``uniform``: the share of
  keys the window holds).
* **Step-to-step similarity** (both): cosine similarity and relative L1
  (sum|O_t - O_{t-1}| / sum|O_{t-1}|) of each attention module's output (after the output
  projection: what ``ast`` reuses; CogVideoX: video and text outputs together) between
  consecutive steps, for every schedule in ``--steps`` / ``--video-steps``.
* **Window residual** (image): R = O_full - O_window in head space (before the projection, the
  paper's band window), compared between steps t and t + k, k in {1, 2, 5}: cosine(R_t, R_{t+k}),
  sum|R_{t+k} - R_t| / sum|R_{t+k}|, and the error of each sharing method at step t + k relative
  to the full output there (sum|.| / sum|O_{t+k}|): ``wars`` (W_{t+k} + R_t), output sharing in
  head space (O_t; ``ast``), window alone (W_{t+k}; ``wa``).

Every statistic is computed for every batch row: each seed's sample, both CFG halves (the JSON
labels each row ``cond``/``uncond``); summaries take min / mean over heads, steps, seeds and both
halves. Memory stays bounded: one layer's L x L matrix at a time (image only; the video uses the
LSE and block mass), the previous output per layer, and the last 5 residuals per layer (image).

    python scripts/probe_attention_stats.py [--device cpu|cuda] [--dtype float32|bfloat16]
        [--seeds 0 1] [--steps 20 50] [--video-steps 20] [--stat-steps 2 4 8 12 16 19]
        [--only image|video] [--json out.json]

CPU defaults (1 seed, image 20 + 50 steps, video 20 steps) take about 5 minutes on 2 busy cores
with ``--threads 1`` (2026-12-03: image 102 s, video 202 s); each seed adds about as much.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import sys
import time
from collections import defaultdict, deque

import torch
import torch.nn.functional as F

from ditaccel.kernels.block_mass import attention_with_lse, block_mass
from ditaccel.kernels.window import window_attention, window_dense_mask
from ditaccel.methods.adaspa import AdaSpaConfig, recall, select_mask, text_blocks
from ditaccel.methods.ditfastattn import make_window
from ditaccel.runtime import install, remove

SPARSITIES = (0.5, 0.8, 0.9)
LAGS = (1, 2, 5)
BLOCK = 64
WINDOW_SIZE = 0.25  # DiTFastAttn's band of N/8 tokens on each side
BAR = 0.8  # the bar: the oracle keeps >= 80% of the mass at s = 0.8


class _NoCache:
    def nbytes(self) -> int:
        return 0

    def release(self) -> None:
        pass


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B, n) float32."""
    return x.reshape(x.shape[0], -1).float()


def _cos(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    return F.cosine_similarity(_rows(a), _rows(b), dim=1).tolist()


def _l1_ratio(num: torch.Tensor, den: torch.Tensor) -> list[float]:
    """sum|num| / sum|den| per batch row."""
    return (_rows(num).abs().sum(1) / _rows(den).abs().sum(1).clamp_min(1e-30)).tolist()


def uniform_recall(seq_len: int, text_tokens: int, text_position: str | None, s: float, device) -> float:
    """Recall of the oracle selection on uniform attention (every key equally likely): chance."""
    nb = -(-seq_len // BLOCK)
    sizes = torch.full((nb,), float(BLOCK), device=device)
    sizes[-1] = seq_len - BLOCK * (nb - 1)
    W = (sizes[:, None] * sizes[None, :] / seq_len)[None, None]
    always = text_blocks(seq_len, BLOCK, text_tokens, text_position, device) if text_tokens else None
    mask, _, rec = select_mask(W, AdaSpaConfig(sparsity=s, head_adaptive=False, block_size=BLOCK), always)
    return float(rec.mean())


class AttentionProbe:
    """A ditaccel "method" that runs dense attention and records statistics of it."""

    name = "probe"

    def __init__(self, stat_steps20: list[int], image_stats: bool):
        self.stat_steps20 = stat_steps20
        self.image_stats = image_stats  # band mass and window residual (no-text DiT only)
        self.records: dict[str, list[dict]] = defaultdict(list)
        self.chance: dict[str, float] = {}
        self.uniform_band: dict[str, float] = {}

    # ---------------------------------------------------------------- runtime protocol
    def check_num_layers(self, n: int):
        self.num_layers = n

    def check_num_steps(self, n: int):  # a generation starts
        self.num_steps = n
        self.stat_steps = sorted({min(n - 1, int(math.floor(s * n / 20 + 0.5))) for s in self.stat_steps20})
        self.prev_out: dict[int, tuple[int, torch.Tensor]] = {}
        self.history: dict[int, deque] = defaultdict(lambda: deque(maxlen=max(LAGS)))
        self.seen: set[tuple[int, int]] = set()

    def begin_call(self, ctx):
        pass

    def new_cache(self):
        return _NoCache()

    def attention(self, ctx, layer: int, call, cache):
        first = (ctx.step, layer) not in self.seen  # a step seen twice (separate CFG calls) counts once
        self.seen.add((ctx.step, layer))

        def core(q, k, v, key_padding_mask=None, heads=None):
            if heads is not None:
                raise ValueError("probe: context parallelism is not supported")
            mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # what the model computes
            if first:
                with torch.no_grad():
                    self._core_stats(ctx, layer, q, k, v, out, key_padding_mask)
            return out

        out = call.core(core)
        if first:
            with torch.no_grad():
                self._output_stats(ctx, layer, out)
        return out, 1.0, "dense"

    # ---------------------------------------------------------------- statistics
    def _branches(self, ctx, batch: int) -> list[str]:
        if ctx.cond is None:
            return ["nocfg"] * batch
        half = batch // 2
        return ["cond" if (i // half) == ctx.cond else "uncond" for i in range(batch)]

    def _base(self, ctx, layer, batch):
        return {"steps": self.num_steps, "step": ctx.step, "layer": layer, "rows": self._branches(ctx, batch)}

    def _core_stats(self, ctx, layer, q, k, v, out, kpm):
        B, H, L, D = q.shape
        if ctx.step in self.stat_steps:
            _, lse = attention_with_lse(q, k, v, key_padding_mask=kpm)
            W = block_mass(q, k, lse, block_size=BLOCK, key_padding_mask=kpm)
            always = text_blocks(L, BLOCK, ctx.text_tokens, ctx.text_position, q.device) if ctx.text_tokens else None
            rec, rec_video = {}, {}
            for s in SPARSITIES:
                mask, _, r = select_mask(W, AdaSpaConfig(sparsity=s, head_adaptive=False, block_size=BLOCK), always)
                rec[str(s)] = r.tolist()
                if always is not None:
                    free = ~always
                    rec_video[str(s)] = recall(W * free, mask & free).tolist()
                key = f"{L}:{ctx.text_tokens}:{s}"
                if key not in self.chance:
                    self.chance[key] = uniform_recall(L, ctx.text_tokens, ctx.text_position, s, q.device)
            rec_row = self._base(ctx, layer, B) | {"recall": rec}
            if rec_video:
                rec_row["recall_video"] = rec_video
                rec_row["text_mass"] = recall(W, always).tolist()  # mass in the always-kept text blocks
            self.records["recall"].append(rec_row)
        if not self.image_stats:
            return
        grid = tuple(ctx.grid)
        band = make_window("band1d", WINDOW_SIZE, grid)
        nbhd = make_window("neighborhood2d", WINDOW_SIZE, grid)
        if ctx.step in self.stat_steps:  # (a) mass inside the windows: one (H, L, L) softmax at a time
            masks = {"band1d": window_dense_mask(band, q.device), "neighborhood2d": window_dense_mask(nbhd, q.device)}
            for name, m in masks.items():
                self.uniform_band.setdefault(name, float(m.float().mean()))
            scale = 1.0 / math.sqrt(D)
            mass = {name: [] for name in masks}
            for b in range(B):
                p = torch.softmax(q[b].float() @ k[b].float().transpose(-1, -2) * scale, dim=-1)
                for name, m in masks.items():
                    mass[name].append((p * m).sum(-1).mean(-1).tolist())
                del p
            self.records["window_mass"].append(self._base(ctx, layer, B) | {"mass": mass})
        # (c) window residual in head space, compared with the residuals of the last 5 steps
        w = window_attention(q, k, v, band)
        res = (out - w).float()
        o = out.float()
        for prev_step, prev_res, prev_o in self.history[layer]:
            lag = ctx.step - prev_step
            if lag in LAGS:
                self.records["residual"].append(self._base(ctx, layer, B) | {
                    "lag": lag,
                    "cos": _cos(res, prev_res),
                    "rel_l1": _l1_ratio(res - prev_res, res),
                    "wars_error": _l1_ratio(res - prev_res, o),  # (W_t+k + R_t) - O_t+k = R_t - R_t+k
                    "ast_error": _l1_ratio(o - prev_o, o),
                    "wa_error": _l1_ratio(res, o),
                })
        self.history[layer].append((ctx.step, res, o))

    def _output_stats(self, ctx, layer, out):
        if isinstance(out, tuple):  # joint attention: (video, text) outputs
            out = torch.cat([t for t in out if t is not None], dim=1)
        out = out.detach()
        prev = self.prev_out.get(layer)
        if prev is not None and prev[0] == ctx.step - 1:
            self.records["step_similarity"].append(self._base(ctx, layer, out.shape[0]) | {
                "cos": _cos(out, prev[1]), "rel_l1": _l1_ratio(out - prev[1], prev[1])})
        self.prev_out[layer] = (ctx.step, out)


# ------------------------------------------------------------------------ summaries
def _flat(x):
    if isinstance(x, (list, tuple)):
        for y in x:
            yield from _flat(y)
    else:
        yield x


def _agg(values) -> dict:
    v = [x for x in _flat(values) if not (isinstance(x, float) and math.isnan(x))]
    if not v:
        return {}
    return {"min": min(v), "mean": sum(v) / len(v), "max": max(v), "n": len(v)}


def summarize(records: dict[str, list[dict]], num_layers: int) -> dict:
    out: dict = {}
    rec = records.get("recall", [])
    if rec:
        out["oracle_recall"] = {}
        for s in SPARSITIES:
            per_layer = [_agg([r["recall"][str(s)] for r in rec if r["layer"] == i]) for i in range(num_layers)]
            cond = [_agg([[row for row, b in zip(r["recall"][str(s)], r["rows"]) if b != "uncond"]
                          for r in rec if r["layer"] == i]) for i in range(num_layers)]
            heads = len(rec[0]["recall"][str(s)][0])
            per_head = [[_agg([[row[h] for row in r["recall"][str(s)]] for r in rec if r["layer"] == i])["mean"]
                         for h in range(heads)] for i in range(num_layers)]
            steps = sorted({(r["steps"], r["step"]) for r in rec})
            per_step = {f"{t}/{n}": [_agg([r["recall"][str(s)] for r in rec if r["layer"] == i
                                           and (r["steps"], r["step"]) == (n, t)])["mean"] for i in range(num_layers)]
                        for n, t in steps}
            entry = {"per_layer": per_layer, "per_layer_cond_rows": cond, "per_layer_head_mean": per_head,
                     "per_step_layer_mean": per_step}
            if "recall_video" in rec[0]:
                entry["per_layer_video_blocks"] = [
                    _agg([r["recall_video"][str(s)] for r in rec if r["layer"] == i]) for i in range(num_layers)]
            out["oracle_recall"][str(s)] = entry
        if "text_mass" in rec[0]:
            out["text_block_mass"] = [_agg([r["text_mass"] for r in rec if r["layer"] == i])
                                      for i in range(num_layers)]
        out["oracle_recall_steps"] = sorted({(r["steps"], r["step"]) for r in rec})
    wm = records.get("window_mass", [])
    if wm:
        out["window_mass"] = {}
        for name in wm[0]["mass"]:
            out["window_mass"][name] = {
                str(n): [_agg([r["mass"][name] for r in wm if r["layer"] == i and r["steps"] == n])
                         for i in range(num_layers)]
                for n in sorted({r["steps"] for r in wm})}
    sim = records.get("step_similarity", [])
    if sim:
        out["step_similarity"] = {
            str(n): {key: [_agg([r[key] for r in sim if r["layer"] == i and r["steps"] == n])
                           for i in range(num_layers)] for key in ("cos", "rel_l1")}
            for n in sorted({r["steps"] for r in sim})}
    res = records.get("residual", [])
    if res:
        out["residual"] = {
            str(n): {str(lag): {key: [_agg([r[key] for r in res if r["layer"] == i and r["steps"] == n
                                            and r["lag"] == lag]) for i in range(num_layers)]
                                for key in ("cos", "rel_l1", "wars_error", "ast_error", "wa_error")}
                     for lag in LAGS}
            for n in sorted({r["steps"] for r in res})}
    return out


# ------------------------------------------------------------------------ runs
def run_testbed(which: str, schedules: list[int], args, device, dtype) -> dict:
    from ditaccel.testbed.pixel import load_image_pipeline, load_video_pipeline

    t0 = time.perf_counter()
    if which == "image":
        pipe = load_image_pipeline(args.weights and os.path.join(args.weights, "image"), dtype=dtype, device=device)
        k = pipe.transformer.config.num_embeds_ada_norm
        inputs = {"class_labels": [s % k for s in args.seeds]}
    else:
        from ditaccel.testbed.data import VideoCaptions

        pipe = load_video_pipeline(args.weights and os.path.join(args.weights, "video"), dtype=dtype, device=device)
        prompts = args.video_prompts or VideoCaptions.captions(VideoCaptions().balanced_labels(len(args.seeds), 0))
        if len(prompts) != len(args.seeds):
            raise SystemExit(f"--video-prompts: {len(prompts)} prompts for {len(args.seeds)} seeds (one each)")
        for p in prompts:
            VideoCaptions.parse(p)  # one line naming the caption if it is not the testbed's language
        inputs = {"prompt": list(prompts)}
    probe = AttentionProbe(args.stat_steps, image_stats=which == "image")
    install(pipe, probe)
    timing = {}
    try:
        for n in schedules:
            t1 = time.perf_counter()
            gens = [torch.Generator().manual_seed(s) for s in args.seeds]
            with torch.no_grad():
                pipe(**inputs, num_inference_steps=n, generator=gens, output_type="pt")
            timing[str(n)] = round(time.perf_counter() - t1, 1)
            print(f"  {which}: {n}-step schedule done in {timing[str(n)]:.0f} s", flush=True)
    finally:
        remove(pipe)
    summary = summarize(probe.records, probe.num_layers)
    summary["chance_recall"] = probe.chance
    if probe.uniform_band:
        summary["window_mass_uniform"] = probe.uniform_band
    tr = pipe.transformer.config
    return {"model": type(pipe.transformer).__name__, "layers": probe.num_layers,
            "heads": tr.num_attention_heads, "head_dim": tr.attention_head_dim,
            "inputs": inputs, "schedules": schedules, "seconds": round(time.perf_counter() - t0, 1),
            "schedule_seconds": timing, "summary": summary, "records": probe.records}


def _fmt(a: dict, pct=True) -> str:
    if not a:
        return "-"
    f = (lambda x: f"{100 * x:.0f}") if pct else (lambda x: f"{x:.3f}")
    return f"{f(a['min'])}/{f(a['mean'])}"


def print_summary(name: str, r: dict) -> None:
    s = r["summary"]
    print(f"\n== {name} testbed ({r['model']}, {r['layers']} layers, {r['heads']} heads x {r['head_dim']}), "
          f"{r['seconds']:.0f} s")
    if "oracle_recall" in s:
        steps = ", ".join(f"{t}/{n}" for n, t in s["oracle_recall_steps"])
        print(f"oracle block top-k recall (min/mean % over heads, steps {steps}, seeds, CFG halves):")
        chance = {k.split(":")[-1]: v for k, v in s["chance_recall"].items()}
        for sp, e in s["oracle_recall"].items():
            line = " ".join(_fmt(a) for a in e["per_layer"])
            bar = ""
            if sp == "0.8":
                ok_min = all(a["min"] >= BAR for a in e["per_layer"])
                ok_mean = all(a["mean"] >= BAR for a in e["per_layer"])
                bar = f"  [bar >= 80% every layer: min {'yes' if ok_min else 'NO'}, mean {'yes' if ok_mean else 'NO'}]"
            print(f"  s={sp}: {line}   (uniform attention: {100 * chance[sp]:.0f}){bar}")
            print(f"    conditional rows only: {' '.join(_fmt(a) for a in e['per_layer_cond_rows'])}")
            if "per_layer_video_blocks" in e:
                print(f"    non-text blocks only: {' '.join(_fmt(a) for a in e['per_layer_video_blocks'])}")
            if sp == "0.8":
                heads = " | ".join(",".join(f"{100 * x:.0f}" for x in layer) for layer in e["per_layer_head_mean"])
                print(f"    mean per head (layer | layer ...): {heads}")
        if "text_block_mass" in s:
            print(f"  mass in text blocks (always kept): {' '.join(_fmt(a) for a in s['text_block_mass'])}")
    if "window_mass" in s:
        for wname, per in s["window_mass"].items():
            for n, layers in per.items():
                print(f"{wname} window mass, {n} steps (min/mean % over heads, steps, rows): "
                      f"{' '.join(_fmt(a) for a in layers)}   "
                      f"(uniform: {100 * s['window_mass_uniform'][wname]:.0f})")
    if "step_similarity" in s:
        for n, e in s["step_similarity"].items():
            print(f"module output, step t vs t-1, {n} steps: cos min/mean {' '.join(_fmt(a, False) for a in e['cos'])}")
            rl = " ".join(f"{a['mean']:.3f}/{a['max']:.3f}" for a in e["rel_l1"])
            print(f"    rel L1 mean/max {rl}")
    if "residual" in s:
        for n, lags in s["residual"].items():
            for lag, e in lags.items():
                print(f"window residual, t vs t+{lag}, {n} steps: cos min/mean "
                      f"{' '.join(_fmt(a, False) for a in e['cos'])}")
                means = {key: " ".join(f"{a['mean']:.3f}" for a in e[key])
                         for key in ("rel_l1", "wars_error", "ast_error", "wa_error")}
                print(f"    rel L1 |R'-R|/|R'| mean {means['rel_l1']}; error/|O| mean: wars {means['wars_error']}, "
                      f"ast {means['ast_error']}, wa {means['wa_error']}")


def _rounded(x, digits: int = 4):
    """Floats rounded to ``digits`` decimals (the raw records stay readable and small)."""
    if isinstance(x, float):
        return round(x, digits)
    if isinstance(x, dict):
        return {k: _rounded(v, digits) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_rounded(v, digits) for v in x]
    return x


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="one sample per seed, one batch")
    ap.add_argument("--steps", type=int, nargs="+", default=[20, 50], help="image testbed schedules")
    ap.add_argument("--video-steps", type=int, nargs="+", default=[20], help="video testbed schedules")
    ap.add_argument("--stat-steps", type=int, nargs="+", default=[2, 4, 8, 12, 16, 19],
                    help="steps of a 20-step schedule for the oracle recall (other schedules: scaled)")
    ap.add_argument("--only", choices=["image", "video"])
    ap.add_argument("--video-prompts", nargs="+", help="one caption per seed (default: balanced over the factors), "
                    "e.g. the same clip over each background to compare them")
    ap.add_argument("--weights", help="folder holding image/ and video/ (default: the shipped testbed weights)")
    ap.add_argument("--threads", type=int, help="torch CPU threads")
    ap.add_argument("--json", help="write settings, summaries and raw records here")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    if any(s < 0 or s >= 20 for s in args.stat_steps):
        ap.error("--stat-steps: steps of a 20-step schedule, in [0, 20)")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = {
        "date": datetime.date.today().isoformat(),
        "command": " ".join(shlex.quote(a) for a in [sys.executable.split("/")[-1], *sys.argv]),
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"cpu ({platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"),
        "dtype": args.dtype, "torch": torch.__version__,
        "settings": {"weights": args.weights or "shipped", "seeds": args.seeds, "video_prompts": args.video_prompts, "image_steps": args.steps, "video_steps": args.video_steps,
                     "stat_steps_of_20": args.stat_steps, "sparsities": SPARSITIES, "block_size": BLOCK,
                     "window_size": WINDOW_SIZE, "lags": LAGS, "rows": "every batch row: each seed, both CFG halves"},
    }
    for which in ("image", "video"):
        if args.only and args.only != which:
            continue
        schedules = args.steps if which == "image" else args.video_steps
        print(f"{which} testbed: schedules {schedules}, seeds {args.seeds}", flush=True)
        result[which] = run_testbed(which, schedules, args, device, dtype)
        print_summary(which, result[which])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(_rounded(result), f, indent=None, separators=(",", ":"))
            f.write("\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
