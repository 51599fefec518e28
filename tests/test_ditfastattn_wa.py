"""``wa``: DiTFastAttn's window attention without the residual, the ablation-only method."""

import json

import pytest
import torch
from conftest import STEPS, dit_call
from PIL import Image
from test_ditfastattn import _heads, _layer_call, plan_of

import ditaccel
from ditaccel.kernels.window import window_attention_reference, window_tile_fraction
from ditaccel.methods.ditfastattn import (
    CANDIDATES, METHODS, LayerCache, StepAction, layer_schedule, make_window, run_layer,
)
from ditaccel.plan import Plan, PlanError
from ditaccel.viz import plot_plan

ROWS = [
    ["full", "wa", "wa", "full", "wars", "ast"],
    ["wa", "ast", "wa", "wa", "full", "wa"],
    ["full", "full", "ast", "wa", "asc", "wars+asc"],
]


def test_wa_is_an_ablation_not_a_default_candidate():
    assert "wa" not in CANDIDATES and "wa" not in METHODS
    assert "wa" not in ditaccel.DiTFastAttnConfig().candidates
    assert ditaccel.DiTFastAttnConfig(candidates=("wa",)).candidates == ("wa",)


def test_wa_output_is_the_window_attention_of_the_layer(pixart):
    attn, call, x = _layer_call(pixart, seed=11)
    window = make_window("band1d", 0.25, (4, 4))
    cache = LayerCache()
    out, cost = run_layer(StepAction("wa"), call, cache, window, cond=None)
    expected = call.project(window_attention_reference(*_heads(attn, x), window))
    assert torch.allclose(out, expected, atol=1e-5)
    assert not torch.allclose(out, call.full(), atol=1e-3)  # not full attention: the far keys are dropped
    assert cost.fraction == pytest.approx(window_tile_fraction(window)) and cost.extra_window == 0.0
    assert cache.out is None and cache.res is None  # wa neither reads nor leaves a residual


def test_wa_needs_no_residual_and_makes_none():
    s = layer_schedule(["full", "wa", "ast", "full", "wars"])
    assert [a.keep_res for a in s] == [None, None, None, "all", None]  # only the full step that wars reads
    assert [a.keep_out for a in s] == [False, True, False, False, False]  # ast reads wa's output


def test_plan_with_wa_runs_counts_flops_and_differs_from_wars(dit):
    dense = dit_call(dit)
    ditaccel.apply(dit, plan_of(dit, ROWS))
    try:
        out = dit_call(dit)
        st = ditaccel.stats(dit)
    finally:
        ditaccel.remove(dit)
    tf = window_tile_fraction(make_window("band1d", 0.25, (4, 4)))
    cost = {"full": 1.0, "wars": tf, "ast": 0.0, "asc": 0.5, "wars+asc": 0.5 * tf, "wa": tf}
    total = sum(cost[m] for row in ROWS for m in row) + tf + 0.5 * tf  # residual passes: layer 0 step 3,
    # layer 2 step 1 (cond half only: its one reader is wars+asc)
    assert st.attention_flops_ratio == pytest.approx(total / (3 * STEPS))
    assert st.method_counts == {"full": 5, "wa": 7, "ast": 3, "wars": 1, "asc": 1, "wars+asc": 1}
    assert torch.isfinite(out).all() and not torch.equal(out, dense)
    with_residual = [[{"wa": "wars"}.get(m, m) for m in row] for row in ROWS]
    with_residual[1][0] = "full"  # wars needs an earlier full step
    ditaccel.apply(dit, plan_of(dit, with_residual))
    try:
        out_wars = dit_call(dit)
    finally:
        ditaccel.remove(dit)
    assert (out_wars - dense).abs().mean() < (out - dense).abs().mean()  # the residual keeps quality


def test_plan_with_wa_round_trips_as_json(dit, tmp_path):
    plan = plan_of(dit, ROWS)
    assert plan.counts() == {"full": 5, "wars": 1, "ast": 3, "asc": 1, "wars+asc": 1, "wa": 7}
    assert "wa" not in plan_of(dit, [["full"] * STEPS] * 3).counts()  # ablation methods only when used
    path = tmp_path / "wa.json"
    plan.save(path)
    assert json.loads(path.read_text())["methods"] == ROWS
    loaded = Plan.load(path)
    assert loaded.methods == ROWS and loaded.counts() == plan.counts()
    plot_plan(loaded, tmp_path / "wa.png")
    with Image.open(tmp_path / "wa.png") as im:
        assert im.format == "PNG"
    bad = plan.to_dict()
    bad["methods"][0][0] = "wb"
    with pytest.raises(PlanError, match=r"^methods\[0\]\[0\]: unknown method 'wb'"):
        Plan.from_dict(bad)


def test_window_only_search_picks_wa(dit):
    config = ditaccel.DiTFastAttnConfig(threshold=10.0, candidates=("wa",), show_progress=False)
    plan = ditaccel.calibrate(dit, config, num_inference_steps=4, class_labels=[1, 2])
    assert plan.metadata["candidates"] == ["wa"]
    # every step after the first takes wa under an unbounded budget; nothing else is tried
    assert all(row == ["full"] + ["wa"] * 3 for row in plan.methods)
