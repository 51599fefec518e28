"""The benchmark harness (``ditaccel bench``): Markdown sections, the timing helper's check and
input rotation, the sparsity masks, the plot, and ``bench all --dry-run`` end to end. CPU only;
no test asserts a time."""

import dataclasses
import inspect
import json
import os
import statistics

import pytest
import torch
import torch.nn.functional as F

from ditaccel import bench, cli
from ditaccel.bench import CASES, CheckFailed, random_block_mask, time_fn
from ditaccel.bench import cases, kernel_cases
from ditaccel.bench.harness import (attention_rows_reference, block_mass_rows_reference, rotation_copies,
                                    rows_reference, sample_rows)
from ditaccel.bench.report import device_slug, missing_matplotlib, plot_sparsity, replace_section, update_markdown

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------ Markdown sections
def test_section_is_appended_after_a_blank_line():
    text = "# Benchmarks\n\nhand-written prose\n"
    assert replace_section(text, "case-a", "| a |\n|---|\n") == (
        "# Benchmarks\n\nhand-written prose\n\n"
        "<!-- bench:case-a:start -->\n| a |\n|---|\n<!-- bench:case-a:end -->\n"
    )


def test_section_is_replaced_in_place_and_nothing_else_changes():
    text = ("# Benchmarks\n\nintro\n\n"
            "<!-- bench:case-a:start -->\nold table\n<!-- bench:case-a:end -->\n\n"
            "middle prose\n\n"
            "<!-- bench:case-b:start -->\nb table\n<!-- bench:case-b:end -->\n\ntail")
    assert replace_section(text, "case-a", "new\ntable") == (
        "# Benchmarks\n\nintro\n\n"
        "<!-- bench:case-a:start -->\nnew\ntable\n<!-- bench:case-a:end -->\n\n"
        "middle prose\n\n"
        "<!-- bench:case-b:start -->\nb table\n<!-- bench:case-b:end -->\n\ntail"
    )


def test_section_append_to_empty_text_and_to_text_without_final_newline():
    assert replace_section("", "x", "body") == "<!-- bench:x:start -->\nbody\n<!-- bench:x:end -->\n"
    assert replace_section("prose", "x", "body") == "prose\n\n<!-- bench:x:start -->\nbody\n<!-- bench:x:end -->\n"


@pytest.mark.parametrize("text", [
    "<!-- bench:x:start -->\nlost end\n",
    "<!-- bench:x:end -->\n<!-- bench:x:start -->\n",
    "<!-- bench:x:start -->\n<!-- bench:x:end -->\n<!-- bench:x:start -->\n<!-- bench:x:end -->\n",
])
def test_broken_markers_are_refused(text):
    with pytest.raises(ValueError, match="section 'x'"):
        replace_section(text, "x", "body")


def test_bad_section_name_is_refused():
    with pytest.raises(ValueError, match="section name"):
        replace_section("", "Has Space", "body")


def test_update_markdown_creates_then_replaces(tmp_path):
    path = tmp_path / "sub" / "B.md"
    update_markdown(path, "one", "first")
    update_markdown(path, "two", "second")
    update_markdown(path, "one", "again")
    assert path.read_text() == ("<!-- bench:one:start -->\nagain\n<!-- bench:one:end -->\n\n"
                                "<!-- bench:two:start -->\nsecond\n<!-- bench:two:end -->\n")


@pytest.mark.parametrize("name, slug", [("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"),
                                        ("NVIDIA GeForce RTX 4090", "rtx-4090"), ("cpu", "cpu")])
def test_device_slug(name, slug):
    assert device_slug(name) == slug


# ------------------------------------------------------------------ timing helper
def _qkv(L=16, D=8, H=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, H, L, D, generator=g) for _ in range(3))


def test_rotation_copies_exceed_twice_the_cache_within_budget_and_runs():
    assert rotation_copies(set_bytes=1000, cache=4000, budget=10**9, limit=100) == 8  # 8 x 1000 >= 2 x 4000
    assert rotation_copies(set_bytes=1000, cache=4000, budget=3000, limit=100) == 4  # 3 extra copies fit
    assert rotation_copies(set_bytes=1000, cache=4000, budget=10**9, limit=5) == 5  # no more copies than runs
    assert rotation_copies(set_bytes=10**9, cache=4000, budget=0, limit=20) == 1  # big inputs: no copy


def test_time_fn_cycles_through_every_input_copy():
    q, k, v = _qkv()
    seen = []

    def kernel(q, k, v):
        seen.append(q.data_ptr())
        return F.scaled_dot_product_attention(q, k, v)

    set_bytes = 3 * q.numel() * q.element_size()
    t = time_fn(kernel, (q, k, v), device="cpu", reference=rows_reference(), repeats=9, warmup=2,
                cache=3 * set_bytes, budget=10**9)
    assert t.copies == 6  # 6 sets = 2 x cache
    assert len(set(seen)) == 6 and q.data_ptr() in seen
    assert len(seen) == 1 + 2 + 9  # check run, warm-up, timed runs
    timed = seen[3:]
    assert [timed.index(p) for p in dict.fromkeys(timed)] == list(range(6))  # timed runs take copies in turn
    assert len(t.times_ms) == 9 and t.median_ms == statistics.median(t.times_ms)
    assert t.warmup == 2 and t.checked_rows == 16
    assert t.summary() == {"repeats": 9, "warmup": 2, "input_copies": 6, "checked_rows": 16}


def test_time_fn_refuses_a_wrong_kernel_before_timing():
    calls = []

    def wrong(q, k, v):
        calls.append(1)
        out = F.scaled_dot_product_attention(q, k, v)
        out[:, :, -1] += 0.5  # only the last row is wrong
        return out

    with pytest.raises(CheckFailed, match="max \\|out - reference\\|"):
        time_fn(wrong, _qkv(L=300), device="cpu", reference=rows_reference(), check_rows=32, check_group=16)
    assert len(calls) == 1  # nothing was timed


def test_time_fn_checks_tuples_and_refuses_nan():
    q, k, v = _qkv()

    def with_lse(q, k, v):
        out = F.scaled_dot_product_attention(q, k, v)
        lse = torch.logsumexp(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
        return out, lse

    def reference(rows, q, k, v):
        return attention_rows_reference(q, k, v, rows, return_lse=True)

    assert time_fn(with_lse, (q, k, v), device="cpu", reference=reference, repeats=1).checked_rows == 16
    with pytest.raises(CheckFailed, match="output 1"):
        time_fn(lambda q, k, v: (with_lse(q, k, v)[0], torch.full((1, 1, 16), float("nan"))), (q, k, v),
                device="cpu", reference=reference, repeats=1)


def test_time_fn_bad_parameters_name_themselves():
    with pytest.raises(ValueError, match="repeats"):
        time_fn(lambda q: q, (torch.zeros(1),), device="cpu", repeats=0)
    with pytest.raises(ValueError, match="warmup"):
        time_fn(lambda q: q, (torch.zeros(1),), device="cpu", warmup=-1)


def test_sample_rows_takes_whole_groups_and_always_the_ragged_last_one():
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample_rows(20, 16, 64, g), torch.arange(20))
    rows = sample_rows(1000, 16, 64, g)
    assert rows.numel() == 3 * 16 + 8  # 3 random full groups + the last group of 1000 - 992 = 8 rows
    assert rows[-8:].tolist() == list(range(992, 1000))
    groups = rows // 16
    assert all(int((groups == gr).sum()) == (8 if gr == 62 else 16) for gr in groups.unique().tolist())


def test_row_references_match_the_full_references():
    from ditaccel.kernels.block_mass import block_mass_reference
    from ditaccel.kernels.block_sparse import block_sparse_attention_reference, mask_to_indices

    q, k, v = _qkv(L=40, H=2)
    rows = torch.tensor([0, 17, 39])
    mask = random_block_mask(1, 2, 3, 0.5, generator=torch.Generator().manual_seed(1))
    idx, cnt = mask_to_indices(mask)
    full, lse = block_sparse_attention_reference(q, k, v, idx, cnt, block_size=16)
    ours = rows_reference(kernel_cases._block_allowed(mask, 16, 40))(rows, q, k, v)
    torch.testing.assert_close(ours, full[:, :, rows].float(), rtol=1e-5, atol=1e-6)
    _, dense_lse = attention_rows_reference(q, k, v, torch.arange(40), return_lse=True)
    blocks = torch.tensor([0, 2])  # the last block is ragged (40 = 2 x 16 + 8)
    W = block_mass_rows_reference(q, k, dense_lse, blocks, block_size=16)
    torch.testing.assert_close(W, block_mass_reference(q, k, dense_lse, block_size=16)[:, :, blocks])


# ------------------------------------------------------------------ sparsity masks and plot
def test_random_block_mask_kept_fraction_diagonal_and_per_head_patterns():
    mask = random_block_mask(2, 4, 32, 0.3, generator=torch.Generator().manual_seed(0))
    assert mask.shape == (2, 4, 32, 32) and mask.dtype == torch.bool
    assert (mask.sum(-1) == round(0.3 * 32)).all()
    assert abs(float(mask.float().mean()) - 0.3) <= 0.5 / 32
    assert mask.diagonal(dim1=-2, dim2=-1).all()
    flat = mask.flatten(0, 1)
    assert all(not torch.equal(flat[i], flat[j]) for i in range(8) for j in range(i + 1, 8))
    assert random_block_mask(1, 1, 8, 1.0).all()
    assert torch.equal(random_block_mask(1, 1, 8, 0.01)[0, 0], torch.eye(8, dtype=torch.bool))


@pytest.mark.parametrize("kept", [0, 1.5, -0.1, True])
def test_random_block_mask_refuses_bad_kept(kept):
    with pytest.raises(ValueError, match="kept"):
        random_block_mask(1, 1, 8, kept)


def test_sparsity_plot_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [{"kept": kept, "ours_speedup": 0.9 / kept, "flex_speedup": 0.6 / kept} for kept in (1.0, 0.5, 0.1)]
    result = {"rows": rows, "ours_backend": "triton", "batch": 1, "heads": 2, "tokens": 128, "head_dim": 16,
              "dtype": "float32", "block_size": 16, "device": "cpu", "date": "2026-01-01"}
    path = tmp_path / "plots" / "s.png"
    plot_sparsity(result, path)
    assert path.read_bytes()[:8] == PNG_SIGNATURE


# ------------------------------------------------------------------ registry and command line
def test_registry_entries_are_consistent():
    names = [c.name for c in CASES]
    assert len(names) == len(set(names))
    for case in CASES:
        replace_section("", case.name, "x")  # a valid marker name
        params = inspect.signature(case.run).parameters
        assert set(case.kwargs) | set(case.dry_kwargs) <= set(params), case.name
        assert case.arguments("cuda", dry_run=True)["device"] == "cpu"


def test_bench_all_dry_run_end_to_end(tmp_path, capsys):
    md = tmp_path / "B.md"
    md.write_text("# Benchmarks\n\nhand-written, kept as is\n")
    before = os.environ.get("TRITON_INTERPRET")
    assert cli.main(["bench", "all", "--dry-run", "--out-md", str(md)]) == 0
    assert os.environ.get("TRITON_INTERPRET") == before
    out = capsys.readouterr().out
    text = md.read_text()
    assert text.startswith("# Benchmarks\n\nhand-written, kept as is\n\n<!-- bench:")
    results = tmp_path / "results"
    for case in CASES:
        assert text.count(f"<!-- bench:{case.name}:start -->") == 1
        assert text.count(f"<!-- bench:{case.name}:end -->") == 1
        assert f"== {case.name}:" in out
        (path,) = results.glob(f"*-cpu-{case.name}.json")
        payload = json.loads(path.read_text())
        assert payload["case"] == case.name and payload["dry_run"] is True
        assert payload["environment"]["device"] == "cpu" and payload["kwargs"]["device"] == "cpu"
        assert f"`results/{path.name}`" in text
    assert "**Dry run**" in text and "| kept (target) |" in text
    if missing_matplotlib() is None:
        (png,) = results.glob("*-cpu-sparsity.png")
        assert png.read_bytes()[:8] == PNG_SIGNATURE

    # a second run of one case replaces its section in place; the rest of the file stays as it was
    start = text.index("<!-- bench:attention-cpu:start -->")
    end = text.index("<!-- bench:attention-cpu:end -->")
    assert bench.main(["all", "--dry-run", "--only", "attention-cpu", "--out-md", str(md)]) == 0
    again = md.read_text()
    new_end = again.index("<!-- bench:attention-cpu:end -->")
    assert again[:start] == text[:start] and again[new_end:] == text[end:]


def test_dry_run_falls_back_to_the_references_where_triton_cannot_interpret(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cases, "_interpreter_problem", lambda: "no interpreter in this test")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    seen = []
    real = bench.bench_sparsity

    def spy(**kw):
        seen.append(os.environ.get("TRITON_INTERPRET"))
        return real(**kw)

    monkeypatch.setattr(cases, "CASES", [dataclasses.replace(c, run=spy) for c in CASES if c.name == "sparsity"])
    assert bench.main(["all", "--dry-run", "--out-md", str(tmp_path / "B.md")]) == 0
    assert seen == [None]
    assert "no interpreter in this test: the dry run uses the PyTorch reference kernels" in capsys.readouterr().err
    assert "ours (`auto`)" in (tmp_path / "B.md").read_text()


@pytest.mark.parametrize("argv, message", [
    (["sparsity", "--only", "sparsity"], "--only: not an option of `ditaccel bench sparsity`"),
    (["step", "--kept", "0.5"], "--kept: not an option of `ditaccel bench step`"),
    (["all", "--dry-run", "--only", "sparsity,nope"], "--only: unknown case(s) 'nope'"),
    (["all", "--dry-run", "--device", "cuda"], "--device: 'cuda': --dry-run runs on the CPU"),
    (["all", "--device", "cpu", "--only", "sparsity"], "case(s) sparsity need a CUDA GPU"),
    (["all", "--dry-run", "--repeats", "3"], "--repeats: not an option of `ditaccel bench all`"),
])
def test_cli_misuse_is_one_clear_line_exit_2(argv, message, capsys):
    assert cli.main(["bench", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ditaccel: error: ") and message in err


@pytest.mark.parametrize("argv, field", [(["sparsity", "--kept", "0,0.5"], "--kept"),
                                         (["sparsity", "--repeats", "0"], "--repeats")])
def test_cli_bad_values_exit_2(argv, field, capsys):
    assert bench.main(argv) == 2  # python -m ditaccel.bench: the same parser and errors as `ditaccel bench`
    err = capsys.readouterr().err
    assert err.startswith(f"ditaccel: error: {field}: ") and err.count("\n") == 1


def test_attention_share_skips_exactly_the_self_attention_cores(monkeypatch):
    """The no-core step of ``bench_attention_share`` is the model with attention replaced by ``v``:
    the same output as patching SDPA itself to return ``v`` (the tiny DiT has self-attention only)."""
    from ditaccel import stats
    from ditaccel.bench.model_cases import _NoCore
    from ditaccel.runtime import install, remove
    from ditaccel.testbed import tiny_dit_pipeline

    tr = tiny_dit_pipeline(sample_size=8, num_layers=2).transformer
    x = torch.randn(2, tr.config.in_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    kw = dict(hidden_states=x, timestep=torch.tensor([500, 500]), class_labels=torch.tensor([1, 2]))
    with torch.no_grad():
        dense = tr(**kw).sample
        install(tr, _NoCore())
        try:
            skipped = tr(**kw).sample
            assert stats(tr).attention_flops_ratio == 0.0
        finally:
            remove(tr)
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", lambda q, k, v, *a, **k2: v)
        patched = tr(**kw).sample
    assert not torch.equal(dense, skipped)
    torch.testing.assert_close(skipped, patched, rtol=0, atol=0)


def test_video_ditfastattn_case_composes_the_50_step_plan_from_its_steps():
    """The full-size video DiTFastAttn case (issue 18 §5) at toy size: one timed step per kind, CFG as two
    calls on Wan, in plans that each fit in memory; attention FLOPs per step from the runtime's stats, and
    the 50-step total composed from them, its memory the plan with the same caches."""
    from ditaccel.bench.model_cases import TOY_WAN, VIDEO_SETUPS, bench_video_ditfastattn, video_plan_50

    plan = video_plan_50(("wars", "ast"))
    assert len(plan) == 50 and plan[0] == plan[10] == "full" and plan.count("full") == 5
    assert plan[1:5] == ["wars", "ast", "wars", "ast"] and plan[11] == "wars"
    setup = VIDEO_SETUPS["wan2.1-14b-720p"]
    r = bench_video_ditfastattn("wan2.1-14b-720p", device="cpu", dtype=torch.float32, latent=(2, 8, 8), text_tokens=8,
                                warmup=False, overrides=TOY_WAN)
    steps = {s["kind"]: s for s in r["steps"]}
    assert set(steps) == {"full", "wars", "asc", "wars+asc", "ast"}
    assert [g["kinds"] for g in r["plans"]] == [list(g) for g in setup.groups]
    # full ran in three plans: its time is their median
    fulls = [g["step_ms"][g["kinds"].index("full")] for g in r["plans"] if "full" in g["kinds"]]
    assert len(fulls) == 3 and steps["full"]["ms"] == pytest.approx(sorted(fulls)[1])
    # asc: the uncond call reuses the cond call's attention (half a dense step); ast: nothing computed
    assert steps["asc"]["attention_flops"] == pytest.approx(0.5)
    assert steps["ast"]["attention_flops"] == 0.0
    assert steps["wars+asc"]["attention_flops"] == pytest.approx(steps["wars"]["attention_flops"] / 2)
    assert steps["full"]["attention_flops"] > 1.0  # dense plus the residual's window pass
    wan50 = video_plan_50(setup.cycle)
    assert r["plan_50"] == {"full": 5, "wars+asc": 45}
    assert r["total_50_ms"] == pytest.approx(sum(steps[k]["ms"] for k in wan50))
    assert r["attention_flops_50"] == pytest.approx(sum(steps[k]["attention_flops"] for k in wan50) / 50)
    assert r["speedup_50"] == pytest.approx(50 * r["dense_step_ms"] / r["total_50_ms"])
    assert r["plan_peak_bytes"] == r["plans"][-1]["peak_bytes"]  # the full → wars+asc plan


def test_calibrate_case_counts_passes_and_stops_greedy_at_its_budget():
    """The full-size calibration case at toy size (2 layers, 4 steps): transformer passes within the bounds
    of its docstring, and a search past its budget stops after 2 decided steps with an estimate for the rest."""
    from ditaccel.bench.model_cases import TOY_PIXART, bench_calibrate
    from ditaccel.bench.report import markdown_calibrate

    r = bench_calibrate(steps=4, text_tokens=8, dtype=torch.float32, device="cpu", greedy_budget_s=0.0,
                        overrides={**TOY_PIXART, "num_layers": 2})
    n, c = 2, 4  # layers, candidates (CFG: all four)
    assert r["layers"] == n and r["tokens"] == 64 and r["batch"] == 2 and r["delta"] == pytest.approx(0.1)
    assert r["dense"]["passes"] == 4
    local, greedy = r["searches"]
    # local: step 0 reference + written; then reference, 1..ceil(log2(n*c + 1)) = 4 trials, written
    assert local["completed"] and local["steps_decided"] == 4 and 2 + 3 * 3 <= local["passes"] <= 2 + 3 * 6
    assert local["attention_flops_ratio"] > 0 and sum(local["plan_counts"].values()) == n * r["steps"]
    # greedy, budget 0: stopped once 2 steps were decided (step 1: reference, n..n*c trials, written)
    assert not greedy["completed"] and greedy["steps_decided"] == 2 and len(greedy["step_seconds"]) == 2
    assert 2 + n + 2 <= greedy["passes"] <= 2 + n * c + 2
    assert greedy["estimated_seconds"] == pytest.approx(greedy["seconds"] + 2 * greedy["step_seconds"][1])
    assert "attention_flops_ratio" not in greedy
    table = markdown_calibrate(r)
    assert "| `greedy` calibration | 2 of 4: stopped at the 0 s budget |" in table and "(estimated)" in table


def test_video_ditfastattn_case_with_float8_caches_runs_the_plan_that_fits_only_with_them(monkeypatch):
    """float8 caches: Wan's wars+asc residuals and ast outputs of both branches together (the plan that
    needs twice the bytes in bf16), and the plans really store float8: the same plan in float32 holds
    three (layer, branch) tensors at its peak (two residuals and an output, or the CFG peer slot), in
    float8 the two cached ones take a byte per element (plus scales), the peer slot stays float32."""
    from ditaccel.bench import model_cases as mc

    kw = dict(device="cpu", dtype=torch.float32, latent=(2, 8, 8), text_tokens=8, warmup=False, overrides=mc.TOY_WAN)
    r = mc.bench_video_ditfastattn("wan2.1-14b-720p", cache_dtype="float8", **kw)
    assert r["cache_dtype"] == "float8" and [g["kinds"] for g in r["plans"]] == [["full", "wars+asc", "ast"]]
    assert r["plan_50"] == {"full": 5, "wars+asc": 25, "ast": 20}
    monkeypatch.setitem(mc.VIDEO_SETUPS, "wan2.1-14b-720p", mc.VIDEO_SETUPS_FLOAT8["wan2.1-14b-720p"])
    same = mc.bench_video_ditfastattn("wan2.1-14b-720p", **kw)
    n = 2 * 32 * 16  # elements of one (1, H, L, D) residual = one (1, L, C) output
    assert same["cache_bytes_peak"] == 3 * 4 * n
    assert 4 * n + 2 * n < r["cache_bytes_peak"] < 4 * n + 2 * n + 4 * (2 * 2 + 2 * 32) + 1


def test_pixart_plan_case_measures_both_cache_dtypes():
    """``pixart-sigma-2k-plan-50`` runs the plan with caches in the model's dtype and in float8 (toy
    sizes on the CPU): one Markdown row each; the float8 caches hold a quarter of float32's bytes
    plus their scales; a result from before (one plan run, its keys at the top level) still renders."""
    from ditaccel.bench.model_cases import TOY_PIXART, bench_pixart_plan
    from ditaccel.bench.report import format_pixart_plan, markdown_pixart_plan, pixart_plan_shapes

    r = bench_pixart_plan(device="cpu", dtype=torch.float32, steps=12, overrides=TOY_PIXART)
    assert [p["cache_dtype"] for p in r["plans"]] == ["model", "float8"]
    model, fp8 = (p["cache_bytes_peak"] for p in r["plans"])
    unit = 2 * r["heads"] * r["tokens"] * r["head_dim"]  # one residual or output: 2 rows (CFG) x H x L x D
    tensors = model // (4 * unit)  # caches held at the peak, each (besides its payload) with at most 2 x C scales
    assert model == 4 * unit * tensors and 0 < fp8 - unit * tensors <= tensors * 2 * r["heads"] * r["head_dim"] * 4
    assert r["plans"][0]["attention_flops_ratio"] == r["plans"][1]["attention_flops_ratio"]
    md = markdown_pixart_plan(r)
    assert md.count("| DiTFastAttn plan") == 2 and "caches float32 |" in md and "caches float8 |" in md
    assert "float8" in pixart_plan_shapes(r) and format_pixart_plan(r).count("  plan (") == 2
    old = {k: v for k, v in r.items() if k != "plans"}
    old.update({k: v for k, v in r["plans"][0].items() if k != "cache_dtype"})
    assert markdown_pixart_plan(old).count("| DiTFastAttn plan") == 1


def test_trivial_masks_dropped_only_drops_masks_that_keep_every_key(monkeypatch):
    """Inside ``trivial_masks_dropped`` an all-True boolean mask is not passed on (positionally or by
    keyword), any other mask is, the output is unchanged, and SDPA is restored on exit."""
    from ditaccel.bench.harness import trivial_masks_dropped

    seen = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(args[3] if len(args) > 3 else kwargs.get("attn_mask"))
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 8, 4, generator=g) for _ in range(3))
    full = torch.ones(1, 1, 1, 8, dtype=torch.bool)
    part = full.clone()
    part[..., -3:] = False
    additive = torch.zeros(1, 1, 1, 8)
    with trivial_masks_dropped():
        a = F.scaled_dot_product_attention(query=q, key=k, value=v, attn_mask=full)
        b = F.scaled_dot_product_attention(q, k, v, full)
        c = F.scaled_dot_product_attention(q, k, v, attn_mask=part)
        d = F.scaled_dot_product_attention(q, k, v, additive)
    assert F.scaled_dot_product_attention is spy  # restored
    assert seen[0] is None and seen[1] is None and seen[2] is part and seen[3] is additive
    torch.testing.assert_close(a, real(q, k, v, attn_mask=full))
    torch.testing.assert_close(b, a)
    torch.testing.assert_close(c, real(q, k, v, attn_mask=part))
    torch.testing.assert_close(d, real(q, k, v))
