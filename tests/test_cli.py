"""The ``ditaccel`` command, run in-process through ``ditaccel.cli.main``."""

import contextlib
import io
import json
import os
import re

import pytest
from PIL import Image

import ditaccel
from ditaccel import cli
from ditaccel.plan import Plan

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path) -> tuple[int, int]:
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE, f"{path} is not a PNG"
    with Image.open(path) as im:
        im.load()
        assert im.format == "PNG"
        assert im.width > 0 and im.height > 0
        return im.size


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """``ditaccel calibrate`` on tiny-dit, 3 steps: (plan path, exit code, stdout)."""
    path = tmp_path_factory.mktemp("cli") / "P.json"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(["calibrate", "--model", "tiny-dit", "--steps", "3", "--threshold", "D6",
                       "--class-labels", "1", "2", "--out", str(path)])
    return path, rc, out.getvalue()


@pytest.fixture
def hand_plan(dit, tmp_path):
    rows = [["full", "wars", "ast", "asc", "wars+asc", "full"],
            ["full", "ast", "ast", "full", "wars", "wars+asc"],
            ["asc", "full", "wars", "wars+asc", "ast", "full"]]
    plan = ditaccel.Plan.from_methods(dit, rows, cfg=True, threshold=0.05)
    path = tmp_path / "hand.json"
    plan.save(path)
    return plan, path


# ------------------------------------------------------------------ plan show
def test_plan_show_prints_summary_and_writes_png(hand_plan, tmp_path, capsys):
    plan, path = hand_plan
    png = tmp_path / "heat" / "OUT.png"
    png.parent.mkdir()
    assert cli.main(["plan", "show", str(path), "--png", str(png), "--json"]) == 0
    out = capsys.readouterr().out
    assert "DiTTransformer2DModel" in out
    assert plan.metadata["config_fingerprint"] in out
    assert "3 layers" in out and "threshold  0.05" in out
    for m, n in plan.counts().items():  # one line per method with its count
        assert re.search(rf"^\s+{re.escape(m)}\s+{n}\s+[\d.]+%$", out, re.M), m
    assert f"heat map: {png}" in out
    assert json.loads(out.strip().splitlines()[-1]) == plan.counts()
    assert_png(png)
    assert not (tmp_path / "hand.png").exists()  # --png was honoured


def test_plan_show_default_png_next_to_plan(hand_plan, tmp_path, capsys):
    _, path = hand_plan
    assert cli.main(["plan", "show", str(path)]) == 0
    out = capsys.readouterr().out
    expected = tmp_path / "hand.png"
    assert f"heat map: {expected}" in out
    assert_png(expected)
    assert "{" not in out.strip().splitlines()[-1]  # no --json, no counts JSON


def _corrupt(d, case):
    if case == "garbage":
        return "{ this is not json"
    if case == "version":
        d["version"] = 2
    elif case == "method-name":
        d["methods"][0][1] = "sparse"
    elif case == "metadata-key":
        del d["metadata"]["window"]
    return json.dumps(d)


@pytest.mark.parametrize("case,field", [("garbage", "not valid JSON"), ("version", "version"),
                                        ("method-name", "methods[0][1]"), ("metadata-key", "metadata.window")])
def test_plan_show_corrupt_plan(hand_plan, tmp_path, capsys, case, field):
    plan, _ = hand_plan
    path = tmp_path / "bad.json"
    path.write_text(_corrupt(json.loads(json.dumps(plan.to_dict())), case))
    assert cli.main(["plan", "show", str(path)]) == 2
    cap = capsys.readouterr()
    assert cap.err.startswith("ditaccel: error: ")
    assert field in cap.err
    assert "Traceback" not in cap.err
    assert cap.out == ""
    assert not (tmp_path / "bad.png").exists()


def test_plan_show_missing_file(tmp_path, capsys):
    assert cli.main(["plan", "show", str(tmp_path / "missing.json")]) == 2
    assert "ditaccel: error:" in capsys.readouterr().err


# ------------------------------------------------------------------ calibrate / generate
def test_calibrate_writes_loadable_plan(calibrated):
    path, rc, out = calibrated
    assert rc == 0
    assert f"wrote {path}" in out
    assert "DiTTransformer2DModel" in out
    plan = Plan.load(path)
    assert plan.num_steps == 3 and plan.metadata["num_steps"] == 3
    assert plan.num_layers == 4  # tiny-dit's default depth
    assert plan.metadata["model_class"] == "DiTTransformer2DModel"
    assert plan.metadata["threshold"] == pytest.approx(0.15)  # D6
    assert plan.metadata["calibration_inputs"] == 2
    assert plan.metadata["cfg"] is True
    assert all(row[0] in ("full", "asc") for row in plan.methods)
    assert sum(plan.counts().values()) == 12


def test_generate_with_plan(calibrated, tmp_path, capsys):
    path, rc, _ = calibrated
    assert rc == 0
    img = tmp_path / "img.png"
    assert cli.main(["generate", "--model", "tiny-dit", "--plan", str(path), "--class-labels", "3",
                     "--out", str(img)]) == 0
    out = capsys.readouterr().out
    assert "generated 1 image(s)" in out and str(img) in out
    assert "attention FLOPs" in out
    assert re.search(r"ditfastattn: 3 steps, attention FLOPs [\d.]+% of dense", out)
    w, h = assert_png(img)
    assert h >= 128 and w >= 128  # one 128 px tile (tiny-dit: 16x16 latent)


def test_generate_with_plan_for_other_step_count(calibrated, tmp_path, capsys):
    path, rc, _ = calibrated
    assert rc == 0 and Plan.load(path).num_steps == 3
    img = tmp_path / "img.png"
    rc = cli.main(["generate", "--model", "tiny-dit", "--plan", str(path), "--steps", "5", "--class-labels", "3",
                   "--out", str(img)])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("ditaccel: error: ")
    assert "num_inference_steps" in err and "3 steps" in err and "runs 5" in err
    assert "Traceback" not in err
    assert not img.exists()


def test_calibrate_pixart(tmp_path, capsys):
    path = tmp_path / "P.json"
    assert cli.main(["calibrate", "--model", "tiny-pixart", "--steps", "3", "--prompt", "a red circle",
                     "--out", str(path)]) == 0
    out = capsys.readouterr().out
    assert "PixArtTransformer2DModel" in out and f"wrote {path}" in out
    plan = Plan.load(path)
    assert plan.metadata["model_class"] == "PixArtTransformer2DModel"
    assert plan.num_steps == 3 and plan.num_layers == 4
    assert plan.metadata["calibration_inputs"] == 1
    assert plan.metadata["cfg"] is True  # PixArt batches the CFG halves


# ------------------------------------------------------------------ demo
def test_demo(tmp_path, capsys):
    out_dir = tmp_path / "DIR"
    assert cli.main(["demo", "--model", "tiny-dit", "--steps", "3", "--calibration-inputs", "2", "--samples", "1",
                     "--out", str(out_dir)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"speed-up [\d.]+x", out)
    assert re.search(r"attention FLOPs\s+[\d.]+% of dense", out)
    m = re.search(r"PSNR (\S+) dB", out)
    assert m and float(m.group(1)) > 0
    w, h = assert_png(out_dir / "samples.png")
    assert h >= 3 * 256 and w >= 256  # dense, ditfastattn and |diff| rows of one sample, scaled to >= 256 px
    assert_png(out_dir / "plan.png")
    plan = Plan.load(out_dir / "plan.json")
    assert plan.num_steps == 3 and plan.metadata["calibration_inputs"] == 2


def test_demo_runs_on_the_shipped_testbed_by_default(tmp_path, capsys):
    out_dir = tmp_path / "DIR"
    assert cli.main(["demo", "--steps", "2", "--calibration-inputs", "1", "--samples", "1", "--out", str(out_dir)]) == 0
    out = capsys.readouterr().out
    assert "model testbed" in out and "trained on procedural shapes" in out and "random weights" not in out
    m = re.search(r"PSNR (\S+) dB", out)
    assert m and float(m.group(1)) > 0
    plan = Plan.load(out_dir / "plan.json")
    assert plan.metadata["model_class"] == "DiTTransformer2DModel" and plan.num_layers == 6
    w, h = assert_png(out_dir / "samples.png")
    assert h >= 3 * 256  # 64 px samples scaled to 256


# ------------------------------------------------------------------ bad --model
def _model_error(argv, capsys):
    """(exit status, message) of a run expected to fail: a returned 2 with stderr, or a SystemExit."""
    try:
        rc = cli.main(argv)
    except SystemExit as e:
        return e.code, str(e.code)
    return rc, capsys.readouterr().err


def test_unknown_hub_model_offline(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc, msg = _model_error(["calibrate", "--model", "no-such-org/no-such-model-xyz", "--steps", "3",
                            "--out", os.devnull], capsys)
    assert rc != 0 and rc is not None
    assert "--model" in msg and "no-such-org/no-such-model-xyz" in msg
    assert "tiny-dit" in msg  # points at the offline built-ins


def test_missing_local_model_path(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    missing = tmp_path / "no-such-model"
    rc, msg = _model_error(["calibrate", "--model", str(missing), "--steps", "3",
                            "--out", str(tmp_path / "P.json")], capsys)
    assert rc == 2 or isinstance(rc, str)
    assert "--model" in msg
    assert not (tmp_path / "P.json").exists()


def test_testbed_train_and_eval_at_toy_size(tmp_path, capsys):
    """`ditaccel testbed train` writes loadable folders; `ditaccel eval` compares a method to dense on them."""
    root = tmp_path / "weights"
    assert cli.main(["testbed", "train", "image", "--out", str(root / "image"), "--toy", "--steps", "2",
                     "--device", "cpu"]) == 0
    assert cli.main(["testbed", "train", "classifiers", "--out", str(root), "--toy", "--steps", "2",
                     "--device", "cpu"]) == 0
    capsys.readouterr()
    out_json = tmp_path / "eval.json"
    assert cli.main(["eval", "--weights", str(root), "--samples", "2", "--steps", "3", "--device", "cpu",
                     "--method", "adaspa", "--sparsity", "0.5", "--json", str(out_json)]) == 0
    printed = capsys.readouterr().out
    r = json.loads(out_json.read_text())
    for key in ("psnr", "ssim", "fd_compressed_vs_dense", "accuracy_dense", "accuracy_compressed",
                "attention_flops_ratio", "time_dense_s"):
        assert key in r and key in printed
    assert r["n"] == 2 and r["steps"] == 3 and r["method"] == "AdaSpaConfig"
    assert r["model"] == "image" and r["weights"] == str(root) and r["env"]["device"] == "cpu"  # where it ran
    assert r["dtype"] == "float32"  # the default
    # the video testbed, dense, with a picture of the samples (one row per video, 4 frames)
    assert cli.main(["testbed", "train", "video", "--out", str(root / "video"), "--toy", "--steps", "2",
                     "--device", "cpu"]) == 0
    png = tmp_path / "video.png"
    assert cli.main(["eval", "--model", "video", "--method", "dense", "--weights", str(root), "--samples", "2",
                     "--steps", "2", "--device", "cpu", "--dtype", "bfloat16", "--samples-png", str(png),
                     "--json", str(out_json)]) == 0
    r = json.loads(out_json.read_text())  # metrics only: no sample or feature tensors
    assert r["dtype"] == "bfloat16" and 0 <= r["accuracy_dense"] <= 1
    assert r["kind"] == "video" and "accuracy_dense_motion" in r and not any(k.startswith(("samples", "features"))
                                                                              for k in r)
    from PIL import Image

    w, h = Image.open(png).size
    assert h == 2 * (2 * 16 + 4) and w == 110 + 4 * (2 * 16 + 4)  # 2 rows x 4 frames of 16 px, scale 2


def test_eval_and_testbed_errors(tmp_path, capsys):
    assert cli.main(["eval", "--weights", str(tmp_path / "none")]) == 2
    assert "--weights" in capsys.readouterr().err
    assert cli.main(["testbed", "fit"]) == 2
    assert "ditaccel testbed train" in capsys.readouterr().err
