"""DiTFastAttn's wars / asc / wars+asc / wa at the attention core: Wan, HunyuanVideo, CogVideoX and
Flux (tiny random transformers and offline pipelines).

The main check runs each family with a plan mixing every method and compares the transformer
outputs with an independent implementation of the definitions (``Reference`` below: dense boolean
masks, a residual per CFG branch and layer refreshed at every refreshing step, sharing by copying),
installed through the same runtime. Then the sharing rules one by one (batched CFG: the
unconditional half is the conditional one; CFG as two calls: the second call of a step reuses the
first call's core, whichever order; FLOPs), the text padding mask, exact remove, calibration on
each pipeline, and ``residual_refresh`` against a brute-force reading of its rule.
"""

import functools
import random

import pytest
import torch
from conftest import tiny_hunyuan_transformer

import ditaccel
from ditaccel.methods.ditfastattn import (
    ASC,
    FULL,
    WARS,
    WARS_ASC,
    layer_schedule,
    refreshes_residual,
)
from ditaccel.models import adapter_for
from ditaccel.plan import Plan, PlanError
from ditaccel.runtime import get_runtime, install, remove


# ------------------------------------------------------------------ the reference definitions
def arrow_mask(L: int, grid, text: int, position: str | None, window_size: float) -> torch.Tensor:
    """(L, L) bool: the paper's 1D band over the visual tokens (±round(window_size · N / 2)),
    every text row and every text column kept."""
    n = grid[0] * grid[1]
    assert L == n + text
    first = text if position == "prefix" else 0
    idx = torch.arange(L)
    visual = (idx >= first) & (idx < first + n)
    r = round(window_size * n / 2)
    band = (idx[:, None] - idx[None, :]).abs() <= r
    return (band & visual[:, None] & visual[None, :]) | ~visual[:, None] | ~visual[None, :]


def box_mask(L: int, grid, frames: int, text: int, position: str | None, window_size: float) -> torch.Tensor:
    """(L, L) bool: the 3D neighbourhood over (frame, row in the frame, column), each axis a radius
    of round(window_size^(1/d) · side / 2) (d = 3 axes for video, 2 for one frame), text rows and
    columns kept."""
    gh, gw = grid
    n, rows = gh * gw, gh // frames
    d = 3 if frames > 1 else 2
    s = window_size ** (1 / d) / 2
    rt, rh, rw = round(s * frames) if d == 3 else 0, round(s * rows), round(s * gw)
    first = text if position == "prefix" else 0
    idx = torch.arange(L)
    visual = (idx >= first) & (idx < first + n)
    p = (idx - first).clamp(0, n - 1)
    f, r, c = p // (rows * gw), p // gw % rows, p % gw

    def near(x, radius):
        return (x[:, None] - x[None, :]).abs() <= radius

    box = near(f, rt) & near(r, rh) & near(c, rw)
    return (box & visual[:, None] & visual[None, :]) | ~visual[:, None] | ~visual[None, :]


def attend(q, k, v, allowed):
    """softmax(q kᵀ / sqrt(D), masked) v; allowed (B or 1, 1, L, L) bool."""
    s = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    return torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1) @ v


class _NoCache:
    def nbytes(self):
        return 0

    def release(self):
        pass


class Reference:
    """The runtime's method protocol, computing each method from its definition."""

    name = "reference"

    def __init__(self, methods, window_size=0.25, refresh="full", window="band1d"):
        self.methods, self.window_size, self.refresh, self.window = methods, window_size, refresh, window
        self.res, self.out, self.first = {}, {}, {}

    def check_num_layers(self, n):
        assert n == len(self.methods)

    def check_num_steps(self, n):
        pass

    def begin_call(self, ctx):
        pass

    def new_cache(self):
        return _NoCache()

    def attention(self, ctx, layer, call, cache):
        m = self.methods[layer][ctx.step]
        key = (ctx.branch, layer)
        if m == "ast":
            return self.out[key], 0.0, m
        refresh = m == "full" or (m == "asc" and self.refresh == "full+asc")

        def core(q, k, v, kpm=None, heads=None):
            B, L = q.shape[0], q.shape[2]
            keys = torch.ones(B, 1, 1, L, dtype=torch.bool) if kpm is None else kpm[:, None, None, :]
            if self.window == "band1d":
                window = arrow_mask(L, ctx.grid, ctx.text_tokens, ctx.text_position, self.window_size) & keys
            else:
                window = box_mask(L, ctx.grid, ctx.frames, ctx.text_tokens, ctx.text_position, self.window_size) & keys
            dense, win = attend(q, k, v, keys), attend(q, k, v, window)
            if m == "full":
                if refresh:
                    self.res[key] = dense - win
                return dense
            if m == "wa":
                return win
            if m == "wars":
                return win + self.res[key]
            value = dense if m == "asc" else win + self.res[key]
            if ctx.cond is not None:  # batched CFG: the conditional half for both halves
                c = slice(ctx.cond * B // 2, (ctx.cond + 1) * B // 2)
                if refresh:
                    self.res[key] = torch.cat([(dense - win)[c]] * 2)
                return torch.cat([value[c]] * 2)
            got = self.first.pop((layer, ctx.step), None)  # CFG as two calls: the first computes
            if got is not None and got[0] != ctx.branch:
                if got[2] is not None:
                    self.res[key] = got[2]
                return got[1]
            res = dense - win if refresh else None
            if res is not None:
                self.res[key] = res
            self.first[(layer, ctx.step)] = (ctx.branch, value, res)
            return value

        out = call.core(core)
        self.out[key] = out
        return out, 1.0, m


# ------------------------------------------------------------------ families
STEPS = (900, 700, 500, 300, 100)


def _wan():
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    tr = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                               out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2,
                               qk_norm="rms_norm_across_heads", rope_max_seq_len=32).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 3, 16, 16, generator=g)  # 3 x 8 x 8 = 192 video tokens
    ctxs = {"cond": torch.randn(1, 7, 32, generator=g), "uncond": torch.randn(1, 7, 32, generator=g)}

    def call(branch, t):
        return tr(x, timestep=torch.tensor([t]), encoder_hidden_states=ctxs[branch]).sample

    return tr, call


def _hunyuan(padded_text=None):
    tr = tiny_hunyuan_transformer()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 4, 16, 16, generator=g)  # 4 x 8 x 8 = 256 video tokens
    ctxs = {b: torch.randn(1, 20, 16, generator=g) for b in ("cond", "uncond")}
    masks = {b: torch.ones(1, 20, dtype=torch.bool) for b in ctxs}
    masks["cond"][:, 13:] = False  # 7 padded text tokens
    masks["uncond"][:, 9:] = False
    if padded_text is not None:  # change only what the masks pad away
        ctxs = {b: torch.where(masks[b][..., None], c, padded_text) for b, c in ctxs.items()}

    def call(branch, t):
        return tr(x, timestep=torch.tensor([t]), encoder_hidden_states=ctxs[branch],
                  encoder_attention_mask=masks[branch], pooled_projections=torch.ones(1, 8),
                  guidance=torch.tensor([6000.0])).sample

    return tr, call


def _cogvideox():
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    tr = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=16, num_layers=2, sample_width=16, sample_height=16, sample_frames=9, patch_size=2,
        max_text_seq_length=12, temporal_compression_ratio=4).eval()
    g = torch.Generator().manual_seed(2)
    lat = torch.randn(1, 3, 4, 16, 16, generator=g)  # 3 latent frames x 8 x 8 = 192 video tokens
    x, ctx = torch.cat([lat, lat]), torch.randn(2, 12, 16, generator=g)  # CFG batch [uncond, cond]

    def call(branch, t):
        return tr(x, encoder_hidden_states=ctx, timestep=torch.tensor([t, t])).sample

    return tr, call


def _flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    tr = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8,
                                guidance_embeds=False, axes_dims_rope=(4, 6, 6)).eval()
    rows, cols, text = 8, 12, 8
    n = rows * cols
    g = torch.Generator().manual_seed(3)
    img_ids = torch.stack([torch.zeros(n), torch.arange(n) // cols, torch.arange(n) % cols], dim=1)
    x = torch.randn(1, n, 4, generator=g)
    ctxs = {b: torch.randn(1, text, 16, generator=g) for b in ("cond", "uncond")}

    def call(branch, t):
        return tr(x, encoder_hidden_states=ctxs[branch], pooled_projections=torch.ones(1, 8),
                  timestep=torch.tensor([t / 1000]), img_ids=img_ids, txt_ids=torch.zeros(text, 3)).sample

    return tr, call


FAMILIES = {"wan": _wan, "hunyuan": _hunyuan, "cogvideox": _cogvideox, "flux": _flux}
#: how each family's runs do CFG: "calls" (cond / uncond calls under cache contexts) or "batch"
CFG = {"wan": "calls", "hunyuan": "calls", "cogvideox": "batch", "flux": "calls"}

ROWS = {  # one row per layer (every family here has 2 attention layers), every method at least once
    "full": [["full", "wars", "asc", "wars+asc", "wa"], ["asc", "full", "wars+asc", "ast", "wars"]],
    "full+asc": [["full", "asc", "wars", "wars+asc", "wars"], ["asc", "wars", "full", "asc", "wars+asc"]],
}


def generate(tr, call, cfg, order=("cond", "uncond")):
    outs = []
    for t in STEPS:
        if cfg == "batch":
            outs.append(call(None, t))
            continue
        for branch in order:
            with tr.cache_context(branch):
                outs.append(call(branch, t))
    return outs


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    tr, call = FAMILIES[request.param]()
    return request.param, tr, call


def _plan(tr, rows, refresh="full", cfg=True, window="band1d"):
    return Plan.from_methods(tr, rows, cfg=cfg, residual_refresh=refresh, window=window)


@pytest.mark.parametrize("window", ["band1d", "neighborhood3d"])
@pytest.mark.parametrize("refresh", ["full", "full+asc"])
@pytest.mark.parametrize("order", [("cond", "uncond"), ("uncond", "cond")])
def test_every_method_matches_its_reference_definition(family, refresh, order, window):
    name, tr, call = family
    if CFG[name] == "batch" and order[0] == "uncond":
        pytest.skip("one batched call per step: no call order")
    rows = ROWS[refresh]
    install(tr, Reference(rows, refresh=refresh, window=window))
    try:
        expected = generate(tr, call, CFG[name], order)
    finally:
        remove(tr)
    ditaccel.apply(tr, _plan(tr, rows, refresh, window=window))
    try:
        got = generate(tr, call, CFG[name], order)
        st = ditaccel.stats(tr)
    finally:
        ditaccel.remove(tr)
    assert st.method_counts == {m: sum(r.count(m) for r in rows) * (1 if CFG[name] == "batch" else 2)
                                for m in {m for r in rows for m in r}}
    for i, (a, b) in enumerate(zip(got, expected)):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=lambda m, i=i: f"call {i}: {m}")


def test_remove_restores_the_exact_dense_outputs(family):
    name, tr, call = family
    dense = generate(tr, call, CFG[name])
    ditaccel.apply(tr, _plan(tr, ROWS["full"]))
    try:
        compressed = generate(tr, call, CFG[name])
    finally:
        ditaccel.remove(tr)
    assert get_runtime(tr) is None
    assert not all(torch.equal(a, b) for a, b in zip(compressed, dense))
    assert all(torch.equal(a, b) for a, b in zip(generate(tr, call, CFG[name]), dense))


def test_an_all_full_plan_is_dense(family):
    name, tr, call = family
    dense = generate(tr, call, CFG[name])
    ditaccel.apply(tr, _plan(tr, [["full"] * 5] * 2, cfg=False))
    try:
        assert all(torch.equal(a, b) for a, b in zip(generate(tr, call, CFG[name]), dense))
    finally:
        ditaccel.remove(tr)


# ------------------------------------------------------------------ the sharing rules, one by one
def _attention_outputs(tr):
    """Forward hooks recording each attention module's output per call: (records, remove)."""
    mods = adapter_for(tr).attention_modules(tr)
    records = []

    def hook(module, args, out):
        records.append((mods.index(module), out[0] if isinstance(out, tuple) else out))

    handles = [m.register_forward_hook(hook) for m in mods]
    return records, lambda: [h.remove() for h in handles]


def test_batched_asc_gives_the_unconditional_half_the_conditional_halfs_attention():
    tr, call = _cogvideox()
    records, unhook = _attention_outputs(tr)
    ditaccel.apply(tr, _plan(tr, [["full", "asc", "wars+asc", "full", "asc"]] * 2))
    try:
        generate(tr, call, "batch")
        st = ditaccel.stats(tr)
    finally:
        ditaccel.remove(tr)
        unhook()
    for i, (layer, out) in enumerate(records):
        step = i // 2
        uncond, cond = out[:1], out[1:]  # CogVideoX batches [uncond, cond]
        assert torch.equal(uncond, cond) == (step in (1, 2, 4)), (step, layer)
    # per layer: full + residual window pass, asc 1/2, wars+asc 1/2 of the tiles, full, asc 1/2
    assert st.attention_flops_by_method["asc"] == pytest.approx(2 * 0.5 / 5)
    assert st.attention_flops_by_method["full"] > 2 / 5  # step 0 also made the residual


@pytest.mark.parametrize("order", [("cond", "uncond"), ("uncond", "cond")])
def test_separate_cfg_calls_the_second_call_reuses_the_first_calls_core(order):
    tr, call = _wan()
    records, unhook = _attention_outputs(tr)
    ditaccel.apply(tr, _plan(tr, [["full", "asc", "asc", "full", "asc"]] * 2))
    try:
        generate(tr, call, "calls", order)
        st = ditaccel.stats(tr)
        slots = get_runtime(tr).cross.slots
    finally:
        ditaccel.remove(tr)
        unhook()
    per_call = [records[i:i + 2] for i in range(0, len(records), 2)]  # (layer 0, layer 1) per call
    for s in range(5):
        first, second = per_call[2 * s], per_call[2 * s + 1]
        assert torch.equal(first[0][1], second[0][1])  # layer 0's self-attention sees no text: same either way
        # layer 1 (after the text cross-attention): the same core only where shared (to_out is row-wise)
        assert torch.equal(first[1][1], second[1][1]) == (s in (1, 2, 4)), s
    # 20 layer calls of one dense D each: 2·D per full step and layer, D per asc step (the second call: 0)
    assert st.attention_flops_ratio == pytest.approx((2 * 2 + 3 * 1) / 10)
    assert st.attention_flops_by_method == pytest.approx({"full": 4 / 10, "asc": 3 / 10})
    assert st.method_counts == {"full": 8, "asc": 12}
    assert not slots  # every slot was taken by its one reader


def test_separate_cfg_asc_without_a_second_call_is_refused():
    tr, call = _wan()
    ditaccel.apply(tr, _plan(tr, [["full", "asc", "full", "full", "full"]] * 2))
    try:
        with tr.cache_context("cond"):
            call("cond", STEPS[0])
            with pytest.raises(ValueError, match="plan uses asc .* one transformer call per step"):
                call("cond", STEPS[1])  # step 1 with only one branch seen at step 0
    finally:
        ditaccel.remove(tr)
    ditaccel.apply(tr, _plan(tr, [["full", "asc", "full", "full", "full"]] * 2))
    try:
        with pytest.raises(ValueError, match="plan uses asc .* no separate cond / uncond calls"):
            call("cond", STEPS[0])  # no cache context: no branch to share with
    finally:
        ditaccel.remove(tr)


def test_text_rows_and_columns_stay_dense():
    """At a wa step every text query row is dense attention, and visual rows attend to every
    text key: the layer output differs from dense only where the band cuts visual keys."""
    from ditaccel.methods.ditfastattn import (
        LayerCache,
        StepAction,
        make_window,
        run_layer,
    )

    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 2, 8 + 48, 16, generator=g) for _ in range(3))

    class Core:  # a bare core call: the module output is the core output
        batch_size = 2

        def core(self, fn, rows=None):
            return fn(q, k, v, None)

    for position in ("prefix", "suffix"):
        window = make_window("band1d", 0.25, (6, 8), 8, position)
        out, _ = run_layer(StepAction("wa"), Core(), LayerCache(), window, cond=None)
        text = slice(0, 8) if position == "prefix" else slice(48, 56)
        dense = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        torch.testing.assert_close(out[:, :, text], dense[:, :, text])
        allowed = arrow_mask(56, (6, 8), 8, position, 0.25)
        assert allowed[:, text].all() and allowed[text].all() and not allowed.all()
        torch.testing.assert_close(out, attend(q, k, v, allowed[None, None]), atol=1e-5, rtol=1e-5)


def test_hunyuan_text_padding_is_never_attended_by_any_method():
    rows = [["full", "wars", "wa", "asc", "wars+asc"], ["wa", "full", "wars", "wars+asc", "asc"]]
    outs = []
    for padded in (None, torch.full((16,), 7.0)):
        tr, call = _hunyuan(padded)
        ditaccel.apply(tr, _plan(tr, rows))
        try:
            outs.append(generate(tr, call, "calls"))
        finally:
            ditaccel.remove(tr)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(*outs))


# ------------------------------------------------------------------ residual_refresh
def _brute_force(row, refresh):
    """Where each step's residual comes from, read straight from the rule: a wars / wars+asc step
    reads the residual of the last refreshing step before it (full; with "full+asc" also asc)."""
    source = {}
    for s, m in enumerate(row):
        if m in (WARS, WARS_ASC):
            before = [t for t in range(s) if row[t] == FULL or (refresh == "full+asc" and row[t] == ASC)]
            source[s] = before[-1] if before else None
    return source


@pytest.mark.parametrize("refresh", ["full", "full+asc"])
def test_layer_schedule_keeps_each_residual_exactly_for_its_readers(refresh):
    rng = random.Random(0)
    for _ in range(500):
        n = rng.randint(1, 9)
        row = [rng.choice(["full", "wars", "ast", "asc", "wars+asc", "wa"]) for _ in range(n)]
        source = _brute_force(row, refresh)
        if any(v is None for v in source.values()):
            continue  # not a valid plan row
        sched = layer_schedule(row, refresh)
        readers = {t: [s for s, src in source.items() if src == t] for t in range(n)}
        for t, act in enumerate(sched):
            kept = act.keep_res is not None
            assert kept == bool(readers[t]), (row, t)
            if kept:
                assert refreshes_residual(row[t], refresh)
                # all rows only where a plain wars step reads a full step's residual
                want = "all" if row[t] == FULL and any(row[s] == WARS for s in readers[t]) else "cond"
                assert act.keep_res == want, (row, t)
            last = [max(r) for r in readers.values() if r]
            assert act.release_res == (t in last), (row, t)


def _official_needs_residual(row):
    """thu-nics/DiTFastAttn's rule, in words: a step whose method string contains "full_attn" (full,
    and asc = "full_attn+cfg_attn_share") computes the window residual when, scanning the later steps,
    a "residual_window_attn" step (wars, wars+asc) comes before the next "full_attn" step."""
    full_attn = (FULL, ASC)
    needs = []
    for s, m in enumerate(row):
        need = False
        if m in full_attn:
            for later in row[s + 1:]:
                if later in (WARS, WARS_ASC):
                    need = True
                if later in full_attn:
                    break
        needs.append(need)
    return needs


def test_full_plus_asc_is_the_official_rule():
    rng = random.Random(1)
    for _ in range(300):
        row = [rng.choice(["full", "wars", "ast", "asc", "wars+asc"]) for _ in range(rng.randint(1, 9))]
        assert [a.keep_res is not None for a in layer_schedule(row, "full+asc")] == _official_needs_residual(row)
    row = ["full", "wars", "asc", "wars", "wars+asc", "full", "asc", "ast"]
    assert [a.keep_res is not None for a in layer_schedule(row, "full")] == [True] + [False] * 7


def test_plan_validation_follows_the_refresh_rule(family):
    _, tr, _ = family
    rows = [["asc", "wars", "full", "wars", "wars"]] * 2  # wars after an asc step only
    with pytest.raises(PlanError, match=r"methods\[0\]\[1\]: 'wars' needs an earlier 'full' step"):
        _plan(tr, rows, "full")
    plan = _plan(tr, rows, "full+asc")
    assert plan.metadata["residual_refresh"] == "full+asc"
    with pytest.raises(PlanError, match="metadata.residual_refresh: unknown rule 'asc'"):
        _plan(tr, rows, "asc")
    assert Plan.from_dict(plan.to_dict()).metadata["residual_refresh"] == "full+asc"
    d = _plan(tr, [["full", "wars", "wars", "wars", "wars"]] * 2).to_dict()
    del d["metadata"]["residual_refresh"]
    assert Plan.from_dict(d).methods  # plans from before the option load ("full")
    with pytest.raises(ValueError, match="residual_refresh must be one of"):
        ditaccel.DiTFastAttnConfig(residual_refresh="asc")


def test_cfg_peer_slot_is_taken_once_by_the_other_branch_of_the_same_step():
    from ditaccel.methods.ditfastattn import CfgPeer

    slots = {}
    x = torch.ones(1, 2, 3, 4)
    CfgPeer(slots, 0, 3, "cond").put("asc", x)
    assert CfgPeer(slots, 0, 3, "cond").take("asc") is None  # its own call: never
    assert CfgPeer(slots, 0, 4, "uncond").take("asc") is None  # another step: never
    assert CfgPeer(slots, 0, 3, "uncond").take("wars+asc") is None  # another method
    assert CfgPeer(slots, 1, 3, "uncond").take("asc") is None  # another layer
    assert CfgPeer(slots, 0, 3, "uncond").take("asc").heads is x
    assert not slots and CfgPeer(slots, 0, 3, "uncond").take("asc") is None  # taken once


# ------------------------------------------------------------------ calibration on the pipelines
def _pipelines():
    from ditaccel.testbed.flux import tiny_flux_pipeline
    from ditaccel.testbed.video import (
        tiny_cogvideox_pipeline,
        tiny_hunyuan_video_pipeline,
        tiny_wan_pipeline,
    )

    video = dict(num_frames=17, height=64, width=64)
    true_cfg = dict(true_cfg_scale=4.0, negative_prompt="dark")
    return {  # name: (builder, CFG call settings, no-CFG call settings or None)
        "wan": (tiny_wan_pipeline, dict(video, guidance_scale=5.0), dict(video, guidance_scale=1.0)),
        "cogvideox": (tiny_cogvideox_pipeline, dict(video, guidance_scale=6.0), dict(video, guidance_scale=1.0)),
        "hunyuan": (tiny_hunyuan_video_pipeline, dict(video, max_sequence_length=16, **true_cfg),
                    dict(video, max_sequence_length=16)),
        "flux": (tiny_flux_pipeline, dict(height=32, width=32, max_sequence_length=8, **true_cfg),
                 dict(height=32, width=32, max_sequence_length=8)),
    }


@pytest.fixture(scope="module", params=["wan", "cogvideox", "hunyuan", "flux"])
def pipeline(request):
    make, cfg_kw, plain_kw = _pipelines()[request.param]
    return request.param, make(), cfg_kw, plain_kw


def _latents(out):
    return out.frames if hasattr(out, "frames") else out.images


def _gen(pipe, kw, steps=4):
    return _latents(pipe(prompt="a red cat running", num_inference_steps=steps, output_type="latent",
                         generator=torch.Generator().manual_seed(0), **kw))


@pytest.mark.parametrize("search", ["greedy", "local"])
def test_calibration_on_each_pipeline_chooses_sharing_and_is_what_apply_runs(pipeline, search, monkeypatch):
    """With CFG (batched, or two calls per step) the search offers wars / asc / wars+asc; the plan
    it returns runs through apply to exactly the latents the calibration pass itself produced
    (for two calls per step: the first call's output is completed once the step is decided)."""
    name, pipe, kw, _ = pipeline
    produced = []
    real_call = type(pipe).__call__

    @functools.wraps(real_call)  # calibrate reads the signature (output_type)
    def capture(self, *args, **kwargs):
        out = real_call(self, *args, **kwargs)
        produced.append(_latents(out).clone())
        return out

    monkeypatch.setattr(type(pipe), "__call__", capture)
    config = ditaccel.DiTFastAttnConfig(threshold=0.02, search=search, candidates=("wars+asc", "wars", "asc"),
                                        show_progress=False)
    plan = ditaccel.calibrate(pipe, config, num_inference_steps=4, prompt="a red cat running",
                              generator=torch.Generator().manual_seed(0), **kw)
    monkeypatch.undo()
    assert plan.metadata["cfg"] is True and plan.metadata["residual_refresh"] == "full"
    counts = plan.counts()
    assert counts["asc"] + counts["wars+asc"] > 0 and counts["full"] < plan.num_layers * 4, plan.methods
    assert all(row[0] == "full" for row in plan.methods)
    assert max(plan.metadata["step_loss"]) < 0.02
    dense = _gen(pipe, kw)
    ditaccel.apply(pipe, Plan.from_dict(plan.to_dict()))
    try:
        applied = _gen(pipe, kw)
    finally:
        ditaccel.remove(pipe)
    (calibrated,) = produced
    assert torch.equal(applied, calibrated)
    assert not torch.equal(applied, dense)
    assert torch.equal(_gen(pipe, kw), dense)


def test_calibration_without_cfg_never_offers_sharing(pipeline):
    name, pipe, _, plain = pipeline
    config = ditaccel.DiTFastAttnConfig(threshold=0.3, candidates=("asc", "wars+asc", "wars"), show_progress=False)
    plan = ditaccel.calibrate(pipe, config, num_inference_steps=3, prompt="a red cat running",
                              generator=torch.Generator().manual_seed(0), **plain)
    assert plan.metadata["cfg"] is False
    assert plan.counts()["asc"] == plan.counts()["wars+asc"] == 0
    ditaccel.apply(pipe, plan)
    try:
        assert torch.isfinite(_gen(pipe, plain, steps=3)).all()
    finally:
        ditaccel.remove(pipe)


def test_calibration_never_offers_what_the_call_kind_cannot_run(monkeypatch):
    from ditaccel.processors import DispatchAttentionCall
    from ditaccel.testbed.video import tiny_wan_pipeline

    monkeypatch.setattr(DispatchAttentionCall, "methods", frozenset({"full", "ast"}))
    pipe = tiny_wan_pipeline()
    config = ditaccel.DiTFastAttnConfig(threshold=10.0, show_progress=False)  # every candidate would pass
    plan = ditaccel.calibrate(pipe, config, num_inference_steps=3, prompt="a red cat",
                              generator=torch.Generator().manual_seed(0), num_frames=17, height=64, width=64,
                              guidance_scale=5.0)
    assert plan.metadata["candidates"] == ["ast"]
    assert {m for row in plan.methods for m in row} == {"full", "ast"}


def test_separate_cfg_asc_on_a_pipeline_without_cfg_is_refused():
    from ditaccel.testbed.video import tiny_wan_pipeline

    pipe = tiny_wan_pipeline()
    ditaccel.apply(pipe, Plan.from_methods(pipe, [["full", "asc", "asc"]] * 2, cfg=True))
    try:
        with pytest.raises(ValueError, match="plan uses asc .* one transformer call per step"):
            _gen(pipe, dict(num_frames=17, height=64, width=64, guidance_scale=1.0), steps=3)
        assert torch.isfinite(_gen(pipe, dict(num_frames=17, height=64, width=64, guidance_scale=5.0), 3)).all()
    finally:
        ditaccel.remove(pipe)


def test_calibration_of_two_call_cfg_scores_both_calls_in_the_pipelines_order(monkeypatch):
    """Each step after 0 is decided on both CFG calls: every loss compares outputs of both calls
    (batch 2 here), and every trial runs the waiting first call before the second, as the
    pipeline does (so the second call's asc layers reuse the first's, as when the plan runs)."""
    import importlib

    from ditaccel.runtime import Runtime
    from ditaccel.testbed.video import tiny_wan_pipeline

    cal = importlib.import_module("ditaccel.calibrate")  # the module (ditaccel.calibrate is the function)
    branches, batches = [], []
    begin = Runtime.begin_call

    def spy(self, args, kwargs):
        begin(self, args, kwargs)
        branches.append((self.last_ctx.step, self.last_ctx.branch))

    real_loss = cal.loss_function("relative")
    monkeypatch.setattr(Runtime, "begin_call", spy)
    monkeypatch.setattr(cal, "loss_function",
                        lambda name: lambda a, b: (batches.append(a.shape[0]), real_loss(a, b))[1])
    pipe = tiny_wan_pipeline()
    ditaccel.calibrate(pipe, ditaccel.DiTFastAttnConfig(threshold=0.02, show_progress=False), num_inference_steps=3,
                       prompt="a red cat", generator=torch.Generator().manual_seed(0), num_frames=17, height=64,
                       width=64, guidance_scale=5.0)
    later = [b for s, b in branches if s > 0]
    assert later[0] == "cond" and later[1] == "uncond"  # the two pipeline calls of step 1 (references)
    trials = later[2:]
    assert trials and trials == ["cond", "uncond"] * (len(trials) // 2)
    assert set(batches[2:]) == {2}  # steps 1, 2: both calls' outputs (step 0 records each call alone)


def test_local_search_of_two_call_cfg_scores_a_candidate_by_its_mean_over_both_calls(monkeypatch):
    import importlib

    from ditaccel.testbed.video import tiny_wan_pipeline

    cal = importlib.import_module("ditaccel.calibrate")
    per_call, searched = [], []
    real_run, real_local = cal._GreedySearchHook._run, cal._GreedySearchHook._local

    def run(self, column, write, *args, **kwargs):
        out = real_run(self, column, write, *args, **kwargs)
        if self.method.scoring:  # a reference pass: its per-layer scores
            per_call.append({i: dict(s) for i, s in self.method.scores.items()})
        return out

    def local(self, reference, allowed, scores, *args):
        searched.append(scores)
        return real_local(self, reference, allowed, scores, *args)

    monkeypatch.setattr(cal._GreedySearchHook, "_run", run)
    monkeypatch.setattr(cal._GreedySearchHook, "_local", local)
    ditaccel.calibrate(tiny_wan_pipeline(), ditaccel.DiTFastAttnConfig(threshold=0.02, search="local",
                                                                       show_progress=False),
                       num_inference_steps=3, prompt="a red cat", generator=torch.Generator().manual_seed(0),
                       num_frames=17, height=64, width=64, guidance_scale=5.0)
    calls = [c for c in per_call if c]  # step 0 scores nothing
    assert len(calls) == 4 and len(searched) == 2  # steps 1 and 2: two calls each, one search
    for (first, second), scores in zip(zip(calls[::2], calls[1::2]), searched):
        assert scores == {i: {c: (first[i][c] + second[i][c]) / 2 for c in second[i]} for i in second}
        assert set(scores[0]) == {"ast", "wars+asc", "wars", "asc"}
        # layer 1 (after the text cross-attention): the first call computes its own, the second reuses
        assert first[1]["asc"] < 1e-6 < second[1]["asc"]


@pytest.mark.parametrize("refresh", ["full", "full+asc"])
@pytest.mark.parametrize("name", ["dit", "pixart"])
def test_dit_and_pixart_match_the_reference_too(name, refresh, request):
    """The q/k/v families run the same core path: the same reference holds (batched CFG in each
    family's order), with either residual refresh."""
    from conftest import dit_call, pixart_call

    pipe = request.getfixturevalue(name)
    call = {"dit": dit_call, "pixart": pixart_call}[name]
    rows = [ROWS[refresh][0], ROWS[refresh][1], ["full", "asc", "wars", "wa", "wars+asc"]]
    install(pipe, Reference(rows, refresh=refresh))
    try:
        expected = call(pipe, steps=5)
    finally:
        remove(pipe)
    ditaccel.apply(pipe, Plan.from_methods(pipe, rows, cfg=True, residual_refresh=refresh))
    try:
        got = call(pipe, steps=5)
    finally:
        ditaccel.remove(pipe)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_calibration_records_and_runs_the_official_refresh(dit):
    from conftest import dit_call

    config = ditaccel.DiTFastAttnConfig(threshold=0.1, residual_refresh="full+asc", show_progress=False)
    plan = ditaccel.calibrate(dit, config, num_inference_steps=5, class_labels=[1, 2, 3],
                              generator=torch.Generator().manual_seed(0))
    assert plan.metadata["residual_refresh"] == "full+asc"
    assert "residual refreshed at full+asc steps" in plan.summary()
    ditaccel.apply(dit, plan)
    try:
        assert get_runtime(dit).method.residual_refresh == "full+asc"
        assert torch.isfinite(dit_call(dit, steps=5)).all()
    finally:
        ditaccel.remove(dit)


def test_make_window_3d_radii():
    from ditaccel.kernels.window import WindowSpec
    from ditaccel.methods.ditfastattn import make_window

    s = 0.25 ** (1 / 3) / 2  # 0.315
    assert make_window("neighborhood3d", 0.25, (24, 8), 5, "suffix", frames=3) == \
        WindowSpec.neighborhood3d((24, 8), 3, (1, 3, 3), 5, "suffix")  # round(s * side): 0.95, 2.52, 2.52
    assert (round(s * 3), round(s * 8)) == (1, 3)
    # one frame: the 2D box of neighborhood2d
    box = make_window("neighborhood2d", 0.25, (16, 8))
    assert make_window("neighborhood3d", 0.25, (16, 8)).radius == (0, *box.radius)


def test_the_step_context_knows_the_latent_frames():
    tr, call = _wan()  # 3 latent frames (Wan patches 1 frame in time)
    from types import SimpleNamespace

    from ditaccel.models.adapters import COGVIDEOX

    seen = []
    ditaccel.apply(tr, _plan(tr, [["full"] * 5] * 2, cfg=False))
    try:
        call("cond", STEPS[0])
        seen.append(get_runtime(tr).last_ctx.frames)
    finally:
        ditaccel.remove(tr)
    assert seen == [3]
    v15 = SimpleNamespace(config=SimpleNamespace(patch_size=2, patch_size_t=2))  # CogVideoX 1.5: 2 frames a patch
    assert COGVIDEOX.token_frames(v15, torch.zeros(1, 5, 16, 20, 30)) == 3
    assert COGVIDEOX.token_frames(v15, torch.zeros(1, 16, 20, 30)) == 1


def test_peak_cache_bytes_count_both_cfg_branches_at_once():
    """With CFG as two calls each branch keeps its own residuals: the reported peak is their sum (it was
    the larger branch alone), exactly the bytes of 2 branches x 2 layers x one (B, H, L, D) residual."""
    tr, call = _wan()
    ditaccel.apply(tr, _plan(tr, [["full", "wars", "wars", "wars", "wars"]] * 2))
    try:
        generate(tr, call, "calls")
        st = ditaccel.stats(tr)
    finally:
        ditaccel.remove(tr)
    res = 1 * 2 * 192 * 16 * 4  # B x H x L x D float32
    assert st.cache_bytes_peak == 2 * 2 * res
