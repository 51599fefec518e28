"""Calibration behaviour that mutation testing (docs/MUTATION.md) found untested: the metadata it
records, its defaults, the progress bar, the local search's binary search against a brute-force
scan, and the settings it must pass on (window size, cfg, latent output)."""

import importlib
import math
import random
from types import SimpleNamespace

import pytest
import torch
from conftest import gen

import ditaccel
from ditaccel.methods import ditfastattn as dfa
from ditaccel.methods.ditfastattn import FULL, DiTFastAttnConfig

cal = importlib.import_module("ditaccel.calibrate")  # the module (ditaccel.calibrate is also the function)


def _calibrate(pipe, steps=3, **cfg):
    cfg.setdefault("show_progress", False)
    return ditaccel.calibrate(pipe, DiTFastAttnConfig(**cfg), num_inference_steps=steps, class_labels=[1, 2],
                              generator=gen())


def test_metadata_records_the_run(dit, monkeypatch):
    clock = iter([100.0, 112.34567])
    monkeypatch.setattr(cal, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    plan = _calibrate(dit, steps=4, threshold=0.15)
    md = plan.metadata
    assert md["scheduler"] == type(dit.scheduler).__name__
    assert md["grid"] == [4, 4] and md["tokens"] == 16  # sample_size 8, patch 2
    assert md["calibration_inputs"] == 2
    assert md["calibration_seconds"] == 12.346  # rounded to ms
    assert md["cfg"] is True and md["num_steps"] == 4 and md["num_layers"] == 3
    losses = md["step_loss"]
    assert len(losses) == 4 and losses[0] == 0.0  # step 0 is all full: the reference itself
    assert all(isinstance(x, float) and x == round(x, 6) for x in losses)
    assert any(0 < x < 0.15 for x in losses[1:])  # compressed steps, within the budget


def _calibrate_pixart(pixart, prompt, steps=2, **cfg):
    return ditaccel.calibrate(pixart, DiTFastAttnConfig(show_progress=False, **cfg), num_inference_steps=steps,
                              prompt=prompt, generator=gen(), max_sequence_length=16, use_resolution_binning=False,
                              clean_caption=False)


def test_one_prompt_counts_one_input(pixart):
    assert _calibrate_pixart(pixart, "a red circle").metadata["calibration_inputs"] == 1
    assert _calibrate_pixart(pixart, ["a red circle", "a cat", "a dog"]).metadata["calibration_inputs"] == 3


def test_defaults_twenty_steps_and_the_default_config(dit):
    plan = ditaccel.calibrate(dit, class_labels=[1, 2], generator=gen())
    assert plan.num_steps == 20
    md = plan.metadata
    assert (md["threshold"], md["search"], md["loss"], md["window"], md["window_size"]) == \
        (0.1, "greedy", "relative", "band1d", 0.25)


@pytest.mark.parametrize("n", [0, -1, 2.0, "3"])
def test_step_count_must_be_a_positive_int(dit, n):
    with pytest.raises(ValueError, match="num_inference_steps"):
        ditaccel.calibrate(dit, DiTFastAttnConfig(show_progress=False), num_inference_steps=n, class_labels=[1])


def test_one_step_is_enough(dit):
    plan = _calibrate(dit, steps=1)
    assert plan.methods == [[FULL]] * 3


def test_progress_bar_counts_every_layer_of_every_step(dit, monkeypatch):
    bars = []

    class Bar:
        def __init__(self, **kw):
            self.kw, self.n = kw, 0
            bars.append(self)

        def update(self, n):
            self.n += n

        def close(self):
            self.closed = True

    monkeypatch.setattr(cal, "tqdm", Bar)
    for search in ("greedy", "local"):
        _calibrate(dit, steps=4, threshold=0.1, search=search, show_progress=True)
    _calibrate(dit, steps=2, show_progress=False)
    for bar in bars[:2]:
        assert bar.kw == {"total": 12, "desc": "ditaccel calibrate", "unit": "layer", "disable": False}
        assert bar.n == 12 and bar.closed
    assert bars[2].kw["disable"] is True and bars[2].n == 6


def test_the_configured_window_size_is_searched(dit, monkeypatch):
    seen = set()
    real = dfa.make_window

    def make_window(kind, size, grid, *a, **k):
        seen.add((kind, size))
        return real(kind, size, grid, *a, **k)

    monkeypatch.setattr(dfa, "make_window", make_window)
    _calibrate(dit, steps=3, window="neighborhood2d", window_size=0.5, threshold=0.1)
    assert seen == {("neighborhood2d", 0.5)}


def test_cfg_false_is_passed_on(dit):
    plan = _calibrate(dit, steps=4, threshold=1.0, cfg=False)
    assert plan.metadata["cfg"] is False
    assert not any(m in ("asc", "wars+asc") for row in plan.methods for m in row)


def test_calibration_does_not_decode_by_default(pixart, monkeypatch):
    """The calibration pass asks the pipeline for latents (where it can): no VAE decode."""
    def decode(*a, **k):
        raise AssertionError("calibration decoded its latents")

    monkeypatch.setattr(pixart.vae, "decode", decode)
    _calibrate_pixart(pixart, ["a red circle"])


def test_local_search_on_a_pipeline_without_cfg(dit):
    plan = ditaccel.calibrate(dit, DiTFastAttnConfig(search="local", threshold=0.2, show_progress=False),
                              num_inference_steps=3, class_labels=[1, 2], guidance_scale=1.0, generator=gen())
    assert plan.metadata["cfg"] is False
    assert not any(m in ("asc", "wars+asc") for row in plan.methods for m in row)


def test_local_search_runs_log_passes_not_greedy_ones(dit):
    """δ = 0: no trial is within budget. Greedy tries every candidate of every layer (1 reference
    + 3 x 4 trials + 1 final pass per step); local bisects the ≤ 12 score levels (≤ 4 trials)."""
    calls = []
    real_run = cal._GreedySearchHook._run

    def run(self, column, write, args, kwargs):
        calls.append(write)
        return real_run(self, column, write, args, kwargs)

    counts = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cal._GreedySearchHook, "_run", run)
        for search in ("greedy", "local"):
            calls.clear()
            plan = _calibrate(dit, steps=3, threshold=0.0, search=search)
            counts[search] = len(calls)
            assert plan.methods == [[FULL] * 3] * 3
            assert calls.count(True) == 3  # one final (cache-writing) pass per step
    assert counts["greedy"] == 2 + 2 * 14  # step 0: reference + final
    assert 2 + 2 * 3 <= counts["local"] <= 2 + 2 * 6


# ------------------------------------------------------------------ the local search, exactly
class _FakeMethod:
    def __init__(self, n):
        self.methods = [[FULL]] * n


def _ref_local(scores, allowed, cost, threshold, n):
    """Brute force: every score level τ, its column, its loss; the largest τ whose loss is under δ
    (the losses grow with τ here, as the bisection assumes)."""
    levels = sorted({v for i in range(n) for v in scores[i].values()})
    best = [FULL] * n
    for tau in levels:
        col = [next((c for c in allowed if scores[i][c] <= tau), FULL) for i in range(n)]
        if cost(col) < threshold:
            best = col
    return best


def test_local_bisection_equals_the_brute_force_scan():
    rng = random.Random(0)
    allowed = ["ast", "wars+asc", "wars", "asc"]
    checked = 0
    for trial in range(300):
        n = rng.randint(1, 5)
        # scores on a coarse grid: ties between layers and candidates happen
        scores = {i: {c: rng.choice([0.01, 0.02, 0.03, 0.05, 0.08, 0.13]) for c in allowed} for i in range(n)}
        weight = {"ast": 4.0, "wars+asc": 3.0, "wars": 2.0, "asc": 1.0, FULL: 0.0}
        layer_w = [rng.uniform(0.5, 1.5) for _ in range(n)]

        def cost(col):  # the transformer loss of a column: more compression, more loss
            return sum(weight[c] * w for c, w in zip(col, layer_w))

        threshold = rng.uniform(0.0, 12.0)
        runs = []
        hook = cal._GreedySearchHook.__new__(cal._GreedySearchHook)
        hook.method = _FakeMethod(n)
        hook.config = SimpleNamespace(threshold=threshold)
        hook.bar = SimpleNamespace(update=lambda k: runs.append(("bar", k)))
        hook.loss = lambda ref, out: out
        hook._run = lambda col, write, a, k: (runs.append(("run", list(col), write)), SimpleNamespace(sample=cost(col)))[1]
        got = hook._local(None, allowed, scores, (), {})
        assert got == _ref_local(scores, allowed, cost, threshold, n), (trial, scores, threshold)
        levels = len({v for i in range(n) for v in scores[i].values()})
        trials = [r for r in runs if r[0] == "run"]
        assert all(w is False for _, _, w in trials)  # trial runs never write the caches
        assert len(trials) <= math.ceil(math.log2(levels + 1))
        assert runs[-1] == ("bar", n)
        checked += got != [FULL] * n
    assert checked > 100


def test_local_level_ties_are_inclusive():
    """A layer takes a candidate scoring exactly τ (≤, not <)."""
    hook = cal._GreedySearchHook.__new__(cal._GreedySearchHook)
    hook.method = _FakeMethod(2)
    hook.config = SimpleNamespace(threshold=1.0)
    hook.bar = SimpleNamespace(update=lambda k: None)
    hook.loss = lambda ref, out: out
    hook._run = lambda col, write, a, k: SimpleNamespace(sample=0.0)  # everything within budget
    scores = {0: {"ast": 0.5, "wars": 0.5}, 1: {"ast": 0.5, "wars": 0.25}}
    assert hook._local(None, ["ast", "wars"], scores, (), {}) == ["ast", "ast"]


def test_non_square_grid_and_candidates_are_recorded(pixart):
    plan = ditaccel.calibrate(pixart, DiTFastAttnConfig(show_progress=False, candidates=("wars", "ast")),
                              num_inference_steps=2, prompt=["a cat"], height=128, width=64, generator=gen(),
                              max_sequence_length=16, use_resolution_binning=False, clean_caption=False)
    assert plan.metadata["grid"] == [8, 4] and plan.metadata["tokens"] == 32
    assert plan.metadata["candidates"] == ["wars", "ast"]
