"""ditaccel under diffusers' Ulysses context parallelism: 2 gloo processes on the CPU.

Each rank first computes the 1-process outputs (no parallelism, ditaccel applied), then enables
Ulysses over both ranks and checks that ditaccel's outputs are the same within fp32 rounding.
Wan splits its video tokens contiguously; Flux splits text and image tokens separately, so its
gathered sequence is [text_0, image_0, text_1, image_1] and AdaSpa's text sink checks that the
core sees the true order. HunyuanVideo runs under ``ditaccel.parallel.hunyuan_video_cp_plan``
(diffusers has no plan for it): gathered [video_0, text_0, video_1, text_1] with a text padding
mask that must be cut per rank; its plain diffusers outputs are checked too. CogVideoX (2b layout:
sin-cos positions; 1.5 layout: temporal patches and rotary embeddings on the video part) runs under
``ditaccel.parallel.cogvideox_cp_plan``, whose hook makes its processor's own
``F.scaled_dot_product_attention`` call Ulysses attention: gathered [text_0, video_0, text_1, video_1].
Every case also checks that ``ditaccel.stats`` on a rank (FLOPs, ratio, method counts) equals the
1-process stats.

``ModelMixin.enable_parallelism`` cannot run on a CPU-only machine (it picks the device as
``rank % torch.accelerator.device_count()``, which is 0 there), so ``_enable_ulysses`` does its
steps by hand: a ``("ring", "ulysses")`` CPU device mesh, ``ParallelConfig.setup``, the config on
the model and on every attention processor, and ``apply_context_parallel`` with the model's
``_cp_plan`` or ditaccel's plan for it (``CP_PLANS``).
"""


import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from diffusers import (CogVideoXTransformer3DModel, ContextParallelConfig, FluxTransformer2DModel,
                       HunyuanVideoTransformer3DModel, WanTransformer3DModel)
from diffusers.models._modeling_parallel import ParallelConfig

import ditaccel
from ditaccel.parallel import cogvideox_cp_plan, hunyuan_video_cp_plan
from ditaccel.plan import Plan
from ditaccel.runtime import get_runtime
from ditaccel.testbed.video import COGVIDEOX_TRANSFORMER_CONFIG, HUNYUAN_TRANSFORMER_CONFIG, WAN_TRANSFORMER_CONFIG

WORLD = 2
STEPS = (900, 700, 500, 300, 100)
ADASPA = ditaccel.AdaSpaConfig(sparsity=0.5, block_size=16, recall_threshold=0.3)
# the first search reads the LSE kept by the dense step before it (each rank: its heads' LSE)
ADASPA_PREVIOUS = ditaccel.AdaSpaConfig(sparsity=0.5, block_size=16, recall_threshold=0.3, first_lse="previous")


def _wan():
    torch.manual_seed(0)  # 4 heads: 2 per rank, so the head-adaptive tiers span both ranks
    return WanTransformer3DModel(**dict(WAN_TRANSFORMER_CONFIG, num_attention_heads=4)).eval()


def _wan_inputs():
    g = torch.Generator().manual_seed(0)  # 4 x 8 x 8 = 256 tokens: 16 blocks of 16, 128 tokens per rank
    return torch.randn(1, 4, 4, 16, 16, generator=g), torch.randn(1, 7, 32, generator=g)


def _wan_call(model, t):
    x, ctx = _wan_inputs()
    return model(x, timestep=torch.tensor([t]), encoder_hidden_states=ctx, return_dict=False)[0]


def _wan_cfg_call(model, t):
    """One step with CFG as two calls, each in its diffusers cache context (as ``WanPipeline``): the
    conditional call, then the unconditional one with other text; both outputs, concatenated."""
    x, ctx = _wan_inputs()
    outs = []
    for branch, text in (("cond", ctx), ("uncond", ctx.flip(1))):
        with model.cache_context(branch):
            outs.append(model(x, timestep=torch.tensor([t]), encoder_hidden_states=text, return_dict=False)[0])
    return torch.cat(outs)


def _flux():
    torch.manual_seed(0)  # 4 heads of 16: 2 per rank
    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                  attention_head_dim=16, num_attention_heads=4, joint_attention_dim=16,
                                  pooled_projection_dim=8, guidance_embeds=False, axes_dims_rope=(4, 6, 6)).eval()


def _flux_call(model, t):
    """16 text + 240 image tokens (a 16 x 15 grid): 16 blocks of 16, the text in block 0; per rank
    8 text and 120 image tokens."""
    g = torch.Generator().manual_seed(0)
    n, text = 240, 16
    img_ids = torch.stack([torch.zeros(n), torch.arange(n) // 15, torch.arange(n) % 15], dim=1)
    x, ctx = torch.randn(1, n, 4, generator=g), torch.randn(1, text, 16, generator=g)
    return model(x, encoder_hidden_states=ctx, pooled_projections=torch.ones(1, 8), timestep=torch.tensor([t / 1000]),
                 img_ids=img_ids, txt_ids=torch.zeros(text, 3), return_dict=False)[0]


def _hunyuan():
    torch.manual_seed(0)  # 4 heads of 16: 2 per rank
    return HunyuanVideoTransformer3DModel(**dict(HUNYUAN_TRANSFORMER_CONFIG, num_attention_heads=4)).eval()


def _hunyuan_call(model, t):
    """128 video tokens (2 x 8 x 8) + 16 text tokens, 3 of them valid: 9 blocks of 16, the text in
    the last; per rank 64 video and 8 text tokens, so rank 1's text is all padding (a contiguous
    cut of the forward's whole-sequence mask would be wrong)."""
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 2, 16, 16, generator=g), torch.randn(1, 16, 16, generator=g)
    return model(x, timestep=torch.tensor([t]), encoder_hidden_states=ctx,
                 encoder_attention_mask=(torch.arange(16) < 3).long()[None], pooled_projections=torch.ones(1, 8),
                 guidance=torch.tensor([6000.0]), return_dict=False)[0]


def _cogvideox():
    torch.manual_seed(0)  # 2b layout (sin-cos positions), 4 heads of 16: 2 per rank
    return CogVideoXTransformer3DModel(**dict(COGVIDEOX_TRANSFORMER_CONFIG, num_attention_heads=4, sample_width=16,
                                              sample_height=16, sample_frames=9, max_text_seq_length=16)).eval()


def _cogvideox_call(model, t):
    """16 text + 192 video tokens (3 x 8 x 8): 13 blocks of 16, the text in block 0; per rank 8
    text and 96 video tokens."""
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 3, 4, 16, 16, generator=g), torch.randn(1, 16, 16, generator=g)
    return model(x, encoder_hidden_states=ctx, timestep=torch.tensor([t]), return_dict=False)[0]


def _cogvideox15():
    torch.manual_seed(0)  # 1.5 layout: temporal patches of 2, rotary embeddings, no positional table
    return CogVideoXTransformer3DModel(**dict(COGVIDEOX_TRANSFORMER_CONFIG, num_attention_heads=4, sample_width=16,
                                              sample_height=16, sample_frames=13, max_text_seq_length=16,
                                              patch_size_t=2, patch_bias=False,
                                              use_rotary_positional_embeddings=True)).eval()


def _cogvideox15_call(model, t):
    """16 text + 128 video tokens (4 latent frames in 2 temporal patches x 8 x 8), with the
    pipeline's rotary tables for them: 9 blocks of 16; per rank 8 text and 64 video tokens."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 4, 16, 16, generator=g), torch.randn(1, 16, 16, generator=g)
    rope = get_3d_rotary_pos_embed(embed_dim=16, crops_coords=None, grid_size=(8, 8), temporal_size=2,
                                   grid_type="slice", max_size=(8, 8))
    return model(x, encoder_hidden_states=ctx, timestep=torch.tensor([t]), image_rotary_emb=rope,
                 return_dict=False)[0]


# (tiny transformer, one call at timestep t)
FAMILIES = {"wan": (_wan, _wan_call), "flux": (_flux, _flux_call), "hunyuan": (_hunyuan, _hunyuan_call),
            "cogvideox": (_cogvideox, _cogvideox_call), "cogvideox15": (_cogvideox15, _cogvideox15_call)}
# families diffusers declares no _cp_plan for: ditaccel's
CP_PLANS = {"HunyuanVideoTransformer3DModel": hunyuan_video_cp_plan, "CogVideoXTransformer3DModel": cogvideox_cp_plan}
# families whose "applied first" case is AdaSpa (its text sink sees the true order), else DiTFastAttn
ADASPA_FIRST = {"flux", "cogvideox"}


def _methods(model, family=None):
    """(name, plan or config) of the cases compared: ditaccel applied with every layer full,
    a DiTFastAttn full/ast plan, AdaSpa with sparse steps and head tiers, a DiTFastAttn plan with
    window attention (wars, wa: the window over the gathered sequence in true order); on Wan also
    asc / wars+asc with CFG as two calls (``_wan_cfg_call``: the uncond call reuses the cond call's
    gathered core output, each rank its own heads) and a mixed plan (format 2)."""
    full, ast = ["full"] * len(STEPS), ["full", "ast", "full", "ast", "ast"]
    cases = [("dense", Plan.from_methods(model, [full] * 2, cfg=False)),
             ("ditfastattn", Plan.from_methods(model, [ast] * 2, cfg=False)),
             ("adaspa", ADASPA),
             ("window", Plan.from_methods(model, [["full", "wars", "wa", "full", "wars"]] * 2, cfg=False))]
    if family == "wan":
        cases.append(("adaspa first_lse=previous", ADASPA_PREVIOUS))
        cases.append(("asc", Plan.from_methods(model, [["full", "asc", "wars+asc", "asc", "wars+asc"]] * 2, cfg=True)))
        # a mixed plan: AdaSpa's search / sparse / research in one layer, sharing and window in the other
        cases.append(("mixed", Plan.from_methods(model, [["search", "sparse", "ast", "research", "sparse"],
                                                         ["full", "wars", "ast", "full", "wars"]], cfg=False,
                                                 adaspa=dict(sparsity=0.5, block_size=16, recall_threshold=0.3))))
    return cases


def _call_for(name, call):
    return _wan_cfg_call if name == "asc" else call


def _generate(model, method, call):
    """One bare-transformer generation; returns the outputs of every step and the stats."""
    ditaccel.apply(model, method, num_inference_steps=len(STEPS) if isinstance(method, ditaccel.AdaSpaConfig) else None)
    try:
        with torch.no_grad():
            outs = [call(model, t) for t in STEPS]
        return outs, ditaccel.stats(model)
    finally:
        ditaccel.remove(model)


def _enable_ulysses(model, rank: int):
    """What ``model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))`` does, with
    the device mesh built on the CPU."""
    from diffusers.hooks.context_parallel import apply_context_parallel
    from torch.distributed.device_mesh import init_device_mesh

    cp = ContextParallelConfig(ulysses_degree=WORLD)
    config = ParallelConfig(context_parallel_config=cp)
    config.setup(rank, WORLD, torch.device("cpu"),
                 mesh=init_device_mesh("cpu", cp.mesh_shape, mesh_dim_names=cp.mesh_dim_names))
    model._parallel_config = config
    for m in model.modules():
        if hasattr(getattr(m, "processor", None), "_parallel_config"):
            m.processor._parallel_config = config
    plan = model._cp_plan if model._cp_plan is not None else CP_PLANS[type(model).__name__](model)
    apply_context_parallel(model, cp, plan)


def _worker(rank: int, store: str, family: str):
    passed = False
    torch.set_num_threads(1)
    # a file rendezvous: no TCP port to pick (and lose to another process) before the ranks start
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    build, call = FAMILIES[family]
    try:
        model = build()
        with torch.no_grad():
            plain = [call(model, t) for t in STEPS]  # diffusers alone: checks the cp_plan itself
        refs = {name: _generate(model, m, _call_for(name, call)) for name, m in _methods(model, family)}
        # applied before parallelism is enabled: the processors must pass the config on (Wan:
        # DiTFastAttn); ditaccel's hook sees this rank's shard of the text and image inputs (Flux
        # splits them at the transformer's own forward: AdaSpa's text sink needs all the text)
        name, m = _methods(model)[2 if family in ADASPA_FIRST else 1]
        ditaccel.apply(model, m, num_inference_steps=len(STEPS) if isinstance(m, ditaccel.AdaSpaConfig) else None)
        _enable_ulysses(model, rank)
        with torch.no_grad():
            outs = [call(model, t) for t in STEPS]
        st = ditaccel.stats(model)
        ditaccel.remove(model)
        _check(f"{name} (applied first)", outs, refs[name][0])
        _check_stats(f"{name} (applied first)", st, refs[name][1])
        with torch.no_grad():
            _check("plain diffusers", [call(model, t) for t in STEPS], plain)
        for name, m in _methods(model, family):  # applied after parallelism is enabled
            outs, st = _generate(model, m, _call_for(name, call))
            _check(name, outs, refs[name][0])
            _check_stats(name, st, refs[name][1])
        st, ref = _generate(model, ADASPA, call)[1].details, refs["adaspa"][1].details
        # global head indexing: the tiers, densities and recalls are those of one process
        assert torch.allclose(torch.tensor(st["density_per_head"]), torch.tensor(ref["density_per_head"])), st
        assert len({round(d, 4) for d in st["density_per_head"][0]}) > 1, "head tiers are not exercised"
        assert all(abs(a - b) < 1e-5 for a, b in zip(sum(st["recall_per_search"], []),
                                                      sum(ref["recall_per_search"], [])))
        assert len(st["rank_imbalance_per_layer"]) == 2 and all(r >= 1.0 for r in st["rank_imbalance_per_layer"])
        dist.barrier()  # both ranks are done: no collective is in flight at teardown
        passed = True
    finally:
        dist.destroy_process_group()
    if passed:
        # This rank passed. Leave without the interpreter's finalisation: gloo's worker threads
        # can abort it ("terminate called without an active exception", SIGABRT), which failed a
        # passing CI run on a fresh clone on 2026-11-25 (1 run in about 10).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _check_stats(name, st, ref):
    """Stats on a rank describe the whole computation: the 1-process FLOPs, ratio and counts."""
    assert st.method_counts == ref.method_counts, name
    assert st.steps == ref.steps, name
    for field in ("attention_tflops_dense", "attention_flops_ratio"):
        a, b = getattr(st, field), getattr(ref, field)
        assert abs(a - b) <= 1e-9 * abs(b), f"{name}: {field} {a} on a rank, {b} in 1 process"


def _check(name, outs, refs):
    for step, (o, r) in enumerate(zip(outs, refs)):
        err = (o - r).abs().max().item()
        assert err <= 1e-5 * max(1.0, r.abs().max().item()), f"{name}, step {step}: max |2-rank - 1-process| = {err}"


def test_wan_ulysses_two_ranks_match_one_process(tmp_path):
    """dense (all-full plan), DiTFastAttn (full/ast) and AdaSpa (sparse, head tiers) on a tiny Wan
    transformer: 2 gloo ranks under Ulysses give the 1-process outputs within fp32 rounding."""
    mp.spawn(_worker, args=(str(tmp_path / "store"), "wan"), nprocs=WORLD)


def test_flux_ulysses_two_ranks_match_one_process(tmp_path):
    """The same on a tiny Flux transformer (joint [text, image] attention, AdaSpa's text sink),
    with DiTFastAttn and AdaSpa also applied before parallelism is enabled."""
    mp.spawn(_worker, args=(str(tmp_path / "store"), "flux"), nprocs=WORLD)


def test_hunyuan_video_ulysses_two_ranks_match_one_process(tmp_path):
    """The same on a tiny HunyuanVideo transformer under ``hunyuan_video_cp_plan``: joint
    [video, text] attention with the text a per-rank suffix, AdaSpa's text sink and the text
    padding mask (cut per rank by the plan's mask hook); plain diffusers matches too."""
    mp.spawn(_worker, args=(str(tmp_path / "store"), "hunyuan"), nprocs=WORLD)


def test_cogvideox_ulysses_two_ranks_match_one_process(tmp_path):
    """The same on a tiny CogVideoX transformer (2b layout) under ``cogvideox_cp_plan``: its
    processor's own SDPA call runs as Ulysses attention (plain diffusers matches), joint
    [text, video] with the text a per-rank prefix and AdaSpa's text sink, AdaSpa also applied before
    parallelism is enabled."""
    mp.spawn(_worker, args=(str(tmp_path / "store"), "cogvideox"), nprocs=WORLD)


def test_cogvideox15_ulysses_two_ranks_match_one_process(tmp_path):
    """The same on the CogVideoX 1.5 layout: temporal patches and rotary tables, which the plan
    splits with the video tokens at every block."""
    mp.spawn(_worker, args=(str(tmp_path / "store"), "cogvideox15"), nprocs=WORLD)


# ----------------------------------------------------------------------------------- refusals
def _processors(model):
    return [m.processor for m in model.modules() if hasattr(m, "processor")]


@pytest.mark.parametrize("cp, match", [(dict(ring_degree=2), "ring_degree"),
                                       (dict(ulysses_degree=2, ulysses_anything=True), "ulysses_anything")])
def test_refused_parallel_settings_leave_the_model_unchanged(cp, match):
    model = _wan()
    model._parallel_config = ParallelConfig(context_parallel_config=ContextParallelConfig(**cp))
    before = _processors(model)
    for method in (ADASPA, Plan.from_methods(model, [["full", "ast"]] * 2, cfg=False)):
        with pytest.raises(ValueError, match=match):
            ditaccel.apply(model, method, num_inference_steps=5 if method is ADASPA else None)
        assert _processors(model) == before and get_runtime(model) is None
        assert not hasattr(model, "_diffusers_hook") or "ditaccel" not in model._diffusers_hook.hooks


def test_unsupported_family_refused_under_context_parallelism():
    from ditaccel.testbed import tiny_dit_pipeline

    model = tiny_dit_pipeline(sample_size=8, num_layers=1).transformer
    model._parallel_config = ParallelConfig(context_parallel_config=ContextParallelConfig(ulysses_degree=2))
    before = _processors(model)
    with pytest.raises(ValueError, match="parallel_config"):
        ditaccel.apply(model, ADASPA, num_inference_steps=5)
    assert _processors(model) == before and get_runtime(model) is None


def test_parallelism_enabled_after_apply_is_checked_at_the_call():
    model = _wan()
    ditaccel.apply(model, ADASPA, num_inference_steps=5)
    try:
        model._parallel_config = ParallelConfig(context_parallel_config=ContextParallelConfig(ring_degree=2))
        x, ctx = _wan_inputs()
        with pytest.raises(ValueError, match="ring_degree"):
            model(x, timestep=torch.tensor([900]), encoder_hidden_states=ctx)
    finally:
        ditaccel.remove(model)


@pytest.mark.parametrize("position", ["prefix", "suffix"])
def test_true_order_undoes_the_per_rank_text_image_interleave(position):
    from ditaccel.parallel import true_order

    text, image = torch.arange(6), torch.arange(6, 18)  # 6 text and 12 image tokens in true order
    true = torch.cat([text, image] if position == "prefix" else [image, text])
    shards = [torch.cat([t, i] if position == "prefix" else [i, t]) for t, i in zip(text.chunk(3), image.chunk(3))]
    gathered = torch.cat(shards)  # what the Ulysses all-to-all gives: the ranks' shards in rank order
    assert torch.equal(gathered[true_order(18, 3, 6, position)], true)
    assert true_order(18, 1, 6, position) is None and true_order(18, 3, 0, None) is None
    with pytest.raises(ValueError, match="text_tokens"):
        true_order(18, 3, 4, position)


def test_hunyuan_video_cp_plan_refusals():
    """Other classes and token_replace blocks are refused; the mask hooks are registered once, do
    nothing without context parallelism and refuse ring attention."""
    with pytest.raises(ValueError, match="transformer"):
        hunyuan_video_cp_plan(_wan())
    config = dict(HUNYUAN_TRANSFORMER_CONFIG, image_condition_type="token_replace")
    token_replace = HunyuanVideoTransformer3DModel(**config)
    with pytest.raises(ValueError, match="image_condition_type"):
        hunyuan_video_cp_plan(token_replace)
    model = _hunyuan()
    plan = hunyuan_video_cp_plan(model)
    assert hunyuan_video_cp_plan(model) == plan  # a second call does not register the mask hooks again
    with torch.no_grad():
        ref = _hunyuan_call(model, 900)  # no parallelism enabled: the mask hooks do nothing
        assert torch.equal(ref, _hunyuan_call(_hunyuan(), 900))
        ring = ParallelConfig(context_parallel_config=ContextParallelConfig(ring_degree=2))
        for m in model.modules():
            if hasattr(getattr(m, "processor", None), "_parallel_config"):
                m.processor._parallel_config = ring
        with pytest.raises(ValueError, match="ring_degree"):
            _hunyuan_call(model, 900)


def test_cogvideox_cp_plan_refusals():
    """Other classes are refused; under context parallelism ditaccel refuses a CogVideoX whose
    attention lacks the plan's hook (its SDPA call would attend over this rank's shard only); the
    hooks are registered once, do nothing without context parallelism and refuse ring attention."""
    import diffusers.models.attention_processor as ap

    with pytest.raises(ValueError, match="transformer"):
        cogvideox_cp_plan(_wan())
    model = _cogvideox()
    model._parallel_config = ParallelConfig(context_parallel_config=ContextParallelConfig(ulysses_degree=2))
    before = _processors(model)
    with pytest.raises(ValueError, match="cogvideox_cp_plan"):
        ditaccel.apply(model, ADASPA, num_inference_steps=5)
    assert _processors(model) == before and get_runtime(model) is None
    plan = cogvideox_cp_plan(model)
    assert cogvideox_cp_plan(model) == plan  # a second call does not register the hooks again
    ditaccel.apply(model, ADASPA, num_inference_steps=5)  # the hooks are there: accepted
    ditaccel.remove(model)
    model._parallel_config = None
    functional = ap.F
    with torch.no_grad():
        ref = _cogvideox_call(model, 900)  # no parallelism enabled: the hooks do nothing
        assert torch.equal(ref, _cogvideox_call(_cogvideox(), 900)) and ap.F is functional
        model._parallel_config = ParallelConfig(context_parallel_config=ContextParallelConfig(ring_degree=2))
        with pytest.raises(ValueError, match="ring_degree"):
            _cogvideox_call(model, 900)
    assert ap.F is functional
