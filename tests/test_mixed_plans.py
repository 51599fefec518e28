"""Mixed plans (format 2): DiTFastAttn's entries and AdaSpa's search / research / sparse per (layer,
step). Validation of every rule, round trip, exact agreement with each method's own runs, FLOP
accounting, calibration with the ``sparse`` candidate and exact ``remove``."""

import copy
import json

import pytest
import torch
from conftest import gen

import ditaccel
from ditaccel.calibrate import with_searches
from ditaccel.methods.ditfastattn import _tile_fraction
from ditaccel.methods.mixed import mixed_schedule, sparse_releases
from ditaccel.plan import Plan, PlanError
from ditaccel.runtime import get_runtime
from ditaccel.testbed import tiny_dit_pipeline

STEPS = 6
ADASPA = {"sparsity": 0.5, "block_size": 16}
# 3 layers x 6 steps, every entry kind where it is legal: search refreshes the wars residual and
# feeds an ast step; research re-searches from the cached LSE
ROWS = [
    ["search", "wars", "sparse", "ast", "research", "ast"],
    ["full", "search", "sparse", "sparse", "wars", "asc"],
    ["asc", "full", "wars+asc", "search", "research", "sparse"],
]


@pytest.fixture(scope="module")
def pipe():
    # 16 x 16 = 256 tokens: 16 blocks of 16 tokens, so block sparsity is not trivial
    return tiny_dit_pipeline(sample_size=32, num_layers=3)


def run(pipe, labels=(1, 2), steps=STEPS, **kw):
    return pipe(class_labels=list(labels), num_inference_steps=steps, generator=gen(0), output_type="pt", **kw).images


@pytest.fixture
def plan(pipe):
    return Plan.from_methods(pipe, ROWS, cfg=True, adaspa=dict(ADASPA))


@pytest.fixture
def good(plan):
    return copy.deepcopy(plan.to_dict())


# ------------------------------------------------------------------ format
def test_round_trip_writes_version_2(plan, tmp_path):
    assert plan.is_mixed and plan.version == 2
    plan.save(tmp_path / "p.json")
    d = json.loads((tmp_path / "p.json").read_text())
    assert d["version"] == 2 and d["methods"] == ROWS and d["metadata"]["adaspa"] == ADASPA
    back = Plan.load(tmp_path / "p.json")
    assert back.methods == plan.methods and back.metadata == plan.metadata
    assert back.adaspa_config() == ditaccel.AdaSpaConfig(**ADASPA)
    c = back.counts()
    assert (c["search"], c["research"], c["sparse"]) == (3, 2, 4)
    assert "format 2" in back.summary() and "adaspa     block_size=16, sparsity=0.5" in back.summary()


def test_plan_without_adaspa_entries_is_still_version_1(pipe, tmp_path):
    p = Plan.from_methods(pipe, [["full", "ast"]] * 3, cfg=False)
    assert not p.is_mixed and p.to_dict()["version"] == 1 and p.adaspa_config() is None
    d = p.to_dict()
    d["version"] = 2  # a version-2 file of DiTFastAttn entries only loads too
    assert Plan.from_dict(d).methods == p.methods


def _set_entry(layer, step, value):
    def mutate(d):
        d["methods"][layer][step] = value
        return d
    return mutate


def _set_md(key, value):
    def mutate(d):
        d["metadata"][key] = value
        return d
    return mutate


def _set_adaspa(key, value):
    def mutate(d):
        d["metadata"]["adaspa"][key] = value
        return d
    return mutate


def _no_adaspa_entries(d):
    d["methods"] = [["full"] * STEPS for _ in range(3)]
    return d


CASES = {
    "unknown-entry": (_set_entry(1, 2, "sparse2"), r"^methods\[1\]\[2\]: unknown method 'sparse2'"),
    "sparse-before-search": (_set_entry(1, 1, "sparse"),
                             r"^methods\[1\]\[1\]: 'sparse' needs an earlier 'search' step of the same layer \(its block mask\)"),
    "research-before-search": (_set_entry(1, 1, "research"),
                               r"^methods\[1\]\[1\]: 'research' needs an earlier 'search' .*cached LSE"),
    "step0-sparse": (_set_entry(1, 0, "sparse"), r"^methods\[1\]\[0\]: step 0 must compute attention"),
    "step0-research": (_set_entry(1, 0, "research"), r"^methods\[1\]\[0\]: step 0 must compute attention"),
    # a residual needs a full or search step: layer 2 starts with asc
    "wars-after-asc-only": (_set_entry(2, 1, "wars"), r"^methods\[2\]\[1\]: 'wars' needs an earlier 'full'"),
    "asc-without-cfg": (_set_md("cfg", False), r"^methods\[1\]\[5\]: 'asc' needs CFG"),
    "adaspa-missing": (lambda d: (d["metadata"].pop("adaspa"), d)[1], r"^metadata\.adaspa: missing"),
    "adaspa-not-object": (_set_md("adaspa", [0.5]), r"^metadata\.adaspa: expected an object"),
    "adaspa-unknown-key": (_set_adaspa("sparsty", 0.5), r"^metadata\.adaspa\.sparsty: unknown AdaSpa setting"),
    "adaspa-schedule-key": (_set_adaspa("warmup", 0.2), r"^metadata\.adaspa\.warmup: a schedule setting"),
    "adaspa-bad-sparsity": (_set_adaspa("sparsity", 1.5), r"^metadata\.adaspa: sparsity must be in \[0, 1\)"),
    "adaspa-bad-block": (_set_adaspa("block_size", 48), r"^metadata\.adaspa: block_size must be one of"),
    "adaspa-without-entries": (_no_adaspa_entries, r"^metadata\.adaspa: AdaSpa settings in a plan without"),
    "version-1-with-sparse": (lambda d: dict(d, version=1), r"^methods\[0\]\[0\]: 'search' is a format-2 entry"),
    "version-3": (lambda d: dict(d, version=3), r"^version: plan format 3 is newer"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_invalid_mixed_plan_is_rejected(good, tmp_path, case):
    mutate, pattern = CASES[case]
    Plan.from_dict(copy.deepcopy(good))  # the unmutated document is valid
    (tmp_path / "p.json").write_text(json.dumps(mutate(copy.deepcopy(good))))
    with pytest.raises(PlanError, match=pattern):
        Plan.load(tmp_path / "p.json")


def test_search_counts_as_full_for_ditfastattn_rules(pipe):
    Plan.from_methods(pipe, [["search", "wars", "ast", "wars+asc", "sparse", "ast"]] * 3, cfg=True,
                      adaspa=dict(ADASPA))


# ------------------------------------------------------------------ schedules
def test_cache_schedule_of_a_mixed_row():
    row = ["search", "wars", "sparse", "ast", "research", "sparse", "full", "ast"]
    acts = mixed_schedule(row)
    assert [a.method for a in acts] == row
    assert acts[0].keep_res == "all"  # the search refreshes the residual its wars reads
    assert acts[1].release_res and acts[2].keep_out and acts[3].release_out and acts[6].keep_out
    # mask: read by the sparse steps up to the next search / research; LSE by the research steps
    assert sparse_releases(row) == [(False, False), (False, False), (True, False), (True, False),
                                    (False, True), (True, True), (True, True), (True, True)]
    assert sparse_releases(["search", "research", "research", "sparse"]) == [
        (True, False), (True, False), (False, True), (True, True)]


def test_with_searches_marks_the_full_step_a_sparse_run_reads():
    assert with_searches(["full", "sparse", "sparse", "ast", "full", "wars", "sparse"]) == [
        "search", "sparse", "sparse", "ast", "search", "wars", "sparse"]
    assert with_searches(["full", "sparse", "asc", "sparse"]) == ["search", "sparse", "asc", "sparse"]
    assert with_searches(["full", "ast", "wars"]) == ["full", "ast", "wars"]


# ------------------------------------------------------------------ against each method's own runs
def _adaspa_config(**kw):
    # 6 steps: dense, dense, search (2), sparse, research (4), sparse
    return ditaccel.AdaSpaConfig(**ADASPA, warmup=0.3, search_at=(0.34, 0.67), **kw)


def _adaspa_row(cfg):
    return ["full" if w == "dense" else w for w in cfg.schedule(STEPS)]


def test_adaspa_rows_give_adaspa_exactly(pipe):
    cfg = _adaspa_config()
    assert cfg.schedule(STEPS) == ["dense", "dense", "search", "sparse", "research", "sparse"]
    ditaccel.apply(pipe, cfg)
    ref, st_ref = run(pipe), ditaccel.stats(pipe)
    ditaccel.remove(pipe)
    plan = Plan.from_methods(pipe, [_adaspa_row(cfg)] * 3, cfg=True, adaspa=dict(ADASPA))
    ditaccel.apply(pipe, plan)
    out, st = run(pipe), ditaccel.stats(pipe)
    ditaccel.remove(pipe)
    assert torch.equal(out, ref)
    assert st.method == "mixed"
    assert st.attention_flops_ratio == st_ref.attention_flops_ratio < 1
    counts = dict(st_ref.method_counts)
    counts["full"] = counts.pop("dense")
    assert st.method_counts == counts
    assert st.details["density_per_layer"] == st_ref.details["density_per_layer"]
    assert st.details["recall_per_search"] == st_ref.details["recall_per_search"]


def test_full_layer_plus_adaspa_layers_give_adaspa_with_a_dense_layer(pipe):
    cfg = _adaspa_config(dense_layers=1)
    ditaccel.apply(pipe, cfg)
    ref = run(pipe)
    ditaccel.remove(pipe)
    plan = Plan.from_methods(pipe, [["full"] * STEPS] + [_adaspa_row(cfg)] * 2, cfg=True, adaspa=dict(ADASPA))
    ditaccel.apply(pipe, plan)
    out = run(pipe)
    ditaccel.remove(pipe)
    assert torch.equal(out, ref)


def _attention_outputs(pipe, plan):
    """Every step's transformer output and layer 0's attention-module output, under ``plan``."""
    outs, attn0 = [], []
    hooks = [pipe.transformer.register_forward_hook(lambda m, a, o: outs.append(o[0].clone())),
             pipe.transformer.transformer_blocks[0].attn1.register_forward_hook(
                 lambda m, a, o: attn0.append(o.clone()))]
    try:
        ditaccel.apply(pipe, plan)
        run(pipe)
    finally:
        ditaccel.remove(pipe)
        for h in hooks:
            h.remove()
    return outs, attn0


def test_ditfastattn_entries_are_unchanged_in_a_mixed_plan(pipe):
    # layer 0 runs DiTFastAttn alone; layers 1-2 full until a search at step 4 and sparse at 5. The
    # search's dense output equals full attention, so every transformer output up to step 4 and
    # every layer-0 output (layer 0 sees only the latents) equal the DiTFastAttn-only plan's
    dfa = ["full", "wars", "ast", "wars+asc", "asc", "wars"]
    v1 = Plan.from_methods(pipe, [dfa] + [["full"] * STEPS] * 2, cfg=True)
    mixed = Plan.from_methods(pipe, [dfa] + [["full"] * 4 + ["search", "sparse"]] * 2, cfg=True,
                              adaspa=dict(ADASPA))
    outs1, attn1 = _attention_outputs(pipe, v1)
    outs2, attn2 = _attention_outputs(pipe, mixed)
    assert len(outs1) == len(outs2) == STEPS and len(attn1) == len(attn2) == STEPS
    for s in range(STEPS):
        assert torch.equal(attn1[s], attn2[s]), s
    for s in range(STEPS - 1):
        assert torch.equal(outs1[s], outs2[s]), s
    assert not torch.equal(outs1[-1], outs2[-1])  # the sparse step changes the last output


# ------------------------------------------------------------------ FLOPs, stats, caches
def test_flop_accounting(pipe, plan):
    ditaccel.apply(pipe, plan)
    try:
        run(pipe)
        st = ditaccel.stats(pipe)
        rt = get_runtime(pipe)
        window = rt.method.window((16, 16))
        caches = [c for s in rt.state_manager._state_cache.values() for c in s.caches.values()]
    finally:
        ditaccel.remove(pipe)
    n = 3 * STEPS
    tile = _tile_fraction(window)
    by = st.attention_flops_by_method
    assert st.method_counts == {"search": 3, "wars": 2, "sparse": 4, "ast": 2, "research": 2, "full": 2,
                                "asc": 2, "wars+asc": 1}
    # searches: dense + block mass (1.5); layers 0 and 1 also make the window residual their wars read
    assert by["search"] == pytest.approx((3 * 1.5 + 2 * tile) / n, rel=1e-12)
    assert by["wars"] == pytest.approx(2 * tile / n, rel=1e-12)
    assert by["ast"] == 0.0
    # full steps: layer 1's step 0 plain; layer 2's step 1 refreshes the residual of its wars+asc (cond half)
    assert by["full"] > 2 * 1.0 / n and by["asc"] == pytest.approx(2 * 0.5 / n, rel=1e-12)
    # sparse and research steps: the kept fraction (+ 0.5 for the re-search's mass pass), under dense
    assert 0 < by["sparse"] < 4 / n and 2 * 0.5 / n < by["research"] < 2 * 1.5 / n
    assert st.attention_flops_ratio == pytest.approx(sum(by.values()), rel=1e-12)
    assert len(st.details["recall_per_search"]) == 3
    # after the generation no layer keeps a mask or an LSE (each dropped after its last reader)
    assert caches and all(c.sparse.mask is None and c.sparse.lse is None for c in caches)


def test_remove_is_exact(pipe, plan):
    dense = run(pipe)
    procs = {n: m.processor for n, m in pipe.transformer.named_modules() if hasattr(m, "set_processor")}
    ditaccel.apply(pipe, plan)
    assert not torch.equal(run(pipe), dense)
    ditaccel.remove(pipe)
    assert {n: m.processor for n, m in pipe.transformer.named_modules() if hasattr(m, "set_processor")} == procs
    assert torch.equal(run(pipe), dense)


def test_mixed_plan_is_refused_for_other_step_counts(pipe, plan):
    ditaccel.apply(pipe, plan)
    try:
        with pytest.raises(ValueError, match="num_inference_steps"):
            run(pipe, steps=STEPS + 1)
    finally:
        ditaccel.remove(pipe)


# ------------------------------------------------------------------ calibration
def test_config_refuses_sparse_without_adaspa_or_with_local_search():
    with pytest.raises(ValueError, match="'sparse' needs AdaSpa's settings"):
        ditaccel.DiTFastAttnConfig(candidates=("sparse", "ast"))
    with pytest.raises(ValueError, match="search='greedy' only"):
        ditaccel.DiTFastAttnConfig(candidates=("sparse",), search="local", adaspa=ditaccel.AdaSpaConfig())
    with pytest.raises(ValueError, match="adaspa must be an AdaSpaConfig"):
        ditaccel.DiTFastAttnConfig(adaspa={"sparsity": 0.5})


def test_calibration_with_the_sparse_candidate_gives_a_plan_apply_reproduces(pipe, tmp_path):
    config = ditaccel.DiTFastAttnConfig(threshold=0.1, candidates=("sparse", "ast", "wars+asc", "wars", "asc"),
                                        adaspa=ditaccel.AdaSpaConfig(**ADASPA, warmup=0.5, search_at=(0.5,)),
                                        show_progress=False)
    outs = []
    h = pipe.transformer.register_forward_hook(lambda m, a, o: outs.append(o[0].clone()))
    try:
        plan = ditaccel.calibrate(pipe, config, num_inference_steps=STEPS, class_labels=[1, 2], generator=gen(0))
        calibrated = list(outs)
        outs.clear()
        c = plan.counts()
        assert plan.version == 2 and c["sparse"] > 0 and c["search"] > 0
        # the schedule fields are not recorded: the plan's entries are the schedule
        assert plan.metadata["adaspa"] == {"sparsity": 0.5, "block_size": 16, "head_adaptive": True,
                                           "recall_threshold": 0.8, "text_sink": True, "head_rule": "tiers",
                                           "target_recall": 0.9}
        plan.save(tmp_path / "p.json")
        loaded = Plan.load(tmp_path / "p.json")
        assert loaded.methods == plan.methods
        ditaccel.apply(pipe, loaded)
        pipe(class_labels=[1, 2], num_inference_steps=STEPS, generator=gen(0), output_type="latent")
        st = ditaccel.stats(pipe)
        ditaccel.remove(pipe)
    finally:
        h.remove()
    assert len(calibrated) == len(outs) == STEPS
    for s in range(STEPS):  # the plan reproduces what calibration computed, step by step
        assert torch.equal(calibrated[s], outs[s]), s
    assert st.method_counts == {m: k for m, k in c.items() if k}
    assert st.attention_flops_ratio < 1


def test_calibration_without_the_sparse_candidate_is_unchanged(pipe):
    base = dict(threshold=0.1, show_progress=False)
    kw = dict(num_inference_steps=4, class_labels=[1, 2], generator=gen(0))
    p1 = ditaccel.calibrate(pipe, ditaccel.DiTFastAttnConfig(**base), **kw)
    kw["generator"] = gen(0)
    p2 = ditaccel.calibrate(pipe, ditaccel.DiTFastAttnConfig(**base, adaspa=ditaccel.AdaSpaConfig()), **kw)
    assert p1.methods == p2.methods and p1.version == p2.version == 1 and "adaspa" not in p2.metadata


# ------------------------------------------------------------------ video families
VIDEO_STEPS = 5


def _video_call(pipe, family):
    from test_video_pipelines import COG_KW, FRAMES, PROMPT, SIZE, WAN_KW

    kw = {"wan": WAN_KW, "cogvideox": COG_KW, "hunyuan": {}}[family]
    return pipe(prompt=PROMPT, num_frames=FRAMES, height=SIZE, width=SIZE, num_inference_steps=VIDEO_STEPS,
                generator=gen(0), output_type="latent", **kw).frames


@pytest.fixture(scope="module", params=["wan", "cogvideox", "hunyuan"])
def video(request):
    from ditaccel.testbed.video import tiny_cogvideox_pipeline, tiny_hunyuan_video_pipeline, tiny_wan_pipeline

    make = {"wan": tiny_wan_pipeline, "cogvideox": tiny_cogvideox_pipeline, "hunyuan": tiny_hunyuan_video_pipeline}
    return request.param, make[request.param]()


def test_video_families_adaspa_rows_give_adaspa_exactly(video):
    """Text prefix with batched CFG (CogVideoX), CFG as two calls (Wan), text suffix with padding
    (HunyuanVideo): AdaSpa's rows in a mixed plan are AdaSpa, bit for bit; remove is exact."""
    family, pipe = video
    dense = _video_call(pipe, family)
    cfg = ditaccel.AdaSpaConfig(**ADASPA)
    ditaccel.apply(pipe, cfg)
    try:
        ref, st_ref = _video_call(pipe, family), ditaccel.stats(pipe)
    finally:
        ditaccel.remove(pipe)
    row = ["full" if w == "dense" else w for w in cfg.schedule(VIDEO_STEPS)]
    assert row == ["full", "search", "sparse", "research", "sparse"]
    plan = Plan.from_methods(pipe, [row] * 2, cfg=family != "hunyuan", adaspa=dict(ADASPA))
    ditaccel.apply(pipe, plan)
    try:
        out, st = _video_call(pipe, family), ditaccel.stats(pipe)
    finally:
        ditaccel.remove(pipe)
    assert torch.equal(out, ref) and not torch.equal(out, dense)
    assert st.attention_flops_ratio == st_ref.attention_flops_ratio
    assert st.details["density_per_layer"] == st_ref.details["density_per_layer"]
    assert torch.equal(_video_call(pipe, family), dense)


def test_video_families_sharing_and_sparsity_in_one_plan(video):
    family, pipe = video
    share = "asc" if family != "hunyuan" else "full"  # HunyuanVideo here: guidance-distilled, no CFG
    rows = [["full", share, "wars", "ast", "wars"], ["search", "sparse", "ast", "research", "sparse"]]
    plan = Plan.from_methods(pipe, rows, cfg=family != "hunyuan", adaspa=dict(ADASPA))
    ditaccel.apply(pipe, plan)
    try:
        out, st = _video_call(pipe, family), ditaccel.stats(pipe)
    finally:
        ditaccel.remove(pipe)
    calls = 2 if family == "wan" else 1  # Wan: cond and uncond calls, each with its own caches
    expected = {m: k * calls for m, k in Plan.counts(plan).items() if k}
    assert torch.isfinite(out).all() and st.method_counts == expected and st.attention_flops_ratio < 1


def test_plan_heat_map_shows_adaspa_entries(plan, tmp_path):
    from ditaccel.viz import METHOD_COLORS, plot_plan

    assert {"search", "research", "sparse"} <= set(METHOD_COLORS)
    plot_plan(plan, tmp_path / "plan.png")
    assert (tmp_path / "plan.png").read_bytes().startswith(b"\x89PNG")


def test_comparison_script_rows():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("compare_mixed_plans",
                                                  Path(__file__).parents[1] / "scripts" / "compare_mixed_plans.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = mod.methods(["D2"], [0.8], 0.5)
    assert [n for n, _ in rows] == ["ditfastattn D2", "mixed D2 (s=0.5)", "adaspa s=0.8"]
    mixed = rows[1][1]
    assert "sparse" in mixed.candidates and mixed.adaspa.sparsity == 0.5 and mixed.threshold == 0.05
    assert mixed.window == rows[0][1].window == "band1d"
    rows3d = mod.methods(["D4"], [], 0.8, window="neighborhood3d")
    assert [n for n, _ in rows3d] == ["ditfastattn D4 neighborhood3d", "mixed D4 (s=0.8) neighborhood3d"]
    assert all(m.window == "neighborhood3d" for _, m in rows3d)


def _flux_call(pipe, **kw):
    return pipe(prompt="a red cat running", height=64, width=64, max_sequence_length=8,
                num_inference_steps=VIDEO_STEPS, generator=gen(0), output_type="latent", **kw).images


def test_flux_mixed_plans_with_true_cfg_as_two_calls():
    """Flux (joint attention, text prefix; true CFG as two calls per step): AdaSpa's rows in a mixed
    plan are AdaSpa bit for bit, sharing and sparsity run together in one plan, remove is exact."""
    from ditaccel.testbed.flux import tiny_flux_pipeline

    pipe = tiny_flux_pipeline()
    cfg_kw = dict(true_cfg_scale=4.0, negative_prompt="dark")
    dense = _flux_call(pipe, **cfg_kw)
    cfg = ditaccel.AdaSpaConfig(**ADASPA)
    ditaccel.apply(pipe, cfg)
    try:
        ref, st_ref = _flux_call(pipe, **cfg_kw), ditaccel.stats(pipe)
    finally:
        ditaccel.remove(pipe)
    row = ["full" if w == "dense" else w for w in cfg.schedule(VIDEO_STEPS)]
    n = len(pipe.transformer.transformer_blocks) + len(pipe.transformer.single_transformer_blocks)
    ditaccel.apply(pipe, Plan.from_methods(pipe, [row] * n, cfg=True, adaspa=dict(ADASPA)))
    try:
        out = _flux_call(pipe, **cfg_kw)
    finally:
        ditaccel.remove(pipe)
    assert torch.equal(out, ref) and not torch.equal(out, dense)
    rows = [["full", "asc", "wars+asc", "ast", "wars"], ["search", "sparse", "ast", "research", "sparse"]][:n]
    plan = Plan.from_methods(pipe, rows, cfg=True, adaspa=dict(ADASPA))
    ditaccel.apply(pipe, plan)
    try:
        mixed, st = _flux_call(pipe, **cfg_kw), ditaccel.stats(pipe)
    finally:
        ditaccel.remove(pipe)
    assert torch.isfinite(mixed).all() and not torch.equal(mixed, ref) and not torch.equal(mixed, dense)
    assert st.method_counts == {m: 2 * k for m, k in Plan.counts(plan).items() if k}  # cond and uncond calls
    assert n == 2 and 0 < st.attention_flops_ratio < 1
    assert torch.equal(_flux_call(pipe, **cfg_kw), dense)


def test_pixart_mixed_plan_adaspa_rows_exact_and_sharing_with_sparsity(pixart):
    """PixArt-Σ (batched CFG, cross-attention beside the self-attention): AdaSpa's rows are AdaSpa bit
    for bit; a plan mixing asc / wars+asc / ast with search / sparse runs every entry it names."""
    from conftest import pixart_call

    cfg = _adaspa_config()
    ditaccel.apply(pixart, cfg)
    ref = pixart_call(pixart)
    ditaccel.remove(pixart)
    ditaccel.apply(pixart, Plan.from_methods(pixart, [_adaspa_row(cfg)] * 3, cfg=True, adaspa=dict(ADASPA)))
    out = pixart_call(pixart)
    ditaccel.remove(pixart)
    assert torch.equal(out, ref)
    rows = [["full", "asc", "wars+asc", "ast", "wars", "asc"], _adaspa_row(cfg), ["full", "ast", "search", "sparse",
                                                                                 "ast", "research"]]
    plan = Plan.from_methods(pixart, rows, cfg=True, adaspa=dict(ADASPA))
    ditaccel.apply(pixart, plan)
    mixed, st = pixart_call(pixart), ditaccel.stats(pixart)
    ditaccel.remove(pixart)
    assert torch.isfinite(mixed).all() and not torch.equal(mixed, ref)
    assert st.method_counts == {m: k for m, k in Plan.counts(plan).items() if k} and 0 < st.attention_flops_ratio < 1
