"""Mixed plans: DiTFastAttn's sharing and AdaSpa's block sparsity, chosen per (layer, step).

A mixed plan (plan format version 2) is a DiTFastAttn plan whose entries may also be AdaSpa's
work on that layer at that step (``ditaccel.methods.adaspa.PLAN_ENTRIES``):

- ``"search"``: dense attention that also searches the layer's block mask (AdaSpa's first search:
  exact LSE, then the block mass; the output is the dense one). It also counts as a ``full`` step
  for DiTFastAttn: it refreshes the ``wars`` residual when a later ``wars`` step reads it (one
  window pass more, counted), and it may precede an ``ast`` step.
- ``"research"``: AdaSpa's cheaper re-search from the LSE cached at the layer's latest
  ``"search"``, then block-sparse attention with the new mask.
- ``"sparse"``: block-sparse attention with the layer's latest mask.

Every other entry runs through DiTFastAttn's own code (:func:`ditaccel.methods.ditfastattn.run_layer`);
the AdaSpa entries run through AdaSpa's own per-layer core (``AdaSpa._core``: the same search,
selection, head rules and kernels, the same FLOP accounting). Caches: a layer keeps DiTFastAttn's
cache and AdaSpa's side by side; the mask is dropped after its last ``"sparse"`` reader, the LSE
after its last ``"research"`` reader.

Like every method, this module never looks at a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..kernels.window import window_attention
from .adaspa import PLAN_ENTRIES, RESEARCH, SEARCH, SPARSE, AdaSpa, AdaSpaCache, AdaSpaConfig
from .ditfastattn import (FULL, DiTFastAttn, LayerCache, StepAction, _check_window, _tile_fraction,
                          layer_schedule)


@dataclass
class MixedCache(LayerCache):
    """One layer's caches in one CFG-branch state: DiTFastAttn's (``out``, ``res``, stored as its
    ``cache_dtype`` says) and AdaSpa's (``sparse``: LSE and packed mask, never quantized)."""

    sparse: AdaSpaCache = field(default_factory=AdaSpaCache)

    def nbytes(self) -> int:
        return super().nbytes() + self.sparse.nbytes()

    def release(self) -> None:
        super().release()
        self.sparse.release()


def sparse_releases(row: list[str]) -> list[tuple[bool, bool]]:
    """For each step of one layer's row: (drop the mask, drop the LSE) after it. A mask is read by
    the ``"sparse"`` steps up to the next ``"search"`` / ``"research"`` (which replace it); the LSE
    by the ``"research"`` steps up to the next ``"search"``."""
    out = []
    for s in range(len(row)):
        rest = row[s + 1:]
        nxt_mask = next((i for i, m in enumerate(rest) if m in (SEARCH, RESEARCH)), len(rest))
        nxt_lse = next((i for i, m in enumerate(rest) if m == SEARCH), len(rest))
        out.append((SPARSE not in rest[:nxt_mask], RESEARCH not in rest[:nxt_lse]))
    return out


def mixed_schedule(row: list[str], residual_refresh: str = "full") -> list[StepAction]:
    """DiTFastAttn's cache schedule of a mixed row: ``"search"`` is a ``full`` step to it (it may
    refresh the residual and feed an ``ast`` step), ``"research"`` / ``"sparse"`` compute their
    output like any non-``ast`` step."""
    as_full = [FULL if m == SEARCH else m for m in row]
    return [replace(a, method=m) for a, m in zip(layer_schedule(as_full, residual_refresh), row)]


class MixedPlan(DiTFastAttn):
    """Runs a mixed plan (``methods[layer][step]`` with DiTFastAttn's and AdaSpa's entries).

    ``adaspa`` gives AdaSpa's per-call settings (sparsity, block size, head rule, text sink...);
    its schedule fields (``warmup``, ``search_at``, ...) are not used: the plan is the schedule.

    Calibration (``ditaccel.calibrate`` with ``"sparse"`` among the candidates) sets
    ``search_full_steps``: every ``full`` step that writes the caches also runs as ``"search"``,
    so that a ``"sparse"`` trial at a later step has the mask of the layer's last full step (the
    step the written plan turns into ``"search"``).
    """

    name = "mixed"

    def __init__(self, methods: list[list[str]], window: str = "band1d", window_size: float = 0.25,
                 residual_refresh: str = "full", adaspa: AdaSpaConfig | None = None, cache_dtype: str = "model"):
        super().__init__(methods, window, window_size, residual_refresh, cache_dtype)
        self.adaspa = AdaSpa(adaspa if adaspa is not None else AdaSpaConfig())
        self.schedules = [mixed_schedule(row, residual_refresh) for row in methods]
        self.releases = [sparse_releases(row) for row in methods]
        self.search_full_steps = False

    def new_cache(self) -> MixedCache:
        return MixedCache(cache_dtype=self.cache_dtype)

    def action(self, layer: int, step: int) -> StepAction:
        if self.trial is not None and self.trial[layer] in PLAN_ENTRIES:
            return StepAction(self.trial[layer], keep_out=True)
        return super().action(layer, step)

    def attention(self, ctx, layer: int, call, cache: MixedCache):
        action = self.action(layer, ctx.step)
        m = action.method
        if m == FULL and self.search_full_steps and self.trial is not None and self.write:
            m = SEARCH  # calibration: every written full step leaves a mask for later sparse trials
        if m not in PLAN_ENTRIES:
            return super().attention(ctx, layer, call, cache)
        if m != SPARSE and not self.write:
            raise RuntimeError(f"{m}: a search writes the layer's cache; it cannot run as a trial")
        window = self.window(ctx.grid, ctx.text_tokens, ctx.text_position, ctx.frames)
        refresh = m == SEARCH and action.keep_res is not None and self.write
        stats, made = {}, {}

        def core(q, k, v, key_padding_mask=None, heads=None):
            o = self.adaspa._core(m, ctx, q, k, v, key_padding_mask, cache.sparse, stats, heads)
            if refresh:  # a search step is a full step for DiTFastAttn: the window residual R = O − W
                _check_window(window, q)
                made["res"] = o - window_attention(q, k, v, window, key_padding_mask=key_padding_mask)
            return o

        out = call.core(core)
        fraction = stats["fraction"] + (_tile_fraction(window) if refresh else 0.0)
        if self.write:
            if "res" in made:
                cache.store_res(made["res"], "all")
            cache.store_out(out if action.keep_out else None)
            if self.trial is not None:
                if m == SEARCH:
                    cache.sparse.lse = None  # calibration tries "sparse" only: no re-search reads it
            else:
                drop_mask, drop_lse = self.releases[layer][ctx.step]
                if drop_mask:
                    cache.sparse.mask = None
                if drop_lse:
                    cache.sparse.lse = None
        return out, fraction, m

    def details(self, caches) -> dict:
        """AdaSpa's details (density, recall per search, search time) of the layers' sparse caches."""
        branches = [caches] if isinstance(caches, dict) else list(caches)
        return self.adaspa.details([{i: c.sparse for i, c in b.items()} for b in branches])


__all__ = ["MixedCache", "MixedPlan", "mixed_schedule", "sparse_releases"]
