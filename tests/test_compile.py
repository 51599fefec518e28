"""ditaccel under ``torch.compile`` of the transformer (issue 16 §5): same outputs as eager, and no
recompilation per denoising step.

How it works (``ditaccel.runtime``): the hook's step / CFG tracking and every ditaccel attention
processor call are ``torch.compiler.disable``-d, so the compiled graphs never read the step; the
rest of the transformer is compiled once. Recompilations are counted from Dynamo's "recompiles"
log (one message per recompilation) and compiled graphs from ``counters["stats"]["unique_graphs"]``.

Exactness: with ``backend="aot_eager"`` (Dynamo + AOTAutograd, eager kernels) the compiled
transformer computes the same float ops in the same order as eager, so outputs are compared with
``torch.equal``: a wrong method, step or CFG branch anywhere would show (on the tiny PixArt one
changed (layer, step) moves the latents by ~1e-3). Those tests check the decisions; Inductor
changes only the kernels inside the same graphs. Inductor fuses and reorders float32 reductions
(norms, GELU, the cross-attention's SDPA): its test allows 2e-6 of the latents' largest magnitude
(the random tiny PixArt's latents reach ~770: 1.5e-3), about 4x what Inductor itself makes on the
*dense* transformer (3.4e-4 measured, 2026-12-03; with the plan 3.7e-4).
"""

import contextlib
import logging

import pytest
import torch
from torch._dynamo.utils import counters

import ditaccel
from ditaccel.kernels import ops
from ditaccel.models import adapter_for
from ditaccel.plan import Plan
from ditaccel.testbed import tiny_pixart_sigma_pipeline
from ditaccel.testbed.video import tiny_wan_pipeline

#: per layer, 6 steps: every DiTFastAttn method, in different orders per layer
MIXED = [["full", "wars", "wars", "ast", "ast", "wars"],
         ["full", "asc", "wars+asc", "ast", "full", "asc"],
         ["full", "full", "ast", "ast", "wars", "wars+asc"]]
#: recompilations a fresh compile of the tiny PixArt makes with ditaccel applied: the graph breaks
#: split each block's frame, and diffusers' first block gets a differently strided input (from the
#: patch embedding) than the others (Dynamo: "hidden_states stride mismatch"), once for the frame
#: before the attention and once for the frame after it; none comes from ditaccel
PIXART_RECOMPILES = 2


class _Recompiles(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def watch():
    """Count what Dynamo does inside the block: ``w.recompiles`` (messages), ``w.graphs``,
    ``w.breaks`` (graph-break reasons, first line)."""
    counters.clear()
    handler = _Recompiles()
    logger = logging.getLogger("torch._dynamo.guards.__recompiles")
    torch._logging.set_logs(recompiles=True)
    logger.addHandler(handler)
    logger.propagate = False  # counted here, not printed

    class W:
        pass

    w = W()
    try:
        yield w
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
        torch._logging.set_logs()
        w.recompiles = handler.messages
        w.graphs = counters["stats"]["unique_graphs"]
        w.breaks = {k.split("\n")[1].strip() if "\n" in k else k: v for k, v in counters["graph_break"].items()}


def _only_ditaccel_breaks(w):
    """Every graph break is at a ditaccel function kept out of the graph (no ``.item()``, no
    contextvar, no Triton launch)."""
    bad = {k: v for k, v in w.breaks.items() if "torch.compiler.disable" not in k}
    assert not bad, bad
    assert any("DiTAccelAttnProcessor._run" in k for k in w.breaks)


def _pixart():
    return tiny_pixart_sigma_pipeline(sample_size=16, num_layers=3)


def _pixart_latents(pipe, steps):
    return pipe(prompt=["a red circle", "a blue square"], num_inference_steps=steps,
                generator=torch.Generator().manual_seed(0), output_type="latent", clean_caption=False,
                max_sequence_length=16, use_resolution_binning=False).images


def _plan(pipe, steps, rows=MIXED):
    return Plan.from_methods(pipe, [row * (steps // 6) for row in rows], cfg=True)


def _eager(pipe, plan_or_config, steps, call):
    ditaccel.apply(pipe, plan_or_config)
    try:
        return call(pipe, steps), ditaccel.stats(pipe).method_counts
    finally:
        ditaccel.remove(pipe)


def test_ditfastattn_compiled_equals_eager_and_never_recompiles_per_step():
    """PixArt with a plan using full / wars / ast / asc / wars+asc: the compiled transformer gives the
    eager latents bit for bit at 6 and at 12 steps; a fresh compile recompiles as often, into as many
    graphs, for the mixed plan as for an all-full one (the methods add nothing); after one 6-step
    generation, a 12-step one (steps 6..11 never seen) compiles nothing at all."""
    pipe = _pixart()
    n = len(adapter_for(pipe.transformer).attention_modules(pipe.transformer))
    assert n == len(MIXED)
    full = [["full"] * 6] * n
    ref6, counts6 = _eager(pipe, _plan(pipe, 6), 6, _pixart_latents)
    ref12, counts12 = _eager(pipe, _plan(pipe, 12), 12, _pixart_latents)
    assert counts6.keys() == {"full", "wars", "ast", "asc", "wars+asc"}

    pipe.transformer.compile(backend="aot_eager")  # in place; ditaccel applied afterwards below
    runs = {}
    for name, steps, rows in (("full6", 6, full), ("mixed6", 6, MIXED)):
        torch._dynamo.reset()
        ditaccel.apply(pipe, _plan(pipe, steps, rows))
        try:
            with watch() as w:
                out = _pixart_latents(pipe, steps)
            runs[name] = (w, out, ditaccel.stats(pipe).method_counts)
        finally:
            ditaccel.remove(pipe)
        _only_ditaccel_breaks(w)
    assert torch.equal(runs["mixed6"][1], ref6) and runs["mixed6"][2] == counts6
    n_recompiles = {k: len(w.recompiles) for k, (w, _, _) in runs.items()}
    assert set(n_recompiles.values()) == {PIXART_RECOMPILES}, (n_recompiles, runs["mixed6"][0].recompiles)
    assert len({w.graphs for w, _, _ in runs.values()}) == 1

    # warm (mixed6 just ran): 12 steps, steps 6..11 never seen, compile nothing
    ditaccel.apply(pipe, _plan(pipe, 12))
    try:
        with watch() as w:
            out = _pixart_latents(pipe, 12)
        assert ditaccel.stats(pipe).method_counts == counts12
    finally:
        ditaccel.remove(pipe)
    assert torch.equal(out, ref12)
    assert w.recompiles == [] and w.graphs == 0, w.recompiles


def test_ditfastattn_inductor_matches_eager():
    """The same plan with Inductor (the default backend): latents within float32 reordering noise of
    eager (module docstring), and a second generation with another step count compiles nothing."""
    pipe = _pixart()
    ref6, _ = _eager(pipe, _plan(pipe, 6), 6, _pixart_latents)
    ref12, _ = _eager(pipe, _plan(pipe, 12), 12, _pixart_latents)
    ditaccel.apply(pipe, _plan(pipe, 6))
    pipe.transformer.compile()  # applied, then compiled: the order of issue 16's report
    torch._dynamo.reset()
    try:
        with watch() as w6:
            out6 = _pixart_latents(pipe, 6)
    finally:
        ditaccel.remove(pipe)
    ditaccel.apply(pipe, _plan(pipe, 12))
    try:
        with watch() as w12:
            out12 = _pixart_latents(pipe, 12)
    finally:
        ditaccel.remove(pipe)
    torch.testing.assert_close(out6, ref6, rtol=0, atol=2e-6 * float(ref6.abs().max()))
    torch.testing.assert_close(out12, ref12, rtol=0, atol=2e-6 * float(ref12.abs().max()))
    assert len(w6.recompiles) == PIXART_RECOMPILES and w6.graphs > 0
    assert w12.recompiles == [] and w12.graphs == 0


def _wan_latents(pipe, steps):
    return pipe(prompt="a red cat running in the snow", num_frames=17, height=64, width=64,
                num_inference_steps=steps, guidance_scale=5.0, generator=torch.Generator().manual_seed(0),
                output_type="latent").frames


def test_adaspa_compiled_equals_eager_and_never_recompiles_per_step():
    """AdaSpa on a Wan pipeline (CFG as separate cond / uncond calls, each branch its own state):
    compiled first, applied afterwards (``pipe.transformer = torch.compile(...)``); dense warm-up,
    first search, sparse steps and the cached-LSE re-search give the eager latents bit for bit at 6
    and 12 steps (searches at steps 1, 4 and 2, 7), with no recompilation at all, and the 12-step
    generation after the 6-step one compiles nothing."""
    pipe = tiny_wan_pipeline()
    cfg = ditaccel.AdaSpaConfig(sparsity=0.5, block_size=16)
    ref6, counts6 = _eager(pipe, cfg, 6, _wan_latents)
    ref12, counts12 = _eager(pipe, cfg, 12, _wan_latents)
    assert counts6 == {"dense": 4, "search": 4, "sparse": 12, "research": 4}

    pipe.transformer = torch.compile(pipe.transformer, backend="aot_eager")
    torch._dynamo.reset()
    ditaccel.apply(pipe, cfg)  # on the compiled module's original
    try:
        with watch() as w6:
            out6 = _wan_latents(pipe, 6)
        st6 = ditaccel.stats(pipe)
        with watch() as w12:
            out12 = _wan_latents(pipe, 12)
        st12 = ditaccel.stats(pipe)
    finally:
        ditaccel.remove(pipe)
    assert ditaccel.runtime.get_runtime(pipe) is None
    assert torch.equal(out6, ref6) and st6.method_counts == counts6
    assert torch.equal(out12, ref12) and st12.method_counts == counts12
    _only_ditaccel_breaks(w6)
    assert w6.recompiles == [] and w6.graphs > 0, w6.recompiles
    assert w12.recompiles == [] and w12.graphs == 0, w12.recompiles


def test_kernel_ops_compile_fullgraph(monkeypatch):
    """``ditaccel.kernels.ops``: each kernel as one opaque custom operator; a function calling all five
    compiles with ``fullgraph=True`` (no graph break) and returns exactly the kernels' results, through
    their Triton kernels (CPU interpreter); ``torch.library.opcheck`` checks each fake implementation
    against the real one (shapes, dtypes, strides, dynamic shapes) on the PyTorch paths."""
    from ditaccel.kernels.block_mass import attention_with_lse, block_mass
    from ditaccel.kernels.block_sparse import block_sparse_attention, mask_to_indices
    from ditaccel.kernels.window import WindowSpec, window_attention
    from ditaccel.kernels.window_residual import full_and_window_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 64, 16, generator=g) for _ in range(3))
    spec = WindowSpec.neighborhood((8, 8), (2, 3))
    blocks = torch.rand(2, 2, 4, 4, generator=g) < 0.5
    blocks[..., 0] = True
    idx, cnt = mask_to_indices(blocks)
    kpm = torch.ones(2, 64, dtype=torch.bool)
    kpm[1, -5:] = False

    def run(m, w, s, a, bm):
        out_w = w(q, k, v, spec, backend="triton", block_size=16)
        full, win = m(q, k, v, spec, block_size=16)
        sparse, sparse_lse = s(q, k, v, idx, cnt, block_size=16, key_padding_mask=kpm, return_lse=True)
        dense, lse = a(q, k, v, key_padding_mask=kpm)
        return out_w, full, win, sparse, sparse_lse, dense, lse, bm(q, k, lse, block_size=16, key_padding_mask=kpm)

    sp = ops.spec_to_ints(spec)
    assert ops.spec_from_ints(sp) == spec
    lse = attention_with_lse(q, k, v, key_padding_mask=kpm)[1]
    for name, args in [  # the PyTorch paths (opcheck runs each op several times)
        ("window_attention", (q, k, v, sp, None, "auto", None, 16)),
        ("full_and_window_attention", (q, k, v, sp, None, "auto", 16)),
        ("block_sparse_attention", (q, k, v, idx, cnt, 16, None, kpm, True, "auto", True, None, [0, 1])),
        ("attention_with_lse", (q, k, v, None, kpm, "auto")),
        ("block_mass", (q, k, lse, 16, None, kpm, "auto")),
    ]:
        torch.library.opcheck(getattr(torch.ops.ditaccel, name).default, args)

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the Triton kernels, in the CPU interpreter
    ref = run(full_and_window_attention, window_attention, block_sparse_attention, attention_with_lse, block_mass)
    torch._dynamo.reset()
    compiled = torch.compile(lambda: run(ops.full_and_window_attention, ops.window_attention,
                                         ops.block_sparse_attention, ops.attention_with_lse, ops.block_mass),
                             fullgraph=True, backend="aot_eager")
    for a, b in zip(compiled(), ref, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("broken", ["begin_call", "_run"])
def test_the_recompile_check_bites(broken, monkeypatch):
    """With the hook's step tracking (``begin_call``) or the processor (``_run``) traced again, as
    before this fix, the warm generation with another step count does recompile: the count above
    would see it."""
    from ditaccel.processors import DiTAccelAttnProcessor
    from ditaccel.runtime import Runtime

    owner = Runtime if broken == "begin_call" else DiTAccelAttnProcessor
    monkeypatch.setattr(owner, broken, getattr(owner, broken).__wrapped__)  # torch.compiler.disable removed
    pipe = _pixart()
    pipe.transformer.compile(backend="eager")
    torch._dynamo.reset()
    for steps in (2, 3):  # the simplest plan, all full: only the step count changes
        ditaccel.apply(pipe, Plan.from_methods(pipe, [["full"] * steps] * 3, cfg=True))
        try:
            with watch() as w:
                _pixart_latents(pipe, steps)
        finally:
            ditaccel.remove(pipe)
    assert w.recompiles
