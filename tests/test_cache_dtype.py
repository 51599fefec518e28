"""DiTFastAttn's caches in float8 (``DiTFastAttnConfig(cache_dtype="float8")``): the quantization
against a brute-force per-head reference, plans that really run with it (close to the model-dtype
run, not equal), the bytes counted, the option carried through plans, files and the CLI."""

import json

import pytest
import torch
from conftest import STEPS, dit_call, pixart_call, run_main

import ditaccel
from ditaccel.kernels.window import window_attention_reference
from ditaccel.methods.ditfastattn import (
    FP8_MAX, CfgPeer, DiTFastAttnConfig, Float8Cache, LayerCache, StepAction, make_window, quantize_fp8, run_layer,
)
from ditaccel.models import adapter_for
from ditaccel.plan import Plan, PlanError
from ditaccel.runtime import get_runtime

E4M3 = torch.float8_e4m3fn


# ------------------------------------------------------------------ quantization
def _reference(t: torch.Tensor, slices) -> torch.Tensor:
    """Brute force: each slice (an index into ``t``) quantized on its own, scale = its amax / 448."""
    out = torch.empty_like(t, dtype=torch.float32)
    for idx in slices:
        x = t[idx].float()
        amax = x.abs().max()
        scale = amax / 448 if amax > 0 else torch.tensor(1.0)
        out[idx] = (x / scale).clamp(-448, 448).to(E4M3).float() * scale
    return out


def _spread_heads(shape, seed=0):
    """Random (B, H, L, D) values whose heads differ in magnitude by up to 1e9 (one head all zero)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g)
    b, h = shape[:2]
    mags = torch.logspace(-6, 3, b * h).view(b, h, 1, 1)
    t = t * mags
    t[0, 1] = 0.0
    return t


def test_residual_quantization_is_per_batch_and_head_as_the_reference():
    t = _spread_heads((2, 4, 33, 8))
    q = quantize_fp8(t, 2)
    assert q.data.dtype == E4M3 and q.data.shape == t.shape
    assert q.scale.dtype == torch.float32 and q.scale.shape == (2, 4, 1, 1)
    deq = q.dequantize()
    assert deq.dtype == torch.float32 and torch.isfinite(deq).all()
    ref = _reference(t, [(b, h) for b in range(2) for h in range(4)])
    assert torch.equal(deq, ref)
    # e4m3 keeps 3 mantissa bits per value whatever its head's magnitude
    bound = t.abs() / 16 + q.scale / 1024
    assert ((deq - t).abs() <= bound * (1 + 1e-6)).all()
    assert torch.equal(deq[0, 1], torch.zeros_like(deq[0, 1])) and q.scale[0, 1].item() == 1.0  # amax 0: scale 1
    # the per-head scales: every head's relative error is e4m3's, the 1e-6 head's too (one scale for the
    # whole tensor would flush it to zero)
    for b in range(2):
        for h in range(4):
            x = t[b, h]
            if x.abs().max() > 0:
                assert ((deq[b, h] - x).norm() / x.norm()).item() < 0.05


def test_output_quantization_is_per_batch_and_channel_as_the_reference():
    g = torch.Generator().manual_seed(1)
    t = torch.randn(3, 20, 6, generator=g) * torch.logspace(-4, 4, 6)  # (B, L, C), channels far apart
    q = quantize_fp8(t, -1)
    assert q.scale.shape == (3, 1, 6)
    ref = _reference(t, [(b, slice(None), c) for b in range(3) for c in range(6)])
    assert torch.equal(q.dequantize(), ref)


def test_quantization_keeps_the_dtype_and_never_overflows_to_nan():
    t = (torch.randn(2, 3, 16, 8) * 1e4).to(torch.bfloat16)
    t[0, 0, 0, 0] = 5e4  # the max of its head: scaled to 448 exactly
    before = t.clone()
    q = quantize_fp8(t, 2)
    deq = q.dequantize()
    assert deq.dtype == torch.bfloat16 and torch.isfinite(deq).all()
    assert (q.data.float().abs() <= FP8_MAX).all() and q.data[0, 0, 0, 0].float().item() == FP8_MAX
    for head in range(3):  # every head's largest value lands on 448, and no rounding turns it into NaN
        assert q.data[0, head].float().abs().max().item() == FP8_MAX
    tiny = torch.full((1, 1, 4, 2), 1e-44)  # amax / 448 underflows to 0 in float32: the guard catches it
    tiny[0, 0, 0, 0] = 0.0
    assert torch.isfinite(quantize_fp8(tiny, 2).dequantize()).all()
    assert torch.allclose(deq.float(), t.float(), rtol=1 / 16, atol=0)
    assert torch.equal(t, before)  # the input is untouched, in float32 too
    t32 = before.float()
    quantize_fp8(t32, 2)
    assert torch.equal(t32, before.float())


def test_cache_bytes_are_the_payload_and_the_scales():
    b, h, L, d = 2, 3, 40, 8
    res, out = torch.randn(b, h, L, d), torch.randn(b, L, h * d)
    model, fp8 = LayerCache(), LayerCache(cache_dtype="float8")
    for c in (model, fp8):
        c.store_res(res, "all")
        c.store_out(out)
    assert model.nbytes() == 4 * (b * h * L * d + b * L * h * d)
    assert fp8.nbytes() == (b * h * L * d + 4 * b * h) + (b * L * h * d + 4 * b * h * d)
    assert isinstance(fp8.res, Float8Cache) and isinstance(fp8.out, Float8Cache)
    assert torch.allclose(fp8.residual(), res, rtol=1 / 16, atol=1e-3)
    assert torch.equal(fp8.residual(slice(1, 2)), fp8.residual()[1:2])  # rows of the stored residual


def test_joint_layers_store_the_output_pair_in_float8():
    img, txt = torch.randn(2, 12, 8), torch.randn(2, 3, 8) * 100
    c = LayerCache(cache_dtype="float8")
    c.store_out((img, txt))
    assert isinstance(c.out, tuple) and all(isinstance(x, Float8Cache) for x in c.out)
    assert c.nbytes() == (2 * 12 * 8 + 4 * 2 * 8) + (2 * 3 * 8 + 4 * 2 * 8)
    back = c.output()
    assert isinstance(back, tuple) and [x.shape for x in back] == [img.shape, txt.shape]
    assert torch.allclose(back[0], img, rtol=1 / 16, atol=1e-3) and torch.allclose(back[1], txt, rtol=1 / 16, atol=0.1)


class _Call:
    """A minimal AttentionCall over given q, k, v: the core's output is the module output."""

    def __init__(self, q, k, v):
        self.q, self.k, self.v, self.batch_size = q, k, v, q.shape[0]

    def full(self):
        return torch.nn.functional.scaled_dot_product_attention(self.q, self.k, self.v)

    def core(self, fn, rows=None):
        if rows is None:
            return fn(self.q, self.k, self.v)
        o = fn(self.q[rows], self.k[rows], self.v[rows])
        return torch.cat([o, o])


def test_run_layer_wars_and_ast_read_what_float8_stored():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 2, 16, 8, generator=g) for _ in range(3))
    window = make_window("band1d", 0.25, (4, 4))
    outs = {}
    for dtype in ("model", "float8"):
        cache = LayerCache(cache_dtype=dtype)
        o0, _ = run_layer(StepAction("full", keep_out=True, keep_res="all"), _Call(q, k, v), cache, window, None)
        assert isinstance(cache.res, Float8Cache) == (dtype == "float8")
        o1, _ = run_layer(StepAction("wars", keep_out=True, release_res=True), _Call(q, k, v), cache, window, None)
        o2, _ = run_layer(StepAction("ast", release_out=True), _Call(q, k, v), cache, window, None)
        assert cache.nbytes() == 0  # released after their last readers
        outs[dtype] = o0, o1, o2
    assert torch.equal(outs["model"][0], outs["float8"][0])  # the full step is computed, not read
    o0 = outs["model"][0]
    res = o0 - window_attention_reference(q, k, v, window)
    # wars adds the stored residual, ast returns the output the wars step stored: e4m3's error of each
    for (a, b), stored in (((outs["model"][1], outs["float8"][1]), res), ((outs["float8"][1], outs["float8"][2]),
                                                                          outs["float8"][1])):
        assert not torch.equal(a, b)
        assert ((a - b).abs() <= stored.abs() / 16 + stored.abs().amax() / 448 / 1024 + 1e-6).all()
    assert torch.equal(outs["model"][1], outs["model"][2])


def test_asc_across_cfg_calls_shares_the_float8_residual():
    """CFG as two calls, residual refreshed at asc steps: the first call's float8 residual is what the
    other call stores (one quantization, shared), and it counts in the shared slot's bytes."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 16, 8, generator=g) for _ in range(3))
    window = make_window("band1d", 0.25, (4, 4))
    slots = {}
    first, second = LayerCache(cache_dtype="float8"), LayerCache(cache_dtype="float8")
    act = StepAction("asc", keep_res="cond")
    run_layer(act, _Call(q, k, v), first, window, None, peer=CfgPeer(slots, 0, 1, "cond"))
    assert isinstance(first.res, Float8Cache) and slots[(0, "asc")].res is first.res
    assert slots[(0, "asc")].nbytes() == 4 * q.numel() + (q.numel() + 4 * 2)  # heads (float32) + the residual
    run_layer(act, _Call(q, k, v), second, window, None, peer=CfgPeer(slots, 0, 1, "uncond"))
    assert second.res is first.res and not slots


# ------------------------------------------------------------------ end to end
def _rows(pipe, row):
    n = len(adapter_for(pipe.transformer).attention_modules(pipe.transformer))
    return [list(row) for _ in range(n)]


WARS_AST = ["full", "wars", "wars", "ast", "ast", "wars+asc"]


@pytest.mark.parametrize("family", ["dit", "pixart"])
def test_float8_plan_is_close_to_the_model_dtype_run_but_not_equal(family, request):
    pipe, call = request.getfixturevalue(family), {"dit": dit_call, "pixart": pixart_call}[family]
    plan = Plan.from_methods(pipe, _rows(pipe, WARS_AST), cfg=True)
    dense = call(pipe)
    got = {}
    for dtype in ("model", "float8"):
        ditaccel.apply(pipe, plan.with_cache_dtype(dtype))
        try:
            got[dtype] = call(pipe)
        finally:
            ditaccel.remove(pipe)
    gap = (got["model"] - dense).abs().max().item()  # what the plan itself changes
    diff = (got["float8"] - got["model"]).abs().max().item()
    assert 0 < diff < max(0.5 * gap, 1e-3), (diff, gap)
    assert torch.equal(call(pipe), dense)  # removed exactly


def _pixart_shape(pipe):
    tr = pipe.transformer
    L = (tr.config.sample_size // tr.config.patch_size) ** 2
    return tr.config.num_attention_heads, L, tr.config.attention_head_dim


@pytest.mark.parametrize("method", ["wars", "ast"])
def test_cache_bytes_of_a_float8_plan_are_counted_from_the_shapes(pixart, method):
    """Every layer holds one residual (wars) or one output (ast) from step 0 to the last step: the peak
    is layers x that, float32 (the tiny model) vs float8 payload + float32 scales."""
    h, L, d = _pixart_shape(pixart)
    b = 4  # two prompts, CFG
    layers = len(_rows(pixart, []))
    plan = Plan.from_methods(pixart, _rows(pixart, ["full"] + [method] * (STEPS - 1)), cfg=True)
    peak = {}
    for dtype in ("model", "float8"):
        ditaccel.apply(pixart, plan.with_cache_dtype(dtype))
        try:
            pixart_call(pixart)
            peak[dtype] = ditaccel.stats(pixart).cache_bytes_peak
        finally:
            ditaccel.remove(pixart)
    scales = b * h if method == "wars" else b * h * d  # per (batch, head) / per (batch, channel)
    assert peak["model"] == layers * b * h * L * d * 4
    assert peak["float8"] == layers * (b * h * L * d + 4 * scales)
    assert peak["float8"] < peak["model"] / 4 + layers * 4 * scales + 1


def test_joint_attention_ast_caches_the_pair_in_float8():
    """Flux's double-stream layer caches (image, text); the single-stream layer one joint output."""
    from test_video_adapters import _tiny_flux

    got, peak = {}, {}
    for dtype in ("model", "float8"):
        tr, run = _tiny_flux(rows=6, cols=6, text=4, seed=5, times=(1.0, 0.5))
        plan = Plan.from_methods(tr, [["full", "ast"]] * 2, cfg=False, cache_dtype=dtype)
        ditaccel.apply(tr, plan)
        try:
            got[dtype] = run()
            peak[dtype] = ditaccel.stats(tr).cache_bytes_peak
        finally:
            ditaccel.remove(tr)
    c, n, t = 32, 36, 4  # 2 heads x 16; 6 x 6 image tokens, 4 text tokens; batch 1
    assert peak["model"] == 4 * c * (n + t + (n + t))
    assert peak["float8"] == c * (n + t + (n + t)) + 3 * 4 * c  # three tensors, a scale per channel each
    assert torch.equal(got["model"][0], got["float8"][0])  # step 0 computes
    assert not torch.equal(got["model"][1], got["float8"][1])
    assert torch.allclose(got["model"][1], got["float8"][1], atol=0.1)


def test_cfg_as_two_calls_with_float8_caches():
    """Wan: CFG as two transformer calls; wars+asc / asc with residuals refreshed at asc steps go
    through the shared slot (CfgPeer) holding float8 residuals."""
    from test_video_pipelines import _call

    from ditaccel.testbed.video import tiny_wan_pipeline

    pipe = tiny_wan_pipeline()
    kw = dict(guidance_scale=5.0)
    rows = [["full", "asc", "wars", "wars+asc", "wars"]] * 2
    got = {}
    for dtype in ("model", "float8"):
        plan = Plan.from_methods(pipe, rows, cfg=True, residual_refresh="full+asc", cache_dtype=dtype)
        ditaccel.apply(pipe, plan)
        try:
            got[dtype] = _call(pipe, **kw)
        finally:
            ditaccel.remove(pipe)
    assert not torch.equal(got["model"], got["float8"])
    assert torch.allclose(got["model"], got["float8"], atol=0.05), (got["model"] - got["float8"]).abs().max()


def test_mixed_plan_honours_the_cache_dtype(dit):
    rows = _rows(dit, ["search", "wars", "sparse", "ast", "ast", "wars"])
    adaspa = {"sparsity": 0.5, "block_size": 16}
    got = {}
    for dtype in ("model", "float8"):
        ditaccel.apply(dit, Plan.from_methods(dit, rows, cfg=True, adaspa=dict(adaspa), cache_dtype=dtype))
        try:
            got[dtype] = dit_call(dit), ditaccel.stats(dit).cache_bytes_peak
        finally:
            ditaccel.remove(dit)
    assert not torch.equal(got["model"][0], got["float8"][0])
    assert torch.allclose(got["model"][0], got["float8"][0], atol=1e-2)
    assert got["float8"][1] < got["model"][1]


# ------------------------------------------------------------------ config, plans, files, CLI
def test_default_is_the_model_dtype():
    assert DiTFastAttnConfig().cache_dtype == "model"
    c = LayerCache()
    t = torch.randn(2, 3)
    c.store_out(t)
    assert c.out is t  # stored as it is


@pytest.mark.parametrize("bad", ["fp8", "float16", None, 8])
def test_bad_cache_dtype_is_refused_in_one_line_naming_it(bad):
    with pytest.raises(ValueError) as e:
        DiTFastAttnConfig(cache_dtype=bad)
    assert "cache_dtype" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("bad", ["fp8", "bfloat16", 1, None])
def test_plan_file_with_a_bad_cache_dtype_is_refused_before_any_work(pixart, tmp_path, bad):
    plan = Plan.from_methods(pixart, _rows(pixart, WARS_AST), cfg=True)
    d = plan.to_dict()
    d["metadata"]["cache_dtype"] = bad
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(d))
    processors = [m.processor for m in adapter_for(pixart.transformer).attention_modules(pixart.transformer)]
    with pytest.raises(PlanError) as e:
        ditaccel.apply(pixart, str(path))
    assert str(e.value).startswith("metadata.cache_dtype:") and "\n" not in str(e.value)
    assert get_runtime(pixart) is None
    assert [m.processor for m in adapter_for(pixart.transformer).attention_modules(pixart.transformer)] == processors
    with pytest.raises(PlanError, match="^cache_dtype:"):
        plan.with_cache_dtype(bad)


def test_a_plan_changed_after_validation_is_refused_by_apply_before_any_work(pixart):
    plan = Plan.from_methods(pixart, _rows(pixart, WARS_AST), cfg=True)
    plan.metadata["cache_dtype"] = "fp8"  # after validation
    with pytest.raises(ValueError, match="cache_dtype"):
        ditaccel.apply(pixart, plan)
    assert get_runtime(pixart) is None


def test_json_round_trip_keeps_the_option_and_apply_honours_it(pixart, tmp_path):
    plan = Plan.from_methods(pixart, _rows(pixart, WARS_AST), cfg=True).with_cache_dtype("float8")
    plan.save(tmp_path / "plan.json")
    loaded = Plan.load(tmp_path / "plan.json")
    assert loaded.metadata["cache_dtype"] == "float8" and loaded.version == 1
    assert "caches in float8" in loaded.summary()
    got = {}
    for name, p in (("memory", plan), ("file", str(tmp_path / "plan.json")), ("model", plan.with_cache_dtype("model"))):
        ditaccel.apply(pixart, p)
        try:
            got[name] = pixart_call(pixart)
        finally:
            ditaccel.remove(pixart)
    assert torch.equal(got["memory"], got["file"]) and not torch.equal(got["file"], got["model"])


def test_old_plans_without_the_option_load_and_run_in_the_model_dtype(pixart, tmp_path):
    plan = Plan.from_methods(pixart, _rows(pixart, WARS_AST), cfg=True)
    d = plan.to_dict()
    assert "cache_dtype" not in d["metadata"]
    (tmp_path / "old.json").write_text(json.dumps(d))
    old = Plan.load(tmp_path / "old.json")
    got = []
    for p in (old, plan.with_cache_dtype("model")):
        ditaccel.apply(pixart, p)
        try:
            got.append(pixart_call(pixart))
        finally:
            ditaccel.remove(pixart)
    assert torch.equal(*got)


def test_calibrate_searches_with_and_records_the_cache_dtype(dit):
    labels = dict(class_labels=[1, 2])
    plans = {d: ditaccel.calibrate(dit, DiTFastAttnConfig(threshold=0.1, cache_dtype=d, show_progress=False),
                                   num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), **labels)
             for d in ("model", "float8")}
    assert plans["float8"].metadata["cache_dtype"] == "float8" and plans["model"].metadata["cache_dtype"] == "model"
    # the search read float8 caches: its losses differ from the model-dtype search's
    assert plans["float8"].metadata["step_loss"] != plans["model"].metadata["step_loss"]


def test_cli_calibrate_option(tmp_path):
    from ditaccel.cli import main

    out = tmp_path / "plan.json"
    rc, printed, _ = run_main(main, ["calibrate", "--model", "tiny-dit", "--steps", "3", "--threshold", "D2",
                                     "--cache-dtype", "float8", "--device", "cpu", "--progress", "off",
                                     "--out", str(out)])
    assert rc == 0 and "caches in float8" in printed
    assert Plan.load(out).metadata["cache_dtype"] == "float8"
    rc, _, err = run_main(main, ["calibrate", "--model", "tiny-dit", "--cache-dtype", "fp8", "--out", str(out)])
    assert rc == 2 and "--cache-dtype" in err and len(err.strip().splitlines()) == 1
