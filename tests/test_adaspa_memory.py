"""AdaSpa's memory (issue 16 §2): the packed mask (video x video bits, text rows and columns
implied), its decode into the kernel's lists, the lean search, and cache_bytes_per_layer as a true
and tight bound of the measured cache bytes on tiny models with text (HunyuanVideo: text last,
key padding; CogVideoX: text first, CFG batch)."""

import functools
import importlib.util
import itertools
import json
import pathlib

import pytest
import torch
from conftest import tiny_hunyuan_transformer

import ditaccel
from ditaccel.kernels.block_sparse import (
    block_sparse_attention,
    block_sparse_attention_reference,
    mask_to_indices,
)
from ditaccel.methods.adaspa import (
    AdaSpaConfig,
    PackedMask,
    cache_bytes_per_layer,
    search_mask,
    select_mask,
    text_blocks,
    video_blocks,
)
from ditaccel.runtime import get_runtime

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _interpreted(request, monkeypatch):
    """The Triton cases run in the CPU interpreter (set per test, as tests/test_kernels_block_sparse.py)."""
    if "triton" in request.node.name:
        if not HAS_TRITON:
            pytest.skip("triton is not installed")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        if _interpreter_problem():
            pytest.skip(_interpreter_problem())


@functools.lru_cache(maxsize=None)
def _interpreter_problem():
    import os

    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        q = torch.zeros(1, 1, 16, 16)
        idx, cnt = torch.zeros(1, 1, 1, 1, dtype=torch.int32), torch.ones(1, 1, 1, dtype=torch.int32)
        block_sparse_attention(q, q, q, idx, cnt, block_size=16, backend="triton")
    except Exception as e:  # noqa: BLE001
        if "0-dimensional" in str(e):
            return f"this Triton's interpreter cannot run the kernel: {e}"
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old
    return None


def ragged_w(seed, B, H, N):
    """Block masses whose rows differ in how peaked they are and whose heads differ in total."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, H, N, N, generator=g) ** torch.randint(1, 6, (B, H, N, 1), generator=g) \
        * torch.rand(B, H, 1, 1, generator=g)


# (L, block, text tokens, position): ragged ends, text touching 1-3 blocks, text not block-aligned
LAYOUTS = [(100, 16, 20, "prefix"), (100, 16, 20, "suffix"), (96, 16, 16, "suffix"), (130, 32, 5, "prefix"),
           (37, 16, 0, None), (229, 16, 37, "suffix")]


# ------------------------------------------------------------------ layout
@pytest.mark.parametrize("L, bs, T, pos", LAYOUTS + [(20, 16, 20, "prefix"), (40, 16, 30, "suffix")])
def test_video_blocks_are_the_complement_of_the_text_blocks(L, bs, T, pos):
    nb = -(-L // bs)
    v0, v1 = video_blocks(L, bs, T, pos)
    video = torch.zeros(nb, dtype=torch.bool)
    video[v0:v1] = True
    assert torch.equal(text_blocks(L, bs, T, pos), ~(video[:, None] & video[None, :]))
    assert v0 == 0 or v1 == nb  # one text range, before or after


# ------------------------------------------------------------------ the lean search = select_mask
@pytest.mark.parametrize("rule", ["tiers", "mass", "top_p"])
@pytest.mark.parametrize("layout", LAYOUTS[:5])
def test_search_mask_equals_select_mask(rule, layout):
    """Same mask, same per-head sparsity (bitwise), same recall (to float rounding), same FLOPs as
    block_sparse_flops of the full lists, same density; W fed two heads at a time."""
    from ditaccel.kernels.block_sparse import block_sparse_flops

    L, bs, T, pos = layout
    nb = -(-L // bs)
    always = text_blocks(L, bs, T, pos) if T else None
    video = video_blocks(L, bs, T, pos)
    for seed, (s, adaptive, pairs) in enumerate(itertools.product((0.0, 0.5, 0.8), (True, False), (False, True))):
        W = ragged_w(seed, 2, 5, nb)
        cfg = AdaSpaConfig(sparsity=s, head_rule=rule, head_adaptive=adaptive, block_size=bs, target_recall=0.8)
        mask, sp, rec = select_mask(W, cfg, always, cfg_pairs=pairs)
        calls = []

        def mass_of(h0, h1, W=W, calls=calls):
            calls.append((h0, h1))
            return W[:, h0:h1]

        packed, sp2, rec2, density, flops = search_mask(mass_of, (2, 5, nb), cfg, video, cfg_pairs=pairs,
                                                        seq_len=L, head_dim=8, chunk_elems=2 * 2 * nb * nb)
        assert calls == [(0, 2), (2, 4), (4, 5)]  # each head's W asked for once
        assert torch.equal(packed.to_mask(), mask) and torch.equal(sp2, sp)
        torch.testing.assert_close(rec2, rec.double(), rtol=1e-5, atol=1e-6)
        idx, cnt = mask_to_indices(mask)
        assert flops == block_sparse_flops(cnt, bs, L, 8, kv_indices=idx)
        torch.testing.assert_close(density, mask.float().mean(dim=(0, 2, 3)))


def test_search_mask_all_text():
    """Every block touches text: nothing to store, every block kept."""
    W = ragged_w(0, 1, 2, 2)
    packed, _, rec, density, flops = search_mask(lambda a, b: W[:, a:b], (1, 2, 2), AdaSpaConfig(block_size=16),
                                                 (2, 2), seq_len=20, head_dim=4)
    assert packed.bits.numel() == 0 and packed.to_mask().all() and torch.allclose(rec, torch.ones_like(rec))
    assert torch.equal(density, torch.ones(2)) and flops == 4.0 * 4 * 2 * 20 * 20
    assert packed.kernel_lists()[2] == (0, 2)


# ------------------------------------------------------------------ decode
@pytest.mark.parametrize("layout", LAYOUTS)
def test_kernel_lists_are_the_old_lists(layout):
    """The decoded lists of the video rows are the old cache's (mask_to_indices: ascending, text
    columns included); the text rows are left to dense_query_blocks."""
    L, bs, T, pos = layout
    nb = -(-L // bs)
    video = video_blocks(L, bs, T, pos)
    W = ragged_w(L, 2, 3, nb)
    mask, _, _ = select_mask(W, AdaSpaConfig(sparsity=0.5, block_size=bs), text_blocks(L, bs, T, pos) if T else None)
    packed = PackedMask.from_mask(mask, video)
    for chunk in (1, nb * nb, 1 << 23):  # one head per chunk, or all at once
        idx, cnt, dense = packed.kernel_lists(chunk_elems=chunk)
        old_idx, old_cnt = mask_to_indices(mask)
        v0, v1 = video
        assert dense == (None if v1 - v0 == nb else ((0, v0) if v0 else (v1, nb)))
        assert torch.equal(cnt[:, :, v0:v1], old_cnt[:, :, v0:v1])
        assert idx.shape[-1] == int(old_cnt[:, :, v0:v1].max())  # as wide as the longest video row
        valid = torch.arange(idx.shape[-1]) < cnt[..., None]
        assert torch.equal(torch.where(valid, idx, -1)[:, :, v0:v1],
                           torch.where(valid, old_idx[..., :idx.shape[-1]], -1)[:, :, v0:v1])


def test_from_mask_refuses_a_mask_that_drops_text():
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    mask[0, 0, 1, 3] = False  # a video row dropping the text column 3
    with pytest.raises(ValueError, match="text rows and columns"):
        PackedMask.from_mask(mask, (0, 3))


def _old_and_new(D, pos, seed, B=2, H=2, L=229, bs=16, T=37):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, L, D, generator=g) for _ in range(3))
    nb = -(-L // bs)
    mask, _, _ = select_mask(ragged_w(seed, B, H, nb), AdaSpaConfig(sparsity=0.6, block_size=bs),
                             text_blocks(L, bs, T, pos))
    old_idx, old_cnt = mask_to_indices(mask)
    old_idx = old_idx[..., :int(old_cnt.max())].contiguous()  # the old cache: every row cut to the longest
    kpm = None
    if pos == "suffix":  # HunyuanVideo: padded text tokens at the end
        kpm = torch.ones(B, L, dtype=torch.bool)
        kpm[0, L - 11:] = False
    new = PackedMask.from_mask(mask, video_blocks(L, bs, T, pos)).kernel_lists(chunk_elems=nb * nb)
    return (q, k, v), (old_idx, old_cnt), new, kpm, bs


@pytest.mark.parametrize("D", [64, 72, 128])
@pytest.mark.parametrize("pos", ["prefix", "suffix"])  # CogVideoX text first, HunyuanVideo text last
def test_sparse_output_equals_the_old_encoding_triton(D, pos):
    """Triton kernel (interpreted): the packed cache's output is bitwise the old cache's, and the
    PyTorch reference's to fp32 rounding; ragged L = 229, 37 text tokens over 3 blocks."""
    (q, k, v), (idx, cnt), (idx2, cnt2, dense), kpm, bs = _old_and_new(D, pos, seed=D)
    assert dense is not None and idx2.shape[-1] < idx.shape[-1]
    ref, _ = block_sparse_attention_reference(q, k, v, idx, cnt, block_size=bs, key_padding_mask=kpm)
    old = block_sparse_attention(q, k, v, idx, cnt, block_size=bs, key_padding_mask=kpm, backend="triton")
    new = block_sparse_attention(q, k, v, idx2, cnt2, block_size=bs, key_padding_mask=kpm, backend="triton",
                                 dense_query_blocks=dense)
    assert torch.equal(new, old)
    torch.testing.assert_close(new, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("D", [64, 72, 128])
@pytest.mark.parametrize("pos", ["prefix", "suffix"])
def test_sparse_output_equals_the_old_encoding_gather(D, pos):
    """The CPU backend: the same output as the old cache's to fp32 rounding (the text rows run in
    their own chunk, so the summation order may differ)."""
    (q, k, v), (idx, cnt), (idx2, cnt2, dense), kpm, bs = _old_and_new(D, pos, seed=D + 1)
    ref, _ = block_sparse_attention_reference(q, k, v, idx, cnt, block_size=bs, key_padding_mask=kpm)
    old = block_sparse_attention(q, k, v, idx, cnt, block_size=bs, key_padding_mask=kpm, backend="gather")
    new = block_sparse_attention(q, k, v, idx2, cnt2, block_size=bs, key_padding_mask=kpm, backend="gather",
                                 dense_query_blocks=dense)
    torch.testing.assert_close(new, old, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(new, ref, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ the bound
def test_bound_formula_at_hunyuan_720p():
    """The figures README.md states (computed, not measured): 24 heads, 118,800 video + 256 text
    tokens, 64-token blocks, batch 1; 60 attention layers."""
    with_text = cache_bytes_per_layer(24, 118_800 + 256, 64, text_tokens=256)
    assert with_text == 24 * (4 * 119_056 + 1857 * 233) == 21_813_720
    no_text = cache_bytes_per_layer(24, 118_800, 64)
    assert no_text == 24 * (4 * 118_800 + 1857 * 233) == 21_789_144
    readme = (ROOT / "README.md").read_text()
    assert f"{with_text / 2**20:.1f} MiB per layer" in readme
    assert f"{60 * with_text / 2**30:.2f} GiB" in readme
    # the same at every sparsity and head rule; the LSE is 52% of it
    assert cache_bytes_per_layer(24, 119_056, 64, text_tokens=256, lse=False) == 24 * 1857 * 233
    with pytest.raises(ValueError, match="text_tokens"):
        cache_bytes_per_layer(24, 100, 64, text_tokens=101)


def _per_layer_peak(model, run):
    """Run ``run()`` with AdaSpa applied; the most bytes each layer's cache held after any call,
    and the caches' LSE state after each search."""
    method = get_runtime(model).method
    orig = method.attention
    peak, lse_after = {}, []

    def attention(ctx, layer, call, cache):
        out = orig(ctx, layer, call, cache)
        peak[layer] = max(peak.get(layer, 0), cache.nbytes())
        if out[2] in ("search", "research"):
            lse_after.append((ctx.step, out[2], cache.lse is not None))
        return out

    method.attention = attention
    run()
    return peak, lse_after


@pytest.fixture(scope="module")
def hunyuan():
    return tiny_hunyuan_transformer()


@pytest.fixture(scope="module")
def cogvideox():
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    return CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=16, num_layers=2, sample_width=16, sample_height=16, sample_frames=9, patch_size=2,
        max_text_seq_length=12, temporal_compression_ratio=4).eval()


CONFIGS = [dict(), dict(head_rule="mass"), dict(head_rule="top_p", target_recall=0.9), dict(lse_cache=False),
           dict(sparsity=0.5, head_adaptive=False)]


@pytest.mark.parametrize("extra", CONFIGS, ids=["tiers", "mass", "top_p", "no-lse-cache", "uniform"])
@pytest.mark.parametrize("family", ["hunyuan", "cogvideox"])
def test_cache_bytes_within_a_tight_bound(family, extra, request):
    """Measured per-layer cache bytes (AdaSpaCache.nbytes(), the most over the generation) <= the
    bound, and the bound within 2x of them; the LSE is held until the last search that reads it."""
    model = request.getfixturevalue(family)
    steps = (900, 700, 500, 300, 100)
    g = torch.Generator().manual_seed(1)
    if family == "hunyuan":  # [video, text]: 4 x 8 x 8 = 256 video + 20 text tokens, 7 padded
        x = torch.randn(1, 4, 4, 16, 16, generator=g)
        ctx = torch.randn(1, 20, 16, generator=g)
        mask = torch.ones(1, 20, dtype=torch.bool)
        mask[:, 13:] = False
        batch, tokens, text = 1, 256 + 20, 20

        def run():
            for t in steps:
                model(x, timestep=torch.tensor([t]), encoder_hidden_states=ctx, encoder_attention_mask=mask,
                      pooled_projections=torch.ones(1, 8), guidance=torch.tensor([6000.0]))
    else:  # [text, video]: 12 text + 3 x 8 x 8 = 192 video tokens, CFG batch of 2
        lat = torch.randn(1, 3, 4, 16, 16, generator=g)
        x = torch.cat([lat, lat])
        ctx = torch.randn(2, 12, 16, generator=g)
        batch, tokens, text = 2, 12 + 192, 12

        def run():
            for t in steps:
                model(x, encoder_hidden_states=ctx, timestep=torch.tensor([t, t]))

    cfg = AdaSpaConfig(**{"sparsity": 0.7, "block_size": 16, **extra})
    ditaccel.apply(model, cfg, num_inference_steps=len(steps))
    try:
        peak, lse_after = _per_layer_peak(model, run)
    finally:
        ditaccel.remove(model)
    keeps_lse = cfg.lse_cache
    bound = cache_bytes_per_layer(2, tokens, 16, text_tokens=text, batch=batch, lse=keeps_lse)
    assert len(peak) == 2 and all(0 < b <= bound for b in peak.values()), (peak, bound)
    assert all(bound <= 2 * b for b in peak.values()), (peak, bound)
    # steps: dense 0, search 1, sparse 2, research 3 (the last search), sparse 4
    if keeps_lse:
        assert lse_after == [(1, "search", True)] * 2 + [(3, "research", False)] * 2
    else:
        assert lse_after == [(1, "search", False)] * 2 + [(3, "search", False)] * 2


# ------------------------------------------------------------------ the GPU measurement script, on CPU
def test_measure_script_toy(tmp_path):
    spec = importlib.util.spec_from_file_location("measure_adaspa_memory", ROOT / "scripts/measure_adaspa_memory.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "toy.json"
    assert mod.main(["--toy", "--device", "cpu", "--json", str(out), "--no-warmup"]) == 0
    r = json.loads(out.read_text())
    assert r["toy"] and r["device"] == "cpu" and r["layers"] == 2 and r["text_tokens"] == 20
    assert [s["kind"] for s in r["steps"]] == ["dense", "dense", "search", "sparse", "research"]
    assert r["within_bound"] and r["cache_bytes_per_layer_measured"] == [r["cache_bytes_per_layer_bound"]] * 2
    assert r["cache_bytes_whole_model_measured"] == r["cache_bytes_whole_model_bound"] == r["cache_bytes_peak_stats"]
    assert r["dense_peak_bytes"] is None and "over_dense_gib" not in r  # no allocator statistics on the CPU
