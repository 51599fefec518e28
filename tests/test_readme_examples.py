"""The README's Python usage examples run as written, on tiny offline pipelines.

Each ```python block of the README's "Usage" section is executed unchanged except for two
substitutions, both checked to apply: ``from_pretrained`` of the pipeline class returns a tiny
random-weight pipeline of the same class (``ditaccel.testbed``), and without CUDA the device
``"cuda"`` is the CPU. The tiny Wan pipeline is called at 17 frames of 64x64 px unless the
example says otherwise (Wan's defaults, 81 frames of 480x832, are for the real model).
"""

import functools
import re
from pathlib import Path

import pytest
import torch

import ditaccel
from ditaccel.runtime import get_runtime

README = Path(__file__).resolve().parents[1] / "README.md"


def usage_examples() -> list[str]:
    text = README.read_text()
    start = text.index("\n## Usage")
    end = text.index("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start:end], re.S)


def _as_run_here(code: str) -> str:
    if torch.cuda.is_available():
        return code
    assert code.count('.to("cuda")') == 1, "the example should move the pipeline to the GPU once"
    return code.replace('.to("cuda")', '.to("cpu")')


def _serve(monkeypatch, cls, make, model_id: str) -> list:
    """``cls.from_pretrained(model_id, ...)`` returns ``make()``; the calls are recorded."""
    calls = []

    def from_pretrained(klass, name, **kwargs):
        calls.append((klass, name, kwargs))
        assert name == model_id, f"the README loads {name!r}, this test serves {model_id!r}"
        return make()

    monkeypatch.setattr(cls, "from_pretrained", classmethod(from_pretrained))
    return calls


def test_one_example_per_method():
    examples = usage_examples()
    assert len(examples) == 3
    assert "DiTFastAttnConfig" in examples[0] and "ditaccel.calibrate(" in examples[0]
    assert "AdaSpaConfig" in examples[1]
    assert '"sparse"' in examples[2] and "ditaccel.calibrate(" in examples[2]  # mixed plans
    for code in examples:  # self-contained: their own imports
        assert "import ditaccel" in code and "import torch" in code and "from diffusers import" in code


def _run(code: str, tmp_path, monkeypatch) -> dict:
    monkeypatch.chdir(tmp_path)  # files the example writes land here
    scope = {"__name__": "readme_example"}
    exec(compile(_as_run_here(code), str(README), "exec"), scope)  # noqa: S102 - the README's own code
    return scope


def test_ditfastattn_example(tmp_path, monkeypatch, capsys):
    from diffusers import PixArtSigmaPipeline

    from ditaccel.testbed import tiny_pixart_sigma_pipeline

    code = usage_examples()[0]
    calls = _serve(monkeypatch, PixArtSigmaPipeline, lambda: tiny_pixart_sigma_pipeline(sample_size=32, num_layers=2),
                   "PixArt-alpha/PixArt-Sigma-XL-2-2K-MS")
    scope = _run(code, tmp_path, monkeypatch)
    assert len(calls) == 1 and calls[0][2]["torch_dtype"] == torch.bfloat16
    pipe = scope["pipe"]
    assert isinstance(pipe, PixArtSigmaPipeline) and get_runtime(pipe) is None  # removed at the end
    plan = ditaccel.Plan.load(tmp_path / "pixart-2k-d6.plan.json")
    assert plan.num_steps == 20 and plan.metadata["threshold"] == pytest.approx(0.15)
    assert plan.metadata["calibration_inputs"] == 6
    assert scope["image"].size == (256, 256)  # a PIL image
    assert "attention FLOPs" in capsys.readouterr().out  # print(ditaccel.stats(pipe))


def _serve_small_wan(monkeypatch):
    """``WanPipeline.from_pretrained`` of the released 14B id serves the tiny offline Wan pipeline,
    whose calls default to 17 frames of 64 x 64; returns the recorded ``from_pretrained`` calls."""
    from diffusers import WanPipeline

    from ditaccel.testbed.video import tiny_wan_pipeline

    calls = _serve(monkeypatch, WanPipeline, tiny_wan_pipeline, "Wan-AI/Wan2.1-T2V-14B-Diffusers")
    call = WanPipeline.__call__

    @functools.wraps(call)
    def small(self, *args, **kwargs):
        for key, value in (("num_frames", 17), ("height", 64), ("width", 64)):
            kwargs.setdefault(key, value)
        return call(self, *args, **kwargs)

    monkeypatch.setattr(WanPipeline, "__call__", small)
    return calls


def test_adaspa_example(tmp_path, monkeypatch, capsys):
    code = usage_examples()[1]
    calls = _serve_small_wan(monkeypatch)
    scope = _run(code, tmp_path, monkeypatch)
    assert len(calls) == 1
    assert get_runtime(scope["pipe"]) is None
    st = scope["st"]
    assert 0 < st.attention_flops_ratio < 1 and len(st.details["density_per_layer"]) == 2
    assert len(scope["video"]) == 17
    assert str(st.attention_flops_ratio) in capsys.readouterr().out


def test_mixed_plan_example(tmp_path, monkeypatch, capsys):
    code = usage_examples()[2]
    calls = _serve_small_wan(monkeypatch)
    scope = _run(code, tmp_path, monkeypatch)
    assert len(calls) == 1 and get_runtime(scope["pipe"]) is None
    plan = ditaccel.Plan.load(tmp_path / "wan-mixed.plan.json")
    assert plan.num_steps == 20 and plan.metadata["adaspa"]["sparsity"] == 0.8
    assert len(scope["video"]) == 17
    out = capsys.readouterr().out
    assert plan.version == 2 and plan.counts()["sparse"] > 0 and "mixed: 20 steps" in out
