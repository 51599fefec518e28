"""The search loss option: ``DiTFastAttnConfig(loss="relative" | "official")``.

"relative" (ours) divides by max(|O|, |O'|) + 1e-6; "official" reproduces thu-nics/DiTFastAttn's
``compression_loss``, which divides by the *signed* elementwise max(O, O') + 1e-6. Both are
checked against hand-computed values where they differ, and both searches are checked to use
the configured one.
"""

import copy
import json
import math

import pytest
import torch
from conftest import gen

import ditaccel
from ditaccel.methods import ditfastattn as dfa
from ditaccel.methods.ditfastattn import LOSSES, loss_function, official_relative_l1, relative_l1
from ditaccel.plan import Plan

# (O, O', ours, official) per element, by hand; eps = 1e-6.
CASES = [
    (-1.0, -2.0, 1 / (2 + 1e-6), 1 / (1 - 1e-6)),      # both negative: official divides by the smaller |.|
    (0.5, -0.5, 1 / (0.5 + 1e-6), 1 / (0.5 + 1e-6)),   # mixed signs, positive max: the same
    (0.0, -1.0, 1 / (1 + 1e-6), 10.0),                 # max(O, O') = 0: official 1e6, clipped to 10
    (1e-3, -1.0, 1.001 / (1 + 1e-6), 10.0),            # near-zero positive max: official ~1000 -> 10
    (-0.25, -4.0, 3.75 / (4 + 1e-6), 10.0),            # both negative: 3.75 / 0.249999 = 15 -> 10
    (-3.0, -3.0, 0.0, 0.0),                            # equal
    (2.0, 1.0, 1 / (2 + 1e-6), 1 / (2 + 1e-6)),        # both positive: the same
]


def _tensors(cases):
    o = torch.tensor([c[0] for c in cases], dtype=torch.float64)
    o2 = torch.tensor([c[1] for c in cases], dtype=torch.float64)
    return o, o2


@pytest.mark.parametrize("i", range(len(CASES)))
def test_each_element_by_hand(i):
    o, o2 = _tensors(CASES[i:i + 1])
    _, _, ours, official = CASES[i]
    assert relative_l1(o, o2) == pytest.approx(ours, rel=1e-6, abs=1e-7)
    assert official_relative_l1(o, o2) == pytest.approx(official, rel=1e-6, abs=1e-7)
    # both are symmetric in (O, O')
    assert official_relative_l1(o2, o) == pytest.approx(official, rel=1e-6, abs=1e-7)


def test_mean_over_all_elements_by_hand():
    o, o2 = _tensors(CASES)
    ours = sum(c[2] for c in CASES) / len(CASES)
    official = sum(c[3] for c in CASES) / len(CASES)
    assert relative_l1(o, o2) == pytest.approx(ours, rel=1e-6)
    assert official_relative_l1(o, o2) == pytest.approx(official, rel=1e-6)
    assert official > 2 * ours  # they differ here


def test_official_is_one_mean_over_the_whole_batch():
    """Not per CFG half or per sample: one mean over every element of the transformer output."""
    o, o2 = _tensors(CASES)
    a = torch.stack([o, o, o2, torch.full_like(o, 3.0)]).reshape(2, 2, -1)  # (CFG half, sample, elements)
    b = torch.stack([o2, o2, o2, torch.full_like(o, 3.0)]).reshape(2, 2, -1)
    per_elem = [official_relative_l1(a[h, s, j:j + 1], b[h, s, j:j + 1])
                for h in range(2) for s in range(2) for j in range(len(CASES))]
    assert official_relative_l1(a, b) == pytest.approx(sum(per_elem) / len(per_elem), rel=1e-6)


def test_official_nan_where_the_signed_denominator_is_zero():
    """O = O' = -1e-6: 0 / 0 in the official code; the NaN reaches the mean (never under budget)."""
    o = torch.tensor([-1e-6, 1.0])
    assert math.isnan(official_relative_l1(o, o.clone()))
    assert relative_l1(o, o.clone()) == 0.0


def test_loss_option_validated():
    assert ditaccel.DiTFastAttnConfig().loss == "relative"
    assert ditaccel.DiTFastAttnConfig(loss="official").loss == "official"
    assert LOSSES == ("relative", "official")
    for bad in ("l1", "Official", None):
        with pytest.raises(ValueError, match=r"^loss must be one of") as e:
            ditaccel.DiTFastAttnConfig(loss=bad)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="^loss"):
        loss_function("mse")
    assert loss_function("relative") is relative_l1 and loss_function("official") is official_relative_l1


# ------------------------------------------------------------------ the searches use it
def _calibrate(pipe, search, loss, threshold=0.05):
    cfg = ditaccel.DiTFastAttnConfig(threshold=threshold, search=search, loss=loss, show_progress=False)
    return ditaccel.calibrate(pipe, cfg, num_inference_steps=4, class_labels=[1, 2], generator=gen())


@pytest.mark.parametrize("search", ["greedy", "local"])
def test_search_calls_only_the_configured_loss(dit, monkeypatch, search):
    calls = {name: 0 for name in LOSSES}

    def spy(name):
        fn = dfa.LOSS_FUNCTIONS[name]

        def wrapped(o, o2):
            calls[name] += 1
            return fn(o, o2)
        return wrapped

    for name, attr in zip(LOSSES, ("relative_l1", "official_relative_l1")):
        wrapped = spy(name)
        monkeypatch.setitem(dfa.LOSS_FUNCTIONS, name, wrapped)
        monkeypatch.setattr(dfa, attr, wrapped)  # also a default bound at DiTFastAttn() (local's scoring)
    for loss, other in (("official", "relative"), ("relative", "official")):
        calls.update({name: 0 for name in LOSSES})
        plan = _calibrate(dit, search, loss)
        assert calls[loss] > 0 and calls[other] == 0, calls
        assert plan.metadata["loss"] == loss and plan.metadata["search"] == search


@pytest.mark.parametrize("search", ["greedy", "local"])
def test_the_two_losses_give_different_plans_at_the_same_threshold(dit, search):
    rel, off = _calibrate(dit, search, "relative"), _calibrate(dit, search, "official")
    assert rel.methods != off.methods
    # each step's chosen column is within δ by the loss it was searched with
    assert max(off.metadata["step_loss"]) < 0.05 and max(rel.metadata["step_loss"]) < 0.05


def test_plans_record_the_loss_and_old_plans_load(dit, tmp_path):
    plan = _calibrate(dit, "local", "official", threshold=0.0)
    plan.save(tmp_path / "new.json")
    assert Plan.load(tmp_path / "new.json").metadata["loss"] == "official"
    old = copy.deepcopy(plan.to_dict())
    del old["metadata"]["loss"]  # a v1 plan file written before the option existed
    assert old["version"] == 1
    (tmp_path / "old.json").write_text(json.dumps(old))
    loaded = Plan.load(tmp_path / "old.json")
    assert "loss" not in loaded.metadata and loaded.methods == plan.methods
    ditaccel.apply(dit, loaded)
    ditaccel.remove(dit)
