"""Runtime behaviour that mutation testing (docs/MUTATION.md) found untested: the step rule at its
tolerance edges (against a reference), the CFG conditioning rule, the stats accounting and text,
schedulers shared by two pipelines, reset."""

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import dit_call

import ditaccel
from ditaccel.plan import Plan
from ditaccel.processors import dense_flops
from ditaccel.runtime import GenerationState, Runtime, Stats, get_runtime
from ditaccel.testbed import tiny_dit_pipeline


# ------------------------------------------------------------------ the step rule
def ref_step(schedule, last_t, last_step, t):
    """DESIGN §4 / runtime: with a schedule, the index of the nearest timestep within a relative
    tolerance 1e-4·max(1, |t|) (else an error); without one, a new generation (-1) when t is above
    the last timestep by more than the tolerance, the same step within it, else the next step."""
    tol = 1e-4 * max(1.0, abs(t))
    if schedule is not None:
        i = min(range(len(schedule)), key=lambda j: abs(schedule[j] - t))
        return i if abs(schedule[i] - t) <= tol else "error"
    if last_t is None or t > last_t + tol:
        return -1
    return last_step if abs(t - last_t) <= tol else last_step + 1


def _step_of(schedule, last_t, last_step, t):
    rt = SimpleNamespace(schedule=None if schedule is None else torch.tensor(schedule, dtype=torch.float64))
    st = SimpleNamespace(last_t=last_t, step=last_step)
    try:
        return Runtime._step_of(rt, st, t)
    except ValueError:
        return "error"


@pytest.mark.parametrize("schedule, t, expect", [
    ([999.0, 500.0], 999.09, 0),  # tolerance is relative above 1: 0.0999
    ([999.0, 500.0], 998.85, "error"),
    ([0.5, 0.25], 0.5 + 1.5e-4, "error"),  # and absolute (1e-4) below 1
    ([0.5, 0.25], 0.25 - 0.9e-4, 1),
    ([1e-4, 1.0], 0.0, 0),  # exactly at the tolerance: still this step
])
def test_step_of_with_a_schedule(schedule, t, expect):
    assert ref_step(schedule, None, None, t) == expect
    assert _step_of(schedule, None, None, t) == expect


@pytest.mark.parametrize("last_t, last_step, t, expect", [
    (None, 3, 0.7, -1),
    (0.0, 2, 1e-4, 2),  # exactly the tolerance above: the same step, not a new generation
    (0.0, 2, 1.1e-4, -1),
    (1e-4, 2, 0.0, 2),  # exactly the tolerance below: the same step
    (1e-4, 2, -0.5e-4, 3),
    (500.0, 4, 499.96, 4),  # relative tolerance 0.05
    (500.0, 4, 499.9, 5),
])
def test_step_of_bare_transformer(last_t, last_step, t, expect):
    assert ref_step(None, last_t, last_step, t) == expect
    assert _step_of(None, last_t, last_step, t) == expect


# ------------------------------------------------------------------ the CFG conditioning rule
def _rt(cond_index=0, null=1000, has_null=True):
    cfg = SimpleNamespace(num_embeds_ada_norm=null) if has_null else SimpleNamespace()
    adapter = SimpleNamespace(cfg_cond_arg="class_labels", cfg_null_label_attr="num_embeds_ada_norm",
                              cond_index=lambda: cond_index)
    return SimpleNamespace(adapter=adapter, transformer=SimpleNamespace(config=cfg))


def _cfg(rt, labels, b):
    return Runtime._cfg_conditioning(rt, {"class_labels": labels}, b)


def test_cfg_conditioning_rule():
    t = torch.tensor
    assert _cfg(_rt(), t(5), 2) is True  # a 0-d label: the latents decide
    assert _cfg(_rt(), t([5]), 2) is True  # not one label per row: the latents decide
    assert _cfg(_rt(), None, 2) is True
    assert _cfg(_rt(), t([5, 5]), 2) is False  # the same sample twice
    assert _cfg(_rt(), t([5, 1000]), 2) is True  # [cond, uncond] with the null class
    assert _cfg(_rt(), t([1000, 5]), 2) is False
    assert _cfg(_rt(), t([5, 6]), 2) is False  # two samples, no null class
    assert _cfg(_rt(cond_index=1), t([1000, 1000, 5, 7]), 4) is True  # [uncond, cond]
    assert _cfg(_rt(cond_index=1), t([5, 7, 1000, 1000]), 4) is False
    assert _cfg(_rt(cond_index=1), t([1000, 7, 5, 7]), 4) is False
    assert _cfg(_rt(has_null=False), t([5, 6]), 2) is True  # no null class known: halves differ
    assert _cfg(_rt(null=None), t([5, 6]), 2) is True


# ------------------------------------------------------------------ stats
def test_stats_text_exact():
    s = Stats(method="ditfastattn", steps=20, attention_flops_ratio=0.4567, method_counts={"wars": 3, "full": 5},
              denoise_seconds=1.23456, cache_bytes_peak=3 * 2**20 + 2**19, attention_tflops_dense=0.001234)
    assert str(s) == ("ditfastattn: 20 steps, attention FLOPs 45.7% of dense (0.00123 TFLOP dense), methods "
                      "[full=5, wars=3], denoising 1.235 s, peak cache 3.5 MiB")


ROWS = [["full", "wars", "ast", "asc"], ["full", "ast", "ast", "full"], ["asc", "full", "wars", "wars+asc"]]


def test_stats_accounting_exact(dit, monkeypatch):
    """Per-method FLOPs, dense TFLOP, the time between the first call's start and the last call's
    end (a fake clock), peak cache, reset."""
    from ditaccel import runtime as rt_mod
    from ditaccel.kernels.window import window_tile_fraction
    from ditaccel.methods.ditfastattn import make_window

    ticks = iter(float(i) for i in range(10, 10_000))
    monkeypatch.setattr(rt_mod, "time", SimpleNamespace(perf_counter=lambda: next(ticks) * 0.5))
    ditaccel.apply(dit, Plan.from_methods(dit, ROWS, cfg=True))
    try:
        dit_call(dit, steps=4)
        st = ditaccel.stats(dit)
        tr = dit.transformer
        inner = tr.config.num_attention_heads * tr.config.attention_head_dim
        per_call = dense_flops(4, 16, inner)  # 2 labels x CFG, 4x4 tokens
        tf = window_tile_fraction(make_window("band1d", 0.25, (4, 4)))
        assert st.method == "ditfastattn" and st.steps == 4
        assert st.attention_tflops_dense == pytest.approx(12 * per_call / 1e12, rel=1e-12)
        n = 12.0
        assert st.attention_flops_by_method == pytest.approx({
            "full": (4 + 2 * tf) / n,  # residual passes at layer 0 step 0 and layer 2 step 1
            "wars": 2 * tf / n, "ast": 0.0, "asc": 2 * 0.5 / n, "wars+asc": 0.5 * tf / n}, rel=1e-9)
        assert sum(st.attention_flops_by_method.values()) == pytest.approx(st.attention_flops_ratio)
        assert list(st.attention_flops_by_method) == sorted(st.attention_flops_by_method)
        # the clock is read at the first call's start (tick 10) and at each of the 4 calls' ends (11-14)
        assert st.denoise_seconds == 2.0
        assert st.cache_bytes_peak > 0
        ditaccel.reset(dit)
        with pytest.raises(RuntimeError, match="no generation has run"):
            ditaccel.stats(dit)
    finally:
        ditaccel.remove(dit)


def test_all_full_plan_caches_nothing(dit):
    ditaccel.apply(dit, Plan.from_methods(dit, [["full"] * 3] * 3, cfg=True))
    try:
        dit_call(dit, steps=3)
        st = ditaccel.stats(dit)
    finally:
        ditaccel.remove(dit)
    assert st.cache_bytes_peak == 0 and st.attention_flops_ratio == 1.0
    assert GenerationState().cache_bytes_peak == 0 and GenerationState().step == -1


def test_missing_timestep_is_refused(dit):
    tr = dit.transformer
    ditaccel.apply(tr, Plan.from_methods(dit, [["full"] * 2] * 3, cfg=False))
    try:
        x = torch.randn(1, tr.config.in_channels, 8, 8)
        with pytest.raises(ValueError, match="hidden_states and 'timestep'"):
            tr(x, class_labels=torch.tensor([1]))
    finally:
        ditaccel.remove(tr)


# ------------------------------------------------------------------ a scheduler shared by two pipelines
def test_two_pipelines_sharing_one_scheduler():
    a = tiny_dit_pipeline(sample_size=8, num_layers=2)
    b = tiny_dit_pipeline(sample_size=8, num_layers=2)
    b.scheduler = a.scheduler
    sched = a.scheduler
    plan_a = Plan.from_methods(a, [["full"] * 5] * 2, cfg=True)
    ditaccel.apply(a, plan_a)
    ditaccel.apply(b, Plan.from_methods(b, [["full"] * 5] * 2, cfg=True))
    ra, rb = get_runtime(a), get_runtime(b)
    try:
        assert sched._ditaccel_listeners == [ra, rb]
        sched.set_timesteps(5)
        assert len(ra.schedule) == len(rb.schedule) == 5
        ditaccel.remove(a)
        assert sched._ditaccel_listeners == [rb] and "set_timesteps" in sched.__dict__
        sched.set_timesteps(5)  # b still listens
        assert torch.equal(rb.schedule, sched.timesteps.double())
        ditaccel.remove(a)  # a second remove is a no-op
    finally:
        ditaccel.remove(b)
    assert "set_timesteps" not in sched.__dict__ and "_ditaccel_listeners" not in sched.__dict__
    from ditaccel import runtime as rt_mod

    rt_mod._unlisten(sched, ra)  # never listening: nothing to do, nothing raised
    assert "set_timesteps" not in sched.__dict__


def test_cfg_override_is_passed_on_and_warned_about_only_where_ignored(dit):
    import warnings

    from ditaccel.methods.adaspa import AdaSpaConfig
    from ditaccel.testbed.video import tiny_wan_pipeline

    # cfg=False on a CFG-batched pipeline: no call is CFG, so a plan that shares across the halves is refused
    ditaccel.apply(dit, Plan.from_methods(dit, [["full", "asc"]] * 3, cfg=True), cfg=False)
    try:
        assert get_runtime(dit).cfg is False
        with pytest.raises(ValueError, match="plan uses asc"):
            dit_call(dit, steps=2)
    finally:
        ditaccel.remove(dit)
    wan = tiny_wan_pipeline()
    for target, cfg, warns in ((dit, True, False), (dit, None, False), (wan, None, False), (wan, True, True)):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            ditaccel.apply(target, AdaSpaConfig(), cfg=cfg)
        ditaccel.remove(target)
        assert any("is ignored" in str(x.message) for x in w) is warns, (target, cfg)
