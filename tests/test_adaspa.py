"""AdaSpa: configuration, schedule, block selection, tiers, and end to end on tiny models."""

import itertools

import pytest
import torch
from conftest import dit_call, gen

import ditaccel
from ditaccel.methods.adaspa import (
    AdaSpaConfig, head_sparsity, keep_counts, recall, select_mask, text_blocks, topk_blocks,
)
from ditaccel.runtime import get_runtime
from ditaccel.testbed import tiny_dit_pipeline


@pytest.fixture(scope="module")
def dit():
    """64 tokens: four 16-token blocks to choose from."""
    return tiny_dit_pipeline(sample_size=16, num_layers=3)


# ------------------------------------------------------------------ configuration
@pytest.mark.parametrize("kwargs, field", [
    ({"sparsity": 1.0}, "sparsity"), ({"sparsity": -0.1}, "sparsity"), ({"block_size": 48}, "block_size"),
    ({"block_size": 8}, "block_size"), ({"warmup": 0.5}, "search_at"), ({"search_at": (1.2,)}, "search_at"),
    ({"recall_threshold": 0}, "recall_threshold"),
])
def test_config_rejects_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=field):
        AdaSpaConfig(**kwargs)


def test_schedule_50_and_20_steps():
    s50 = AdaSpaConfig().schedule(50)
    assert s50[:10] == ["dense"] * 10 and s50[10] == "search" and s50[30] == "research"
    assert set(s50[11:30]) == {"sparse"} and set(s50[31:]) == {"sparse"}
    s20 = AdaSpaConfig().schedule(20)
    assert s20.index("search") == 4 and s20.index("research") == 12 and s20[:4] == ["dense"] * 4
    with pytest.raises(ValueError, match="search_at"):
        AdaSpaConfig(search_at=(0.2, 0.99)).schedule(20)  # floor(19.8 + .5) = 20: past the last step
    fresh = AdaSpaConfig(lse_cache=False).schedule(50)  # the caching ablation: every search is a first one
    assert [i for i, w in enumerate(fresh) if w == "search"] == [10, 30] and "research" not in fresh


# ------------------------------------------------------------------ selection
def test_topk_is_really_topk():
    """The kept mass is at least that of any other mask with the same per-row budget."""
    g = torch.Generator().manual_seed(0)
    W = torch.rand(1, 2, 3, 4, generator=g)
    keep = torch.tensor([[2, 1]])
    mask = topk_blocks(W, keep)
    assert (mask.sum(-1) == keep[..., None]).all()
    for h in range(2):
        for p in range(3):
            best = max(sum(W[0, h, p, list(c)]) for c in itertools.combinations(range(4), int(keep[0, h])))
            assert torch.isclose((W[0, h, p] * mask[0, h, p]).sum(), torch.as_tensor(best))


def test_text_blocks_are_kept_and_free():
    g = torch.Generator().manual_seed(1)
    L, bs = 100, 16  # 7 blocks, ragged; 20 text tokens at the front touch blocks 0 and 1
    always = text_blocks(L, bs, 20, "prefix")
    assert always[0].all() and always[:, 1].all() and not always[2, 2]
    W = torch.rand(1, 1, 7, 7, generator=g)
    mask = topk_blocks(W, torch.tensor([[2]]), always)
    assert mask[:, :, :2].all() and mask[:, :, :, :2].all()
    assert (mask[0, 0, 2:, 2:].sum(-1) == 2).all()  # the budget counts the other blocks only
    mask, _, _ = select_mask(W, AdaSpaConfig(sparsity=0.0), always)
    assert mask.all()  # sparsity 0 keeps everything, text prefix or not
    suffix = text_blocks(L, bs, 20, "suffix")
    assert suffix[-1].all() and suffix[:, -2].all()  # tokens 80..99 touch blocks 5 and 6


def test_tiers_keep_the_mean_sparsity():
    g = torch.Generator().manual_seed(2)
    r = torch.rand(3, 8, generator=g)
    s = head_sparsity(r, 0.8, 0.5)
    assert torch.allclose(s.mean(dim=1), torch.full((3,), 0.8, dtype=s.dtype))
    n = min(int((r[0] > 0.5).sum()), 4)
    best = r[0].argsort(descending=True)[:n]
    assert torch.allclose(s[0, best], torch.full((n,), 0.9, dtype=s.dtype))


def test_sparsity_zero_keeps_everything():
    W = torch.rand(2, 2, 5, 5)
    mask, s, rec = select_mask(W, AdaSpaConfig(sparsity=0.0), None)
    assert mask.all() and torch.allclose(rec, torch.ones_like(rec))
    assert (keep_counts(torch.tensor([0.8]), 5) == 1).all()
    assert torch.allclose(recall(W, mask), torch.ones(2, 2))


# ------------------------------------------------------------------ end to end
def test_adaspa_on_a_pipeline_and_exact_remove(dit, tmp_path):
    ref = dit_call(dit, steps=10)
    ditaccel.apply(dit, AdaSpaConfig(sparsity=0.5, block_size=16))
    try:
        out = dit_call(dit, steps=10)
        st = ditaccel.stats(dit)
    finally:
        ditaccel.remove(dit)
    assert st.method_counts["dense"] == 3 * 2 and st.method_counts["search"] == 3
    assert st.method_counts["research"] == 3 and st.method_counts["sparse"] == 3 * 6
    assert len(st.details["density_per_layer"]) == 3
    assert all(len(r) == 2 for r in st.details["recall_per_search"])
    assert st.attention_flops_ratio < 1.5 and torch.isfinite(out).all()
    from PIL import Image

    from ditaccel.viz import plot_density

    plot_density(st.details, tmp_path / "density.png")
    assert Image.open(tmp_path / "density.png").size[0] > 100
    assert torch.equal(dit_call(dit, steps=10), ref) and get_runtime(dit) is None


def test_adaspa_sparsity_zero_matches_dense(dit):
    ref = dit_call(dit, steps=10)
    ditaccel.apply(dit, AdaSpaConfig(sparsity=0.0, block_size=16))
    try:
        out = dit_call(dit, steps=10)
    finally:
        ditaccel.remove(dit)
    assert torch.allclose(out, ref, atol=1e-4)


def test_bare_transformer_needs_the_step_count(dit):
    with pytest.raises(ValueError, match="num_inference_steps"):
        ditaccel.apply(dit.transformer, AdaSpaConfig())
    assert get_runtime(dit) is None
    ditaccel.apply(dit.transformer, AdaSpaConfig(block_size=16), num_inference_steps=5)
    try:
        x = torch.randn(2, 4, 16, 16, generator=gen())
        for t in (900, 700, 500, 300, 100):
            dit.transformer(x, timestep=torch.tensor([t, t]), class_labels=torch.tensor([1, 1000]))
        assert ditaccel.stats(dit.transformer).method_counts["search"] == 3
    finally:
        ditaccel.remove(dit.transformer)


def test_cache_is_compact_and_freed(dit):
    from ditaccel.methods.adaspa import cache_bytes_per_layer

    ditaccel.apply(dit, AdaSpaConfig(sparsity=0.5, block_size=16))
    try:
        peaks = []
        orig = get_runtime(dit).method._search

        def spy(*a, **k):
            out = orig(*a, **k)
            cache = a[-1]  # _search(what, ctx, q, k, v, kpm, cache, heads=...)
            peaks.append((cache.nbytes(), cache.mask.bits.dtype, tuple(cache.mask.bits.shape)))
            return out

        get_runtime(dit).method._search = spy
        dit_call(dit, steps=10)
        caches = list(get_runtime(dit).state_manager._state_cache.values())[0].caches.values()
    finally:
        ditaccel.remove(dit)
    nbytes, dtype, shape = peaks[0]
    assert dtype == torch.uint8 and shape == (4, 2, 4, 1)  # 4 key blocks: one byte of bits per row
    # no text: the bound is exact (LSE 4 x 2 x 64 fp32 + 4 x 2 x 4 bytes of bits)
    assert nbytes == cache_bytes_per_layer(heads=2, tokens=64, block_size=16, batch=4) == 2048 + 32
    assert all(c.lse is None and c.mask is None for c in caches)  # freed after the last step


def test_a_step_count_the_schedule_cannot_fit_is_refused(dit):
    ditaccel.apply(dit, AdaSpaConfig(search_at=(0.2, 0.95), block_size=16))
    try:
        with pytest.raises(ValueError, match="search_at.*num_inference_steps=10"):
            dit_call(dit, steps=10)  # floor(9.5 + 0.5) = 10: past the last step
        assert torch.isfinite(dit_call(dit, steps=30)).all()  # 29 fits: the next call is unharmed
    finally:
        ditaccel.remove(dit)


def test_unsupported_model_is_refused_untouched():
    model = torch.nn.Linear(2, 2)
    forward = model.forward
    with pytest.raises(TypeError, match="no adapter for transformer class 'Linear'"):
        ditaccel.apply(model, AdaSpaConfig(), num_inference_steps=10)
    assert model.forward == forward and get_runtime(model) is None
