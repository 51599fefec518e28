"""DiTFastAttn behaviour that mutation testing (docs/MUTATION.md) found untested: config edges, the
exact windows, cache byte counts, the checks a plan makes at each call, and run_layer's half-batch
residual path (the fused-kernel branch) with the kernel replaced by its reference."""

import math
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from ditaccel.kernels.window import WindowSpec, window_attention
from ditaccel.methods import ditfastattn as dfa
from ditaccel.methods.ditfastattn import (DiTFastAttn, DiTFastAttnConfig, LayerCache, StepAction, make_window,
                                          run_layer)


# ------------------------------------------------------------------ config edges
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -0.01, True])
def test_threshold_must_be_finite_and_non_negative(bad):
    if bad is True:  # a bool is an int: accepted as 1.0 (documented as a float >= 0)
        assert DiTFastAttnConfig(threshold=bad).threshold == 1.0
        return
    with pytest.raises(ValueError, match="threshold"):
        DiTFastAttnConfig(threshold=bad)


def test_window_size_edges():
    assert DiTFastAttnConfig(window_size=1.0).window_size == 1.0  # the whole sequence is a window
    for bad in (1.5, 0.0, 2.0):
        with pytest.raises(ValueError, match="window_size"):
            DiTFastAttnConfig(window_size=bad)


@pytest.mark.parametrize("cfg", [None, True, False])
def test_cfg_accepts_none_true_false(cfg):
    assert DiTFastAttnConfig(cfg=cfg).cfg is cfg


# ------------------------------------------------------------------ windows
def test_make_window_exact():
    assert make_window("band1d", 0.25, (16, 8), 7, "suffix") == WindowSpec.band((16, 8), 16, 7, "suffix")
    assert make_window("band1d", 0.25, (16, 8)) == WindowSpec.band((16, 8), 16, 0, "prefix")
    # neighborhood: radius round(sqrt(size) / 2 * side) per axis
    assert make_window("neighborhood2d", 0.25, (16, 8), 5, "suffix") == \
        WindowSpec.neighborhood((16, 8), (4, 2), 5, "suffix")
    assert make_window("neighborhood2d", 0.36, (20, 10)) == WindowSpec.neighborhood((20, 10), (6, 3), 0, "prefix")


def test_default_window_is_the_papers_band():
    m = DiTFastAttn([["full", "wars"]])
    assert (m.window_kind, m.window_size) == ("band1d", 0.25)
    assert m.window((4, 4)) == WindowSpec.band((4, 4), 2)


# ------------------------------------------------------------------ caches
def test_layer_cache_nbytes_and_release():
    c = LayerCache(out=torch.zeros(2, 3, 4), res=torch.zeros(5, dtype=torch.float16), res_rows="all")
    assert c.nbytes() == 24 * 4 + 5 * 2
    c.out = (torch.zeros(2, 3), torch.zeros(2, 1, dtype=torch.float64))  # a joint layer: (image, text)
    assert c.nbytes() == 6 * 4 + 2 * 8 + 5 * 2
    c.release()
    assert c.out is None and c.res is None and c.res_rows is None and c.nbytes() == 0


# ------------------------------------------------------------------ per-call checks
def ctx(step, grid=(4, 4), cond=1):
    return SimpleNamespace(step=step, grid=grid, cond=cond, text_tokens=0, text_position=None, frames=1, branch=None,
                           branches=1, shared=None)


def test_step_count_and_steps_past_the_plan_are_refused():
    m = DiTFastAttn([["full"] * 3, ["full"] * 3])
    m.check_num_steps(3)
    with pytest.raises(ValueError, match="made for 3 steps"):
        m.check_num_steps(4)
    m.begin_call(ctx(2))
    with pytest.raises(ValueError, match="step 3 is past"):
        m.begin_call(ctx(3))
    m.trial = ["full", "full"]  # calibration: no plan yet to check against
    m.check_num_steps(7)
    m.begin_call(ctx(9))


def test_grid_warning_only_at_step_0_of_another_grid():
    m = DiTFastAttn([["full"] * 3])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m.begin_call(ctx(0))  # no calibration grid known: no warning
        m.expected_grid = [4, 4]
        m.begin_call(ctx(0))  # the same grid
        m.begin_call(ctx(1, grid=(8, 8)))  # warned once per generation, at step 0 only
    with pytest.warns(UserWarning, match="calibrated at a 4x4 token grid, this generation runs 8x8"):
        m.begin_call(ctx(0, grid=(8, 8)))


# ------------------------------------------------------------------ run_layer
class Call:
    """A minimal AttentionCall on fixed head-space q, k, v (project = identity)."""

    def __init__(self, q, k, v):
        self.q, self.k, self.v, self.batch_size = q, k, v, q.shape[0]

    def qkv(self, rows=None):
        rows = slice(None) if rows is None else rows
        return self.q[rows], self.k[rows], self.v[rows]

    def full(self, rows=None):
        return F.scaled_dot_product_attention(*self.qkv(rows))

    def project(self, heads):
        return heads

    def core(self, fn, rows=None):
        o = fn(*self.qkv(rows), None)
        return o if rows is None else torch.cat([o, o])


def _qkv(b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 2, 16, 8, generator=g) for _ in range(3)]


def test_ast_without_a_cached_output_of_this_batch_is_refused():
    call = Call(*_qkv())
    window = make_window("band1d", 0.25, (4, 4))
    with pytest.raises(RuntimeError, match="ast: no cached output"):
        run_layer(StepAction("ast"), call, LayerCache(), window, cond=1)
    with pytest.raises(RuntimeError, match="ast: no cached output"):
        run_layer(StepAction("ast"), call, LayerCache(out=torch.zeros(2, 2, 16, 8)), window, cond=1)
    out, cost = run_layer(StepAction("ast"), call, LayerCache(out=(torch.ones(4, 16), torch.zeros(4, 3))), window, 1)
    assert torch.equal(out[0], torch.ones(4, 16)) and cost.fraction == 0.0


@pytest.mark.parametrize("cond", [0, 1])
def test_fused_branch_half_residual_with_a_reference_kernel(monkeypatch, cond):
    """The Hopper branch of a residual-making full step (keep_res="cond"): the conditional half
    goes through full_and_window_attention (here its reference), the other half plain dense; the
    output is dense for every row and the residual is the conditional half's."""
    q, k, v = _qkv(seed=3)
    window = make_window("band1d", 0.25, (4, 4))
    seen = []

    def fused(q_, k_, v_, w_):
        seen.append((q_.shape[0], w_))
        return F.scaled_dot_product_attention(q_, k_, v_), window_attention(q_, k_, v_, w_)

    monkeypatch.setattr(dfa, "tma_available", lambda *t: len(t) == 3 and all(torch.is_tensor(x) for x in t))
    monkeypatch.setattr(dfa, "full_and_window_attention", fused)
    cache = LayerCache()
    out, cost = run_layer(StepAction("full", keep_res="cond"), Call(q, k, v), cache, window, cond=cond)
    dense = F.scaled_dot_product_attention(q, k, v)
    half = slice(cond * 2, cond * 2 + 2)
    torch.testing.assert_close(out, dense)
    assert seen == [(2, window)]
    assert cache.res_rows == "cond"
    torch.testing.assert_close(cache.res, dense[half] - window_attention(q[half], k[half], v[half], window))
    assert cost.fraction == 1.0 and cost.extra_window == pytest.approx(dfa._mixed_fraction(window) * 0.5)


def test_scoring_candidates_leaves_the_caches_alone():
    """Calibration's local search scores every candidate on the layer's own output during the
    reference pass: the scores are the search loss against the full output, and no candidate run
    may write the layer's caches (the trial and final passes of the step still read them)."""
    q, k, v = _qkv(b=2, seed=5)
    prev, res = torch.randn(2, 2, 16, 8), torch.randn(2, 2, 16, 8)
    cache = LayerCache(out=prev, res=res, res_rows="all")
    m = DiTFastAttn([["full", "full"]])
    m.trial, m.write, m.scoring = ["full"], False, ("ast", "wars", "asc")
    out, frac, name = m.attention(ctx(1, cond=None), 0, Call(q, k, v), cache)
    assert cache.out is prev and cache.res is res and cache.res_rows == "all"
    window = m.window((4, 4))
    assert m.scores == {0: {"ast": dfa.relative_l1(out, prev),
                            "wars": dfa.relative_l1(out, window_attention(q, k, v, window) + res)}}  # no asc: no CFG
    assert (frac, name) == (1.0, "full")
