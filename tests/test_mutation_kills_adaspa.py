"""AdaSpa behaviour that mutation testing (docs/MUTATION.md) found untested, each against a small
brute-force reference: a whole search / sparse / re-search cycle of one layer (outputs, masks, LSE
reuse, FLOP fractions, cache release), the same decisions with the heads split across ranks
(context parallelism, simulated with threads), ``details`` over crafted caches, the cache-size
bound against a real cache, and the small helpers' edge cases."""

import math
import threading
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from ditaccel.methods import adaspa as A
from ditaccel.methods.adaspa import (AdaSpa, AdaSpaCache, AdaSpaConfig, cache_bytes_per_layer, text_blocks,
                                     top_p_counts, video_blocks)
from ditaccel.parallel import HeadShard


# ------------------------------------------------------------------ brute-force references
def ref_scores(q, k, kpm):
    s = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if kpm is not None:
        s = s.masked_fill(~kpm[:, None, None, :], float("-inf"))
    return s


def ref_block_sum(x, bs):
    """(B, H, L, L) -> (B, H, NB, NB) tile sums (the last tile ragged)."""
    B, H, L, _ = x.shape
    nb = -(-L // bs)
    pad = torch.zeros(B, H, nb * bs, nb * bs, dtype=x.dtype)
    pad[:, :, :L, :L] = x
    return pad.view(B, H, nb, bs, nb, bs).sum(dim=(3, 5))


def ref_text(L, bs, text, position):
    nb = -(-L // bs)
    tok = torch.zeros(nb * bs, dtype=torch.bool)
    if text and position == "prefix":
        tok[:text] = True
    elif text and position == "suffix":
        tok[L - text:L] = True
    is_text = tok.view(nb, bs).any(1)
    return is_text[:, None] | is_text[None, :]


def ref_topk(W, k, always):
    """Every query block keeps its k heaviest non-``always`` key blocks, plus the ``always`` ones."""
    B, H, NQ, NK = W.shape
    mask = torch.zeros(B, H, NQ, NK, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            for p in range(NQ):
                cols = [c for c in range(NK) if always is None or not always[p, c]]
                cols.sort(key=lambda c: -float(W[b, h, p, c]))
                for c in cols[:k]:
                    mask[b, h, p, c] = True
                if always is not None:
                    mask[b, h, p] |= always[p]
    return mask


def tokens_of(mask, L, bs):
    return mask.repeat_interleave(bs, 2).repeat_interleave(bs, 3)[:, :, :L, :L]


def ref_attention(q, k, v, allowed):
    s = ref_scores(q, k, None).masked_fill(~allowed, float("-inf"))
    return (s.softmax(-1) @ v.double()).float()


class FakeCall:
    """The part of the AttentionCall protocol AdaSpa uses: ``full()`` and ``core(fn)``."""

    def __init__(self, q, k, v, kpm=None, heads=None):
        self.q, self.k, self.v, self.kpm, self.heads = q, k, v, kpm, heads

    def full(self):
        return ("full", self.q)

    def core(self, fn):
        if self.heads is None:
            return fn(self.q, self.k, self.v, self.kpm)
        return fn(self.q, self.k, self.v, self.kpm, heads=self.heads)


def ctx(step, cond=None, text=0, position=None):
    return SimpleNamespace(step=step, cond=cond, text_tokens=text, text_position=position)


def qkv(B, H, L, D, seed, sharp=1.0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, L, D, generator=g) * s for s in (sharp, sharp, 1.0)]


# ------------------------------------------------------------------ one layer, a whole cycle
@pytest.mark.parametrize("text_sink, chunked", [(True, False), (False, False), (True, True)])
def test_one_layer_search_sparse_research_by_brute_force(text_sink, chunked, monkeypatch):
    """5 steps [dense, search, sparse, research, sparse]; L = 100 (a ragged last block), 16-token
    blocks, 20 prefix text tokens, padded keys in the second batch row, a CFG pair."""
    clock = iter(range(1000))
    monkeypatch.setattr(A, "time", SimpleNamespace(perf_counter=lambda: float(next(clock))))
    seen = []
    real_search = A.search_mask

    def search_mask(mass_of, shape, config, video, heads=None, cfg_pairs=False, **kw):
        seen.append((heads, cfg_pairs))
        if chunked:  # W one head at a time (what a long sequence gets): the same decisions
            kw["chunk_elems"] = 1
        return real_search(mass_of, shape, config, video, heads, cfg_pairs, **kw)

    monkeypatch.setattr(A, "search_mask", search_mask)

    B, H, L, D, bs, text = 2, 2, 100, 8, 16, 20
    cfg = AdaSpaConfig(sparsity=0.5, block_size=bs, head_adaptive=False, text_sink=text_sink)
    m = AdaSpa(cfg)
    m.check_num_steps(5)
    assert m.plan == ["dense", "search", "sparse", "research", "sparse"] and m.last_use == 4
    kpm = torch.ones(B, L, dtype=torch.bool)
    kpm[1, -7:] = False
    always = ref_text(L, bs, text, "prefix") if text_sink else None
    budget = 7 - (2 if text_sink else 0)  # 7 key blocks, 2 of them text (tokens 0-19)
    k_keep = math.ceil(0.5 * budget)
    cache = m.new_cache()

    def call(step, seed):
        q, k, v = qkv(B, H, L, D, seed)
        return (q, k, v), m.attention(ctx(step, cond=1, text=text, position="prefix"), 0, FakeCall(q, k, v, kpm), cache)

    (q0, _, _), (out, frac, name) = call(0, 0)
    assert out == ("full", q0) and frac == 1.0 and name == "dense"
    assert cache.lse is None and seen == []

    # the first search: exact dense output, the LSE cached, the mask from the exact block mass
    (q, k, v), (out, frac, name) = call(1, 1)
    s = ref_scores(q, k, kpm)
    lse1 = torch.logsumexp(s, -1)
    torch.testing.assert_close(out, (s.softmax(-1) @ v.double()).float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache.lse, lse1.float(), atol=1e-5, rtol=1e-5)
    W = ref_block_sum((s - lse1[..., None]).exp(), bs)
    mask = ref_topk(W, k_keep, always)
    assert cache.mask.to_mask().dtype == torch.bool and torch.equal(cache.mask.to_mask(), mask)
    assert cache.nbytes() == cache_bytes_per_layer(H, L, bs, text_tokens=text if text_sink else 0, batch=B)
    allowed = tokens_of(mask, L, bs)
    assert cache.kept == pytest.approx(float(allowed.double().mean()), rel=1e-12)  # exact kept (q, k) pairs
    assert name == "search" and frac == 1.5  # full attention + the mass pass; no sparse pass
    assert torch.equal(cache.density, mask.float().mean(dim=(0, 2, 3)))
    assert cache.recalls == [pytest.approx(float(((W * mask).sum((-1, -2)) / W.sum((-1, -2))).mean()), rel=1e-5)]
    assert cache.search_seconds == 1.0
    assert seen == [(None, True)]  # a CFG pair: the two halves decide together
    kept1 = cache.kept

    # a sparse step: block-sparse attention with that mask
    (q, k, v), (out, frac, name) = call(2, 2)
    torch.testing.assert_close(out, ref_attention(q, k, v, allowed & kpm[:, None, None, :]), atol=1e-5, rtol=1e-5)
    assert (name, frac) == ("sparse", kept1)

    # the re-search: block mass from the LSE cached at step 1, a new mask used at once
    (q, k, v), (out, frac, name) = call(3, 3)
    s = ref_scores(q, k, kpm)
    mask3 = ref_topk(ref_block_sum((s - lse1[..., None]).exp(), bs), k_keep, always)
    allowed3 = tokens_of(mask3, L, bs)
    assert not torch.equal(mask3, mask)
    torch.testing.assert_close(out, ref_attention(q, k, v, allowed3 & kpm[:, None, None, :]), atol=1e-5, rtol=1e-5)
    assert name == "research" and frac == pytest.approx(0.5 + float(allowed3.double().mean()), rel=1e-12)
    assert torch.equal(cache.mask.to_mask(), mask3)
    assert cache.lse is None  # no later search reads it
    assert cache.nbytes() == cache_bytes_per_layer(H, L, bs, text_tokens=text if text_sink else 0, batch=B, lse=False)
    assert cache.search_seconds == 2.0 and len(cache.recalls) == 2

    # the last step that reads the cache frees it (and still runs sparse with the searched mask)
    (q, k, v), (out, frac, name) = call(4, 4)
    torch.testing.assert_close(out, ref_attention(q, k, v, allowed3 & kpm[:, None, None, :]), atol=1e-5, rtol=1e-5)
    assert name == "sparse" and frac == pytest.approx(float(allowed3.double().mean()), rel=1e-12)
    assert cache.lse is None and cache.mask is None and cache.nbytes() == 0


def test_search_without_cfg_or_with_an_odd_batch_decides_per_item(monkeypatch):
    seen = []
    real_search = A.search_mask
    monkeypatch.setattr(A, "search_mask", lambda m_, sh, c, vi, h=None, p=False, **kw: (seen.append(p), real_search(
        m_, sh, c, vi, h, p, **kw))[1])
    m = AdaSpa(AdaSpaConfig(sparsity=0.5, block_size=16))
    m.check_num_steps(5)
    for B, cond in ((2, None), (3, 1), (2, 0)):
        q, k, v = qkv(B, 2, 64, 8, B)
        m.attention(ctx(1, cond=cond), 0, FakeCall(q, k, v), m.new_cache())
    assert seen == [False, False, True]


# ------------------------------------------------------------------ heads split across ranks
class _Board:
    def __init__(self, ranks):
        self.parts = [None] * ranks
        self.barrier = threading.Barrier(ranks, timeout=60)


@dataclass(frozen=True)
class ThreadShard(HeadShard):
    """A HeadShard whose all-gather runs between threads (one thread per rank)."""

    def gather(self, x):
        board, r = self.group, self.start // self.count
        board.parts[r] = x.clone()
        board.barrier.wait()
        out = torch.cat(board.parts, dim=1)
        board.barrier.wait()
        return out


def run_ranks(board: _Board, fn) -> list:
    """``[fn(r) for r in range(ranks)]``, one thread per rank of ``board`` (so that
    ``ThreadShard.gather`` can meet at its barrier); any rank's error fails the test."""
    ranks = len(board.parts)
    results, errors = [None] * ranks, []

    def rank(r):
        try:
            results[r] = fn(r)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
            board.barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(ranks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return results


@pytest.mark.parametrize("rule", ["tiers", "mass", "top_p"])
def test_head_shards_decide_as_one_device(rule):
    """Ulysses: each rank holds H / ranks heads; its masks must be those the same layer gets on one
    device (the head rules see every head), and density / recall / kept fraction are global."""
    B, H, L, D, bs, ranks = 1, 4, 128, 8, 16, 2
    cfg = AdaSpaConfig(sparsity=0.75, block_size=bs, head_rule=rule, target_recall=0.7, recall_threshold=0.6)
    q, k, v = qkv(B, H, L, D, 7)
    q[:, 0] *= 3  # head 0 attends to itself (block-diagonal mass: recall ~1); the others diffuse
    k[:, 0] = q[:, 0]
    q[:, 3] *= 0.2

    def run(heads_of, n):
        m = AdaSpa(cfg)
        m.check_num_steps(5)
        cache = m.new_cache()
        sl = slice(None) if heads_of is None else slice(heads_of.start, heads_of.start + heads_of.count)
        out1 = m.attention(ctx(1), 0, FakeCall(q[:, sl], k[:, sl], v[:, sl], heads=heads_of), cache)
        q2, k2, v2 = qkv(B, H, L, D, 8)
        out2 = m.attention(ctx(2), 0, FakeCall(q2[:, sl], k2[:, sl], v2[:, sl], heads=heads_of), cache)
        return out1, out2, cache

    one = run(None, None)
    assert one[2].rank_density is None
    board = _Board(ranks)

    def rank(r):
        return run(ThreadShard(r * (H // ranks), H // ranks, H, board), r)

    results = run_ranks(board, rank)
    c1 = one[2]
    for r, (out1, out2, c) in enumerate(results):
        sl = slice(r * 2, r * 2 + 2)
        torch.testing.assert_close(out1[0], one[0][0][:, sl])
        torch.testing.assert_close(out2[0], one[1][0][:, sl])
        assert torch.equal(c.mask.to_mask(), c1.mask.to_mask()[:, sl])
        assert torch.equal(c.density, c1.density)  # all heads, in global order
        assert c.recalls == [pytest.approx(c1.recalls[0], rel=1e-6)]
        assert c.kept == pytest.approx(c1.kept, rel=1e-12)  # the mean over the ranks' equal-cost heads
        assert out1[1] == 1.5 and out2[1] == pytest.approx(c1.kept, rel=1e-12)
        assert c.rank_density == pytest.approx([float(c1.density[0:2].mean()), float(c1.density[2:4].mean())])
    full = c1.mask.to_mask()
    assert len({int(full[0, h].sum()) for h in range(H)}) > 1  # budgets differ by head


# ------------------------------------------------------------------ details over crafted caches
def _cache(density=None, rank=None, recalls=(), secs=0.0):
    return AdaSpaCache(density=None if density is None else torch.tensor(density), recalls=list(recalls),
                       search_seconds=secs, rank_density=rank)


def test_details_of_one_branch_exact():
    caches = {0: _cache([0.1, 0.3], rank=[0.1, 0.3], recalls=[0.9, 0.8], secs=1.5), 1: _cache(secs=0.25)}
    d = AdaSpa(AdaSpaConfig()).details(caches)
    assert d == {
        "density_per_layer": [pytest.approx(0.2), 1.0],  # a layer never searched counts as dense
        "density_per_head": [pytest.approx([0.1, 0.3]), None],
        "recall_per_search": [[0.9, 0.8], []],
        "search_seconds": 1.75,
        "rank_density_per_layer": [[0.1, 0.3], None],
        "rank_imbalance_per_layer": [pytest.approx(0.3 * 2 / 0.4), 1.0],  # max / mean of the ranks
    }
    assert AdaSpa(AdaSpaConfig()).details([caches]) == d  # a list of one branch: the same
    zero = AdaSpa(AdaSpaConfig()).details({0: _cache([0.0, 0.0], rank=[0.0, 0.0])})
    assert zero["rank_imbalance_per_layer"] == [0.0]  # no division by zero


def test_details_of_two_branches_exact():
    a = {0: _cache([0.2, 0.6], rank=[0.2, 0.6], recalls=[0.9], secs=1.0),
         1: _cache([0.5, 0.1], recalls=[0.7], secs=2.0),
         2: _cache([0.3, 0.1], rank=[0.3, 0.1], recalls=[0.6])}
    b = {0: _cache([0.4, 0.4], rank=[0.4, 0.4], recalls=[0.8], secs=0.5),
         1: _cache(),  # this branch never searched layer 1
         3: _cache([0.25, 0.75], rank=[0.25, 0.75], recalls=[0.5])}
    d = AdaSpa(AdaSpaConfig()).details([a, b])
    assert d["branches"] == 2
    assert d["density_per_layer"] == pytest.approx([(0.4 + 0.4) / 2, (0.3 + 1.0) / 2, 0.2, 0.5])
    hd = d["density_per_head"]
    assert hd[0] == pytest.approx([0.3, 0.5]) and hd[1] == pytest.approx([0.75, 0.55])
    assert hd[2] == pytest.approx([0.3, 0.1]) and hd[3] == pytest.approx([0.25, 0.75])
    assert d["recall_per_search"] == [[0.9, 0.8], [0.7], [0.6], [0.5]]
    assert d["search_seconds"] == 3.5
    assert d["rank_density_per_layer"][0] == pytest.approx([0.3, 0.5])  # per-rank mean over the branches
    assert d["rank_density_per_layer"][1] is None
    assert d["rank_density_per_layer"][2:] == [[0.3, 0.1], [0.25, 0.75]]
    imb = d["rank_imbalance_per_layer"]
    assert imb[0] == pytest.approx((0.6 + 0.4) / (0.4 + 0.4))  # Σ max / Σ mean over the branches
    assert imb[1] == 1.0
    assert imb[2] == pytest.approx(0.3 / 0.2) and imb[3] == pytest.approx(0.75 / 0.5)


# ------------------------------------------------------------------ the cache-size bound
@pytest.mark.parametrize("text, position", [(0, None), (20, "prefix"), (20, "suffix"), (100, "prefix")])
def test_cache_bound_exact_values(text, position):
    # NV = ceil(L / B) - ceil(T / B) video blocks; bits NV x ceil(NV / 8); LSE 4 bytes per token
    nv = 7 - -(-text // 16)
    assert cache_bytes_per_layer(3, 100, 16, text_tokens=text) == 3 * (400 + nv * -(-nv // 8))
    assert cache_bytes_per_layer(3, 100, 16, text_tokens=text, batch=2, lse=False) == 2 * 3 * nv * -(-nv // 8)
    # defaults: 64-token blocks (1025 tokens: 17 blocks), no text, batch 1, with the LSE
    assert cache_bytes_per_layer(2, 1025) == 2 * (4100 + 17 * 3)
    # video blocks as the cache stores them (the blocks no text token touches)
    v0, v1 = video_blocks(100, 16, text, position)
    if position == "suffix":
        assert (v0, v1) == (0, (100 - text) // 16)
    else:
        assert (v0, v1) == (min(7, -(-text // 16)), 7)
    assert video_blocks(100, 16, text, None) == (0, 7)  # no text position: no text blocks
    rows = ~ref_text(100, 16, text, position or "prefix").all(dim=1)
    assert rows.nonzero().flatten().tolist() == list(range(v0, v1))


def test_cache_nbytes_exact():
    c = AdaSpaCache(lse=torch.zeros(2, 3, 10))
    assert c.nbytes() == 60 * 4
    c.mask = A.PackedMask(torch.zeros(2, 3, 5, 1, dtype=torch.uint8), (0, 5), 5, 5)
    assert c.nbytes() == 60 * 4 + 30
    c.release()
    assert c.nbytes() == 0 and c.lse is None and c.mask is None


# ------------------------------------------------------------------ small helpers
def test_text_blocks_edge_cases():
    none = text_blocks(100, 16, 0, None)
    assert none.dtype == torch.bool and none.shape == (7, 7) and not none.any()
    assert not text_blocks(100, 16, 5, None).any()  # no position: no text layout known
    assert not text_blocks(100, 16, 0, "prefix").any()
    assert torch.equal(text_blocks(100, 16, 20, "suffix"), ref_text(100, 16, 20, "suffix"))
    assert torch.equal(text_blocks(100, 16, 20, "prefix"), ref_text(100, 16, 20, "prefix"))
    for text in (0, 20):  # made on the device of the attention tensors
        assert text_blocks(100, 16, text, "prefix", device="meta").device.type == "meta"


def test_top_p_reaching_the_target_exactly_stops_there():
    rec = torch.tensor([[[0.5, 0.75, 1.0]]], dtype=torch.float64)
    assert top_p_counts(rec, 0.75).tolist() == [[2]]
    assert top_p_counts(rec, 0.5).tolist() == [[1]]
    assert top_p_counts(rec, 0.76).tolist() == [[3]]


@pytest.mark.parametrize("kwargs, field", [
    ({"warmup": 1.0}, "warmup must"), ({"warmup": 1.5}, "warmup must"),
    ({"search_at": (0.2, 1.0)}, "search_at must"), ({"recall_threshold": 1.5}, "recall_threshold"),
])
def test_config_range_edges(kwargs, field):
    with pytest.raises(ValueError, match=field):
        AdaSpaConfig(**kwargs)


def test_recall_threshold_one_is_allowed():
    assert AdaSpaConfig(recall_threshold=1.0).recall_threshold == 1.0


def test_begin_call_needs_the_step_count_and_refuses_steps_past_it():
    m = AdaSpa(AdaSpaConfig())
    with pytest.raises(ValueError, match="needs the step count"):
        m.begin_call(ctx(0))
    m.check_num_steps(10)
    m.begin_call(ctx(9))
    with pytest.raises(ValueError, match="step 10 is past the 10 steps"):
        m.begin_call(ctx(10))


@pytest.mark.parametrize("kw, name", [({"heads": 0}, "heads"), ({"tokens": 0}, "tokens"), ({"block_size": 0}, "block_size"),
                                      ({"batch": 0}, "batch"), ({"heads": 2.0}, "heads"), ({"heads": True}, "heads"),
                                      ({"text_tokens": True}, "text_tokens"), ({"text_tokens": 101}, "text_tokens"),
                                      ({"text_tokens": -1}, "text_tokens")])
def test_cache_bound_refuses_bad_sizes_naming_them(kw, name):
    args = dict(heads=2, tokens=100, block_size=16)
    args.update(kw)
    with pytest.raises(ValueError, match=f"^{name} must"):
        cache_bytes_per_layer(**args)


def test_a_lone_search_drops_its_lse_at_once():
    """No re-search follows (one search step): the LSE is not kept past its search."""
    m = AdaSpa(AdaSpaConfig(sparsity=0.5, block_size=16, warmup=0.0, search_at=(0.0,)))
    m.check_num_steps(4)
    assert m.plan == ["search", "sparse", "sparse", "sparse"]
    cache = m.new_cache()
    q, k, v = qkv(1, 2, 144, 8, 0)  # 9 blocks: two bytes of bits per row
    m.attention(ctx(0), 0, FakeCall(q, k, v), cache)
    assert cache.lse is None and cache.mask is not None
    assert cache.mask.bits.shape == (1, 2, 9, 2) and cache.nbytes() == 1 * 2 * 9 * 2


@pytest.mark.parametrize("rule, s, heads, expect", [
    ("tiers", 0.8, 4, 5),  # the densest tier (3s - 1) / 2 = 0.7 keeps ceil(0.3 * 16) = 5
    ("tiers", 0.5, 4, 12),  # tiers 0.5 / 0.75 / 0.25: ceil(0.75 * 16)
    ("tiers", 0.0, 4, 16),
    (None, 0.8, 4, 4),  # uniform: ceil(0.2 * 16)
    ("mass", 0.8, 4, 13),  # one head may take every other head's extra blocks: 1 + 4 * (4 - 1)
    ("mass", 0.8, 8, 16),  # capped at the budget
    ("top_p", 0.8, 4, 16),
])
def test_candidate_width_is_the_most_blocks_a_head_can_keep(rule, s, heads, expect):
    """The search remembers each row's best ``width`` blocks: the tightest bound on what any head
    keeps under the rule (less would lose blocks, more costs memory)."""
    cfg = AdaSpaConfig(sparsity=s, head_rule=rule or "tiers", head_adaptive=rule is not None)
    assert A._candidate_width(cfg, rule, 16, heads) == expect


@pytest.mark.parametrize("rule", ["tiers", "mass", "top_p"])
def test_select_mask_on_head_shards_equals_one_device(rule):
    """The reference selection (``select_mask``) on each rank's heads, with the head rules seeing
    every head through the shard's gather, gives that rank's slice of the one-device result."""
    g = torch.Generator().manual_seed(11)
    B, H, nb, ranks = 2, 4, 6, 2
    W = torch.rand(B, H, nb, nb, generator=g) ** 4
    W[:, 0] += torch.eye(nb) * 3  # a concentrated head
    W[:, 1] = 0.1  # a flat one: the rules give the heads different budgets
    always = ref_text(6 * 16, 16, 20, "prefix")
    cfg = AdaSpaConfig(sparsity=0.6, block_size=16, head_rule=rule, target_recall=0.7, recall_threshold=0.6)
    mask1, s1, rec1 = A.select_mask(W, cfg, always, None, True)
    assert len({int(mask1[0, h].sum()) for h in range(H)}) > 1
    board = _Board(ranks)

    def rank(r):
        return A.select_mask(W[:, r * 2:r * 2 + 2], cfg, always, ThreadShard(r * 2, 2, H, board), True)

    results = run_ranks(board, rank)
    for r, (mask, s, rec) in enumerate(results):
        sl = slice(r * 2, r * 2 + 2)
        assert torch.equal(mask, mask1[:, sl])
        torch.testing.assert_close(s, s1[:, sl])
        torch.testing.assert_close(rec, rec1[:, sl])
