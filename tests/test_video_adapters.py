"""Video families through the dispatch_attention_fn interception (tiny random transformers)."""

import pytest
import torch
from conftest import tiny_hunyuan_transformer
from diffusers import WanTransformer3DModel

import ditaccel
from ditaccel.models import adapter_for
from ditaccel.plan import Plan
from ditaccel.runtime import get_runtime


@pytest.fixture(scope="module")
def wan():
    torch.manual_seed(0)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                 out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2,
                                 qk_norm="rms_norm_across_heads", rope_max_seq_len=32).eval()


def _wan_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 4, 3, 8, 8, generator=g), torch.randn(1, 7, 32, generator=g)


def test_wan_adapter_facts(wan):
    ad = adapter_for(wan)
    x, _ = _wan_inputs()
    assert ad.token_grid(wan, x) == (3 * 4, 4)  # frames stack their rows
    assert len(ad.attention_modules(wan)) == 2 and ad.cfg_batch_order is None


def test_wan_ast_and_exact_remove(wan):
    import diffusers.models.transformers.transformer_wan as tw

    x, ctx = _wan_inputs()
    dispatch = tw.dispatch_attention_fn
    ref = wan(x, timestep=torch.tensor([500]), encoder_hidden_states=ctx).sample
    ditaccel.apply(wan, Plan.from_methods(wan, [["full", "ast"]] * 2, cfg=False))
    try:
        assert tw.dispatch_attention_fn is not dispatch  # routed through ditaccel while applied
        assert torch.equal(wan(x, timestep=torch.tensor([500]), encoder_hidden_states=ctx).sample, ref)
        wan(x, timestep=torch.tensor([400]), encoder_hidden_states=ctx)
        assert ditaccel.stats(wan).method_counts == {"full": 2, "ast": 2}
        # cross-attention (attn2) keeps its own processor
        assert all(type(b.attn2.processor).__name__ == "WanAttnProcessor" for b in wan.blocks)
    finally:
        ditaccel.remove(wan)
    assert tw.dispatch_attention_fn is dispatch and get_runtime(wan) is None
    assert torch.equal(wan(x, timestep=torch.tensor([500]), encoder_hidden_states=ctx).sample, ref)


def test_a_call_kind_that_cannot_run_a_method_is_refused_before_any_work(wan, monkeypatch):
    """Every built-in call kind runs every method; a kind restricted to full/ast (as the dispatch
    kinds were before wars/asc ran at the core) makes apply refuse a plan with wars, in one line."""
    from ditaccel.processors import DispatchAttentionCall

    monkeypatch.setattr(DispatchAttentionCall, "methods", frozenset({"full", "ast"}))
    processors = [b.attn1.processor for b in wan.blocks]
    with pytest.raises(ValueError, match=r"plan_or_config: methods \['wars'\] are not supported") as e:
        ditaccel.apply(wan, Plan.from_methods(wan, [["full", "wars"]] * 2, cfg=False))
    assert "\n" not in str(e.value)
    assert [b.attn1.processor for b in wan.blocks] == processors and get_runtime(wan) is None


def test_wan_adaspa_sparsity_zero_matches_dense_and_sparse_runs(wan):
    """AdaSpa through the dispatcher interception: sparsity 0 reproduces the model; 0.5 runs
    its full schedule (per-branch state: Wan calls cond and uncond separately)."""
    x, ctx = _wan_inputs()
    steps = (900, 700, 500, 300, 100)
    refs = [wan(x, timestep=torch.tensor([t]), encoder_hidden_states=ctx).sample for t in steps]
    ditaccel.apply(wan, ditaccel.AdaSpaConfig(sparsity=0.0, block_size=16), num_inference_steps=5)
    try:
        outs = [wan(x, timestep=torch.tensor([t]), encoder_hidden_states=ctx).sample for t in steps]
    finally:
        ditaccel.remove(wan)
    assert all(torch.allclose(o, r, atol=1e-4) for o, r in zip(outs, refs))
    ditaccel.apply(wan, ditaccel.AdaSpaConfig(sparsity=0.5, block_size=16), num_inference_steps=5)
    try:
        for t in steps:
            for branch in ("cond", "uncond"):
                with wan.cache_context(branch):
                    assert torch.isfinite(wan(x, timestep=torch.tensor([t]), encoder_hidden_states=ctx).sample).all()
        st = ditaccel.stats(wan)
    finally:
        ditaccel.remove(wan)
    assert st.method_counts == {"dense": 4, "search": 4, "sparse": 8, "research": 4}  # 2 layers x 2 branches
    assert 0 < st.details["density_per_layer"][0] < 1


@pytest.fixture(scope="module")
def hunyuan():
    return tiny_hunyuan_transformer()


def _hunyuan_call(tr, t, ctx, mask):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 4, 16, 16, generator=g)  # 4 x 8 x 8 = 256 video tokens
    return tr(x, timestep=torch.tensor([t]), encoder_hidden_states=ctx, encoder_attention_mask=mask,
              pooled_projections=torch.ones(1, 8), guidance=torch.tensor([6000.0])).sample


@pytest.mark.parametrize("first_lse, counts", [
    ("fresh", {"dense": 2, "search": 2, "sparse": 4, "research": 2}),  # 2 attention layers
    ("previous", {"dense_lse": 2, "research": 4, "sparse": 4}),  # step 0 keeps its LSE for the search at 1
])
def test_hunyuan_adaspa_honours_the_text_padding_mask(hunyuan, first_lse, counts):
    g = torch.Generator().manual_seed(1)
    ctx = torch.randn(1, 20, 16, generator=g)
    mask = torch.ones(1, 20, dtype=torch.bool)
    mask[:, 13:] = False  # 7 padded text tokens
    ctx2 = ctx.clone()
    ctx2[:, 13:] = torch.randn(1, 7, 16, generator=g)  # change only what is padded away
    steps = (900, 700, 500, 300, 100)
    dense = [_hunyuan_call(hunyuan, t, ctx, mask) for t in steps]
    assert ditaccel.models.adapter_for(hunyuan).text_layout({"encoder_hidden_states": ctx}) == (20, "suffix")
    ditaccel.apply(hunyuan, ditaccel.AdaSpaConfig(sparsity=0.0, block_size=16, first_lse=first_lse),
                   num_inference_steps=5)
    try:
        exact = [_hunyuan_call(hunyuan, t, ctx, mask) for t in steps]
    finally:
        ditaccel.remove(hunyuan)
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(exact, dense))
    ditaccel.apply(hunyuan, ditaccel.AdaSpaConfig(sparsity=0.6, block_size=16, first_lse=first_lse),
                   num_inference_steps=5)
    try:
        a = [_hunyuan_call(hunyuan, t, ctx, mask) for t in steps]
        st = ditaccel.stats(hunyuan)
        b = [_hunyuan_call(hunyuan, t, ctx2, mask) for t in steps]
    finally:
        ditaccel.remove(hunyuan)
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(a, b))  # padded keys never attended
    assert st.method_counts == counts
    assert all(0 < d < 1 for d in st.details["density_per_layer"])


@pytest.mark.parametrize("padded", [0, 7])
def test_hunyuan_text_mask_reaches_the_kernels_only_when_it_masks_a_key(hunyuan, monkeypatch, padded):
    """diffusers' HunyuanVideo passes its text mask on every call. One that keeps every key is dropped
    before the method, so the kernels take their unmasked paths (cuDNN with no bias); one with padding
    reaches every kernel as the (B, L) key-padding mask. Dropping changes no output: the same run with
    an all-True mask handed to every kernel gives the same samples."""
    import ditaccel.methods.adaspa as ada

    seen, force = [], []
    for name in ("attention_with_lse", "block_mass", "block_sparse_attention"):
        def spy(q, *a, _real=getattr(ada, name), _name=name, **kw):
            seen.append((_name, kw.get("key_padding_mask")))
            if force and kw.get("key_padding_mask") is None:
                kw["key_padding_mask"] = torch.ones(q.shape[0], q.shape[2], dtype=torch.bool)
            return _real(q, *a, **kw)
        monkeypatch.setattr(ada, name, spy)
    g = torch.Generator().manual_seed(1)
    ctx = torch.randn(1, 20, 16, generator=g)
    mask = torch.ones(1, 20, dtype=torch.bool)
    mask[:, 20 - padded:] = False
    steps = (900, 700, 500, 300, 100)

    def run():
        ditaccel.apply(hunyuan, ditaccel.AdaSpaConfig(sparsity=0.6, block_size=16), num_inference_steps=5)
        try:
            return [_hunyuan_call(hunyuan, t, ctx, mask) for t in steps]
        finally:
            ditaccel.remove(hunyuan)

    out = run()
    assert {n for n, _ in seen} == {"attention_with_lse", "block_mass", "block_sparse_attention"}
    if padded:
        for _, m in seen:  # video keys all kept, then the text mask (HunyuanVideo's text is a suffix)
            assert m is not None and m.shape == (1, 256 + 20)
            assert m[:, :256].all() and torch.equal(m[:, 256:], mask)
    else:
        assert all(m is None for _, m in seen)
        force.append(True)
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(out, run()))


@pytest.fixture(scope="module")
def cogvideox():
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    return CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=16, num_layers=2, sample_width=16, sample_height=16, sample_frames=9, patch_size=2,
        max_text_seq_length=12, temporal_compression_ratio=4).eval()


def test_video_token_grids_follow_each_family_layout(cogvideox, wan, hunyuan):
    """The grid covers exactly the model's video tokens: CogVideoX latents are (B, F, C, H, W), Wan
    and HunyuanVideo (B, C, F, H, W); CogVideoX 1.5 and HunyuanVideo can patch frames in time."""
    from types import SimpleNamespace

    from ditaccel.models.adapters import COGVIDEOX, HUNYUAN_VIDEO, WAN

    assert COGVIDEOX.token_grid(cogvideox, torch.zeros(1, 3, 4, 16, 16)) == (3 * 8, 8)  # 192 tokens
    assert WAN.token_grid(wan, torch.zeros(1, wan.config.in_channels, 3, 8, 12)) == (3 * 4, 6)
    assert HUNYUAN_VIDEO.token_grid(hunyuan, torch.zeros(1, hunyuan.config.in_channels, 3, 8, 8)) == (3 * 4, 4)
    v15 = SimpleNamespace(config=SimpleNamespace(patch_size=2, patch_size_t=2))  # CogVideoX 1.5's patching
    assert COGVIDEOX.token_grid(v15, torch.zeros(1, 5, 16, 20, 30)) == (3 * 10, 15)  # 5 frames -> 3 (padded)
    hy2 = SimpleNamespace(config=SimpleNamespace(patch_size=2, patch_size_t=2))
    assert HUNYUAN_VIDEO.token_grid(hy2, torch.zeros(1, 16, 4, 8, 8)) == (2 * 4, 4)


def test_cogvideox_adaspa_with_batched_cfg(cogvideox):
    import diffusers.models.attention_processor as ap

    g = torch.Generator().manual_seed(2)
    lat = torch.randn(1, 3, 4, 16, 16, generator=g)  # 3 latent frames x 8 x 8 = 192 video tokens
    x = torch.cat([lat, lat])  # CFG batch [uncond, cond]
    ctx = torch.randn(2, 12, 16, generator=g)
    steps = (900, 700, 500, 300, 100)

    def run():
        return [cogvideox(x, encoder_hidden_states=ctx, timestep=torch.tensor([t, t])).sample for t in steps]

    dense = run()
    functional = ap.F
    ditaccel.apply(cogvideox, ditaccel.AdaSpaConfig(sparsity=0.0, block_size=16), num_inference_steps=5)
    try:
        assert ap.F is not functional
        exact = run()
    finally:
        ditaccel.remove(cogvideox)
    assert ap.F is functional
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(exact, dense))
    assert ditaccel.models.adapter_for(cogvideox).text_layout({"encoder_hidden_states": ctx}) == (12, "prefix")
    ditaccel.apply(cogvideox, ditaccel.AdaSpaConfig(sparsity=0.7, block_size=16), num_inference_steps=5)
    try:
        outs = run()
        st = ditaccel.stats(cogvideox)
    finally:
        ditaccel.remove(cogvideox)
    assert all(torch.isfinite(o).all() for o in outs)
    assert all(0 < d < 1 for d in st.details["density_per_layer"])
    assert st.method_counts["sparse"] == 2 * 2


def _tiny_flux(rows: int, cols: int, text: int, seed: int, times):
    """A tiny Flux transformer on a rows x cols image + ``text`` text tokens, and a function running
    one bare-transformer generation at ``times``."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    tr = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8,
                                guidance_embeds=False, axes_dims_rope=(4, 6, 6)).eval()
    n = rows * cols
    g = torch.Generator().manual_seed(seed)
    img_ids = torch.stack([torch.zeros(n), torch.arange(n) // cols, torch.arange(n) % cols], dim=1)
    x, ctx = torch.randn(1, n, 4, generator=g), torch.randn(1, text, 16, generator=g)

    def run():
        return [tr(x, encoder_hidden_states=ctx, pooled_projections=torch.ones(1, 8), timestep=torch.tensor([s]),
                   img_ids=img_ids, txt_ids=torch.zeros(text, 3)).sample for s in times]

    return tr, run


def test_flux_adaspa_joint_text_image():
    tr, run = _tiny_flux(rows=8, cols=12, text=8, seed=3, times=(1.0, 0.8, 0.6, 0.4, 0.2))

    dense = run()
    ditaccel.apply(tr, ditaccel.AdaSpaConfig(sparsity=0.0, block_size=16), num_inference_steps=5)
    try:
        assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(run(), dense))
    finally:
        ditaccel.remove(tr)
    ditaccel.apply(tr, ditaccel.AdaSpaConfig(sparsity=0.6, block_size=16), num_inference_steps=5)
    try:
        run()
        st = ditaccel.stats(tr)
    finally:
        ditaccel.remove(tr)
    # timesteps 1.0 .. 0.2 (the pipeline's t / 1000) map to five steps
    assert st.steps == 5 and st.method_counts == {"dense": 2, "search": 2, "sparse": 4, "research": 2}
    assert all(0 < d < 1 for d in st.details["density_per_layer"])


def test_flux_ast_on_joint_layers_reuses_the_output_pair():
    """Flux's double-stream attention returns (image, text): `ast` caches and returns the pair."""
    from ditaccel.plan import Plan

    tr, run = _tiny_flux(rows=6, cols=6, text=4, seed=5, times=(1.0, 0.5))

    ditaccel.apply(tr, Plan.from_methods(tr, [["full", "ast"]] * 2, cfg=False))
    try:
        outs = run()
        st = ditaccel.stats(tr)
    finally:
        ditaccel.remove(tr)
    assert st.method_counts == {"full": 2, "ast": 2} and st.cache_bytes_peak > 0
    assert all(torch.isfinite(o).all() for o in outs)
