"""DiTFastAttn end to end on tiny DiT and PixArt-Sigma pipelines, and each method against its
definition."""

import pytest
import torch
import torch.nn.functional as F
from conftest import STEPS, dit_call, gen, pixart_call

import ditaccel
from ditaccel.kernels.window import window_attention_reference, window_tile_fraction
from ditaccel.methods.ditfastattn import (
    CALIBRATION_ACTION, LayerCache, StepAction, layer_schedule, make_window, relative_l1, run_layer,
)
from ditaccel.models import adapter_for
from ditaccel.plan import Plan
from ditaccel.processors import SdpaSelfAttentionCall
from ditaccel.runtime import get_runtime


def plan_of(pipe, rows, cfg=True, **kw):
    return Plan.from_methods(pipe, rows, cfg=cfg, **kw)


def uniform(pipe, method_after_0, steps=STEPS, first="full", cfg=True):
    n = len(adapter_for(pipe.transformer).attention_modules(pipe.transformer))
    return plan_of(pipe, [[first] + [method_after_0] * (steps - 1) for _ in range(n)], cfg=cfg)


CALLS = {"dit": dit_call, "pixart": pixart_call}


@pytest.fixture(params=["dit", "pixart"])
def family(request):
    return request.param, request.getfixturevalue(request.param), CALLS[request.param]


# ------------------------------------------------------------------ identity and restore
def test_all_full_plan_is_identical_and_remove_restores(family):
    _, pipe, call = family
    ref = call(pipe)
    originals = [m.processor for m in adapter_for(pipe.transformer).attention_modules(pipe.transformer)]
    ditaccel.apply(pipe, uniform(pipe, "full"))
    try:
        assert torch.equal(call(pipe), ref)
    finally:
        ditaccel.remove(pipe)
    assert [m.processor for m in adapter_for(pipe.transformer).attention_modules(pipe.transformer)] == originals
    ditaccel.apply(pipe, uniform(pipe, "wars+asc"))
    compressed = call(pipe)
    ditaccel.remove(pipe)
    assert not torch.equal(compressed, ref)
    assert torch.equal(call(pipe), ref)  # bit-identical after remove
    assert get_runtime(pipe) is None and "set_timesteps" not in vars(pipe.scheduler)
    assert not hasattr(pipe.transformer, "_ditaccel")


def test_cross_attention_untouched(pixart):
    attn2 = [b.attn2.processor for b in pixart.transformer.transformer_blocks]
    ditaccel.apply(pixart, uniform(pixart, "ast"))
    try:
        assert [b.attn2.processor for b in pixart.transformer.transformer_blocks] == attn2
    finally:
        ditaccel.remove(pixart)


# ------------------------------------------------------------------ calibration
def test_threshold_zero_calibrates_to_all_full(family):
    _, pipe, call = family
    kw = {"class_labels": [1, 2, 3]} if family[0] == "dit" else {
        "prompt": ["a cat", "a dog"], "max_sequence_length": 16, "clean_caption": False,
        "use_resolution_binning": False}
    plan = ditaccel.calibrate(pipe, ditaccel.DiTFastAttnConfig(threshold=0.0, show_progress=False),
                              num_inference_steps=4, generator=gen(), **kw)
    assert plan.counts()["full"] == plan.num_layers * 4
    assert plan.metadata["cfg"] is True and plan.metadata["num_steps"] == 4
    assert get_runtime(pipe) is None  # calibration leaves nothing behind


def test_calibration_compresses_and_respects_rules(dit):
    cfgd = ditaccel.DiTFastAttnConfig(threshold="D6", show_progress=False)
    plan = ditaccel.calibrate(dit, cfgd, num_inference_steps=5, class_labels=[1, 2, 3, 4], generator=gen())
    assert plan.metadata["threshold"] == pytest.approx(0.15)
    assert all(row[0] == "full" for row in plan.methods)
    assert plan.counts()["full"] < plan.num_layers * 5  # random weights still change slowly: some sharing
    # the per-step loss of the chosen column stays under the last layer's budget δ
    assert max(plan.metadata["step_loss"]) < 0.15
    # a candidate list without ast never yields ast; no CFG never yields asc variants
    no_ast = ditaccel.DiTFastAttnConfig(threshold="D6", candidates=("wars", "asc"), show_progress=False)
    plan2 = ditaccel.calibrate(dit, no_ast, num_inference_steps=4, class_labels=[1, 2], generator=gen())
    assert plan2.counts()["ast"] == 0 and plan2.counts()["wars+asc"] == 0
    plan3 = ditaccel.calibrate(dit, cfgd, num_inference_steps=4, class_labels=[1, 2], guidance_scale=1.0,
                               generator=gen())
    assert plan3.metadata["cfg"] is False
    assert plan3.counts()["asc"] == 0 and plan3.counts()["wars+asc"] == 0


@pytest.mark.parametrize("threshold", [0.0, 0.15])
def test_local_search_keeps_the_end_to_end_bound(dit, threshold):
    cfgd = ditaccel.DiTFastAttnConfig(threshold=threshold, search="local", show_progress=False)
    plan = ditaccel.calibrate(dit, cfgd, num_inference_steps=5, class_labels=[1, 2, 3], generator=gen())
    if threshold == 0:
        assert plan.counts()["full"] == plan.num_layers * 5
    else:
        assert plan.counts()["full"] < plan.num_layers * 5
        assert max(plan.metadata["step_loss"]) < threshold
    assert all(row[0] == "full" for row in plan.methods)


def test_calibrated_plan_reproduces_calibration_output(pixart, monkeypatch):
    """The calibration's last run per step is exactly what apply() runs later: the image the
    calibration pass itself produced equals the applied plan's image."""
    import functools

    images = []
    call = type(pixart).__call__

    @functools.wraps(call)
    def capture(self, *args, **kwargs):  # the calibration's own pipeline call
        out = call(self, *args, **kwargs)
        images.append(out.images)
        return out

    monkeypatch.setattr(type(pixart), "__call__", capture)
    kw = dict(max_sequence_length=16, use_resolution_binning=False)
    plan = ditaccel.calibrate(pixart, ditaccel.DiTFastAttnConfig(threshold=0.1, show_progress=False),
                              num_inference_steps=STEPS, prompt=["a red circle", "a blue square"],
                              generator=gen(), output_type="pt", clean_caption=False, **kw)
    monkeypatch.undo()
    (calibration_image,) = images
    assert plan.counts()["full"] < plan.num_layers * STEPS  # something compressed: not a trivial match
    ditaccel.apply(pixart, plan)
    try:
        applied = pixart_call(pixart)
    finally:
        ditaccel.remove(pixart)
    assert torch.equal(applied, calibration_image)
    assert not torch.equal(applied, pixart_call(pixart))  # and both differ from the uncompressed image


# ------------------------------------------------------------------ methods vs definitions
def _layer_call(pipe, b=4, seed=0):
    tr = pipe.transformer
    attn = adapter_for(tr).attention_modules(tr)[0]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 16, attn.inner_dim, generator=g)
    return attn, SdpaSelfAttentionCall(attn.processor, attn, x, None, None, (), {}), x


def _heads(attn, x):
    b, L, _ = x.shape
    q, k, v = (f(x).view(b, L, attn.heads, -1).transpose(1, 2) for f in (attn.to_q, attn.to_k, attn.to_v))
    return q, k, v


def test_wars_is_window_plus_residual_of_last_full_step(pixart):
    attn, call0, x0 = _layer_call(pixart, seed=1)
    window = make_window("band1d", 0.25, (4, 4))
    cache = LayerCache()
    out0, _ = run_layer(StepAction("full", keep_res="all"), call0, cache, window, cond=None)
    assert torch.allclose(out0, call0.full(), atol=1e-6)  # a full step stays exact
    _, call1, x1 = _layer_call(pixart, seed=2)
    out1, cost = run_layer(StepAction("wars", release_res=True), call1, cache, window, cond=None)
    q0, k0, v0 = _heads(attn, x0)
    q1, k1, v1 = _heads(attn, x1)
    residual = F.scaled_dot_product_attention(q0, k0, v0) - window_attention_reference(q0, k0, v0, window)
    expected = window_attention_reference(q1, k1, v1, window) + residual
    assert torch.allclose(out1, call1.project(expected), atol=1e-5)
    assert cache.res is None  # released after its last planned use
    assert cost.fraction == pytest.approx(window_tile_fraction(window))


@pytest.mark.parametrize("cond", [0, 1])
def test_asc_copies_the_conditional_half(pixart, cond):
    _, call, _ = _layer_call(pixart, b=4, seed=3)
    out, cost = run_layer(StepAction("asc"), call, LayerCache(), make_window("band1d", 0.25, (4, 4)), cond=cond)
    half = call.full(slice(2 * cond, 2 * cond + 2))
    assert torch.allclose(out[:2], half, atol=1e-6) and torch.allclose(out[2:], half, atol=1e-6)
    assert cost.fraction == 0.5


@pytest.mark.parametrize("cond", [0, 1])
def test_wars_asc_uses_the_conditional_residual(pixart, cond):
    attn, call0, x0 = _layer_call(pixart, b=4, seed=4)
    window = make_window("neighborhood2d", 0.25, (4, 4))
    cache = LayerCache()
    run_layer(StepAction("full", keep_res="cond"), call0, cache, window, cond=cond)
    assert cache.res.shape[0] == 2 and cache.res_rows == "cond"  # only the half that is read later
    _, call1, x1 = _layer_call(pixart, b=4, seed=5)
    out, _ = run_layer(StepAction("wars+asc"), call1, cache, window, cond=cond)
    rows = slice(2 * cond, 2 * cond + 2)
    q0, k0, v0 = _heads(attn, x0[rows])
    q1, k1, v1 = _heads(attn, x1[rows])
    res = F.scaled_dot_product_attention(q0, k0, v0) - window_attention_reference(q0, k0, v0, window)
    call1.qkv(rows)  # project() adds the rows' residual connection (none here) from the last qkv rows
    expected = call1.project(window_attention_reference(q1, k1, v1, window) + res)
    assert torch.allclose(out[:2], expected, atol=1e-5) and torch.allclose(out[2:], expected, atol=1e-5)


def test_ast_reuses_previous_output(pixart):
    _, call0, _ = _layer_call(pixart, seed=6)
    _, call1, _ = _layer_call(pixart, seed=7)
    cache = LayerCache()
    out0, _ = run_layer(StepAction("full", keep_out=True), call0, cache, make_window("band1d", 0.25, (4, 4)), None)
    out1, cost = run_layer(StepAction("ast", release_out=True), call1, cache, make_window("band1d", 0.25, (4, 4)), None)
    assert out1 is out0 and cost.fraction == 0.0 and cache.out is None


def test_layer_schedule_keeps_only_what_is_read():
    s = layer_schedule(["full", "ast", "ast", "wars", "full", "asc", "wars+asc", "full"])
    assert [a.keep_out for a in s] == [True, False, False, False, False, False, False, False]
    assert [a.release_out for a in s] == [False, False, True, False, False, False, False, False]
    assert [a.keep_res for a in s] == ["all", None, None, None, "cond", None, None, None]
    assert [a.release_res for a in s] == [False, False, False, True, False, False, True, False]
    assert CALIBRATION_ACTION["full"].keep_res == "all"


def test_caches_are_freed_after_the_generation(dit):
    rows = [["full", "wars", "ast", "ast", "wars+asc", "full"]] * 3
    ditaccel.apply(dit, plan_of(dit, rows))
    try:
        dit_call(dit)
        rt = get_runtime(dit)
        caches = [c for s in rt.state_manager._state_cache.values() for c in s.caches.values()]
        assert caches and all(c.out is None and c.res is None for c in caches)
        assert ditaccel.stats(dit).cache_bytes_peak > 0
    finally:
        ditaccel.remove(dit)


def test_relative_l1_is_symmetric_and_clipped():
    a, b = torch.tensor([1.0, -2.0, 0.0]), torch.tensor([-1.0, -2.0, 1e-3])
    assert relative_l1(a, b) == pytest.approx(relative_l1(b, a))
    assert relative_l1(a, b) <= 10.0
    assert relative_l1(a, a) == 0.0


# ------------------------------------------------------------------ state across generations
def test_state_resets_between_generations_and_after_an_exception(dit):
    rows = [["full", "ast", "wars", "wars+asc", "asc", "ast"]] * 3
    ditaccel.apply(dit, plan_of(dit, rows))
    try:
        first = dit_call(dit)
        assert torch.equal(dit_call(dit), first)

        calls = {"n": 0}

        def boom(module, args, kwargs):
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("interrupted")

        handle = dit.transformer.register_forward_pre_hook(boom, with_kwargs=True)
        with pytest.raises(RuntimeError, match="interrupted"):
            dit_call(dit)
        handle.remove()
        assert torch.equal(dit_call(dit), first)
        # a different input after that: same as a fresh application
        other = dit_call(dit, labels=(5, 6), seed=3)
    finally:
        ditaccel.remove(dit)
    ditaccel.apply(dit, plan_of(dit, rows))
    try:
        assert torch.equal(dit_call(dit, labels=(5, 6), seed=3), other)
    finally:
        ditaccel.remove(dit)


def _lockstep(pipes, call):
    """Run ``call(pipe)`` for every pipe with their denoising steps interleaved: transformer call k
    of pipe 0, then call k of pipe 1, ..., then call k + 1 of pipe 0. Each generation runs in its
    own thread, but only one thread runs at a time (a baton passed at each transformer call).
    Returns the outputs and the order of the transformer calls (pipe indices)."""
    import threading

    n = len(pipes)
    baton = [threading.Semaphore(0) for _ in range(n)]
    order, outputs, errors, done = [], [None] * n, [], set()

    def take(j):
        if not baton[j].acquire(timeout=120):
            raise RuntimeError("lockstep: no turn in 120 s")

    def hand_over(j):  # to the next pipe still generating; False when none is left
        live = [i for i in range(j + 1, j + n) if i % n not in done]
        if live:
            baton[live[0] % n].release()
        return bool(live)

    def run(j):
        calls = {"n": 0}

        def pre(module, args, kwargs):
            if calls["n"] and hand_over(j):  # from the second step on: the next pipe's turn, then ours
                take(j)
            calls["n"] += 1
            order.append(j)

        handle = pipes[j].transformer.register_forward_pre_hook(pre, with_kwargs=True)
        try:
            take(j)
            outputs[j] = call(pipes[j])
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            errors.append(e)
        finally:
            handle.remove()
            done.add(j)
            hand_over(j)

    threads = [threading.Thread(target=run, args=(j,)) for j in range(n)]
    for t in threads:
        t.start()
    baton[0].release()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return outputs, order


def test_two_pipelines_do_not_share_state():
    from ditaccel.testbed import tiny_dit_pipeline

    a, b = tiny_dit_pipeline(sample_size=8, num_layers=3), tiny_dit_pipeline(sample_size=8, num_layers=3, seed=1)
    rows_a = [["full", "ast", "wars", "ast", "wars+asc", "ast"]] * 3
    rows_b = [["full", "wars", "ast", "wars+asc", "asc", "wars"]] * 3
    ditaccel.apply(a, plan_of(a, rows_a))
    ditaccel.apply(b, plan_of(b, rows_b))
    try:
        solo_a, solo_b = dit_call(a), dit_call(b, labels=(3, 4), seed=1)
        # interleave the two pipelines' steps (a0, b0, a1, b1, ...): each one's caches must survive
        # the other's steps in between
        (inter_a, inter_b), order = _lockstep([a, b], lambda p: dit_call(p) if p is a else dit_call(p, labels=(3, 4), seed=1))
        assert order == [0, 1] * STEPS  # really interleaved, one transformer call per step each
        assert torch.equal(inter_a, solo_a) and torch.equal(inter_b, solo_b)
        assert get_runtime(a) is not get_runtime(b)
        assert ditaccel.stats(a).method_counts == {"full": 3, "ast": 9, "wars": 3, "wars+asc": 3}
    finally:
        ditaccel.remove(a)
        ditaccel.remove(b)


def test_bare_transformer_tracks_steps_from_timesteps(dit):
    """Without a pipeline, steps come from distinct timesteps; separate cond/uncond calls at one
    timestep are one step; a larger timestep starts a new generation."""
    tr = dit.transformer
    rows = [["full", "ast", "ast"]] * 3
    ditaccel.apply(tr, plan_of(tr, rows))
    try:
        x = torch.randn(2, 4, 8, 8, generator=gen())
        labels = torch.tensor([1, 1000])
        attn0 = adapter_for(tr).attention_modules(tr)[0]
        seen = []
        handle = attn0.register_forward_hook(lambda m, a, out: seen.append(out))
        for t in (900, 500, 500, 100):
            tr(x, timestep=torch.tensor([t, t]), class_labels=labels)
        st = ditaccel.stats(tr)
        assert st.steps == 3 and st.method_counts == {"full": 3, "ast": 9}
        assert all(o is seen[0] for o in seen[1:])  # steps 1 and 2 shared step 0's attention output
        # a larger timestep starts a new generation: full again, on the new input
        y = torch.randn(2, 4, 8, 8, generator=gen(1))
        tr(y, timestep=torch.tensor([900, 900]), class_labels=labels)
        handle.remove()
        assert not torch.equal(seen[-1], seen[0])
        assert ditaccel.stats(tr).method_counts == {"full": 3}
    finally:
        ditaccel.remove(tr)


# ------------------------------------------------------------------ bad input
def test_asc_without_cfg_is_refused(dit):
    ditaccel.apply(dit, uniform(dit, "asc"))
    try:
        with pytest.raises(ValueError, match="asc"):
            dit_call(dit, guidance_scale=1.0)
        ditaccel.remove(dit)
        ditaccel.apply(dit, uniform(dit, "asc").without_asc())
        assert dit_call(dit, guidance_scale=1.0).shape[0] == 2
    finally:
        ditaccel.remove(dit)


def test_wrong_step_count_is_refused(dit):
    ditaccel.apply(dit, uniform(dit, "ast"))
    try:
        with pytest.raises(ValueError, match="num_inference_steps"):
            dit_call(dit, steps=STEPS + 2)
    finally:
        ditaccel.remove(dit)


def test_bad_apply_leaves_the_model_untouched(dit, pixart):
    before = [m.processor for m in adapter_for(dit.transformer).attention_modules(dit.transformer)]
    forward = dit.transformer.forward
    with pytest.raises(ditaccel.PlanError, match="model_class"):
        ditaccel.apply(dit, uniform(pixart, "ast"))
    rows = [["full"] * STEPS] * 2  # wrong layer count
    bad = Plan(rows, dict(uniform(dit, "full").metadata, num_layers=2))
    with pytest.raises(ValueError, match="layers"):
        ditaccel.apply(dit, bad)
    with pytest.raises(TypeError, match="plan_or_config"):
        ditaccel.apply(dit, ditaccel.DiTFastAttnConfig())
    with pytest.raises(TypeError, match="pipe_or_transformer"):
        ditaccel.apply(object(), uniform(dit, "ast"))
    assert [m.processor for m in adapter_for(dit.transformer).attention_modules(dit.transformer)] == before
    assert dit.transformer.forward == forward and get_runtime(dit) is None
    ditaccel.apply(dit, uniform(dit, "ast"))
    try:
        with pytest.raises(RuntimeError, match="already applied"):
            ditaccel.apply(dit, uniform(dit, "ast"))
    finally:
        ditaccel.remove(dit)


def test_config_validation():
    with pytest.raises(ValueError, match="threshold"):
        ditaccel.DiTFastAttnConfig(threshold=-1)
    with pytest.raises(ValueError, match="threshold"):
        ditaccel.DiTFastAttnConfig(threshold="D9")
    with pytest.raises(ValueError, match="window"):
        ditaccel.DiTFastAttnConfig(window="circle")
    with pytest.raises(ValueError, match="window_size"):
        ditaccel.DiTFastAttnConfig(window_size=0)
    with pytest.raises(ValueError, match="candidates"):
        ditaccel.DiTFastAttnConfig(candidates=("full",))
    with pytest.raises(ValueError, match="search"):
        ditaccel.DiTFastAttnConfig(search="exhaustive")
    assert ditaccel.DiTFastAttnConfig(threshold="D2").threshold == pytest.approx(0.05)


# ------------------------------------------------------------------ accounting
def test_stats_flops_ratio_matches_the_analytic_value(dit):
    rows = [
        ["full", "wars", "ast", "asc", "wars+asc", "full"],
        ["full", "ast", "ast", "ast", "ast", "ast"],
        ["asc", "asc", "full", "full", "ast", "wars"],
    ]
    ditaccel.apply(dit, plan_of(dit, rows))
    try:
        dit_call(dit)
        st = ditaccel.stats(dit)
    finally:
        ditaccel.remove(dit)
    tf = window_tile_fraction(make_window("band1d", 0.25, (4, 4)))
    cost = {"full": 1.0, "wars": tf, "ast": 0.0, "asc": 0.5, "wars+asc": 0.5 * tf}
    total = sum(cost[m] for row in rows for m in row)
    # residual passes at the full steps that later wars steps read: layer 0 step 0 (all rows),
    # layer 2 step 3 (all rows)
    total += tf + tf
    assert st.attention_flops_ratio == pytest.approx(total / (3 * STEPS))
    assert st.method_counts == {"full": 5, "wars": 2, "ast": 7, "asc": 3, "wars+asc": 1}
    assert st.steps == STEPS and st.denoise_seconds > 0


@pytest.mark.parametrize("keep, cond", [("all", None), ("cond", 0), ("cond", 1)])
def test_full_step_residual_through_the_fused_tile_kernel(pixart, monkeypatch, keep, cond):
    """Where the tile kernel runs with tensor descriptors (Hopper), a residual-making full step uses
    full_and_window_attention; forced here under the Triton interpreter, it must match the
    dense + window path."""
    pytest.importorskip("triton")
    from ditaccel.methods import ditfastattn

    attn, call, x = _layer_call(pixart, b=4, seed=8)
    window = make_window("band1d", 0.25, (4, 4))
    plain = LayerCache()
    out_plain, _ = run_layer(StepAction("full", keep_res=keep), call, plain, window, cond=cond)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(ditfastattn, "tma_available", lambda *t: True)
    fused = LayerCache()
    _, call2, _ = _layer_call(pixart, b=4, seed=8)
    out_fused, cost = run_layer(StepAction("full", keep_res=keep), call2, fused, window, cond=cond)
    assert torch.allclose(out_fused, out_plain, atol=1e-5)
    assert fused.res_rows == plain.res_rows and torch.allclose(fused.res, plain.res, atol=1e-5)
    share = 1.0 if keep == "all" else 0.5  # only the tiles the window boundary cuts are computed twice
    assert cost.extra_window == pytest.approx(ditfastattn._mixed_fraction(window) * share)
