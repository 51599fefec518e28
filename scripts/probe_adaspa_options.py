"""AdaSpa's options on the video testbed: why the paper's head tiers and the LSE cache cost PSNR
there, and what head_rule / dense_last / dense_layers / more searches buy.

One seed of the shipped video model (CogVideoX, 6 layers, 3 heads x 64, CFG batch of 2), dense,
then AdaSpa runs; for each the PSNR of the video against the dense one (float pixels in [0, 1])
and the attention-FLOPs ratio (``ditaccel.stats``). Two runs (s = 0.5 and s = 0.8, paper
defaults) also record every searched block-mass matrix W and analyse it offline:

* tiers: per search step, layer, CFG half (0 = uncond, 1 = cond) and head, the recall (kept
  attention mass / total, text blocks included) of the uniform mask at s, the head's tier
  sparsity, the recall under the tiers and under ``head_rule="mass"``; whether the two CFG halves
  got the same tiers; the kept mass with tiers ranked on the mean recall of the two halves;
* LSE cache: at the re-search, recall (measured on W from a fresh LSE, i.e. the step's true block
  mass) of the mask chosen from the cached-LSE W, of the one chosen from the fresh W, and of the
  first search's mask (no re-search at all).

    python scripts/probe_adaspa_options.py [--seed 2] [--steps 20] [--only NAME,...] [--kernel masked_sdpa]
                                           [--json out.json]
    python scripts/probe_adaspa_options.py --head-errors 0.5,0.8 [--json out.json]

CPU, float32. ``--list`` prints the run names. ``--head-errors``: per-head attention errors at the
first search only (stops each generation there). About 1 min a run on 2 idle cores with
``--kernel masked_sdpa``; docs/results/2026-12-03-cpu-probe-adaspa-options.json holds the runs.
"""

import argparse
import datetime
import json
import platform
import sys
import time

import torch
import torch.nn.functional as F

import ditaccel
from ditaccel.evaluate import psnr
from ditaccel.kernels.block_mass import attention_with_lse, block_mass
from ditaccel.kernels.block_sparse import block_sparse_attention
from ditaccel.methods import adaspa
from ditaccel.methods.adaspa import AdaSpaConfig, head_sparsity, search_mask, select_mask, text_blocks
from ditaccel.runtime import get_runtime
from ditaccel.testbed.pixel import load_video_pipeline

# name: (AdaSpaConfig kwargs, special): special is None, "capture", "dense_research", "per_half" or
# "tiers_{all,sparser_only,denser_only}[:layers]" (see instrument)
RUNS = {
    "s=0.5 tiers": (dict(sparsity=0.5), "capture"),
    "s=0.5 tiers per-half ranking (before the fix)": (dict(sparsity=0.5), "per_half"),
    "s=0.5 no tiers": (dict(sparsity=0.5, head_adaptive=False), None),
    "s=0.5 mass": (dict(sparsity=0.5, head_rule="mass"), None),
    "s=0.5 tiers lse_cache=False": (dict(sparsity=0.5, lse_cache=False), None),
    "s=0.5 tiers re-search output exact": (dict(sparsity=0.5), "dense_research"),
    "s=0.8 tiers": (dict(sparsity=0.8), None),
    "s=0.8 no tiers": (dict(sparsity=0.8, head_adaptive=False), None),
    "s=0.8 mass": (dict(sparsity=0.8, head_rule="mass"), None),
    "top_p 0.9": (dict(head_rule="top_p", target_recall=0.9), None),
    "top_p 0.95": (dict(head_rule="top_p", target_recall=0.95), None),
    "s=0.8 tiers dense_last 0.1": (dict(sparsity=0.8, dense_last=0.1), None),
    "s=0.8 tiers dense_last 0.2": (dict(sparsity=0.8, dense_last=0.2), None),
    "s=0.8 tiers dense_layers 1": (dict(sparsity=0.8, dense_layers=1), None),
    "s=0.8 tiers dense_layers 2": (dict(sparsity=0.8, dense_layers=2), None),
    "s=0.8 tiers 4 searches": (dict(sparsity=0.8, search_at=(0.2, 0.4, 0.6, 0.8)), None),
    # where the tiers' loss at s=0.5 comes from (ablations patched into head_sparsity)
    "s=0.5 tiers good heads sparser only": (dict(sparsity=0.5), "tiers_sparser_only"),
    "s=0.5 tiers bad heads denser only": (dict(sparsity=0.5), "tiers_denser_only"),
    "s=0.5 tiers in layer 0 only": (dict(sparsity=0.5), "tiers_all:0"),
    "s=0.5 tiers in layers 1-3 only": (dict(sparsity=0.5), "tiers_all:1,2,3"),
    # the LSE cache at s=0.8
    "s=0.8 tiers (W captured)": (dict(sparsity=0.8), "capture"),
    "s=0.8 tiers lse_cache=False": (dict(sparsity=0.8, lse_cache=False), None),
    "s=0.8 tiers re-search output exact": (dict(sparsity=0.8), "dense_research"),
    "s=0.8 tiers per-half ranking (before the fix)": (dict(sparsity=0.8), "per_half"),
}


def masked_sdpa_sparse():
    """A stand-in for ``block_sparse_attention`` on the CPU: dense SDPA with the block mask expanded
    to tokens (the same attention up to rounding, ~1.5x faster than the CPU gather path here). The
    token mask is built once per searched mask (keyed on the lists' contents: the method decodes
    fresh lists from its packed cache at every call)."""
    memo = {}

    def attend(q, k, v, kv_indices, kv_counts, *, block_size, key_padding_mask=None, validate=True,
               dense_query_blocks=None):
        if key_padding_mask is not None:
            raise ValueError("masked_sdpa_sparse: no key padding mask on the video testbed")
        key = (tuple(kv_indices.shape), hash(kv_counts.cpu().numpy().tobytes()),
               hash(kv_indices.cpu().numpy().tobytes()), dense_query_blocks)
        if key not in memo:
            L = q.shape[2]
            blocks = indices_to_mask(kv_indices, kv_counts, -(-L // block_size))
            if dense_query_blocks is not None:  # rows the kernel runs densely (the text rows)
                blocks[:, :, dense_query_blocks[0]:dense_query_blocks[1]] = True
            tok = blocks.repeat_interleave(block_size, -1).repeat_interleave(block_size, -2)[..., :L, :L]
            if len(memo) >= 6:  # first in, first out: one live mask per layer of the testbed
                memo.pop(next(iter(memo)))
            memo[key] = tok
        return F.scaled_dot_product_attention(q, k, v, attn_mask=memo[key])

    return attend


def instrument(pipe, special, records):
    """Spy on the installed AdaSpa: record W at each search ("capture"), replace the research
    step's sparse output by exact attention ("dense_research": what lse_cache=False adds), or
    rank the head rules per batch item, splitting the CFG halves ("per_half": as before the fix).
    Returns a function that undoes the module-level patch."""
    method = get_runtime(pipe).method
    layer_now = [None]
    attention, search, core = method.attention, method._search, method._core

    def spy_attention(ctx, layer, call, cache):
        layer_now[0] = layer
        return attention(ctx, layer, call, cache)

    def spy_search(what, ctx, q, k, v, kpm, cache, heads=None):
        first_mask = None if cache.mask is None else cache.mask.to_mask()
        out = search(what, ctx, q, k, v, kpm, cache, heads)
        bs = method.config.block_size
        rec = {"step": ctx.step, "layer": layer_now[0], "what": what, "cond": ctx.cond,
               "W": block_mass(q, k, cache.lse, block_size=bs).float(),
               "always": text_blocks(q.shape[2], bs, ctx.text_tokens, ctx.text_position) if ctx.text_tokens else None}
        if what == "research":
            _, lse = attention_with_lse(q, k, v)
            rec["W_fresh"] = block_mass(q, k, lse.float(), block_size=bs).float()
            rec["first_mask"] = first_mask
        records.append(rec)
        return out

    def dense_core(what, ctx, q, k, v, kpm, cache, stats, heads=None):
        out = core(what, ctx, q, k, v, kpm, cache, stats, heads)
        return F.scaled_dot_product_attention(q, k, v) if what == "research" else out

    method.attention = spy_attention
    if special == "capture":
        method._search = spy_search
    elif special == "dense_research":
        method._core = dense_core
    elif special == "per_half":
        def per_half(mass_of, shape, config, video, heads=None, cfg_pairs=False, **kw):
            return search_mask(mass_of, shape, config, video, heads, False, **kw)

        adaspa.search_mask = per_half
    elif special and special.startswith("tiers_"):  # ablations of the paper's tiers
        part, _, layers = special[len("tiers_"):].partition(":")
        layers = {int(x) for x in layers.split(",")} if layers else None

        def tiers(base_recall, s, threshold):
            out = head_sparsity(base_recall, s, threshold)
            if layers is not None and layer_now[0] not in layers:
                return torch.full_like(out, s)
            if part == "sparser_only":  # only the good heads change (to (1+s)/2): fewer FLOPs
                return torch.where(out > s, out, torch.full_like(out, s))
            if part == "denser_only":  # only the bad heads change (to (3s-1)/2): more FLOPs
                return torch.where(out < s, out, torch.full_like(out, s))
            return out

        adaspa.head_sparsity = tiers

    def undo():
        adaspa.search_mask, adaspa.head_sparsity = search_mask, head_sparsity

    return undo


def indices_to_mask(idx, counts, nk):
    B, H, NQ, _ = idx.shape
    mask = torch.zeros(B, H, NQ, nk + 1, dtype=torch.bool)
    ar = torch.arange(idx.shape[-1])
    valid = ar < counts[..., None]
    mask.scatter_(-1, torch.where(valid, idx.long(), nk), True)
    return mask[..., :nk]


def analyse(records, s):
    """Per (search step, layer): the tier analysis (see the module docstring)."""
    out = []
    for r in records:
        W, always = r["W"], r["always"]
        pairs = r["cond"] is not None and W.shape[0] % 2 == 0
        uni_m, _, uni_r = select_mask(W, AdaSpaConfig(sparsity=s, head_adaptive=False), always)
        tie_m, tie_s, tie_r = select_mask(W, AdaSpaConfig(sparsity=s), always, cfg_pairs=pairs)
        half_m, half_s, half_r = select_mask(W, AdaSpaConfig(sparsity=s), always)  # as before the fix
        mas_m, mas_s, mas_r = select_mask(W, AdaSpaConfig(sparsity=s, head_rule="mass"), always, cfg_pairs=pairs)

        def agree(m):  # fraction of (head, query block, key block) entries equal in the two CFG halves
            return float((m[0] == m[1]).float().mean()) if m.shape[0] == 2 else None

        e = {"step": r["step"], "layer": r["layer"], "what": r["what"],
             "recall_uniform": uni_r.tolist(), "tier_sparsity": tie_s.tolist(), "recall_tiers": tie_r.tolist(),
             "tier_sparsity_per_half": half_s.tolist(), "recall_tiers_per_half": half_r.tolist(),
             "mass_sparsity": mas_s.tolist(), "recall_mass": mas_r.tolist(),
             "n_good_heads_per_half": (uni_r > 0.8).sum(1).tolist(),
             "cfg_halves_same_tiers_per_half": bool((half_s[0] == half_s[-1]).all()),
             "mask_agreement_cfg_halves": {"uniform": agree(uni_m), "tiers": agree(tie_m),
                                           "tiers_per_half": agree(half_m), "mass": agree(mas_m)},
             "text_mass_fraction": (((W * always).sum((-1, -2)) / W.sum((-1, -2))).tolist()
                                    if always is not None else None)}
        if r["what"] == "research":
            Wf = r["W_fresh"]
            cfg = AdaSpaConfig(sparsity=s)
            m_cached, _, _ = select_mask(W, cfg, always, cfg_pairs=pairs)
            m_fresh, _, _ = select_mask(Wf, cfg, always, cfg_pairs=pairs)
            m_first = r["first_mask"]
            if always is not None:
                m_first |= always
            e["lse"] = {"recall_cached_lse_mask": adaspa.recall(Wf, m_cached).tolist(),
                        "recall_fresh_lse_mask": adaspa.recall(Wf, m_fresh).tolist(),
                        "recall_first_search_mask": adaspa.recall(Wf, m_first).tolist(),
                        "mask_agreement_cached_vs_fresh": float((m_cached == m_fresh).float().mean()),
                        "W_rel_diff": float((W - Wf).abs().sum() / Wf.abs().sum())}
        out.append(e)
    return out


class _Stop(Exception):
    pass


def head_errors(pipe, generate, s, guidance=6.0):
    """At the first search step (its inputs are those of the dense run: warm-up and search step are
    exact), per layer and head: the relative error ||O_mask - O|| / ||O|| of the head's attention
    output for the uniform mask, the tiers (as shipped: CFG halves together), the tiers per batch
    item (before the fix) and head_rule="mass"; and the same for the guided combination
    uncond + g (cond - uncond) of the two CFG halves. The generation is stopped there."""
    rows = []
    ditaccel.apply(pipe, AdaSpaConfig(sparsity=s))
    method = get_runtime(pipe).method
    search, bs = method._search, method.config.block_size
    n_layers = len(pipe.transformer.transformer_blocks)

    def spy(what, ctx, q, k, v, kpm, cache, heads=None):
        o = search(what, ctx, q, k, v, kpm, cache, heads)
        W = block_mass(q, k, cache.lse, block_size=bs)
        always = text_blocks(q.shape[2], bs, ctx.text_tokens, ctx.text_position) if ctx.text_tokens else None
        L = q.shape[2]
        row = {"layer": len(rows), "step": ctx.step}
        for name, cfg, pairs in (("uniform", AdaSpaConfig(sparsity=s, head_adaptive=False), True),
                                 ("tiers", AdaSpaConfig(sparsity=s), True),
                                 ("tiers_per_half", AdaSpaConfig(sparsity=s), False),
                                 ("mass", AdaSpaConfig(sparsity=s, head_rule="mass"), True)):
            mask, sp, rec = select_mask(W, cfg, always, cfg_pairs=pairs)
            tok = mask.repeat_interleave(bs, -1).repeat_interleave(bs, -2)[..., :L, :L]
            e = F.scaled_dot_product_attention(q, k, v, attn_mask=tok) - o
            u, c = 0, 1  # CogVideoX batches [uncond; cond]
            guided_o = o[u] + guidance * (o[c] - o[u])
            guided_e = e[u] + guidance * (e[c] - e[u])
            proj = pipe.transformer.transformer_blocks[len(rows)].attn1.to_out[0].weight  # (C, H * D)
            B, H, _, D = o.shape
            pe = torch.einsum("bhld,chd->bhlc", e, proj.view(-1, H, D))  # each head's share of the layer error
            po = torch.einsum("bhld,chd->blc", o, proj.view(-1, H, D))
            row[name] = {"sparsity": sp.tolist(), "recall": rec.tolist(),
                         "rel_err": (e.flatten(2).norm(dim=-1) / o.flatten(2).norm(dim=-1)).tolist(),
                         "head_out_norm": o.flatten(2).norm(dim=-1).tolist(),
                         "projected_err_per_head": (pe.flatten(2).norm(dim=-1) / po.flatten(1).norm(dim=-1)[:, None]).tolist(),
                         "projected_rel_err": (pe.sum(1).flatten(1).norm(dim=-1) / po.flatten(1).norm(dim=-1)).tolist(),
                         "rel_err_guided": (guided_e.flatten(1).norm(dim=-1) / guided_o.flatten(1).norm(dim=-1)).tolist()}
        rows.append(row)
        if len(rows) == n_layers:
            raise _Stop
        return o

    method._search = spy
    try:
        generate()
    except _Stop:
        pass
    finally:
        ditaccel.remove(pipe)
    return rows


def mean(x):
    x = torch.as_tensor(x, dtype=torch.float64)
    return float(x.mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--caption", default="a blue circle moving up over stripes")
    ap.add_argument("--only", help="comma-separated run names (dense always runs)")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--kernel", choices=("block_sparse", "masked_sdpa"), default="block_sparse",
                    help="sparse attention of AdaSpa's sparse steps: ditaccel's kernel, or masked_sdpa_sparse "
                         "(same result up to rounding, faster on the CPU)")
    ap.add_argument("--head-errors", help="comma-separated sparsities: only the per-head output errors at the "
                                         "first search step (no full generations)")
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args()
    if a.list:
        print("\n".join(RUNS))
        return
    names = list(RUNS) if not a.only else [n.strip() for n in a.only.split(",")]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        raise SystemExit(f"--only: unknown runs {unknown}; --list shows them")
    pipe = load_video_pipeline()

    def generate():
        g = torch.Generator().manual_seed(a.seed)
        return pipe([a.caption], num_inference_steps=a.steps, generator=g, output_type="pt").frames.float()

    if a.head_errors:
        out = {}
        for sp in (float(x) for x in a.head_errors.split(",")):
            out[sp] = rows = head_errors(pipe, generate, sp)
            for r in rows:
                print(f"s={sp} layer {r['layer']}: " + "; ".join(
                    f"{k} s {[round(x, 2) for x in r[k]['sparsity'][1]]} recall {[round(x, 3) for x in r[k]['recall'][1]]} "
                    f"err {[round(x, 3) for x in r[k]['rel_err'][1]]} |O_h| {[round(x) for x in r[k]['head_out_norm'][1]]} "
                    f"projected err per head {[round(x, 3) for x in r[k]['projected_err_per_head'][1]]} "
                    f"layer {[round(x, 3) for x in r[k]['projected_rel_err']]} "
                    f"guided {[round(x, 3) for x in r[k]['rel_err_guided']]}"
                    for k in ("uniform", "tiers", "tiers_per_half", "mass")), flush=True)
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"date": datetime.date.today().isoformat(), "command": "python " + " ".join(sys.argv),
                           "seed": a.seed, "steps": a.steps, "caption": a.caption, "head_errors": out}, f, indent=1)
        return
    t0 = time.perf_counter()
    dense = generate()
    dense_seconds = time.perf_counter() - t0
    print(f"dense: {dense_seconds:.0f} s", flush=True)
    results = []
    for name in names:
        kw, special = RUNS[name]
        records = []
        ditaccel.apply(pipe, AdaSpaConfig(**kw))
        undo = instrument(pipe, special, records)
        if a.kernel == "masked_sdpa":
            adaspa.block_sparse_attention = masked_sdpa_sparse()
        try:
            t = time.perf_counter()
            video = generate()
            seconds = time.perf_counter() - t
            st = ditaccel.stats(pipe)
        finally:
            undo()
            adaspa.block_sparse_attention = block_sparse_attention
            ditaccel.remove(pipe)
        r = {"run": name, "config": kw, "special": special, "psnr": psnr(dense, video),
             "attention_flops_ratio": st.attention_flops_ratio, "seconds": seconds,
             "method_counts": st.method_counts, "density_per_layer": st.details["density_per_layer"],
             "recall_per_layer_per_search": st.details["recall_per_search"]}
        print(f"{name}: {r['psnr']:.2f} dB, attention FLOPs {100 * r['attention_flops_ratio']:.1f}%, "
              f"density per layer {[round(d, 3) for d in r['density_per_layer']]}, {seconds:.0f} s", flush=True)
        if records:
            r["analysis"] = analyse(records, kw["sparsity"])
            for e in r["analysis"]:
                def rnd(x, n=3):
                    return [[round(v, n) for v in b] for b in x]
                line = (f"  step {e['step']:2d} layer {e['layer']} n_good {e['n_good_heads_per_half']} "
                        f"recall uniform {rnd(e['recall_uniform'])} tiers s {rnd(e['tier_sparsity'], 2)} "
                        f"-> {rnd(e['recall_tiers'])} (per half: s {rnd(e['tier_sparsity_per_half'], 2)} "
                        f"-> {rnd(e['recall_tiers_per_half'])}); mean recall uniform {mean(e['recall_uniform']):.3f} "
                        f"tiers {mean(e['recall_tiers']):.3f} per-half tiers {mean(e['recall_tiers_per_half']):.3f} "
                        f"mass {mean(e['recall_mass']):.3f}; mask agreement of the CFG halves "
                        f"{ {k: round(v, 3) for k, v in e['mask_agreement_cfg_halves'].items()} }")
                print(line)
                if "lse" in e:
                    x = e["lse"]
                    print(f"    re-search: recall on fresh W of mask from cached LSE "
                          f"{mean(x['recall_cached_lse_mask']):.4f}, from fresh LSE {mean(x['recall_fresh_lse_mask']):.4f}, "
                          f"first search's mask {mean(x['recall_first_search_mask']):.4f}; masks agree "
                          f"{x['mask_agreement_cached_vs_fresh']:.4f}; |W_cached - W_fresh| / |W| {x['W_rel_diff']:.4f}")
            sys.stdout.flush()
        results.append(r)
        if a.json:  # after every run: a partial file survives an interrupted probe
            write(a, results, dense_seconds)


def write(a, results, dense_seconds) -> None:
    with open(a.json, "w") as f:
        json.dump({"date": datetime.date.today().isoformat(),
                   "device": f"CPU ({platform.machine()}, {torch.get_num_threads()} torch threads, shared), float32",
                   "command": "python " + " ".join(sys.argv), "kernel": a.kernel, "seed": a.seed, "steps": a.steps, "caption": a.caption,
                   "torch": torch.__version__, "dense_seconds": dense_seconds, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
