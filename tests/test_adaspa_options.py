"""AdaSpa options: head rules (paper tiers, mass, top_p) against brute-force references, CFG pairs,
dense_last, dense_layers, more search steps, validation; defaults unchanged."""

import itertools
import math

import pytest
import torch
from conftest import dit_call

import ditaccel
from ditaccel.methods.adaspa import (
    AdaSpaConfig, head_sparsity, keep_counts, recall, select_mask, text_blocks, topk_blocks,
)
from ditaccel.runtime import get_runtime
from ditaccel.testbed import tiny_dit_pipeline


@pytest.fixture(scope="module")
def dit():
    """64 tokens: four 16-token blocks to choose from; 3 attention layers."""
    return tiny_dit_pipeline(sample_size=16, num_layers=3)


def ragged_w(seed, B=1, H=3, N=5):
    """Block masses whose rows differ in how peaked they are and whose heads differ in total."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, H, N, N, generator=g) ** torch.randint(1, 6, (B, H, N, 1), generator=g) \
        * torch.rand(B, H, 1, 1, generator=g)


# ------------------------------------------------------------------ references (written from DESIGN §3)
def k_of(s, budget):
    """k = ceil((1 - s) * budget) blocks, at least 1 (rounded first: (1 - 0.7) * 10 = 3.0000000000000004)."""
    return max(1, math.ceil(round((1 - s) * budget, 9)))


def ref_tiers(rec, s, threshold=0.8, cap=True, clamp=True, strict=True):
    """The paper's rule for one input: n = #heads with recall > threshold (at most H/2); the n best
    heads get (1+s)/2, the n worst (3s-1)/2 (not below 0), the others s. Flags switch parts off."""
    H = len(rec)
    n = sum((r > threshold) if strict else (r >= threshold) for r in rec)
    n = min(n, H // 2) if cap else n
    order = sorted(range(H), key=lambda h: -rec[h])
    out = [s] * H
    low = (3 * s - 1) / 2
    for h in order[H - n:] if n else []:
        out[h] = max(0.0, low) if clamp else low
    for h in order[:n]:
        out[h] = (1 + s) / 2
    return out


def head_recall_curve(W, always, h, b=0):
    """[recall of head h when every row keeps its k best non-``always`` blocks, for k = 1..budget]."""
    w = W[b, h].double()
    total = float(w.sum())
    fixed = float((w * always).sum()) if always is not None else 0.0
    rows = []
    for p in range(w.shape[0]):
        free = [float(w[p, c]) for c in range(w.shape[1]) if always is None or not always[p, c]]
        rows.append(sorted(free, reverse=True))
    budget = w.shape[1] - (int(always.all(0).sum()) if always is not None else 0)
    return [(fixed + sum(sum(r[:k]) for r in rows)) / total for k in range(1, budget + 1)]


def kept_per_row(mask, always, b, h):
    """Blocks kept by each row of head h beyond the ``always`` ones (all rows: asserted equal)."""
    m = mask[b, h] if always is None else mask[b, h] & ~always
    free_rows = [p for p in range(m.shape[0]) if always is None or not always[p].all()]
    counts = {int(m[p].sum()) for p in free_rows}
    assert len(counts) == 1, "every query block of a head keeps the same number of blocks"
    return counts.pop()


# ------------------------------------------------------------------ configuration
@pytest.mark.parametrize("kwargs, field", [
    ({"head_rule": "best"}, "head_rule"), ({"head_rule": None}, "head_rule"),
    ({"target_recall": 0.0}, "target_recall"), ({"target_recall": 1.5}, "target_recall"),
    ({"target_recall": float("nan")}, "target_recall"), ({"target_recall": "0.9"}, "target_recall"),
    ({"dense_last": 1.0}, "dense_last"), ({"dense_last": -0.1}, "dense_last"), ({"dense_last": True}, "dense_last"),
    ({"dense_layers": -1}, "dense_layers"), ({"dense_layers": 1.0}, "dense_layers"),
    ({"dense_layers": True}, "dense_layers"), ({"first_lse": "stale"}, "first_lse"), ({"first_lse": None}, "first_lse"),
])
def test_config_rejects_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}"):
        AdaSpaConfig(**kwargs)


def test_defaults_are_the_paper():
    c = AdaSpaConfig()
    assert (c.head_rule, c.target_recall, c.dense_last, c.dense_layers) == ("tiers", 0.9, 0.0, 0)
    assert c.schedule(50) == AdaSpaConfig(dense_last=0.0).schedule(50)


# ------------------------------------------------------------------ schedule
@pytest.mark.parametrize("n, f", [(20, 0.1), (20, 0.2), (50, 0.2), (10, 0.25), (30, 0.3), (7, 0.05), (20, 0.0)])
def test_dense_last_schedule(n, f):
    tail = int(math.floor(f * n + 0.5))
    plain = AdaSpaConfig().schedule(n)
    got = AdaSpaConfig(dense_last=f).schedule(n)
    assert got[n - tail:] == ["dense"] * tail
    assert got[:n - tail] == plain[:n - tail]
    assert len(got) == n


def test_dense_last_may_not_cover_a_search():
    with pytest.raises(ValueError, match="^dense_last"):
        AdaSpaConfig(dense_last=0.45).schedule(20)  # 9 dense steps from step 11: covers the search at 12
    with pytest.raises(ValueError, match="^dense_last"):
        AdaSpaConfig(dense_last=0.4).schedule(20)  # 8 dense steps from step 12: the search step itself
    assert AdaSpaConfig(dense_last=0.35).schedule(20)[12:] == ["research"] + ["dense"] * 7
    with pytest.raises(ValueError, match="^dense_last"):
        AdaSpaConfig(dense_last=0.45).schedule(50)  # 23 dense steps from 27: covers 30


def test_four_search_steps_schedule():
    sched = AdaSpaConfig(search_at=(0.2, 0.4, 0.6, 0.8)).schedule(20)
    assert [i for i, w in enumerate(sched) if w == "search"] == [4]
    assert [i for i, w in enumerate(sched) if w == "research"] == [8, 12, 16]
    fresh = AdaSpaConfig(search_at=(0.2, 0.4, 0.6, 0.8), lse_cache=False).schedule(20)
    assert [i for i, w in enumerate(fresh) if w == "search"] == [4, 8, 12, 16]


# ------------------------------------------------------------------ the paper's tiers
@pytest.mark.parametrize("rec, s, part", [
    ([0.95, 0.85, 0.81, 0.30], 0.5, "cap"),        # 3 good heads, at most H/2 = 2 get a tier
    ([0.90, 0.85, 0.20], 0.5, "cap"),              # H = 3: at most 1
    ([0.90, 0.60, 0.20, 0.10], 0.3, "clamp"),      # (3s-1)/2 = -0.05 -> 0
    ([0.80, 0.90, 0.20, 0.10], 0.5, "strict"),     # recall equal to the threshold is not "good"
    ([0.70, 0.60, 0.20, 0.10], 0.5, "threshold"),  # no good head: all at s
])
def test_tiers_match_the_papers_rule(rec, s, part):
    got = head_sparsity(torch.tensor([rec]), s, 0.8)[0].tolist()
    ref = ref_tiers(rec, s)
    assert got == pytest.approx(ref, abs=1e-12)
    # the input is one where that part of the rule changes the outcome
    if part == "threshold":
        assert ref != ref_tiers(rec, s, threshold=0.5)
    else:
        assert ref != ref_tiers(rec, s, **{part: False})


def test_tiers_in_select_mask_match_the_reference():
    """select_mask's default = paper tiers from the recall at base sparsity, then row-wise top-k
    with k = ceil((1-s_h) * budget); text blocks kept and free."""
    for seed in range(20):
        W = ragged_w(seed, B=2, H=4, N=6)
        always = text_blocks(6 * 16 - 3, 16, 20, "prefix") if seed % 2 else None
        budget = 6 - (2 if always is not None else 0)
        for s in (0.3, 0.5, 0.8):
            mask, sp, rec = select_mask(W, AdaSpaConfig(sparsity=s), always)
            for b in range(2):
                k0 = k_of(s, budget)
                base = [head_recall_curve(W, always, h, b)[k0 - 1] for h in range(4)]
                ref = ref_tiers(base, s, 0.8)
                assert sp[b].tolist() == pytest.approx(ref, abs=1e-12)
                for h in range(4):
                    k = k_of(ref[h], budget)
                    assert kept_per_row(mask, always, b, h) == k
                    assert float(rec[b, h]) == pytest.approx(head_recall_curve(W, always, h, b)[k - 1], rel=1e-5)


def test_default_equals_explicit_tiers_and_the_old_composition():
    """Defaults are bit-identical to head_rule="tiers" and, without CFG pairs, to the code before
    the options (tiers per batch item from topk_blocks / recall / head_sparsity)."""
    for seed in range(10):
        W = ragged_w(seed, B=2, H=4, N=6)
        always = text_blocks(6 * 16, 16, 16, "suffix") if seed % 2 else None
        budget = 6 - (1 if always is not None else 0)
        for s in (0.0, 0.5, 0.8):
            a = select_mask(W, AdaSpaConfig(sparsity=s), always)
            b = select_mask(W, AdaSpaConfig(sparsity=s, head_rule="tiers", target_recall=0.3), always)
            assert all(torch.equal(x, y) for x, y in zip(a, b))
            s0 = torch.full((2, 4), s, dtype=torch.float64)
            if s > 0:
                s0 = head_sparsity(recall(W, topk_blocks(W, keep_counts(s0, budget), always)), s, 0.8)
            old = topk_blocks(W, keep_counts(s0, budget), always)
            assert torch.equal(a[0], old) and torch.equal(a[1], s0)


def test_cfg_halves_get_the_same_tiers():
    """Two good heads in a near-tie, ranked differently in the two CFG halves: per batch item the
    halves got different tiers (the defect); with cfg_pairs both are ranked on the pair's mean
    recall (paper rule otherwise), and mass / top_p decide on the pair as well."""
    row = torch.tensor([10.0, 5.0, 1.0, 0.1, 0.1, 0.1])
    W = row.repeat(2, 3, 6, 1)  # (B=2 halves, H=3, 6 query blocks, 6 key blocks)
    W[:, 2] = 1.0  # head 2 diffuse: recall 0.5 at s = 0.5
    W[0, 0, :, 0] = 10.4  # half 0: head 0 a hair better than head 1
    W[1, 1, :, 0] = 10.2  # half 1: head 1 a hair better than head 0
    cfg = AdaSpaConfig(sparsity=0.5)  # two good heads, H // 2 = 1 tier each side
    _, per_item, _ = select_mask(W, cfg, None)
    assert per_item[0].tolist() == [0.75, 0.5, 0.25] and per_item[1].tolist() == [0.5, 0.75, 0.25]
    mask, paired, _ = select_mask(W, cfg, None, cfg_pairs=True)
    assert paired[0].tolist() == paired[1].tolist() == [0.75, 0.5, 0.25]  # head 0 is better on average
    mean_rec = recall(W, topk_blocks(W, keep_counts(torch.full((2, 3), 0.5, dtype=torch.float64), 6))).mean(0)
    assert paired[0].tolist() == pytest.approx(ref_tiers(mean_rec.tolist(), 0.5), abs=1e-12)
    assert torch.equal(mask[0], mask[1])
    for rule in ("mass", "top_p"):
        _, sp, _ = select_mask(W, AdaSpaConfig(sparsity=0.5, head_rule=rule, target_recall=0.96), None,
                               cfg_pairs=True)
        assert torch.equal(sp[0], sp[1])


# ------------------------------------------------------------------ head_rule="mass"
@pytest.mark.parametrize("H, N, text", [(2, 5, False), (3, 5, False), (3, 6, True), (2, 7, True)])
def test_mass_is_the_best_allocation(H, N, text):
    """Brute force over every allocation (k_h >= 1, sum = H * k(s)): the rule keeps the most
    attention mass, in recall units (each head's kept mass over its total; exact block masses give
    every head the same total, so this is the kept mass)."""
    always = text_blocks(N * 16, 16, 10, "prefix") if text else None
    budget = N - (1 if text else 0)
    for seed in range(12):
        W = ragged_w(100 + seed, B=1, H=H, N=N)
        curves = [head_recall_curve(W, always, h) for h in range(H)]
        for s in (0.3, 0.5, 0.7, 0.9):
            k = k_of(s, budget)
            best = max(sum(curves[h][a[h] - 1] for h in range(H))
                       for a in itertools.product(range(1, budget + 1), repeat=H) if sum(a) == H * k)
            mask, sp, rec = select_mask(W, AdaSpaConfig(sparsity=s, head_rule="mass"), always)
            ks = [kept_per_row(mask, always, 0, h) for h in range(H)]
            assert sum(ks) == H * k and min(ks) >= 1
            assert sum(curves[h][ks[h] - 1] for h in range(H)) == pytest.approx(best, abs=1e-9)
            assert float(rec.sum()) == pytest.approx(best, rel=1e-5)
            assert sp[0].tolist() == pytest.approx([1 - kh / budget for kh in ks])


def test_mass_with_equal_head_totals_maximises_raw_mass():
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(1, 3, 5, 5, generator=g) * torch.tensor([0.3, 2.0, 5.0])[None, :, None, None]
    W = logits.softmax(-1) * 16  # every block row holds the mass of 16 queries, like exact attention
    for s in (0.4, 0.6, 0.8):
        k = k_of(s, 5)
        best = max(sum(float(W[0, h].sort(-1, descending=True).values[:, :a[h]].sum()) for h in range(3))
                   for a in itertools.product(range(1, 6), repeat=3) if sum(a) == 3 * k)
        mask, _, _ = select_mask(W, AdaSpaConfig(sparsity=s, head_rule="mass"), None)
        assert float((W * mask).sum()) == pytest.approx(best, rel=1e-6)


# ------------------------------------------------------------------ head_rule="top_p"
@pytest.mark.parametrize("text", [False, True])
def test_top_p_is_the_smallest_k_reaching_the_target(text):
    N = 6
    always = text_blocks(N * 16, 16, 5, "suffix") if text else None
    for seed in range(10):
        W = ragged_w(200 + seed, B=2, H=3, N=N)
        for target in (0.3, 0.6, 0.9, 0.99, 1.0):
            mask, sp, rec = select_mask(W, AdaSpaConfig(head_rule="top_p", target_recall=target, sparsity=0.8),
                                        always)
            for b in range(2):
                for h in range(3):
                    curve = head_recall_curve(W, always, h, b)
                    k = 1
                    while k < len(curve) and curve[k - 1] < target:
                        k += 1
                    assert kept_per_row(mask, always, b, h) == k
                    assert float(rec[b, h]) >= min(target, curve[-1]) - 1e-6


def test_top_p_ignores_sparsity():
    W = ragged_w(5, B=1, H=3, N=6)
    a = select_mask(W, AdaSpaConfig(head_rule="top_p", sparsity=0.0), None)
    b = select_mask(W, AdaSpaConfig(head_rule="top_p", sparsity=0.9), None)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_head_rule_needs_head_adaptive():
    W = ragged_w(6, B=1, H=3, N=6)
    uniform = select_mask(W, AdaSpaConfig(sparsity=0.5, head_adaptive=False), None)
    for rule in ("mass", "top_p"):
        other = select_mask(W, AdaSpaConfig(sparsity=0.5, head_adaptive=False, head_rule=rule), None)
        assert all(torch.equal(x, y) for x, y in zip(uniform, other))


# ------------------------------------------------------------------ end to end (tiny DiT, CFG batch)
def run(dit, cfg, steps=10, spy=False):
    """Generate; with ``spy`` also record, per call, whether each layer's output equals dense."""
    ditaccel.apply(dit, cfg)
    seen = []
    try:
        if spy:
            method = get_runtime(dit).method
            orig = method.attention

            def attention(ctx, layer, call, cache):
                out, frac, name = orig(ctx, layer, call, cache)
                seen.append((ctx.step, layer, name, frac, torch.equal(out, call.full()),
                             torch.allclose(out, call.full(), atol=1e-5)))
                return out, frac, name

            method.attention = attention
        out = dit_call(dit, steps=steps)
        st = ditaccel.stats(dit)
        caches = list(get_runtime(dit).state_manager._state_cache.values())[0].caches.values()
        freed = all(c.lse is None and c.mask is None for c in caches)
    finally:
        ditaccel.remove(dit)
    return out, st, seen, freed


def test_defaults_bit_identical_end_to_end(dit):
    a, _, _, _ = run(dit, AdaSpaConfig(sparsity=0.5, block_size=16))
    b, _, _, _ = run(dit, AdaSpaConfig(sparsity=0.5, block_size=16, head_rule="tiers", target_recall=0.5,
                                       dense_last=0.0, dense_layers=0))
    assert torch.equal(a, b)


@pytest.mark.parametrize("n", [1, 2])
def test_dense_layers(dit, n):
    out, st, seen, freed = run(dit, AdaSpaConfig(sparsity=0.8, block_size=16, dense_layers=n), spy=True)
    assert torch.isfinite(out).all() and freed
    for step, layer, name, frac, equal, _ in seen:
        if layer < n:
            assert name == "dense" and frac == 1.0 and equal
    sparse = [close for step, layer, name, _, _, close in seen if layer >= n and name == "sparse"]
    assert sparse and not any(sparse)  # sparsity 0.8 of 4 blocks keeps 1: never the dense output
    assert st.method_counts["dense"] == 2 * 3 + 8 * n and st.method_counts["search"] == 3 - n
    assert st.details["density_per_layer"][:n] == [1.0] * n and st.details["recall_per_search"][:n] == [[]] * n
    assert all(d < 1.0 for d in st.details["density_per_layer"][n:])
    # every call has the same dense cost (CFG halves in one batch): the ratio is the mean fraction
    fractions = [frac for _, _, _, frac, _, _ in seen]
    assert st.attention_flops_ratio == pytest.approx(sum(fractions) / len(fractions))
    assert sum(frac == 1.0 for frac in fractions) >= 2 * 3 + 8 * n


def test_dense_layers_more_than_the_model_has(dit):
    with pytest.raises(ValueError, match="^dense_layers.*3 attention layers"):
        ditaccel.apply(dit, AdaSpaConfig(block_size=16, dense_layers=4))
    assert get_runtime(dit) is None
    out, st, _, _ = run(dit, AdaSpaConfig(block_size=16, dense_layers=3))  # all dense: allowed
    assert st.method_counts == {"dense": 30} and st.attention_flops_ratio == 1.0


def test_dense_last_end_to_end(dit):
    out, st, seen, freed = run(dit, AdaSpaConfig(sparsity=0.8, block_size=16, dense_last=0.2), spy=True)
    assert freed and torch.isfinite(out).all()  # the cache is freed at the last sparse step (7)
    assert st.method_counts == {"dense": 3 * 4, "search": 3, "research": 3, "sparse": 3 * 4}
    assert all(name == "dense" and equal for step, _, name, _, equal, _ in seen if step >= 8)
    plain, st_plain, _, _ = run(dit, AdaSpaConfig(sparsity=0.8, block_size=16))
    assert st.attention_flops_ratio > st_plain.attention_flops_ratio


def test_four_searches_end_to_end(dit):
    out, st, _, freed = run(dit, AdaSpaConfig(sparsity=0.5, block_size=16, search_at=(0.2, 0.4, 0.6, 0.8)))
    assert freed and torch.isfinite(out).all()
    assert st.method_counts["search"] == 3 and st.method_counts["research"] == 3 * 3
    assert all(len(r) == 4 for r in st.details["recall_per_search"])


@pytest.mark.parametrize("rule", ["mass", "top_p"])
def test_head_rules_end_to_end(dit, rule):
    out, st, _, _ = run(dit, AdaSpaConfig(sparsity=0.5, block_size=16, head_rule=rule, target_recall=0.9))
    assert torch.isfinite(out).all()
    assert all(0 < d <= 1 for d in st.details["density_per_layer"])
    if rule == "top_p":
        assert all(min(r) >= 0.9 - 1e-5 for r in st.details["recall_per_search"])
