"""Video families through the dispatch_attention_fn interception (tiny random transformers)."""

import pytest
import torch
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


def test_wan_refuses_methods_it_cannot_run(wan):
    processors = [b.attn1.processor for b in wan.blocks]
    with pytest.raises(ValueError, match=r"plan_or_config.*wars"):
        ditaccel.apply(wan, Plan.from_methods(wan, [["full", "wars"]] * 2, cfg=False))
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
