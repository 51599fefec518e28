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
        assert re.search(rf"^\s+{re.escape(m)}\s+{n}\s+[\d.]+%$", out, re.MULTILINE), m
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
        d["version"] = 3
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


def test_calibrate_window_and_residual_refresh_options(tmp_path, capsys):
    """--window neighborhood3d and --residual-refresh full+asc reach the config and the plan's metadata."""
    path = tmp_path / "P.json"
    assert cli.main(["calibrate", "--model", "tiny-pixart", "--steps", "3", "--prompt", "a red circle",
                     "--search", "local", "--window", "neighborhood3d", "--residual-refresh", "full+asc",
                     "--out", str(path)]) == 0
    out = capsys.readouterr().out
    assert "window neighborhood3d, residual refresh full+asc" in out
    plan = Plan.load(path)
    assert plan.metadata["window"] == "neighborhood3d" and plan.metadata["residual_refresh"] == "full+asc"
    assert plan.metadata["search"] == "local"

# ------------------------------------------------------------------ demo
def test_demo(tmp_path, capsys):
    out_dir = tmp_path / "DIR"
    assert cli.main(["demo", "--model", "tiny-dit", "--steps", "3", "--calibration-inputs", "2", "--samples", "1",
                     "--out", str(out_dir)]) == 0
    out = capsys.readouterr().out
    assert "plan: calibrating (the shipped plan is for the testbed, not 'tiny-dit')" in out
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
    assert "plan: calibrating (the shipped plan was made for other settings: --steps 2 (plan: 10)" in out
    m = re.search(r"PSNR (\S+) dB", out)
    assert m and float(m.group(1)) > 0
    plan = Plan.load(out_dir / "plan.json")
    assert plan.metadata["model_class"] == "DiTTransformer2DModel" and plan.num_layers == 6
    _, h = assert_png(out_dir / "samples.png")
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
                     "--method", "adaspa", "--sparsity", "0.5", "--first-lse", "previous", "--json", str(out_json)]) == 0
    printed = capsys.readouterr().out
    r = json.loads(out_json.read_text())
    for key in ("psnr", "ssim", "fd_compressed_vs_dense", "accuracy_dense", "accuracy_compressed",
                "attention_flops_ratio", "time_dense_s"):
        assert key in r and key in printed
    assert r["n"] == 2 and r["steps"] == 3 and r["method"] == "AdaSpaConfig"
    assert r["method_counts"]["dense_lse"] > 0 and "search" not in r["method_counts"]  # --first-lse previous
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
    assert "error: COMMAND: invalid choice: 'fit' (choose from 'train')" in capsys.readouterr().err


# ------------------------------------------------------------------ bad input: one line, exit 2, no work
@pytest.fixture
def no_work(monkeypatch):
    """Make every way of starting work fail loudly: a bad-input run must stop before any of them."""
    import ditaccel.evaluate

    def started(*a, **k):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(cli, "load_pipeline", started)
    monkeypatch.setattr(ditaccel, "calibrate", started)
    monkeypatch.setattr(ditaccel.evaluate, "evaluate_trained", started)


def _one_line_error(argv, capsys) -> str:
    rc = cli.main(argv)
    captured = capsys.readouterr()
    err = captured.err
    assert rc == 2, (rc, captured.out, err)
    assert err.startswith("ditaccel: error: ") and err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


BAD_INPUT = [  # (argv with {tmp} for a temp folder, the field the error names, a phrase it says)
    (["calibrate", "--model", "tiny-dit", "--out", "{tmp}/missing/P.json"], "--out", "does not exist"),
    (["calibrate", "--model", "tiny-dit", "--out", "{tmp}"], "--out", "is a folder"),
    (["generate", "--model", "tiny-dit", "--out", "{tmp}/missing/x.png"], "--out", "does not exist"),
    (["generate", "--model", "tiny-dit", "--out", "{tmp}/x.notanimage"], "--out", "extension"),
    (["generate", "--model", "tiny-dit", "--plan", "{tmp}/none.json"], "--plan", "no such file"),
    (["demo", "--out", "{tmp}/missing/sub"], "--out", "does not exist"),
    (["demo", "--out", "{tmp}/afile"], "--out", "not a folder"),
    (["plan", "show", "{tmp}/P.json", "--png", "{tmp}/missing/x.png"], "--png", "does not exist"),
    (["demo", "--samples", "0", "--out", "{tmp}/d"], "--samples", ">= 1"),
    (["demo", "--steps", "0", "--out", "{tmp}/d"], "--steps", ">= 1"),
    (["demo", "--steps", "1", "--out", "{tmp}/d"], "--steps", "step 0"),
    (["demo", "--calibration-inputs", "0", "--out", "{tmp}/d"], "--calibration-inputs", ">= 1"),
    (["calibrate", "--model", "tiny-dit", "--steps", "0", "--out", "{tmp}/P.json"], "--steps", ">= 1"),
    (["calibrate", "--model", "tiny-dit", "--steps", "1", "--out", "{tmp}/P.json"], "--steps", "step 0"),
    (["calibrate", "--model", "tiny-dit", "--steps", "-3", "--out", "{tmp}/P.json"], "--steps", ">= 1"),
    (["calibrate", "--model", "tiny-dit", "--steps", "x", "--out", "{tmp}/P.json"], "--steps", "not an integer"),
    (["calibrate", "--model", "tiny-dit", "--threshold", "D9", "--out", "{tmp}/P.json"], "--threshold", "preset"),
    (["calibrate", "--model", "tiny-dit", "--threshold", "-0.1", "--out", "{tmp}/P.json"], "--threshold", ">= 0"),
    (["calibrate", "--model", "tiny-dit", "--window-size", "0", "--out", "{tmp}/P.json"], "--window-size", "(0"),
    (["calibrate", "--model", "tiny-dit", "--window", "neighborhood4d", "--out", "{tmp}/P.json"], "--window",
     "invalid choice: 'neighborhood4d' (choose from 'band1d', 'neighborhood2d', 'neighborhood3d')"),
    (["calibrate", "--model", "tiny-dit", "--residual-refresh", "asc", "--out", "{tmp}/P.json"], "--residual-refresh",
     "invalid choice: 'asc' (choose from 'full', 'full+asc')"),
    (["calibrate", "--model", "tiny-dit", "--class-labels", "-1", "--out", "{tmp}/P.json"], "--class-labels", ">= 0"),
    (["calibrate", "--model", "tiny-dit", "--dtype", "fp8", "--out", "{tmp}/P.json"], "--dtype", "fp8"),
    (["calibrate", "--model", "tiny-dit", "--device", "tpu9", "--out", "{tmp}/P.json"], "--device", "tpu9"),
    (["calibrate", "--model", "tiny-dit", "--guidance-scale", "nan", "--out", "{tmp}/P.json"], "--guidance-scale",
     ">= 0"),
    (["generate", "--model", "tiny-dit", "--steps", "0", "--out", "{tmp}/x.png"], "--steps", ">= 1"),
    (["generate", "--model", "tiny-dit", "--seed", "-1", "--out", "{tmp}/x.png"], "--seed", ">= 0"),
    (["eval", "--steps", "0"], "--steps", ">= 1"),
    (["eval", "--samples", "0"], "--samples", ">= 1"),
    (["eval", "--method", "ditfastattn", "--steps", "1"], "--steps", "step 0"),
    (["eval", "--sparsity", "1.5"], "--sparsity", "[0.0, 1.0]"),
    (["eval", "--json", "{tmp}/missing/m.json"], "--json", "does not exist"),
    (["eval", "--samples-png", "{tmp}/missing/s.png"], "--samples-png", "does not exist"),
    (["eval", "--method", "ditfastattn", "--plan", "{tmp}/none.json"], "--plan", "no such file"),
    (["eval", "--dtype", "auto"], "--dtype", "invalid choice"),
    (["demo", "--bogus", "--out", "{tmp}/d"], "--bogus", "unknown option"),
    ([], "COMMAND", "required"),
]


@pytest.mark.parametrize("argv,field,phrase", BAD_INPUT, ids=[" ".join(c[0][:3]) for c in BAD_INPUT])
def test_bad_input_is_one_line_before_any_work(argv, field, phrase, tmp_path, capsys, no_work):
    (tmp_path / "afile").write_text("a file, not a folder")
    err = _one_line_error([a.replace("{tmp}", str(tmp_path)) for a in argv], capsys)
    assert f"error: {field}: " in err, err
    assert phrase in err, err
    assert not (tmp_path / "d").exists() and not (tmp_path / "P.json").exists()  # nothing written either


@pytest.mark.parametrize("command", ["demo", "calibrate", "generate", "eval"])
def test_cuda_without_cuda_is_one_line(command, tmp_path, capsys, no_work, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU build, even on a GPU machine
    out = {"demo": tmp_path / "d", "calibrate": tmp_path / "P.json", "generate": tmp_path / "x.png"}.get(command)
    err = _one_line_error([command, "--device", "cuda", *(["--out", str(out)] if out else [])], capsys)
    assert "error: --device: 'cuda': CUDA is not available" in err


def test_model_dependent_input_is_refused_before_generating(tmp_path, capsys, monkeypatch):
    """Class ids/names and the plan's model are checked once the model is loaded, before any generation."""
    def started(*a, **k):
        raise AssertionError("generation started with a bad class label")

    monkeypatch.setattr(ditaccel, "calibrate", started)
    monkeypatch.setattr(cli, "_timed", started)
    err = _one_line_error(["generate", "--model", "tiny-dit", "--class-labels", "3", "5000",
                           "--out", str(tmp_path / "x.png")], capsys)
    assert "error: --class-labels: [5000] outside this model's" in err
    err = _one_line_error(["calibrate", "--model", "tiny-dit", "--steps", "3", "--class-labels", "5000",
                           "--out", str(tmp_path / "P.json")], capsys)
    assert "error: --class-labels: [5000]" in err
    err = _one_line_error(["generate", "--model", "tiny-pixart", "--class-labels", "3",
                           "--out", str(tmp_path / "x.png")], capsys)
    assert "error: --class-labels: this model takes prompts" in err
    err = _one_line_error(["generate", "--model", "tiny-dit", "--prompt", "no such class",
                           "--out", str(tmp_path / "x.png")], capsys)
    assert "error: --prompt: this class-conditional model takes class names" in err and "golden retriever" in err
    err = _one_line_error(["generate", "--model", "tiny-dit", "--plan", cli.DEMO_PLAN, "--class-labels", "3",
                           "--out", str(tmp_path / "x.png")], capsys)
    assert "error: --plan: " in err and "does not fit --model tiny-dit" in err
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "P.json").exists()


def test_generate_plan_step_mismatch_is_refused_before_loading(hand_plan, tmp_path, capsys, no_work):
    _, path = hand_plan  # 6 steps
    err = _one_line_error(["generate", "--plan", str(path), "--steps", "4", "--out", str(tmp_path / "x.png")], capsys)
    assert "error: --steps: " in err and "6 steps" in err and "runs 4" in err


# ------------------------------------------------------------------ --version, help
def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"ditaccel {ditaccel.__version__}"


def test_testbed_help(capsys):
    assert cli.main(["testbed", "--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: ditaccel testbed" in out and "train" in out


def _leaves(parser, path=()):
    """(command path, parser) of every runnable subcommand of the tree."""
    import argparse

    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
        return
    for name, child in subs[0].choices.items():
        yield from _leaves(child, (*path, name))


ALL_COMMANDS = ["demo", "calibrate", "generate", "eval", "plan show", "quality", "worth", "testbed train image",
                "testbed train video", "testbed train classifiers", *(f"bench {w}" for w in
                                                                    ("step", "attention", "sweep", "adaspa",
                                                                     "adaspa-step", "sparsity", "all"))]


def test_one_parser_tree_holds_every_command():
    assert sorted(" ".join(path) for path, _ in _leaves(cli.build_parser())) == sorted(ALL_COMMANDS)


def test_help_shows_every_default():
    """Every option of every subcommand says its default in --help: the value (added by the
    formatter), or, where it has none (None), what happens instead ("default: the plan's ...")."""
    import argparse

    checked = 0
    for path, p in _leaves(cli.build_parser()):
        name = " ".join(path)
        fmt = p._get_formatter()
        shown = "".join(p.format_help().split())  # argparse wraps lines, also at hyphens
        for action in p._actions:
            if not action.option_strings or isinstance(action, argparse._HelpAction) \
                    or action.default is False or action.default == argparse.SUPPRESS:  # flags: off unless given
                continue
            text = fmt._get_help_string(action)
            assert "default" in text, f"{name} {action.option_strings[0]}: the help does not say the default"
            if action.default is not None and "%(default)s" in text:
                value = action.default if not isinstance(action.default, tuple) else ",".join(map(str, action.default))
                assert f"(default:{value})" in shown, (name, action.option_strings[0])
            checked += 1
    assert checked >= 100


@pytest.mark.parametrize("command", ALL_COMMANDS)
def test_help_of_every_subcommand(command, capsys):
    assert cli.main([*command.split(), "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: ditaccel {command} ") and "--debug" in out
    assert "(default: " in out or "default:" in out


def test_calibrate_prints_the_threshold_used(calibrated):
    _, rc, out = calibrated
    assert rc == 0
    assert "threshold δ = 0.15 (preset D6)" in out


# ------------------------------------------------------------------ the shipped demo plan
def test_shipped_demo_plan_matches_weights_and_demo_settings():
    """Cheap drift guard: the shipped plan records the demo settings and the testbed weights it was made for."""
    fix = f"regenerate it (minutes on CPU) with: {cli.DEMO_PLAN_REGENERATE}"
    assert os.path.exists(cli.DEMO_PLAN), f"no shipped demo plan at {cli.DEMO_PLAN}; {fix}"
    plan = Plan.load(cli.DEMO_PLAN)
    defaults = cli.build_parser().parse_args(["demo"])
    assert plan.metadata.get("demo_settings") == cli.demo_settings(defaults), \
        f"`ditaccel demo`'s defaults changed since {cli.DEMO_PLAN} was made; {fix}"
    assert plan.metadata.get("weights_sha256") == cli._file_sha256(cli.DEMO_WEIGHTS), \
        f"the testbed's weights ({cli.DEMO_WEIGHTS}) changed since {cli.DEMO_PLAN} was made; {fix}"
    assert plan.num_steps == defaults.steps and plan.metadata["model_class"] == "DiTTransformer2DModel"
    assert plan.metadata["threshold"] == pytest.approx(cli.demo_settings(defaults)["threshold"])
    assert any(m != "full" for row in plan.methods for m in row)  # it compresses something
    found, why = cli.shipped_demo_plan(defaults)
    assert found is not None, why


def test_shipped_demo_plan_is_not_used_for_other_settings(tmp_path, monkeypatch):
    parse = cli.build_parser().parse_args
    for argv, says in ((["--steps", "12"], "--steps 12 (plan: 10)"), (["--threshold", "D3"], "--threshold 0.075"),
                       (["--calibration-inputs", "2"], "--calibration-inputs 2"),
                       (["--model", "tiny-dit"], "not 'tiny-dit'")):
        plan, why = cli.shipped_demo_plan(parse(["demo", *argv]))
        assert plan is None and says in why, (argv, why)
    other = tmp_path / "w.safetensors"
    other.write_bytes(b"retrained")
    monkeypatch.setattr(cli, "DEMO_WEIGHTS", str(other))
    plan, why = cli.shipped_demo_plan(parse(["demo"]))
    assert plan is None and "weights changed" in why


def test_demo_uses_the_shipped_plan_without_calibrating(tmp_path, capsys, monkeypatch):
    def started(*a, **k):
        raise AssertionError("the demo calibrated although the shipped plan fits")

    monkeypatch.setattr(ditaccel, "calibrate", started)
    out_dir = tmp_path / "DIR"
    assert cli.main(["demo", "--samples", "1", "--out", str(out_dir)]) == 0
    out = capsys.readouterr().out
    assert "plan: the shipped testbed plan" in out and "threshold δ = 0.05 (preset D2)" in out
    assert Plan.load(out_dir / "plan.json").methods == Plan.load(cli.DEMO_PLAN).methods
    m = re.search(r"PSNR (\S+) dB", out)
    assert m
    assert_png(out_dir / "samples.png")
    # result.json holds the printed numbers (what docs/results keeps of a demo run)
    res = json.loads((out_dir / "result.json").read_text())
    assert res["plan"] == "shipped" and res["settings"] == cli.demo_settings(cli.build_parser().parse_args(["demo"]))
    assert f"{res['psnr_db']:.2f}" == m.group(1)
    assert f"{100 * res['attention_flops_ratio']:.1f}% of dense" in out
    assert res["speedup"] == pytest.approx(res["dense_s"] / res["ditfastattn_s"])
    assert sum(res["method_counts"].values()) == 6 * 10 and res["device"] == "cpu"


# ------------------------------------------------------------------ bench, quality, worth, testbed train: the same errors
@pytest.fixture
def no_tool_work(monkeypatch):
    """Every way bench, quality, worth and testbed train start work fails loudly."""
    import ditaccel.evaluate
    from ditaccel import quality, worth
    from ditaccel.bench import command as bench  # where `ditaccel bench` looks its cases up
    from ditaccel.testbed import train

    def started(*a, **k):
        raise AssertionError("work started before the arguments were checked")

    for name in ("bench_step", "bench_attention", "bench_sweep", "bench_adaspa", "bench_adaspa_step",
                 "bench_sparsity", "run_all"):
        monkeypatch.setattr(bench, name, started)
    monkeypatch.setattr(ditaccel.evaluate, "load_trained", started)
    monkeypatch.setattr(quality, "load_trained", started)
    monkeypatch.setattr(quality, "run_table", started)
    monkeypatch.setattr(worth, "run_table", started)
    for name in ("train_image", "train_video", "train_classifiers"):
        monkeypatch.setattr(train, name, started)
    monkeypatch.setattr(cli, "load_pipeline", started)


TOOL_BAD_INPUT = [  # (argv with {tmp}, the field the error names, a phrase it says)
    # bench
    (["bench", "sparsity", "--only", "sparsity"], "--only", "not an option of `ditaccel bench sparsity` (only of: all)"),
    (["bench", "step", "--kept", "0.5"], "--kept", "not an option of `ditaccel bench step` (only of: sparsity)"),
    (["bench", "all", "--dry-run", "--repeats", "3"], "--repeats", "not an option of `ditaccel bench all`"),
    (["bench", "sparsity", "--kept", "0,0.5"], "--kept", "fractions in (0, 1]"),
    (["bench", "attention", "--tokens", "-5"], "--tokens", "positive integer"),
    (["bench", "step", "--model", "sdxl"], "--model", "invalid choice"),
    (["bench", "step", "--window", "box"], "--window", "invalid choice"),
    (["bench", "sweep", "--bogus"], "--bogus", "unknown option"),
    (["bench", "nope"], "WHAT", "invalid choice"),
    (["bench"], "WHAT", "required"),
    (["bench", "all", "--dry-run", "--only", "sparsity,nope"], "--only", "unknown case(s) 'nope'"),
    (["bench", "all", "--dry-run", "--device", "cuda"], "--device", "--dry-run runs on the CPU"),
    (["bench", "all", "--dry-run", "--out-md", "{tmp}/missing/B.md"], "--out-md", "does not exist"),
    (["bench", "all", "--dry-run", "--results-dir", "{tmp}/missing/r"], "--results-dir", "does not exist"),
    (["bench", "sparsity", "--json", "{tmp}/missing/r.json"], "--json", "does not exist"),
    (["bench", "sparsity", "--plot", "{tmp}/p.notanimage"], "--plot", "extension"),
    (["bench", "attention", "--device", "tpu9"], "--device", "tpu9"),
    # quality
    (["quality", "--only", "audio"], "--only", "invalid choice"),
    (["quality", "--samples", "3"], "--samples", "ambiguous"),
    (["quality", "--steps", "0"], "--steps", "positive integer"),
    (["quality", "--guidance-scale", "-1"], "--guidance-scale", ">= 0"),
    (["quality", "--samples-image", "1", "--only", "image"], "--samples-image", "at least 2"),
    (["quality", "--toy", "--weights", "{tmp}/none"], "--weights", "no trained testbed folder"),
    (["quality", "--out-md", "{tmp}/missing/Q.md"], "--out-md", "does not exist"),
    (["quality", "--results-dir", "{tmp}/afile"], "--results-dir", "not a folder"),
    (["quality", "--device", "tpu9"], "--device", "tpu9"),
    (["quality", "--reference-steps", "5"], "--reference-steps", "not an option of `ditaccel quality` (only of: worth)"),
    # worth
    (["worth", "--efficiency", "2"], "--efficiency", "(0.0, 1.0]"),
    (["worth", "--attention-share-video", "1.5"], "--attention-share-video", "[0.0, 1.0]"),
    (["worth", "--samples-video", "1"], "--samples-video", "at least 2"),
    (["worth", "--toy", "--weights", "{tmp}/none"], "--weights", "no trained testbed folder"),
    (["worth", "--results-dir", "{tmp}/missing/r"], "--results-dir", "does not exist"),
    (["worth", "--steps", "5"], "--steps", "not an option of `ditaccel worth` (only of: demo, calibrate, generate, "
                                           "eval, quality)"),
    # testbed train
    (["testbed", "train", "classifiers", "--init", "{tmp}"], "--init",
     "not an option of `ditaccel testbed train classifiers` (only of: image, video)"),
    (["testbed", "train", "image", "--layers", "3"], "--layers", "(only of: video)"),
    (["testbed", "train", "image", "--rope"], "--rope", "(only of: video)"),
    (["testbed", "train", "video", "--only", "image"], "--only", "(only of: classifiers)"),
    (["testbed", "train", "video", "--prediction-type", "epsilon"], "--prediction-type", "(only of: image)"),
    (["testbed", "train", "video", "--width", "20"], "--width", "multiple of 16"),
    (["testbed", "train", "video", "--heads", "0"], "--heads", ">= 1"),
    (["testbed", "train", "image", "--minutes", "0"], "--minutes", "> 0"),
    (["testbed", "train", "image", "--init", "{tmp}"], "--init", "no transformer/config.json"),
    (["testbed", "train", "image", "--probe-every", "1"], "--probe-every", "needs --probe-classifier"),
    (["testbed", "train", "video", "--probe-every", "1", "--probe-classifier", "{tmp}"], "--probe-classifier",
     "not a classifier folder"),
    (["testbed", "train", "image", "--out", "{tmp}/afile/image"], "--out", "is not a writable folder"),
    (["testbed", "train", "image", "--out", "{tmp}/afile"], "--out", "is not a folder"),
    (["testbed", "train", "classifiers", "--device", "tpu9"], "--device", "tpu9"),
    (["testbed", "train", "image", "--compile", "maybe"], "--compile", "invalid choice"),
    (["testbed", "train"], "WHAT", "required"),
    (["testbed", "train", "audio"], "WHAT", "invalid choice"),
    # the shared flags
    (["generate", "--progress", "sometimes"], "--progress", "invalid choice"),
    (["plan", "show", "{tmp}/P.json", "--progress", "on"], "--progress", "unknown option"),
]


@pytest.mark.parametrize("argv,field,phrase", TOOL_BAD_INPUT, ids=[" ".join(c[0][:4]) for c in TOOL_BAD_INPUT])
def test_tool_bad_input_is_one_line_before_any_work(argv, field, phrase, tmp_path, capsys, no_tool_work):
    (tmp_path / "afile").write_text("a file, not a folder")
    err = _one_line_error([a.replace("{tmp}", str(tmp_path)) for a in argv], capsys)
    assert f"error: {field}: " in err, err
    assert phrase in err, err
    assert "usage:" not in err


@pytest.mark.parametrize("command", ["bench", "quality", "worth", "testbed.train"])
def test_module_entry_points_are_the_same_command(command, capsys, no_tool_work):
    """``python -m ditaccel.bench ...`` etc. are thin wrappers over the same tree and errors."""
    import importlib

    module = importlib.import_module(f"ditaccel.{command}")
    argv = {"bench": ["sparsity", "--only", "x"], "quality": ["--bogus"], "worth": ["--bogus"],
            "testbed.train": ["classifiers", "--init", "x"]}[command]
    assert module.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("ditaccel: error: --") and err.count("\n") == 1


def test_cuda_without_cuda_is_one_line_for_every_tool(capsys, no_tool_work, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for argv in (["bench", "sparsity", "--device", "cuda"], ["quality", "--device", "cuda"],
                 ["worth", "--device", "cuda:1"], ["testbed", "train", "video", "--device", "cuda"]):
        err = _one_line_error(argv, capsys)
        assert "CUDA is not available" in err, argv


def test_device_auto_is_resolved_for_the_tools(monkeypatch):
    from ditaccel import quality
    from ditaccel.bench import command as bench

    seen = {}
    monkeypatch.setattr(bench, "bench_adaspa_step", lambda **kw: seen.setdefault("bench", kw["device"]) and {})
    monkeypatch.setattr(bench, "format_adaspa_step", lambda r: "")
    monkeypatch.setattr(quality, "run_quality", lambda only, **kw: seen.setdefault("quality", kw["device"]))
    assert cli.main(["bench", "adaspa-step", "--device", "auto"]) == 0
    assert cli.main(["quality", "--device", "auto"]) == 0
    assert seen == {"bench": cli.check_device("auto"), "quality": cli.check_device("auto")} and "auto" not in seen.values()


def test_debug_shows_the_traceback(tmp_path, capsys, no_work):
    argv = ["calibrate", "--model", "tiny-dit", "--out", str(tmp_path / "missing" / "P.json")]
    assert cli.main(argv) == 2
    with pytest.raises(cli.UsageError, match="--out: folder .* does not exist"):
        cli.main([*argv, "--debug"])
    with pytest.raises(cli.UsageError, match="--out"):
        cli.main(["--debug", *argv])
    with pytest.raises(cli.UsageError, match="--bogus"):  # even when parsing fails
        cli.main(["bench", "step", "--bogus", "--debug"])


# ------------------------------------------------------------------ generate: the image itself; a grid on request
def test_generate_writes_the_image_itself(tmp_path, capsys):
    import numpy as np
    import torch

    from ditaccel.viz import to_uint8

    out = tmp_path / "x.png"
    assert cli.main(["generate", "--model", "tiny-dit", "--steps", "2", "--class-labels", "3", "--seed", "5",
                     "--out", str(out)]) == 0
    assert f"-> {out}" in capsys.readouterr().out
    pipe = cli.load_pipeline("tiny-dit", "cpu", torch.float32)
    expected = to_uint8(pipe(class_labels=[3], num_inference_steps=2, generator=cli._generator("cpu", 5),
                             output_type="np").images)[0]
    got = np.asarray(Image.open(out).convert("RGB"))
    assert got.shape == expected.shape == (128, 128, 3)  # the image, no label column, no scaling
    assert np.array_equal(got, expected)
    assert not list(tmp_path.glob("x-*.png"))


def test_generate_several_images_and_grid_on_request(calibrated, tmp_path, capsys):
    path, rc, _ = calibrated
    assert rc == 0
    out, grid = tmp_path / "x.png", tmp_path / "grid.png"
    assert cli.main(["generate", "--model", "tiny-dit", "--plan", str(path), "--class-labels", "3", "7",
                     "--out", str(out), "--grid", str(grid)]) == 0
    printed = capsys.readouterr().out
    for i in (0, 1):
        assert assert_png(tmp_path / f"x-{i}.png") == (128, 128)
    assert not out.exists()
    assert f"grid: {grid}" in printed
    w, h = assert_png(grid)
    assert h >= 3 * 256 and w >= 2 * 256  # dense, ditfastattn and |diff| rows of two samples, scaled to 256 px


# ------------------------------------------------------------------ progress bars
def _bars(stderr: str) -> bool:
    return bool(re.search(r"\d+%\|", stderr)) or "it/s]" in stderr or "s/it]" in stderr


def test_progress_bars_when_asked_and_not_in_a_pipe(tmp_path, capsys):
    argv = ["calibrate", "--model", "tiny-dit", "--steps", "2", "--class-labels", "1", "--out", str(tmp_path / "P.json")]
    assert cli.main(argv) == 0
    assert capsys.readouterr().err == ""  # stderr is not a terminal here: no bars by default
    assert cli.main([*argv, "--progress", "on"]) == 0
    err = capsys.readouterr().err
    assert "ditaccel calibrate" in err and _bars(err)
    argv = ["generate", "--model", "tiny-dit", "--steps", "2", "--class-labels", "1", "--out", str(tmp_path / "x.png")]
    assert cli.main(argv) == 0
    assert capsys.readouterr().err == ""
    assert cli.main([*argv, "--progress", "on"]) == 0
    err = capsys.readouterr().err
    assert "dense" in err and _bars(err)
    assert cli.main([*argv, "--progress", "off"]) == 0
    assert capsys.readouterr().err == ""


def test_progress_auto_follows_the_terminal(monkeypatch):
    import argparse
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    auto = argparse.Namespace(progress="auto")
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert not cli.progress_on(auto) and cli.progress_bar(auto) is None
    monkeypatch.setattr("sys.stderr", Terminal())
    assert cli.progress_on(auto) and cli.progress_bar(auto) is not None
    assert not cli.progress_on(argparse.Namespace(progress="off"))


def test_eval_progress_bars(tmp_path, capsys, monkeypatch):
    """eval: one bar per generated set (dense, then the method), counting samples."""
    import ditaccel.evaluate

    seen = {}

    def fake(which, method, progress=None, **kw):
        seen["progress"] = progress
        from ditaccel.evaluate import generate_samples

        pipe = cli.load_pipeline("tiny-dit", "cpu", __import__("torch").float32)
        generate_samples(pipe, "image", [1, 2, 3], [0, 1, 2], 2, 2, {}, progress=progress, desc="dense")
        return {"psnr": 1.0}

    monkeypatch.setattr(ditaccel.evaluate, "evaluate_trained", fake)
    assert cli.main(["eval", "--method", "dense", "--progress", "on"]) == 0
    err = capsys.readouterr().err
    assert seen["progress"] is not None and "dense:" in err and "/3 [" in err and "sample/s" in err
    assert cli.main(["eval", "--method", "dense"]) == 0
    assert seen["progress"] is None and capsys.readouterr().err == ""


@pytest.mark.parametrize("command", ["quality", "worth"])
def test_sweeps_get_a_row_bar_only_when_asked(command, monkeypatch, capsys):
    import importlib

    module = importlib.import_module(f"ditaccel.{command}")
    seen = {}

    def fake(only=None, *, progress=None, log=print, **kw):
        seen["progress"] = progress
        bar = progress(total=3, desc=f"{command} image", unit="row") if progress else None
        for _ in range(3):
            log("a row")
            if bar:
                bar.update()
        return {}

    monkeypatch.setattr(module, f"run_{command}", fake)
    assert cli.main([command, "--toy", "--progress", "on"]) == 0
    cap = capsys.readouterr()
    assert f"{command} image:" in cap.err and "/3 [" in cap.err and "row/s" in cap.err
    assert cap.out.count("a row") == 3  # the log lines stay on stdout
    assert cli.main([command, "--toy"]) == 0
    cap = capsys.readouterr()
    assert seen["progress"] is None and cap.err == "" and cap.out.count("a row") == 3


def _recording_bar(events: list):
    """A tqdm-like factory that records what the library does with its bars."""
    class Bar:
        def __init__(self, total, desc, unit):
            events.append(("open", total, desc))

        def update(self, n=1):
            events.append(("row", n))

        def close(self):
            events.append(("close",))

    return Bar


def test_evaluate_counts_its_samples(dit):
    from ditaccel.evaluate import evaluate

    events = []
    evaluate(dit, ditaccel.AdaSpaConfig(sparsity=0.5, block_size=16), n=3, steps=2, batch_size=2,
             progress=_recording_bar(events))
    assert events == [("open", 3, "dense"), ("row", 2), ("row", 1), ("close",),
                      ("open", 3, "AdaSpaConfig"), ("row", 2), ("row", 1), ("close",)]
    events.clear()
    evaluate(dit, None, n=2, steps=2, batch_size=2)  # quiet by default: no bar, nothing on stderr
    assert events == []


def test_worth_table_counts_its_rows(toy_weights):
    from ditaccel.worth import Setting, run_table

    events = []
    run_table("image", [Setting("dense 2", "dense (fewer steps)", 2)], weights_dir=toy_weights, n=2, batch_size=2,
              reference_steps=2, n_reference=4, log=lambda line: None, progress=_recording_bar(events))
    assert events == [("open", 2, "worth image"), ("row", 1), ("row", 1), ("close",)]


def test_quality_table_counts_its_rows(toy_weights):
    """The library side of the sweep bar: run_table advances it once per row (dense first)."""
    from ditaccel.quality import Setting, run_table

    events = []
    Bar = _recording_bar(events)
    settings = [Setting("s=0.5", "AdaSpa", ("0.5", "yes", "yes"), ditaccel.AdaSpaConfig(sparsity=0.5, block_size=16))]
    run_table("video", settings, weights_dir=toy_weights, n=2, steps=2, batch_size=2, n_reference=4,
              log=lambda line: None, progress=Bar)
    assert events == [("open", 2, "quality video"), ("row", 1), ("row", 1), ("close",)]


# ------------------------------------------------------------------ every documented command is valid
def _documented_commands() -> list[str]:
    """``ditaccel ...`` commands in the docs (inline code and shell blocks) and the ones the
    benchmark cases print, placeholders (``[...]``, ``<...>``, ``a|b``, ``...``) left out."""
    from pathlib import Path

    from ditaccel.bench import CASES

    root = Path(__file__).resolve().parents[1]
    found = [c.command for c in CASES]
    for name in ("README.md", "BENCHMARKS.md", "QUALITY.md", *(f"scripts/{p.name}" for p in (root / "scripts").glob("*.sh"))):
        text = (root / name).read_text()
        found += re.findall(r"`(ditaccel [^`]+)`", text)
        found += re.findall(r"^(ditaccel [^#\n]+)", text, re.M)
    placeholder = re.compile(r"[\[\]<>|{}$]|\.\.\.|\bW\b|COMMAND|NAME")
    return sorted({" ".join(c.split()) for c in found if not placeholder.search(c) and "-h" not in c.split()})


def test_documented_commands_parse():
    import shlex

    commands = _documented_commands()
    assert len(commands) >= 25
    parser = cli.build_parser()
    for command in commands:
        args = parser.parse_args(shlex.split(command)[1:])  # a UsageError names the broken one
        assert callable(args.func), command
