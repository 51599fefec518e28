"""AdaSpa (Xia et al., 2025): per-input, per-head block-sparse attention found online.

Dense attention for the warm-up steps; at the first search step, full attention that also
returns each row's log-sum-exp (LSE, cached), then the block attention mass
W[b,h,p,c] = Σ_{i∈p, j∈c} exp(q_i·k_j·scale − LSE_i) in a second pass; each query block keeps its
top-k key blocks (k from the head's sparsity tier); text blocks are always kept. At later
search steps W comes in one pass from the cached LSE. Between searches, block-sparse attention
with the last mask.

Memory: between steps a layer's cache holds the LSE (until the last search that reads it) and
the mask as one bit per video x video block pair (:class:`PackedMask`: text rows and columns are
implied, not stored); :func:`cache_bytes_per_layer` is its exact bound. A search holds ``W`` of a
few heads at a time (:func:`search_mask`), not the layer's ``(B, H, NB, NB)``.

This module decides and caches; it never looks at a model. It sees the attention core through
``AttentionCall.core(fn)`` and computes with ``ditaccel.kernels``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from ..kernels.block_mass import BLOCK_SIZES, attention_with_lse, block_mass
from ..kernels.block_sparse import block_sparse_attention, pack_block_mask, unpack_block_mask
from ..kernels.tiles import compact_columns


HEAD_RULES = ("tiers", "mass", "top_p")

#: AdaSpa's per-(layer, step) work, as entries of a mixed plan (``ditaccel.methods.mixed``) and as the
#: words of :meth:`AdaSpaConfig.schedule`: ``"search"`` dense attention that also searches the block
#: mask with a fresh LSE (output dense), ``"research"`` a search from the cached LSE followed by
#: block-sparse attention with the new mask, ``"sparse"`` block-sparse attention with the latest mask
SEARCH, RESEARCH, SPARSE = "search", "research", "sparse"
PLAN_ENTRIES: tuple[str, ...] = (SEARCH, RESEARCH, SPARSE)
#: a schedule word only (not a plan entry): dense attention that keeps its LSE for the next step's
#: search (``AdaSpaConfig.first_lse="previous"``)
DENSE_LSE = "dense_lse"
#: the AdaSpaConfig fields that say *when* AdaSpa searches and runs sparse: in a mixed plan its
#: entries say that, so these fields are not used there
SCHEDULE_FIELDS: tuple[str, ...] = ("warmup", "search_at", "lse_cache", "dense_last", "dense_layers", "first_lse")
FIRST_LSE = ("previous", "fresh")


def _real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class AdaSpaConfig:
    """Settings of AdaSpa (paper defaults).

    Attributes:
        sparsity: base fraction of key blocks each query block drops (0.8: keep 20%). Higher is
            faster and loses more attention mass.
        block_size: tokens per block: 16, 32, 64 or 128 (``kernels.block_mass.BLOCK_SIZES``, the
            sizes the block-mass search accepts). Smaller blocks follow the pattern more closely but
            run less efficiently.
        warmup: fraction of the steps run dense before the first search (0.2 = the paper's 10 of 50).
        search_at: fractions of the steps at which masks are searched (the paper's {10, 30} of 50).
            Step index = floor(fraction · num_steps + 0.5) (round half up): 20 steps → {4, 12}.
            The first search step must be ≥ the warm-up step count.
        head_adaptive: per-head budgets within a layer, by ``head_rule`` (default: the paper's
            tiers, best heads sparser, worst denser, mean unchanged where the tiers stay within
            [0, 1)). ``False``: every head keeps k(s) blocks per query block.
        recall_threshold: a head counts as "good" when the mass kept at base sparsity exceeds it
            (``head_rule="tiers"`` only).
        text_sink: always keep text query blocks and text key blocks. Text blocks are free: the
            top-k budget counts the other key blocks.
        lse_cache: later searches reuse the LSE cached at the first one (the paper's cheaper
            re-search: one QKᵀ pass, no full attention). ``False`` runs every search like the
            first (full attention, fresh LSE): the ablation of the caching. Note that a fresh
            search also returns the exact dense output of its step, so ``False`` runs one more
            dense step per extra search.
        head_rule: how ``head_adaptive`` spreads the key-block budget over the heads of one layer
            and input (the two halves of a batched CFG call decide together; every query block of
            a head keeps the same k_h blocks; text blocks are free). ``"tiers"``: the paper's
            (above; a head's tier follows a fixed recall threshold, not how much mass the moved
            blocks carry, and can lower the layer's total recall). ``"mass"``: the same total
            Σ_h k_h = H · k(s) as uniform sparsity s (same FLOPs), split to keep the most
            attention mass (measured as Σ_h recall_h, which equals it for exact block masses and
            is robust to a stale cached LSE): greedy by marginal gain, optimal because a head's
            kept mass is concave in k_h; every head keeps ≥ 1 block. ``"top_p"``: each head keeps
            the fewest blocks per query block whose recall (kept mass, text blocks included, over
            the head's total mass) reaches ``target_recall``; ``sparsity`` is then not used and
            the density (FLOPs) is an outcome, reported by ``ditaccel.stats``: diffuse heads may
            run nearly dense.
        target_recall: the recall each head reaches under ``head_rule="top_p"``, in (0, 1]. Higher
            is closer to dense and slower.
        dense_last: fraction of the steps run dense at the end: the last floor(f · n + 0.5) of n
            steps (fine detail is decided there; costs their sparse savings). In [0, 1); a dense
            tail that would cover a search step is refused when the step count is known.
        dense_layers: the first N attention layers always run dense (never searched; their cache
            stays empty). Costs their sparse savings; N may not exceed the model's layer count.
        first_lse: where the first search's LSE comes from. ``"fresh"`` (the paper's): the search
            step runs full attention that returns its LSE, then the block-mass pass; its output is
            exact (about 1.6 dense steps of attention). ``"previous"``: the dense step before it
            computes its attention with the LSE (the same kernel cost: cuDNN returns it) and keeps
            it; the search step then runs like a re-search, the block-mass pass from that LSE and
            block-sparse attention with the new mask (about 0.6 dense steps + the sparse step). The
            LSE barely moves between neighbouring steps (DESIGN §7). With no step before the first
            search (``warmup=0`` and a search at step 0) the first search is fresh either way.
    """

    sparsity: float = 0.8
    block_size: int = 64
    warmup: float = 0.2
    search_at: tuple[float, ...] = (0.2, 0.6)
    head_adaptive: bool = True
    recall_threshold: float = 0.8
    text_sink: bool = True
    lse_cache: bool = True
    head_rule: str = "tiers"
    target_recall: float = 0.9
    dense_last: float = 0.0
    dense_layers: int = 0
    first_lse: str = "fresh"

    def __post_init__(self):
        if not isinstance(self.sparsity, (int, float)) or not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity!r}")
        bs = self.block_size
        if isinstance(bs, bool) or not isinstance(bs, int) or bs not in BLOCK_SIZES:
            # the block-mass search accepts these on every backend (and the block-sparse Triton kernel)
            raise ValueError(f"block_size must be one of {BLOCK_SIZES} (the block-mass kernel's), got {bs!r}")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"warmup must be in [0, 1), got {self.warmup!r}")
        self.search_at = tuple(sorted(self.search_at))
        if not self.search_at or any(not 0.0 <= f < 1.0 for f in self.search_at):
            raise ValueError(f"search_at must be fractions in [0, 1), got {self.search_at!r}")
        if self.search_at[0] < self.warmup:
            raise ValueError(f"search_at: the first search ({self.search_at[0]}) comes before the end of the "
                             f"warm-up ({self.warmup})")
        if not 0.0 < self.recall_threshold <= 1.0:
            raise ValueError(f"recall_threshold must be in (0, 1], got {self.recall_threshold!r}")
        if self.head_rule not in HEAD_RULES:
            raise ValueError(f"head_rule must be one of {HEAD_RULES}, got {self.head_rule!r}")
        if not _real(self.target_recall) or not 0.0 < self.target_recall <= 1.0:
            raise ValueError(f"target_recall must be in (0, 1], got {self.target_recall!r}")
        if not _real(self.dense_last) or not 0.0 <= self.dense_last < 1.0:
            raise ValueError(f"dense_last must be in [0, 1), got {self.dense_last!r}")
        if isinstance(self.dense_layers, bool) or not isinstance(self.dense_layers, int) or self.dense_layers < 0:
            raise ValueError(f"dense_layers must be an int >= 0, got {self.dense_layers!r}")
        if self.first_lse not in FIRST_LSE:
            raise ValueError(f"first_lse must be one of {FIRST_LSE}, got {self.first_lse!r}")

    def schedule(self, num_steps: int) -> list[str]:
        """``"dense"``, ``"dense_lse"`` (dense, keeping the LSE for the next step's search),
        ``"search"`` (fresh LSE), ``"research"`` (cached LSE) or ``"sparse"`` for each step. With
        ``first_lse="previous"`` the step before the first search is ``"dense_lse"`` and the first
        search a ``"research"``."""
        def at(f):
            return int(math.floor(f * num_steps + 0.5))

        searches = sorted({at(f) for f in self.search_at})
        warm = at(self.warmup)
        if searches[0] < warm:
            raise ValueError(f"search_at: with {num_steps} steps the first search (step {searches[0]}) falls in "
                             f"the warm-up (steps < {warm})")
        if searches[-1] >= num_steps:
            raise ValueError(f"search_at: step {searches[-1]} is beyond num_inference_steps={num_steps}")
        tail = num_steps - at(self.dense_last)  # first step of the dense tail
        if searches[-1] >= tail:
            raise ValueError(f"dense_last: with {num_steps} steps the dense tail (steps >= {tail}) covers the "
                             f"search at step {searches[-1]}")
        kept_lse = self.first_lse == "previous" and searches[0] > 0  # a dense step before the search keeps its LSE
        out = []
        for s in range(num_steps):
            if s == searches[0] - 1 and kept_lse:
                out.append(DENSE_LSE)
            elif s < searches[0] or s >= tail:
                out.append("dense")
            elif s == searches[0]:
                out.append("research" if kept_lse else "search")
            elif s in searches:
                out.append("research" if self.lse_cache else "search")
            else:
                out.append("sparse")
        return out


# ------------------------------------------------------------------------------ selection
def topk_blocks(W: torch.Tensor, keep: torch.Tensor, always: torch.Tensor | None = None) -> torch.Tensor:
    """Row-wise top-k block mask. W (B,H,NQ,NK) block mass; keep (B,H) key blocks kept per query
    block (over the non-``always`` blocks); always (NQ,NK) bool blocks kept regardless.
    Returns bool (B,H,NQ,NK)."""
    nk = W.shape[-1]
    scores = W.clone()
    if always is not None:
        scores = scores.masked_fill(always, float("-inf"))  # chosen separately, not from the budget
    order = scores.argsort(dim=-1, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(nk, device=W.device).expand_as(order))
    mask = rank < keep[..., None, None]
    if always is not None:
        mask |= always
    return mask


def keep_counts(sparsity: torch.Tensor, nk_budget: int) -> torch.Tensor:
    """k = ceil((1 − s) · budget) blocks, at least 1."""
    return torch.ceil((1.0 - sparsity) * nk_budget - 1e-9).clamp(min=1).long()


def recall(W: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Kept mass / total mass per (b, h)."""
    total = W.sum(dim=(-1, -2)).clamp_min(1e-30)
    return (W * mask).sum(dim=(-1, -2)) / total


def head_sparsity(base_recall: torch.Tensor, s: float, threshold: float) -> torch.Tensor:
    """Tiered sparsity per (b, h): n = #heads with recall > threshold (≤ H/2); the n best heads get
    (1+s)/2, the n worst (3s−1)/2 (clamped at 0), the rest s."""
    B, H = base_recall.shape
    out = torch.full((B, H), s, dtype=torch.float64, device=base_recall.device)
    n = (base_recall > threshold).sum(dim=1).clamp(max=H // 2)
    order = base_recall.argsort(dim=1, descending=True)
    for b in range(B):
        k = int(n[b])
        if k:
            out[b, order[b, :k]] = (1 + s) / 2
            out[b, order[b, H - k:]] = max(0.0, (3 * s - 1) / 2)
    return out


def text_blocks(seq_len: int, block_size: int, text_tokens: int, position: str | None, device=None):
    """(NQ, NK) bool: blocks touching a text query row or a text key column."""
    nb = -(-seq_len // block_size)
    is_text = torch.zeros(nb, dtype=torch.bool, device=device)
    if text_tokens and position:
        tok = torch.zeros(nb * block_size, dtype=torch.bool, device=device)
        if position == "prefix":
            tok[:text_tokens] = True
        else:
            tok[seq_len - text_tokens:seq_len] = True
        is_text = tok.view(nb, block_size).any(1)
    return is_text[:, None] | is_text[None, :]


def row_mass(W: torch.Tensor, always: torch.Tensor | None, budget: int) -> torch.Tensor:
    """(B, H, budget) float64: column j is the mass, summed over all query blocks, of each row's
    (j+1)-th heaviest non-``always`` key block. Non-increasing in j, so Σ_{j<k} (the mass a head
    keeps with k blocks per row) is concave in k."""
    scores = W.double() if always is None else W.double().masked_fill(always, 0.0)
    return scores.sort(dim=-1, descending=True).values[..., :budget].sum(dim=2)


def mass_counts(gains: torch.Tensor, k: int) -> torch.Tensor:
    """``head_rule="mass"``: blocks per row for each (b, h), ≥ 1 each and H · k in all per b, with
    the most kept mass. gains (B, H, budget) as from ``row_mass``. The best allocation takes the
    H · (k − 1) largest marginal gains beyond each head's first block: by concavity they form a
    prefix per head (ties: equal mass)."""
    B, H, budget = gains.shape
    extra = H * (min(k, budget) - 1)
    keep = torch.ones(B, H, dtype=torch.long, device=gains.device)
    if extra:
        top = gains[..., 1:].flatten(1).topk(extra, dim=1).indices // (budget - 1)
        keep.scatter_add_(1, top, torch.ones_like(top))
    return keep


def top_p_counts(recall_at: torch.Tensor, target: float) -> torch.Tensor:
    """``head_rule="top_p"``: the fewest blocks per row k for each (b, h) with recall_at[b, h, k−1]
    (non-decreasing in k) ≥ ``target``; all blocks if none reaches it."""
    return ((recall_at < target).sum(dim=-1) + 1).clamp(max=recall_at.shape[-1])


def pair_mean(x: torch.Tensor, cfg_pairs: bool) -> torch.Tensor:
    """With ``cfg_pairs`` (the batch is [one CFG half; the other]): the mean of the two halves,
    repeated for both, so that both halves of a pair get the same per-head budgets."""
    if not cfg_pairs:
        return x
    half = x.view(2, x.shape[0] // 2, *x.shape[1:]).mean(dim=0)
    return torch.cat([half, half])


def select_mask(W: torch.Tensor, config: AdaSpaConfig, always: torch.Tensor | None, heads=None,
                cfg_pairs: bool = False):
    """The searched mask and its diagnostics: (mask, per-head sparsity, recall of the mask).

    heads: the ``HeadShard`` W belongs to when the heads are split across ranks (context
    parallelism): the head rules see the heads of all ranks, as on one device.
    cfg_pairs: the batch holds the two CFG halves of each sample ([one half; the other]): the
    head rules decide on both halves together (tiers: ranked on the pair's mean recall), so the
    two halves never get different budgets from a near-tie (guidance amplifies their difference)."""
    B, H, NQ, NK = W.shape
    # the budget counts the key blocks a video query block chooses from: all but the text columns
    text_cols = int(always.all(dim=0).sum()) if always is not None else 0
    budget = max(NK - text_cols, 1)
    s = torch.full((B, H), float(config.sparsity), dtype=torch.float64, device=W.device)
    rule = config.head_rule if config.head_adaptive else None
    if rule == "tiers" and config.sparsity > 0:
        base = topk_blocks(W, keep_counts(s, budget), always)
        base_recall = recall(W, base) if heads is None else heads.gather(recall(W, base))
        s = head_sparsity(pair_mean(base_recall, cfg_pairs), config.sparsity, config.recall_threshold)
        if heads is not None:
            s = s[:, heads.start:heads.start + heads.count]
    keep = keep_counts(s, budget)
    if rule in ("mass", "top_p"):
        # in recall units (per-head mass / head total): exact block masses give every head the same
        # total (one per query row), a W from a stale cached LSE does not
        total = W.double().sum(dim=(-1, -2)).clamp_min(1e-30)[..., None]
        gains = row_mass(W, always, budget) / total
        if rule == "mass":
            gains = pair_mean(gains if heads is None else heads.gather(gains), cfg_pairs)
            keep = mass_counts(gains, int(keep.max()))
            keep = keep if heads is None else keep[:, heads.start:heads.start + heads.count]
        else:
            kept_always = (W.double() * always).sum(dim=(-1, -2))[..., None] if always is not None else 0.0
            keep = top_p_counts(pair_mean(kept_always / total + gains.cumsum(dim=-1), cfg_pairs),
                                config.target_recall)
        s = 1.0 - keep.double() / budget
    mask = topk_blocks(W, keep, always)
    return mask, s, recall(W, mask)


def video_blocks(seq_len: int, block_size: int, text_tokens: int, position: str | None) -> tuple[int, int]:
    """The blocks ``[v0, v1)`` that touch no text token (the rows ``text_blocks`` does not mark):
    ``(ceil(T / B), NB)`` for a text prefix of T tokens, ``(0, floor((L − T) / B))`` for a text
    suffix, ``(0, NB)`` without text."""
    nb = -(-seq_len // block_size)
    if not text_tokens or not position:
        return 0, nb
    if position == "prefix":
        return min(nb, -(-text_tokens // block_size)), nb
    return 0, max(0, (seq_len - text_tokens) // block_size)


@dataclass
class PackedMask:
    """One layer's searched block mask as the cache keeps it between steps: only what the text
    sink does not imply.

    Blocks outside ``video = [v0, v1)`` are text blocks (they touch a text token; one contiguous
    range, before the video for a text prefix, after it for a suffix): their query rows keep every
    key block and their key columns are kept by every query block, so neither is stored. What is
    stored is the video x video part, one bit per block pair (``kernels.block_sparse.
    pack_block_mask``): ``bits`` uint8 ``(B, H, NV, ceil(NV / 8))``, ``NV = v1 - v0``. For the
    kernel, :meth:`kernel_lists` decodes it a few heads at a time into per-row key-block lists
    (the text columns put back in ascending block order) and names the text rows as
    ``dense_query_blocks``, so the decoded lists are as wide as the longest video row plus the
    text columns, not ``NB``.

    Why bits. Measured at HunyuanVideo 720p (24 heads, 118,800 video + 256 text tokens = 1,861
    blocks of 64, 1,856 of them video, batch 1) on a tiers mask at s = 0.8 (6 heads at 0.9, 12 at
    0.8, 6 at 0.7: 186 / 372 / 557 video blocks per row, mean 371.75), CPU, 2026-12-03:

    ====================================  ===========  ==========================================
    encoding                              bytes/layer  note
    ====================================  ===========  ==========================================
    int16 lists cut to the longest row    166.2 MB     the old cache: text rows keep all 1,861
    int16 lists, video rows, one width    49.6 MB      width = the densest tier's 557
    int16 lists per head (CSR)            33.1 MB      every row of a head keeps k_h blocks
    bits, video x video                   10.3 MB      any sparsity and head rule
    ====================================  ===========  ==========================================

    A bit costs 1/16 of an int16 index, so bits are the smallest whenever more than 1/16 of the
    blocks are kept (uniform s < 0.9375; at s = 0.8 with tiers even the sparsest tier keeps 10%),
    and their size does not depend on the search: the bound (:func:`cache_bytes_per_layer`) is
    exact and holds for every ``head_rule`` (``top_p`` may keep every block). The price is a
    decode per sparse call: per chunk of heads an unpack, a cumulative sum and a scatter over
    ``B * H * NV**2`` block pairs (``compact_columns``), into int32 lists as wide as the longest
    video row plus the text columns (562 here: a 100 MB transient, freed after the call). On 2
    shared CPU threads at this shape the decode takes 1.9 s per layer against 0.15 s for the old
    int16 -> int32 copy, both negligible beside the CPU attention itself (minutes); on the GPU it
    is ~1 GB of memory traffic (well under 1 ms on an H200) against tens of ms of sparse attention
    per layer (not measured on a GPU yet; ``scripts/measure_adaspa_memory.py`` times the sparse
    step). The kernel then runs exactly the lists the old cache held, in the same order (bitwise
    the same output), plus one launch for the text rows (``dense_query_blocks``). A kernel
    reading the bits directly would skip the decode but visit all NB blocks of every row.
    """

    bits: torch.Tensor
    video: tuple[int, int]
    num_blocks: int
    width: int  # the longest video row (kept video blocks): sizes the decoded lists with no device sync

    @classmethod
    def from_mask(cls, mask: torch.Tensor, video: tuple[int, int]) -> PackedMask:
        """From a full bool block mask ``(B, H, NB, NB)`` whose text rows and columns (outside
        ``video``) are all True (checked)."""
        v0, v1 = video
        nb = mask.shape[-1]
        if not (v0 == 0 or v1 == nb):
            raise ValueError(f"video blocks {video}: the text blocks must be one range before or after them")
        text = torch.ones(nb, dtype=torch.bool, device=mask.device)
        text[v0:v1] = False
        if not bool(mask[:, :, text].all() and mask[..., text].all()):
            raise ValueError("mask: text rows and columns must be all kept")
        part = mask[:, :, v0:v1, v0:v1]
        width = int(part.sum(-1).max()) if part.numel() else 0
        return cls(pack_block_mask(part), (v0, v1), nb, width)

    def to_mask(self) -> torch.Tensor:
        """The full bool block mask ``(B, H, NB, NB)``."""
        v0, v1 = self.video
        B, H = self.bits.shape[:2]
        mask = torch.ones(B, H, self.num_blocks, self.num_blocks, dtype=torch.bool, device=self.bits.device)
        mask[:, :, v0:v1, v0:v1] = unpack_block_mask(self.bits, v1 - v0)
        return mask

    def nbytes(self) -> int:
        return self.bits.numel() * self.bits.element_size()

    def kernel_lists(self, chunk_elems: int = 1 << 23):
        """``(kv_indices, kv_counts, dense_query_blocks)`` for ``block_sparse_attention``: int32
        ``(B, H, NB, width + text blocks)`` lists of the video rows in ascending block order (text
        columns included), the text rows left to ``dense_query_blocks``. Decoded ``chunk_elems``
        block pairs at a time."""
        v0, v1 = self.video
        nb, nv = self.num_blocks, v1 - v0
        nt = nb - nv
        B, H = self.bits.shape[:2]
        dev = self.bits.device
        idx = torch.zeros(B, H, nb, max(1, self.width + nt), dtype=torch.int32, device=dev)
        cnt = torch.zeros(B, H, nb, dtype=torch.int32, device=dev)
        text_ids = (torch.arange(0, v0) if v0 > 0 else torch.arange(v1, nb)).to(device=dev, dtype=torch.int32)
        w = self.width
        per = max(1, chunk_elems // max(1, B * nv * nv))
        for h0 in range(0, H if nv else 0, per):
            h1 = min(H, h0 + per)
            cols, c = compact_columns(unpack_block_mask(self.bits[:, h0:h1], nv))
            rows = idx[:, h0:h1, v0:v1]
            if v0 > 0:  # text first: its blocks precede every video block
                rows[..., :nt] = text_ids
                rows[..., nt:nt + w] = cols[..., :w] + v0
            else:  # text (if any) after each row's video blocks
                rows[..., :w] = cols[..., :w]
                if nt:
                    pos = c[..., None].long() + torch.arange(nt, device=dev)
                    rows.scatter_(-1, pos, text_ids.expand(pos.shape).contiguous())
            cnt[:, h0:h1, v0:v1] = c + nt
        dense = (0, v0) if v0 > 0 else (v1, nb)
        return idx, cnt, dense if dense[0] < dense[1] else None


def _candidate_width(config: AdaSpaConfig, rule, budget: int, heads_total: int) -> int:
    """The most blocks per row any head can keep under the rule: how many of each row's best
    blocks the search must remember while it waits for the other heads."""
    s = config.sparsity
    if rule == "top_p":
        return budget
    if rule == "mass":
        k = int(keep_counts(torch.tensor(float(s), dtype=torch.float64), budget))
        return min(budget, 1 + heads_total * (min(k, budget) - 1))
    tiers = [s] if rule != "tiers" or s <= 0 else [s, (1 + s) / 2, max(0.0, (3 * s - 1) / 2)]
    return max(int(keep_counts(torch.tensor(t, dtype=torch.float64), budget)) for t in tiers)


def search_mask(mass_of, shape: tuple[int, int, int], config: AdaSpaConfig, video: tuple[int, int], heads=None,
                cfg_pairs: bool = False, seq_len: int | None = None, block_size: int | None = None,
                head_dim: int = 1, chunk_elems: int = 1 << 24):
    """:func:`select_mask` as the method runs it: the same masks and per-head sparsities (recalls
    to float rounding), with the text blocks given as the complement of ``video``, but never a
    ``(B, H, NB, NB)`` tensor other than a few heads' ``W`` at a time.

    ``mass_of(h0, h1)`` returns ``W`` (float32 ``(B, h1 - h0, NB, NB)``) of heads ``h0..h1-1``;
    it is called once per chunk of about ``chunk_elems`` block pairs. Each head's video rows are
    sorted once; the search keeps each row's best ``_candidate_width`` key blocks (int16 ids) and
    per-head sums, decides the per-head counts from them (all heads, as ``select_mask``), then
    packs the kept blocks into a :class:`PackedMask`. Transient memory at HunyuanVideo 720p: W of
    4 heads (55 MB), one head's sort (~60 MB) and the candidates (50 MB under tiers at s = 0.8,
    166 MB under ``mass`` / ``top_p``, which may keep every block).

    Returns ``(packed, sparsity (B, H) float64, recall (B, H) float64, density (H,) float32,
    flops)``: density per head over (batch, NB, NB) as ``mask.float().mean((0, 2, 3))``; flops
    those of one sparse call (``block_sparse_flops`` of the full lists, ``head_dim`` and
    ``seq_len`` given; ``block_size`` defaults to the config's).
    """
    B, H, nb = shape
    v0, v1 = video
    nv = v1 - v0
    bs = block_size or config.block_size
    L = seq_len if seq_len is not None else nb * bs
    dev_w = None
    budget = max(nv, 1)
    rule = config.head_rule if config.head_adaptive else None
    tiers = rule == "tiers" and config.sparsity > 0
    K = min(nv, _candidate_width(config, rule, budget, heads.total if heads is not None else H))
    Kg = budget if rule in ("mass", "top_p") else K
    text_cols = torch.ones(nb, dtype=torch.bool)
    text_cols[v0:v1] = False
    has_text = nv < nb
    cand = total = fixed = gains = base_recall = None
    per = max(1, chunk_elems // max(1, B * nb * nb))
    for h0 in range(0, H, per):
        h1 = min(H, h0 + per)
        W = mass_of(h0, h1)
        if cand is None:
            dev_w = W.device
            text_cols = text_cols.to(dev_w)
            cand = torch.empty(B, H, nv, K, dtype=torch.int16 if nb < 2**15 else torch.int32, device=dev_w)
            total = torch.empty(B, H, dtype=torch.float64, device=dev_w)
            fixed = torch.zeros(B, H, dtype=torch.float64, device=dev_w)
            gains = torch.zeros(B, H, Kg, dtype=torch.float64, device=dev_w)
            base_recall = torch.empty(B, H, dtype=torch.float32, device=dev_w)
        for j in range(h1 - h0):  # one head at a time: the sort's transients stay one head's
            h = h0 + j
            w = W[:, j:j + 1]
            total[:, h] = w.sum(dim=(-1, -2), dtype=torch.float64)[:, 0]
            if has_text:
                fixed[:, h] = total[:, h] - w[:, :, v0:v1, v0:v1].sum(dim=(-1, -2), dtype=torch.float64)[:, 0]
            if not nv:
                continue
            scores = w[:, :, v0:v1].masked_fill(text_cols, float("-inf"))  # as topk_blocks: text chosen apart
            vals, order = scores.sort(dim=-1, descending=True)
            del scores
            cand[:, h:h + 1] = (order[..., :K] - v0).to(cand.dtype)
            gains[:, h] = vals[..., :Kg].sum(dim=2, dtype=torch.float64)[:, 0]
            del vals
            if tiers:  # select_mask's base recall, computed the same way (float32 recall of the mask)
                k0 = int(keep_counts(torch.tensor(float(config.sparsity), dtype=torch.float64), budget))
                base = torch.zeros(B, 1, nb, nb, dtype=torch.bool, device=dev_w)
                base[:, :, text_cols] = True
                base[..., text_cols] = True
                base[:, :, v0:v1].scatter_(-1, order[..., :k0], True)
                base_recall[:, h] = recall(w, base)[:, 0]
                del base
            del order
        del W
    dev = dev_w
    s = torch.full((B, H), float(config.sparsity), dtype=torch.float64, device=dev)
    if tiers:
        if not nv:  # no video block: every block is text, kept whatever the tier
            base_recall.fill_(1.0)
        br = base_recall if heads is None else heads.gather(base_recall)
        s = head_sparsity(pair_mean(br, cfg_pairs), config.sparsity, config.recall_threshold)
        if heads is not None:
            s = s[:, heads.start:heads.start + heads.count]
    keep = keep_counts(s, budget)
    if rule in ("mass", "top_p"):
        g = gains / total.clamp_min(1e-30)[..., None]
        if rule == "mass":
            g = pair_mean(g if heads is None else heads.gather(g), cfg_pairs)
            keep = mass_counts(g, int(keep.max()))
            keep = keep if heads is None else keep[:, heads.start:heads.start + heads.count]
        else:
            keep = top_p_counts(pair_mean(fixed[..., None] / total.clamp_min(1e-30)[..., None] + g.cumsum(dim=-1),
                                          cfg_pairs), config.target_recall)
        s = 1.0 - keep.double() / budget
    kept_mass = fixed.clone()
    if nv:
        kept_mass += gains.cumsum(dim=-1).gather(-1, (keep.clamp(max=Kg) - 1)[..., None])[..., 0]
    rec = kept_mass / total.clamp_min(1e-30)
    # pack the kept blocks; density and FLOPs on the way
    bits = torch.empty(B, H, nv, -(-nv // 8), dtype=torch.uint8, device=dev)
    sizes = torch.full((nb,), float(bs), dtype=torch.float32, device=dev)
    sizes[-1] = L - (nb - 1) * bs
    text_col_tokens = float(sizes[text_cols].sum())
    video_rows = sizes[v0:v1].double()
    kept_pairs = torch.zeros(H, dtype=torch.float64, device=dev)
    flops_video = 0.0
    per = max(1, chunk_elems // max(1, B * nv * max(nv, 1)))
    for h0 in range(0, H if nv else 0, per):
        h1 = min(H, h0 + per)
        sel = torch.arange(K, device=dev) < keep[:, h0:h1, None, None]
        idx = torch.where(sel, cand[:, h0:h1].long(), nv)
        m = torch.zeros(B, h1 - h0, nv, nv + 1, dtype=torch.bool, device=dev).scatter_(-1, idx, True)[..., :nv]
        del sel, idx
        bits[:, h0:h1] = pack_block_mask(m)
        kept_pairs[h0:h1] = m.sum(dim=(0, 2, 3), dtype=torch.float64)
        kept_tokens = (m.float() @ sizes[v0:v1]).double()  # exact: integer sums below 2**24
        flops_video += float(((kept_tokens + text_col_tokens) * video_rows).sum())
        del m
    text_row_tokens = text_col_tokens  # the text blocks, as rows
    flops = 4.0 * head_dim * (flops_video + B * H * text_row_tokens * L)
    density = ((kept_pairs + B * (nb * nb - nv * nv)) / (B * nb * nb)).float()
    packed = PackedMask(bits, (v0, v1), nb, int(keep.max()) if nv else 0)
    return packed, s, rec, density, flops


def cache_bytes_per_layer(heads: int, tokens: int, block_size: int = 64, *, text_tokens: int = 0, batch: int = 1,
                          lse: bool = True) -> int:
    """The most bytes one layer's AdaSpa cache holds (per CFG-branch state), for every sparsity and
    ``head_rule``: the LSE (fp32, ``batch · heads · tokens``; ``lse=False`` when no cached-LSE
    search follows, e.g. ``lse_cache=False``: it is then dropped after each search) plus the packed
    video x video mask (:class:`PackedMask`: ``batch · heads · NV · ceil(NV / 8)`` bytes,
    ``NV = ceil(tokens / B) − ceil(text_tokens / B)``: at least that many blocks touch text, for a
    prefix or a suffix). ``tokens`` counts every token of the attention, text included; the text
    sink's blocks are not stored, so ``text_tokens=0`` (or ``text_sink=False``) gives the
    largest bound. Under context parallelism ``heads`` is one rank's."""
    for name, val in (("heads", heads), ("tokens", tokens), ("block_size", block_size), ("batch", batch)):
        if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
            raise ValueError(f"{name} must be a positive int, got {val!r}")
    if isinstance(text_tokens, bool) or not isinstance(text_tokens, int) or not 0 <= text_tokens <= tokens:
        raise ValueError(f"text_tokens must be an int in [0, tokens], got {text_tokens!r}")
    nb = -(-tokens // block_size)
    nv = nb - -(-text_tokens // block_size)
    return batch * heads * ((4 * tokens if lse else 0) + nv * -(-nv // 8))


# ------------------------------------------------------------------------------ the method
@dataclass
class AdaSpaCache:
    """One layer's state between steps (per CFG-branch state): what ``nbytes`` counts is bounded by
    :func:`cache_bytes_per_layer`."""

    lse: torch.Tensor | None = None  # (B,H,L) fp32, from the first search; dropped after the last search that reads it
    mask: PackedMask | None = None  # the searched mask, video x video bits (text rows / columns implied)
    flops: float = 0.0  # attention FLOPs of one sparse call with these masks (this rank's heads)
    kept: float = 0.0  # FLOPs of one sparse call / its dense FLOPs, over all heads (of all ranks)
    density: torch.Tensor | None = None  # (H,) mean kept fraction per (global) head
    recalls: list[float] = field(default_factory=list)  # mean recall at each search
    search_seconds: float = 0.0
    rank_density: list[float] | None = None  # under context parallelism: mean kept fraction per rank

    def nbytes(self) -> int:
        return ((self.lse.numel() * self.lse.element_size() if self.lse is not None else 0)
                + (self.mask.nbytes() if self.mask is not None else 0))

    def release(self) -> None:
        self.lse = self.mask = None


class AdaSpa:
    """Runs AdaSpa inside the runtime (same protocol as ``DiTFastAttn``)."""

    name = "adaspa"

    def __init__(self, config: AdaSpaConfig):
        self.config = config
        self.plan: list[str] | None = None
        self.last_use = -1  # the last step that reads the cache: free it after that
        self.last_research = -1  # the last step that reads the cached LSE: drop the LSE after that

    def check_num_layers(self, n: int):
        if self.config.dense_layers > n:
            raise ValueError(f"dense_layers: {self.config.dense_layers} dense layers asked, the transformer has {n} "
                             "attention layers")

    def check_num_steps(self, n: int):
        self.plan = self.config.schedule(n)
        self.last_use = max(i for i, w in enumerate(self.plan) if w != "dense")
        self.last_research = max((i for i, w in enumerate(self.plan) if w == "research"), default=-1)

    def begin_call(self, ctx):
        if self.plan is None:
            raise ValueError("num_inference_steps: AdaSpa needs the step count: apply it to a pipeline (its "
                             "scheduler tells), or ditaccel.apply(transformer, AdaSpaConfig(), num_inference_steps=N)")
        if ctx.step >= len(self.plan):
            raise ValueError(f"num_inference_steps: step {ctx.step} is past the {len(self.plan)} steps scheduled")

    def new_cache(self) -> AdaSpaCache:
        return AdaSpaCache()

    def attention(self, ctx, layer: int, call, cache: AdaSpaCache):
        what = self.plan[ctx.step]
        if what == "dense" or layer < self.config.dense_layers:
            return call.full(), 1.0, "dense"
        if what == DENSE_LSE:  # dense, keeping the LSE for the next step's search

            def dense_lse(q, k, v, key_padding_mask=None, heads=None):
                out, lse = attention_with_lse(q, k, v, key_padding_mask=key_padding_mask)
                cache.lse = lse.float()
                return out

            return call.core(dense_lse), 1.0, what
        stats = {}

        def core(q, k, v, key_padding_mask=None, heads=None):
            return self._core(what, ctx, q, k, v, key_padding_mask, cache, stats, heads)

        out = call.core(core)
        if ctx.step == self.last_use:  # the generation's last sparse step: free LSE and masks
            cache.release()
        elif what in ("search", "research") and ctx.step >= self.last_research:
            cache.lse = None  # no later search reads it
        return out, stats["fraction"], what

    def details(self, caches: dict[int, AdaSpaCache] | list[dict[int, AdaSpaCache]]) -> dict:
        """Per-layer density (mean, per head), recall at each search, search time; under context
        parallelism also each layer's work balance (max over mean of the per-rank kept fraction:
        the step waits for the busiest rank).

        ``caches``: one branch's per-layer caches, or a list of them, one per CFG branch state
        (pipelines such as Wan run cond and uncond as separate transformer calls, each with its own
        state and masks), in the order the branches first ran. Over several branches:
        ``density_per_layer`` / ``density_per_head`` are the means over the branches (a layer a
        branch never searched counts as dense), ``recall_per_search[layer]`` lists every branch's
        searches, branch after branch (``branches × searches`` entries), ``search_seconds`` is the
        sum, ``rank_density_per_layer`` the per-rank mean and ``rank_imbalance_per_layer``
        Σ_branch max_rank / Σ_branch mean_rank; ``branches`` gives their number (only present when
        there are several). One branch: exactly the single-branch output."""
        branches = [caches] if isinstance(caches, dict) else list(caches)
        layers = sorted(set().union(*branches))
        per_layer = [[b[i] for b in branches if i in b] for i in layers]

        def head_density(cs):
            if all(c.density is None for c in cs):
                return None
            ref = next(c.density for c in cs if c.density is not None)
            ds = [c.density if c.density is not None else torch.ones_like(ref) for c in cs]
            return ds[0].tolist() if len(ds) == 1 else torch.stack(ds).mean(0).tolist()

        def imbalance(cs):
            ranks = [c.rank_density for c in cs if c.rank_density]
            if not ranks:
                return 1.0
            if len(ranks) == 1:
                return max(ranks[0]) * len(ranks[0]) / max(sum(ranks[0]), 1e-30)
            return sum(max(r) for r in ranks) / max(sum(sum(r) / len(r) for r in ranks), 1e-30)

        def rank_mean(cs):
            ranks = [c.rank_density for c in cs if c.rank_density]
            if len(ranks) <= 1:
                return ranks[0] if ranks else None
            return [sum(col) / len(ranks) for col in zip(*ranks)]

        out = {
            "density_per_layer": [sum(float(c.density.mean()) if c.density is not None else 1.0 for c in cs) / len(cs)
                                  for cs in per_layer],
            "density_per_head": [head_density(cs) for cs in per_layer],
            "recall_per_search": [[r for c in cs for r in c.recalls] for cs in per_layer],
            "search_seconds": sum(c.search_seconds for cs in per_layer for c in cs),
        }
        if any(c.rank_density for cs in per_layer for c in cs):
            out["rank_density_per_layer"] = [rank_mean(cs) for cs in per_layer]
            out["rank_imbalance_per_layer"] = [imbalance(cs) for cs in per_layer]
        if len(branches) > 1:
            out["branches"] = len(branches)
        return out

    def _core(self, what, ctx, q, k, v, kpm, cache: AdaSpaCache, stats, heads=None):
        cfg = self.config
        B, H, L, D = q.shape
        fraction = 0.0
        if what in ("search", "research"):
            with torch.no_grad():
                out = self._search(what, ctx, q, k, v, kpm, cache, heads=heads)
            fraction += 1.5 if what == "search" else 0.5  # (full attention +) the QKᵀ-only mass pass
            if what == "search":
                stats["fraction"] = fraction
                return out
        if cache.mask is None:
            raise RuntimeError("adaspa: no searched mask for this layer in this generation")
        idx, counts, dense = cache.mask.kernel_lists()
        out = block_sparse_attention(q, k, v, idx, counts, block_size=cfg.block_size, key_padding_mask=kpm,
                                     validate=False, dense_query_blocks=dense)  # lists built by PackedMask
        del idx, counts
        stats["fraction"] = fraction + cache.kept
        return out

    def _search(self, what, ctx, q, k, v, kpm, cache: AdaSpaCache, heads=None):
        """Search the masks; at the first search also return the exact attention output.

        heads: the ``HeadShard`` of q/k/v under context parallelism (``None``: all heads). The
        LSE and masks cached here are this rank's heads; tiers, density and recall are global."""
        cfg = self.config
        t0 = time.perf_counter()
        out = None
        if what == "search" or cache.lse is None:
            out, lse = attention_with_lse(q, k, v, key_padding_mask=kpm)
            cache.lse = lse.float()
        cache.mask = None  # the old mask is not read again: free it before the mass pass
        B, H, L, D = q.shape
        nb = -(-L // cfg.block_size)
        video = (0, nb)
        if cfg.text_sink and ctx.text_tokens:
            video = video_blocks(L, cfg.block_size, ctx.text_tokens, ctx.text_position)
        cfg_pairs = ctx.cond is not None and B % 2 == 0  # [uncond; cond] halves of a CFG batch
        lse = cache.lse

        def mass_of(h0, h1):  # W of a chunk of heads (all of them unsliced when one chunk holds all)
            part = (lambda t: t) if (h0, h1) == (0, H) else (lambda t: t[:, h0:h1])
            return block_mass(part(q), part(k), part(lse), block_size=cfg.block_size, key_padding_mask=kpm)

        cache.mask, _, rec, density, cache.flops = search_mask(
            mass_of, (B, H, nb), cfg, video, heads, cfg_pairs, seq_len=L, head_dim=D)
        cache.kept = cache.flops / (4.0 * B * H * L * L * D)
        if heads is not None:
            density, rec = heads.gather(density[None])[0], heads.gather(rec)
            cache.rank_density = density.view(heads.ranks, heads.count).mean(dim=1).tolist()
            # every rank's heads have the same dense cost: the kept fraction of all heads is the mean
            kept = heads.gather(torch.tensor([[cache.kept]], dtype=torch.float64, device=q.device))
            cache.kept = float(kept.mean())
        cache.density = density.cpu()
        cache.recalls.append(float(rec.mean()))
        if q.is_cuda:
            torch.cuda.synchronize(q.device)
        cache.search_seconds += time.perf_counter() - t0
        return out
