"""The greedy plan search (DESIGN.md §2) against a brute-force reference written here, plan for plan.

The reference follows the text of §2 literally, with its own loss and its own runs: for each step
t > 0 it runs the generation (through the public ``Plan``/``apply`` API) with the columns chosen for
steps < t and every layer ``full`` at step t to get O; then for each layer i in order it tries the
candidates in the configured order, with layers < i at their chosen methods and layers > i
``full``, and takes the first with L(O, O') < (i + 1)/n · δ. Step 0 is all ``full``; ``asc`` and
``wars+asc`` are tried only with CFG. Each input below is also shown to discriminate: the reference
with one rule mutated (budget δ for every layer, reversed candidate order, earlier layers reset to
``full`` during a trial) gives a different plan there, so a library with that mutation fails.

Also the search loss ``relative_l1`` against hand values where the existing cases do not reach:
O < O', near-zero denominators (the 1e-6), the only reachable clip, and the CFG rule.
"""

import math

import pytest
import torch
from conftest import gen

import ditaccel
from ditaccel.methods.ditfastattn import ASC, CANDIDATES, WARS_ASC, relative_l1
from ditaccel.plan import Plan


class _Stop(Exception):
    pass


def ref_loss(o, o2):
    """§2's L, written out again (not the library's): mean of clip(|O−O'| / (max(|O|,|O'|)+1e-6), 0, 10)."""
    o, o2 = o.double(), o2.double()
    return ((o - o2).abs() / (torch.maximum(o.abs(), o2.abs()) + 1e-6)).clamp(0, 10).mean().item()


class Reference:
    """Brute-force greedy search over whole (truncated) generations of ``pipe``."""

    def __init__(self, pipe, steps, labels=(1, 2), guidance_scale=4.0):
        self.pipe, self.steps, self.labels, self.gs = pipe, steps, list(labels), guidance_scale
        self.n = len(pipe.transformer.transformer_blocks)
        self.memo = {}

    def output(self, cols):
        """The transformer output at step t = len(cols) - 1 of a generation whose steps 0..t use
        ``cols[s]`` (one method per layer); the generation stops there."""
        key = tuple(map(tuple, cols))
        if key not in self.memo:
            t = len(cols) - 1
            rows = [[cols[s][i] if s <= t else "full" for s in range(self.steps)] for i in range(self.n)]
            ditaccel.apply(self.pipe, Plan.from_methods(self.pipe, rows, cfg=self.gs > 1))
            seen = []

            def hook(module, args, kwargs, out):
                seen.append(out.sample if hasattr(out, "sample") else out[0])
                if len(seen) == t + 1:
                    raise _Stop

            handle = self.pipe.transformer.register_forward_hook(hook, with_kwargs=True)
            try:
                self.pipe(class_labels=self.labels, num_inference_steps=self.steps, generator=gen(),
                          guidance_scale=self.gs, output_type="latent")
            except _Stop:
                pass
            finally:
                handle.remove()
                ditaccel.remove(self.pipe)
            assert len(seen) == t + 1  # one batched (CFG) transformer call per step
            self.memo[key] = seen[t]
        return self.memo[key]

    def plan(self, delta, order=CANDIDATES, budget=None, keep_earlier=True):
        n, full = self.n, ["full"] * self.n
        budget = budget or (lambda i: (i + 1) / n * delta)
        allowed = [c for c in order if self.gs > 1 or c not in (ASC, WARS_ASC)]
        cols = [full]  # step 0: all full
        for _ in range(1, self.steps):
            reference = self.output(cols + [full])
            chosen = list(full)
            for i in range(n):
                for cand in allowed:
                    trial = (chosen[:i] if keep_earlier else full[:i]) + [cand] + full[i + 1:]
                    if ref_loss(reference, self.output(cols + [trial])) < budget(i):
                        chosen[i] = cand
                        break
            cols.append(chosen)
        return [[cols[s][i] for s in range(self.steps)] for i in range(n)]


def calibrated(pipe, steps, delta, guidance_scale, labels=(1, 2), **cfg):
    config = ditaccel.DiTFastAttnConfig(threshold=delta, show_progress=False, **cfg)
    return ditaccel.calibrate(pipe, config, num_inference_steps=steps, class_labels=list(labels), generator=gen(),
                              guidance_scale=guidance_scale)


# (guidance scale, steps, δ); the first two discriminate every mutated rule (checked below)
DISCRIMINATING = [(4.0, 4, 0.05), (1.0, 5, 0.05)]
OTHERS = [(4.0, 5, 0.02), (4.0, 5, 0.08), (1.0, 5, 0.08), (4.0, 4, 0.15)]


@pytest.mark.parametrize("gs, steps, delta", DISCRIMINATING + OTHERS)
def test_greedy_equals_the_reference(dit, gs, steps, delta):
    ref = Reference(dit, steps, guidance_scale=gs)
    plan = calibrated(dit, steps, delta, gs)
    assert plan.methods == ref.plan(delta)
    assert plan.metadata["cfg"] is (gs > 1)


@pytest.mark.parametrize("gs, steps, delta", DISCRIMINATING)
def test_the_inputs_discriminate_each_rule(dit, gs, steps, delta):
    """On these inputs each single-rule mutation of §2 gives a different plan than the true rule, so
    test_greedy_equals_the_reference fails for a library with that mutation."""
    ref = Reference(dit, steps, guidance_scale=gs)
    true = ref.plan(delta)
    # budget δ at every layer instead of (i + 1)/n · δ
    assert ref.plan(delta, budget=lambda i: delta) != true
    # the candidates tried least compressing first
    assert ref.plan(delta, order=CANDIDATES[::-1]) != true
    # a trial that resets the layers before i to full instead of keeping their chosen methods
    assert ref.plan(delta, keep_earlier=False) != true
    # and the plan is not trivial: something compressed, at more than one kind of method
    assert len({m for row in true for m in row[1:]}) >= 2


def test_a_custom_candidate_order_is_followed(dit):
    order = ("wars", "ast", "asc", "wars+asc")
    ref = Reference(dit, 4)
    plan = calibrated(dit, 4, 0.05, 4.0, candidates=order)
    assert plan.methods == ref.plan(0.05, order=order)
    assert plan.methods != ref.plan(0.05)  # differs from the default order here


def test_cfg_rule(dit):
    """Without CFG no asc/wars+asc, even when they are the only candidates or within any budget;
    with CFG they are chosen."""
    with_cfg = calibrated(dit, 4, 0.05, 4.0)
    assert with_cfg.counts()["asc"] > 0 and with_cfg.counts()["wars+asc"] > 0
    only_asc = ("asc", "wars+asc")
    assert calibrated(dit, 4, 1.0, 4.0, candidates=only_asc).counts()["full"] == 3  # step 0 only
    no_cfg = calibrated(dit, 4, 1.0, 1.0, candidates=only_asc)
    assert no_cfg.counts()["full"] == 3 * 4 and no_cfg.metadata["cfg"] is False
    for delta in (0.05, 1.0):
        counts = calibrated(dit, 5, delta, 1.0).counts()
        assert counts["asc"] == 0 and counts["wars+asc"] == 0


# ------------------------------------------------------------------ the loss by hand
EPS = 1e-6
# (O, O', value) per element; each case also holds with O and O' swapped
LOSS_CASES = [
    (-2.0, -1.0, 1 / (2 + EPS)),          # O < O', both negative: |O−O'| in the numerator
    (-1.0, 1.0, 2 / (1 + EPS)),           # opposite signs: the largest value the ratio reaches (< 2)
    (-3.0, 0.5, 3.5 / (3 + EPS)),         # the larger magnitude is the negative one
    (1e-7, -1e-7, 2e-7 / (1e-7 + EPS)),   # near-zero denominator: the 1e-6 dominates (0.1818...)
    (1e-6, 0.0, 1e-6 / (2 * EPS)),        # exactly 0.5
    (0.0, 0.0, 0.0),                      # both zero: 0 / 1e-6, not NaN
    (-1e-9, 0.0, 1e-9 / (1e-9 + EPS)),    # ~1e-3: tiny differences near zero stay tiny
]


@pytest.mark.parametrize("o, o2, value", LOSS_CASES)
def test_relative_l1_by_hand(o, o2, value):
    a, b = torch.tensor([o], dtype=torch.float64), torch.tensor([o2], dtype=torch.float64)
    assert relative_l1(a, b) == pytest.approx(value, rel=1e-5, abs=1e-9)
    assert relative_l1(b, a) == pytest.approx(value, rel=1e-5, abs=1e-9)


def test_relative_l1_mean_of_the_cases():
    a = torch.tensor([c[0] for c in LOSS_CASES], dtype=torch.float64)
    b = torch.tensor([c[1] for c in LOSS_CASES], dtype=torch.float64)
    assert relative_l1(a, b) == pytest.approx(sum(c[2] for c in LOSS_CASES) / len(LOSS_CASES), rel=1e-5)
    assert relative_l1(a, b) == pytest.approx(ref_loss(a, b), rel=1e-5)


def test_relative_l1_clip_at_ten():
    """For finite float32 values |O−O'| ≤ 2·max(|O|,|O'|), so the ratio stays < 2 and the clip can
    only act where O−O' overflows: ±3e38 (float32) differ by inf; inf / 3e38 clips to exactly 10."""
    a, b = torch.tensor([3e38, 1.0]), torch.tensor([-3e38, 1.0])
    assert relative_l1(a, b) == pytest.approx((10.0 + 0.0) / 2)
    assert relative_l1(b, a) == pytest.approx(5.0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(1000, generator=g) * 1e-3, torch.randn(1000, generator=g)
    assert relative_l1(x, y) < 2.0 and math.isfinite(relative_l1(x, y))
