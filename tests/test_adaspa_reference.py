"""AdaSpa (DESIGN.md §3) against references: the step schedule for many step counts, and that a
later search really reuses the LSE cached at the first one (the paper's cheaper re-search).

``attention_with_lse`` (full attention + LSE) and ``block_mass`` (the mass pass, fed an LSE) are
instrumented in ``ditaccel.methods.adaspa``; each call is attributed to the (step, layer) of the
attention call it runs in. Tier placement, top-k and text blocks are tested against references in
test_adaspa.py and test_adaspa_options.py.
"""

import math
from collections import Counter
from fractions import Fraction

import pytest
import torch
from conftest import dit_call

import ditaccel
from ditaccel.methods import adaspa as adaspa_mod
from ditaccel.methods.adaspa import AdaSpaConfig
from ditaccel.runtime import get_runtime
from ditaccel.testbed import tiny_dit_pipeline


# ------------------------------------------------------------------ the schedule
def ref_schedule(n, warmup=0.2, search_at=(0.2, 0.6), lse_cache=True, dense_last=0.0, first_lse="fresh"):
    """§3 written out: step index of a fraction f = floor(f·n + 1/2) (exact decimal arithmetic); dense
    before the first search (the warm-up) and in the dense tail; the first search fresh, later ones
    from the cached LSE (``research``) unless the cache is off; sparse in between. ``None`` where
    the configuration cannot fit n steps. ``first_lse="previous"``: the step before the first search
    keeps its LSE (``dense_lse``) and the first search reads it (``research``), if there is such a
    step."""
    def at(f):
        return math.floor(Fraction(str(f)) * n + Fraction(1, 2))

    searches = sorted({at(f) for f in search_at})
    tail = n - at(dense_last)
    if searches[0] < at(warmup) or searches[-1] >= n or searches[-1] >= tail:
        return None
    out = []
    for s in range(n):
        if s < searches[0] or s >= tail:
            out.append("dense")
        elif s == searches[0]:
            out.append("search")
        elif s in searches:
            out.append("research" if lse_cache else "search")
        else:
            out.append("sparse")
    if first_lse == "previous" and searches[0] > 0:
        out[searches[0] - 1:searches[0] + 1] = ["dense_lse", "research"]
    return out


CONFIGS = [
    {},
    {"lse_cache": False},
    {"search_at": (0.2, 0.4, 0.6, 0.8)},
    {"warmup": 0.1, "search_at": (0.25, 0.75)},  # exact halves: 0.25·10 + 0.5 = 3 (round half up)
    {"warmup": 0.0, "search_at": (0.0, 0.35, 0.5)},  # 0.35·10 + 0.5 = 4
    {"warmup": 0.3, "search_at": (0.3, 0.45), "dense_last": 0.25},
    {"search_at": (0.6, 0.2, 0.6)},  # unsorted, repeated
    {"first_lse": "previous"},
    {"first_lse": "previous", "lse_cache": False},  # only the first search reads a kept LSE
    {"first_lse": "previous", "warmup": 0.0, "search_at": (0.0, 0.5)},  # no step before: fresh
    {"first_lse": "previous", "warmup": 0.3, "search_at": (0.3, 0.45), "dense_last": 0.25},
]


@pytest.mark.parametrize("kw", CONFIGS)
def test_schedule_matches_the_reference(kw):
    checked = 0
    for n in range(1, 81):
        ref = ref_schedule(n, **kw)
        if ref is None:
            with pytest.raises(ValueError):
                AdaSpaConfig(**kw).schedule(n)
            continue
        assert AdaSpaConfig(**kw).schedule(n) == ref, n
        checked += 1
    assert checked > 40


def test_schedule_rounds_half_up():
    assert AdaSpaConfig(warmup=0.1, search_at=(0.25, 0.75)).schedule(10).index("search") == 3  # not round(2.5) = 2
    assert AdaSpaConfig(warmup=0.1, search_at=(0.25, 0.75)).schedule(10).index("research") == 8  # 7.5 -> 8
    assert AdaSpaConfig().schedule(50)[:10] == ["dense"] * 10  # the paper: 10 dense warm-up steps of 50


# ------------------------------------------------------------------ LSE reuse
class Spy:
    """Counts attention_with_lse / block_mass per (step, layer) and keeps the LSE objects."""

    def __init__(self, monkeypatch):
        self.where = None
        self.lse_calls = Counter()
        self.mass_calls = Counter()
        self.fresh = {}   # (step, layer) -> [LSE tensors returned by attention_with_lse]
        self.fed = {}     # (step, layer) -> [LSE tensors block_mass received]
        real_lse, real_mass = adaspa_mod.attention_with_lse, adaspa_mod.block_mass

        def attention_with_lse(*a, **k):
            out, lse = real_lse(*a, **k)
            self.lse_calls[self.where] += 1
            self.fresh.setdefault(self.where, []).append(lse)
            return out, lse

        def block_mass(q, k, lse, *a, **kw):
            self.mass_calls[self.where] += 1
            self.fed.setdefault(self.where, []).append(lse)
            return real_mass(q, k, lse, *a, **kw)

        monkeypatch.setattr(adaspa_mod, "attention_with_lse", attention_with_lse)
        monkeypatch.setattr(adaspa_mod, "block_mass", block_mass)

    def attach(self, method):
        orig = method.attention

        def attention(ctx, layer, call, cache):
            self.where = (ctx.step, layer)
            try:
                return orig(ctx, layer, call, cache)
            finally:
                self.where = None

        method.attention = attention

    def per_step(self, counter):
        steps = Counter()
        for (s, _), c in counter.items():
            steps[s] += c
        return dict(steps)


@pytest.fixture(scope="module")
def dit16():
    """64 tokens: four 16-token blocks; one batched CFG call per step."""
    return tiny_dit_pipeline(sample_size=16, num_layers=3)


STEPS = 10  # default schedule: dense 0-1, search at 2, research at 6


def _generate(pipe, monkeypatch, **cfg):
    spy = Spy(monkeypatch)
    ditaccel.apply(pipe, AdaSpaConfig(sparsity=0.5, block_size=16, **cfg))
    try:
        spy.attach(get_runtime(pipe).method)
        dit_call(pipe, steps=STEPS)
        counts = ditaccel.stats(pipe).method_counts
    finally:
        ditaccel.remove(pipe)
    return spy, counts


def test_research_reuses_the_cached_lse(dit16, monkeypatch):
    assert AdaSpaConfig().schedule(STEPS)[2] == "search" and AdaSpaConfig().schedule(STEPS)[6] == "research"
    spy, counts = _generate(dit16, monkeypatch)
    assert counts == {"dense": 6, "search": 3, "sparse": 18, "research": 3}
    assert spy.per_step(spy.lse_calls) == {2: 3}  # full attention + LSE once per layer, first search only
    assert spy.per_step(spy.mass_calls) == {2: 3, 6: 3}  # the mass pass at both searches
    for layer in range(3):
        (cached,) = spy.fed[(2, layer)]
        (fresh,) = spy.fresh[(2, layer)]
        assert torch.equal(cached, fresh.float())
        (reused,) = spy.fed[(6, layer)]
        assert reused is cached  # the very LSE object of the first search, not a recomputed one
    assert not any(spy.fed[(6, a)][0] is spy.fed[(6, b)][0] for a in range(3) for b in range(3) if a != b)


def test_first_search_reads_the_previous_steps_lse(dit16, monkeypatch):
    """first_lse="previous": step 1 runs dense with the LSE (no mass pass, its output exact), the first
    search at step 2 reads that very LSE (no full attention there) and runs sparse; the re-search at
    step 6 reuses it again."""
    spy = Spy(monkeypatch)
    cfg = AdaSpaConfig(sparsity=0.5, block_size=16, first_lse="previous")
    assert cfg.schedule(STEPS)[:3] == ["dense", "dense_lse", "research"]
    ditaccel.apply(dit16, cfg)
    checked = []
    try:
        method = get_runtime(dit16).method
        orig = method.attention

        def attention(ctx, layer, call, cache):  # the dense_lse step's output is the dense one
            out, fraction, what = orig(ctx, layer, call, cache)
            if what == "dense_lse":
                torch.testing.assert_close(out, call.full(), rtol=1e-5, atol=1e-5)
                checked.append((ctx.step, layer, fraction))
            return out, fraction, what

        method.attention = attention
        spy.attach(method)
        dit_call(dit16, steps=STEPS)
        st = ditaccel.stats(dit16)
    finally:
        ditaccel.remove(dit16)
    assert checked == [(1, 0, 1.0), (1, 1, 1.0), (1, 2, 1.0)]
    assert st.method_counts == {"dense": 3, "dense_lse": 3, "research": 6, "sparse": 18}
    assert spy.per_step(spy.lse_calls) == {1: 3}
    assert spy.per_step(spy.mass_calls) == {2: 3, 6: 3}
    for layer in range(3):
        (kept,) = spy.fresh[(1, layer)]
        assert spy.fed[(2, layer)][0] is kept and spy.fed[(6, layer)][0] is kept


def test_without_the_cache_every_search_recomputes(dit16, monkeypatch):
    spy, counts = _generate(dit16, monkeypatch, lse_cache=False)
    assert counts == {"dense": 6, "search": 6, "sparse": 18}
    assert spy.per_step(spy.lse_calls) == {2: 3, 6: 3}
    assert spy.per_step(spy.mass_calls) == {2: 3, 6: 3}
    for layer in range(3):
        (fed,) = spy.fed[(6, layer)]
        (fresh,) = spy.fresh[(6, layer)]
        assert fed is not spy.fed[(2, layer)][0] and torch.equal(fed, fresh.float())


def test_more_searches_reuse_the_first_lse(dit16, monkeypatch):
    spy = Spy(monkeypatch)
    cfg = AdaSpaConfig(sparsity=0.5, block_size=16, search_at=(0.2, 0.4, 0.6, 0.8))
    assert [i for i, w in enumerate(cfg.schedule(STEPS)) if w != "sparse"][2:] == [2, 4, 6, 8]
    ditaccel.apply(dit16, cfg)
    try:
        spy.attach(get_runtime(dit16).method)
        dit_call(dit16, steps=STEPS)
    finally:
        ditaccel.remove(dit16)
    assert spy.per_step(spy.lse_calls) == {2: 3}
    assert spy.per_step(spy.mass_calls) == {2: 3, 4: 3, 6: 3, 8: 3}
    for layer in range(3):
        first = spy.fed[(2, layer)][0]
        assert all(spy.fed[(s, layer)][0] is first for s in (4, 6, 8))


def test_wan_two_branches_each_reuse_their_own_lse(monkeypatch):
    """Wan runs CFG as two calls per step (cond / uncond keep separate state): each branch's
    research uses the LSE its own first search cached."""
    from ditaccel.testbed.video import tiny_wan_pipeline

    wan = tiny_wan_pipeline()
    steps = 5  # dense 0, search 1, sparse 2, research 3, sparse 4
    spy = Spy(monkeypatch)
    ditaccel.apply(wan, AdaSpaConfig(sparsity=0.5, block_size=16))
    try:
        spy.attach(get_runtime(wan).method)
        wan(prompt="a red cat", num_frames=17, height=64, width=64, num_inference_steps=steps, guidance_scale=5.0,
            generator=torch.Generator().manual_seed(0), output_type="latent")
    finally:
        ditaccel.remove(wan)
    assert spy.per_step(spy.lse_calls) == {1: 4}  # 2 layers x 2 branches
    assert spy.per_step(spy.mass_calls) == {1: 4, 3: 4}
    for layer in range(2):
        first = spy.fed[(1, layer)]
        later = spy.fed[(3, layer)]
        assert len(first) == len(later) == 2 and first[0] is not first[1]
        # one-to-one: each research LSE is one of this layer's cached ones, each used once
        assert sorted(next(i for i, f in enumerate(first) if f is x) for x in later) == [0, 1]
