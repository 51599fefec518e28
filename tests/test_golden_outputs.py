"""Every method's outputs on the tiny offline pipelines against golden outputs stored in
``tests/data/golden_outputs.json``: a change of behaviour in any method (a plan entry, a window, an
AdaSpa rule) fails here, whatever else the other tests check.

Cases (``CASES``), each generated from a fixed seed:

* a tiny DiT (class labels, batched CFG, 256 tokens) and a tiny PixArt-Sigma (prompts,
  cross-attention, batched CFG, 64 tokens): dense; DiTFastAttn plans of each entry after a full
  first step (``wars``, ``asc``, ``wars+asc``, ``ast``), a plan mixing them per layer, ``wars`` with
  a wider ``band1d`` window and with the ``neighborhood2d`` one; AdaSpa with each head rule,
  without head adaptivity, without the LSE cache, with a dense tail;
* the tiny Wan (CFG as two calls), CogVideoX (text tokens in front of the video, with and without
  the text sink) and HunyuanVideo (dual and single stream) video pipelines: dense and AdaSpa.

The images' q/k projections are scaled up (``PEAKED``) so that their attention is concentrated, as
a trained DiT's is: with the random initialisation it is so diffuse that AdaSpa's head rules pick
the same blocks. ``test_every_case_is_told_apart`` checks that any two cases of one pipeline differ
by over 10x the tolerance below, so that a method or setting falling back to another would fail.

What is compared: the transformer's output at every call of a generation (the denoiser's
prediction, the method's direct effect), stacked, as a fingerprint (``fingerprint``): its shape,
``max|x|``, the mean, the mean of ``|x|``, 8 means of ``x`` under fixed ±1 sign patterns and 64
elements at fixed positions. The check is a tolerance, not bit equality (float32 results may differ
in the last bits across CPUs and thread counts): every stored number must be within
``1e-5 * max|x|`` of the golden one. Each is one element or a mean over elements, so an output
within ``1e-5 * max|x|`` of the golden one element by element always passes. (On the machine that
made the file the fingerprints came out bit-identical at 1, 2 and 4 threads. AdaSpa's top-k picks
are discrete: a block mass within rounding of its head's cut could flip on another CPU and fail a
case there; then compare the machines before regenerating.) Checked to fail: one more token of
``band1d`` window, the best heads' tier at (1 + 2s)/3 instead of (1 + s)/2, and ``asc`` copying
the unconditional half.

After an intended change of behaviour, regenerate the file and review its diff:

    PYTHONPATH=src python tests/test_golden_outputs.py    # rewrites tests/data/golden_outputs.json
"""

import itertools
import json
import os
import sys
from pathlib import Path

import pytest
import torch

import ditaccel
from ditaccel.plan import Plan
from ditaccel.testbed import (
    tiny_cogvideox_pipeline,
    tiny_dit_pipeline,
    tiny_hunyuan_video_pipeline,
    tiny_pixart_sigma_pipeline,
    tiny_wan_pipeline,
)

GOLDEN = Path(__file__).parent / "data" / "golden_outputs.json"
TOLERANCE = 1e-5  # relative to the golden output's max |x|
SIGNS, VALUES = 8, 64
IMAGE_STEPS, VIDEO_STEPS = 5, 5
PEAKED = 3.0  # the factor on the images' q/k projections


# ------------------------------------------------------------------ pipelines and their calls
def _peaked(pipe):
    with torch.no_grad():
        for block in pipe.transformer.transformer_blocks:
            block.attn1.to_q.weight.mul_(PEAKED)
            block.attn1.to_k.weight.mul_(PEAKED)
    return pipe


def _video_call(pipe):
    pipe(prompt="a red cat running in the snow", num_frames=17, height=64, width=64, num_inference_steps=VIDEO_STEPS,
         generator=torch.Generator().manual_seed(0), output_type="latent")


PIPELINES = {  # name -> (builder, call)
    "dit": (lambda: _peaked(tiny_dit_pipeline(sample_size=32, num_layers=3, num_heads=4)),
            lambda p: p(class_labels=[1, 2], num_inference_steps=IMAGE_STEPS, generator=torch.Generator().manual_seed(0),
                        output_type="pt")),
    "pixart": (lambda: _peaked(tiny_pixart_sigma_pipeline(sample_size=16, num_layers=3)),
               lambda p: p(prompt=["a red circle", "a blue square"], num_inference_steps=IMAGE_STEPS,
                           generator=torch.Generator().manual_seed(0), output_type="latent", clean_caption=False,
                           max_sequence_length=16, use_resolution_binning=False)),
    "wan": (tiny_wan_pipeline, _video_call),
    "cogvideox": (tiny_cogvideox_pipeline, _video_call),
    "hunyuan": (tiny_hunyuan_video_pipeline, _video_call),
}


# ------------------------------------------------------------------ the cases
def _plan(rows, **window):
    """A DiTFastAttn plan: ``rows(num_layers)`` or a fixed list of rows, validated by ``Plan``."""
    def make(pipe):
        n = pipe.transformer.config.num_layers
        return Plan.from_methods(pipe, rows(n) if callable(rows) else rows, cfg=True, **window)
    return make


def _uniform(method):
    """Every layer: a full first step, then ``method``."""
    return lambda n_layers: [["full"] + [method] * (IMAGE_STEPS - 1) for _ in range(n_layers)]


MIXED = [["full", "wars", "wars", "full", "ast"], ["full", "ast", "asc", "wars+asc", "wars"],
         ["full", "wars+asc", "ast", "asc", "full"]]


def _adaspa(**kw):
    return lambda pipe: ditaccel.AdaSpaConfig(**{"sparsity": 0.8, "block_size": 16, **kw})


CASES = {}  # name -> (pipeline, method factory or None for dense)
for _pipe in ("dit", "pixart"):
    CASES[f"{_pipe}/dense"] = (_pipe, None)
    for _m in ("wars", "asc", "wars+asc", "ast"):
        CASES[f"{_pipe}/{_m}"] = (_pipe, _plan(_uniform(_m)))
    CASES[f"{_pipe}/mixed"] = (_pipe, _plan(MIXED))
    CASES[f"{_pipe}/wars-band1d-0.4"] = (_pipe, _plan(_uniform("wars"), window_size=0.4))
    CASES[f"{_pipe}/wars-neighborhood2d"] = (_pipe, _plan(_uniform("wars"), window="neighborhood2d", window_size=0.5))
    CASES[f"{_pipe}/adaspa"] = (_pipe, _adaspa())
for _name, _kw in (("mass", {"head_rule": "mass"}), ("top_p", {"head_rule": "top_p", "target_recall": 0.5}),
                   ("uniform-heads", {"head_adaptive": False}), ("no-lse-cache", {"lse_cache": False}),
                   ("dense-last", {"dense_last": 0.2})):
    CASES[f"dit/adaspa-{_name}"] = ("dit", _adaspa(**_kw))
for _pipe in ("wan", "cogvideox", "hunyuan"):
    CASES[f"{_pipe}/dense"] = (_pipe, None)
    CASES[f"{_pipe}/adaspa"] = (_pipe, _adaspa())
CASES["cogvideox/adaspa-no-text-sink"] = ("cogvideox", _adaspa(text_sink=False))


# ------------------------------------------------------------------ running a case, fingerprints
def _sign_patterns(n: int) -> torch.Tensor:
    """``SIGNS`` fixed ±1 patterns of length ``n`` from an integer hash (the same on every machine)."""
    i = torch.arange(n, dtype=torch.int64)[None, :]
    k = torch.arange(SIGNS, dtype=torch.int64)[:, None]
    bits = ((i * 2654435761 + k * 40503 + 12345) % 4294967296) >> 13 & 1
    return (bits * 2 - 1).double()


def fingerprint(x: torch.Tensor) -> dict:
    """What is stored of an output: shape, max |x|, mean, mean |x|, signed means, sampled elements."""
    flat = x.detach().double().flatten().cpu()
    n = flat.numel()
    positions = torch.linspace(0, n - 1, min(VALUES, n)).round().long()
    return {"shape": list(x.shape), "max_abs": float(flat.abs().max()), "mean": float(flat.mean()),
            "mean_abs": float(flat.abs().mean()), "signed_means": (_sign_patterns(n) @ flat / n).tolist(),
            "values": flat[positions].tolist()}


def run_case(name: str, pipe, make_method) -> torch.Tensor:
    """The transformer's outputs over one generation of pipeline ``name``, stacked, with the case's
    method applied (and removed again after)."""
    outputs = []

    def keep(module, args, out):
        outputs.append((out[0] if isinstance(out, tuple) else out.sample).detach().clone())

    hook = pipe.transformer.register_forward_hook(keep)
    if make_method is not None:
        ditaccel.apply(pipe, make_method(pipe))
    try:
        PIPELINES[name][1](pipe)
    finally:
        if make_method is not None:
            ditaccel.remove(pipe)
        hook.remove()
    return torch.stack(outputs)


def build_all() -> dict:
    """Every pipeline of ``PIPELINES``, built (seeded), without progress bars."""
    pipes = {name: build() for name, (build, _) in PIPELINES.items()}
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    return pipes


def generate_all() -> dict:
    """Every case's fingerprint: the golden file's content."""
    pipes = build_all()
    return {case: fingerprint(run_case(name, pipes[name], make)) for case, (name, make) in CASES.items()}


def _largest_difference(a: dict, b: dict) -> float:
    return max(float((torch.tensor(a[k], dtype=torch.float64) - torch.tensor(b[k], dtype=torch.float64)).abs().max())
               for k in ("max_abs", "mean", "mean_abs", "signed_means", "values"))


# ------------------------------------------------------------------ the tests
@pytest.fixture(scope="module")
def pipes():
    return build_all()


@pytest.fixture(scope="module")
def golden():
    return json.loads(GOLDEN.read_text())


def test_the_golden_file_has_every_case(golden):
    assert sorted(golden) == sorted(CASES), "cases changed: regenerate the file (see the module docstring)"


@pytest.mark.parametrize("case", list(CASES))
def test_output_matches_golden(case, pipes, golden):
    name, make = CASES[case]
    got, want = fingerprint(run_case(name, pipes[name], make)), golden[case]
    assert got["shape"] == want["shape"]
    err, atol = _largest_difference(got, want), TOLERANCE * want["max_abs"]
    assert err <= atol, f"{case}: differs from the golden output by {err:.3g} (tolerance {atol:.3g})"


def test_every_case_is_told_apart(golden):
    """Any two cases of one pipeline (dense included) differ by over 10x the tolerance: each method
    and setting is visible in the fingerprint, and one falling back to another would fail."""
    for a, b in itertools.combinations(CASES, 2):
        if CASES[a][0] == CASES[b][0]:
            scale = golden[f"{CASES[a][0]}/dense"]["max_abs"]
            assert _largest_difference(golden[a], golden[b]) > 10 * TOLERANCE * scale, (a, b)


def test_full_plans_are_dense(pipes):
    """The identity plan (every entry ``full``) gives the dense outputs exactly, on this machine."""
    for name in ("dit", "pixart"):
        assert torch.equal(run_case(name, pipes[name], _plan(_uniform("full"))), run_case(name, pipes[name], None))


if __name__ == "__main__":  # regenerate the golden file
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)  # as the test suite (conftest)
    GOLDEN.parent.mkdir(exist_ok=True)
    data = generate_all()
    GOLDEN.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {len(data)} cases to {GOLDEN} ({GOLDEN.stat().st_size / 1e3:.1f} kB)", file=sys.stderr)
