"""Runtime checks (issue 16 §2): AdaSpa block sizes refused at construction, stats details over
every CFG branch state, and CFG detection that looks at the conditioning as well as the latents."""

import pytest
import torch
from conftest import STEPS, dit_call, gen

import ditaccel
from ditaccel import AdaSpaConfig, Plan
from ditaccel.kernels.block_mass import BLOCK_SIZES
from ditaccel.models.adapters import DIT, PIXART
from ditaccel.runtime import Runtime, get_runtime


# ------------------------------------------------------------------ block sizes
@pytest.mark.parametrize("bs", [8, 48, 256, 512, True, 64.0])
def test_unsupported_block_size_is_refused_at_construction(bs, monkeypatch):
    import ditaccel.methods.adaspa as A

    calls = []
    monkeypatch.setattr(A, "block_mass", lambda *a, **k: calls.append(1))
    monkeypatch.setattr(A, "attention_with_lse", lambda *a, **k: calls.append(1))
    with pytest.raises(ValueError, match="block_size") as err:
        AdaSpaConfig(block_size=bs)
    msg = str(err.value)
    assert "\n" not in msg and str(BLOCK_SIZES) in msg
    assert not calls  # refused before any search could start


@pytest.mark.parametrize("bs", BLOCK_SIZES)
def test_supported_block_sizes_run_end_to_end(dit, bs):
    ditaccel.apply(dit, AdaSpaConfig(sparsity=0.5, block_size=bs))
    try:
        out = dit_call(dit)
        st = ditaccel.stats(dit)
    finally:
        ditaccel.remove(dit)
    assert torch.isfinite(out).all()
    assert st.method_counts["search"] == 3 and st.method_counts["research"] == 3
    assert all(len(r) == 2 for r in st.details["recall_per_search"])


# ------------------------------------------------------------------ details over CFG branches
def _branch_details(pipe):
    rt = get_runtime(pipe)
    states = [s for s in rt.state_manager._state_cache.values() if s.flops_dense]
    return [rt.method.details(s.caches) for s in states]


def test_details_of_one_branch_are_unchanged(dit):
    ditaccel.apply(dit, AdaSpaConfig(sparsity=0.5, block_size=16))
    try:
        dit_call(dit)  # batched CFG: one state
        st = ditaccel.stats(dit)
        (one,) = _branch_details(dit)
    finally:
        ditaccel.remove(dit)
    assert st.details == one and "branches" not in st.details


def test_details_cover_both_wan_cfg_branches():
    from ditaccel.testbed.video import tiny_wan_pipeline

    wan = tiny_wan_pipeline()
    ditaccel.apply(wan, AdaSpaConfig(sparsity=0.5, block_size=16))
    try:
        wan(prompt="a red cat", num_frames=17, height=64, width=64, num_inference_steps=5, guidance_scale=5.0,
            generator=gen(), output_type="latent")
        st = ditaccel.stats(wan)
        cond, uncond = _branch_details(wan)  # Wan: separate cond / uncond calls, one state each
    finally:
        ditaccel.remove(wan)
    d = st.details
    assert all(len(r) == 2 for r in cond["recall_per_search"])  # search + research per branch
    assert d["recall_per_search"] == [a + b for a, b in zip(cond["recall_per_search"], uncond["recall_per_search"])]
    assert all(len(r) == 4 for r in d["recall_per_search"])
    assert d["search_seconds"] == pytest.approx(cond["search_seconds"] + uncond["search_seconds"])
    assert uncond["search_seconds"] > 0
    assert d["density_per_layer"] == pytest.approx(
        [(a + b) / 2 for a, b in zip(cond["density_per_layer"], uncond["density_per_layer"])])
    for row, a, b in zip(d["density_per_head"], cond["density_per_head"], uncond["density_per_head"]):
        assert row == pytest.approx([(x + y) / 2 for x, y in zip(a, b)])
    assert d["branches"] == 2


# ------------------------------------------------------------------ CFG detection
def _asc_plan(pipe):
    return Plan.from_methods(pipe, [["full"] + ["asc"] * (STEPS - 1)] * 3, cfg=True)


def _record_conds(pipe):
    """(step, cond) of every transformer call from now on."""
    method, seen = get_runtime(pipe).method, []
    begin = method.begin_call

    def record(ctx):
        seen.append((ctx.step, ctx.cond))
        return begin(ctx)

    method.begin_call = record
    return seen


def test_same_noise_different_labels_is_not_cfg(dit):
    """guidance_scale=1 on two labels, each sample from the same seed: identical latent halves at
    step 0, but not a CFG pair; asc must not copy sample 0's attention into sample 1."""
    same_noise = dict(guidance_scale=1.0, generator=[gen(0), gen(0)], output_type="pt", num_inference_steps=STEPS)
    ditaccel.apply(dit, _asc_plan(dit))
    try:
        seen = _record_conds(dit)
        with pytest.raises(ValueError, match="asc"):
            dit(class_labels=[1, 2], **same_noise)
        assert seen == [(0, None)]  # refused at the first call
        seen.clear()
        dit_call(dit)  # a real CFG call (guidance 4): detected at every step
        assert seen == [(s, 0) for s in range(STEPS)]
    finally:
        ditaccel.remove(dit)
    ditaccel.apply(dit, AdaSpaConfig(sparsity=0.5, block_size=16))
    try:
        seen = _record_conds(dit)
        dit(class_labels=[1, 2], **same_noise)
        assert seen == [(s, None) for s in range(STEPS)]
    finally:
        ditaccel.remove(dit)


def test_cfg_rule_on_bare_calls(dit):
    """The rule itself: latent halves identical, conditioning halves differ the way CFG does."""
    x = torch.randn(1, 4, 8, 8, generator=gen()).repeat(2, 1, 1, 1)
    rt = Runtime(dit.transformer, DIT, method=None)
    labels = {"cfg": [1, 1000], "two labels": [1, 2], "same label": [3, 3], "uncond first": [1000, 1]}
    got = {k: rt._cond_index(x, {"class_labels": torch.tensor(v)}) for k, v in labels.items()}
    assert got == {"cfg": 0, "two labels": None, "same label": None, "uncond first": None}
    assert rt._cond_index(torch.randn(2, 4, 8, 8, generator=gen(1)), {"class_labels": torch.tensor([1, 1000])}) is None
    assert rt._cond_index(x, {}) == 0  # no conditioning to look at: the latents decide
    pix = Runtime(dit.transformer, PIXART, method=None)
    ctx = torch.randn(2, 5, 8, generator=gen(2))
    assert pix._cond_index(x, {"encoder_hidden_states": ctx}) == 1  # [uncond, cond]
    assert pix._cond_index(x, {"encoder_hidden_states": ctx[:1].repeat(2, 1, 1)}) is None
    forced = Runtime(dit.transformer, DIT, method=None, cfg=True)  # ditaccel.apply(..., cfg=True) still overrides
    assert forced._cond_index(x, {"class_labels": torch.tensor([1, 2])}) == 0
