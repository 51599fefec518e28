"""Plan behaviour that mutation testing (docs/MUTATION.md) found untested: the exact summary text,
to_dict's independence from the plan, the defaults of a plan document, derived-plan metadata."""

import copy
import json

import pytest

from ditaccel.plan import FORMAT, Plan, PlanError

METHODS = [["full", "wars", "ast"], ["asc", "full", "wars+asc"]]  # 2 layers x 3 steps


def _md(**extra):
    md = {"model_class": "DiTTransformer2DModel", "config_fingerprint": "0123456789abcdef", "num_layers": 2,
          "num_steps": 3, "cfg": True, "window": "band1d", "window_size": 0.25}
    md.update(extra)
    return md


def test_summary_exact_with_every_informative_key():
    p = Plan(copy.deepcopy(METHODS), _md(scheduler="DDIMScheduler", tokens=256, grid=[16, 16], threshold=0.05,
                                         calibration_seconds=12.345, calibration_inputs=8))
    assert p.summary().split("\n") == [
        "ditaccel plan (ditfastattn, format 1)",
        "  model      DiTTransformer2DModel [0123456789abcdef], 2 layers",
        "  steps      3 (DDIMScheduler), cfg=True",
        "  tokens     256 (grid [16, 16])",
        "  window     band1d, size 0.25",
        "  threshold  0.05",
        "  calibrated in 12.3 s on 8 inputs",
        # 6 (layer, step) pairs: percentages are of layers x steps
        "  full          2   33.3%",
        "  wars          1   16.7%",
        "  ast           1   16.7%",
        "  asc           1   16.7%",
        "  wars+asc      1   16.7%",
    ]


def test_summary_exact_with_only_the_required_keys():
    p = Plan([["full"] * 3, ["full", "full", "ast"]], _md(cfg=False, window="neighborhood2d", window_size=0.5))
    assert p.summary().split("\n") == [
        "ditaccel plan (ditfastattn, format 1)",
        "  model      DiTTransformer2DModel [0123456789abcdef], 2 layers",
        "  steps      3 (?), cfg=False",
        "  tokens     ? (grid ?)",
        "  window     neighborhood2d, size 0.5",
        "  threshold  ?",  # no "calibrated in" line without calibration_seconds
        "  full          5   83.3%",
        "  wars          0    0.0%",
        "  ast           1   16.7%",
        "  asc           0    0.0%",
        "  wars+asc      0    0.0%",
    ]
    # calibration_seconds that is not a number is not printed as one
    assert "calibrated" not in Plan(p.methods, dict(p.metadata, calibration_seconds="?")).summary()
    assert "  calibrated in 2.0 s on ? inputs" in Plan(p.methods, dict(p.metadata, calibration_seconds=2)).summary()


def test_to_dict_is_independent_of_the_plan():
    p = Plan(copy.deepcopy(METHODS), _md(grid=[4, 4]))
    d = p.to_dict()
    assert d == {"format": FORMAT, "version": 1, "method": "ditfastattn", "metadata": p.metadata,
                 "methods": METHODS}
    d["methods"][0][0] = "wars"
    d["metadata"]["grid"][0] = 99
    d["metadata"]["cfg"] = False
    assert p.methods == METHODS
    assert p.metadata["grid"] == [4, 4] and p.metadata["cfg"] is True


def test_a_document_without_method_is_a_ditfastattn_plan():
    d = Plan(copy.deepcopy(METHODS), _md()).to_dict()
    del d["method"]
    p = Plan.from_dict(d)
    assert p.method == "ditfastattn"
    d["method"] = "adaspa"
    with pytest.raises(PlanError, match="method"):
        Plan.from_dict(d)


def test_without_asc_records_its_origin_and_keeps_the_method():
    p = Plan(copy.deepcopy(METHODS), _md(threshold=0.1))
    w = p.without_asc()
    assert w.metadata == dict(p.metadata, cfg=False, derived_from="without_asc")
    assert w.methods == [["full", "wars", "ast"], ["full", "full", "wars"]]
    assert w.method == "ditfastattn"
    assert p.metadata["cfg"] is True and "derived_from" not in p.metadata  # the original is untouched


def test_saved_file_is_one_space_indented_json(tmp_path):
    """The file layout is part of what ``plan show`` users and diffs see: stable, one-space indent."""
    p = Plan(copy.deepcopy(METHODS), _md())
    p.save(tmp_path / "p.json")
    text = (tmp_path / "p.json").read_text()
    assert text == json.dumps(p.to_dict(), indent=1) + "\n"
    assert text.startswith('{\n "format": "ditaccel.plan",\n "version": 1,\n')


def test_from_methods_metadata(dit):
    import datetime

    import ditaccel

    p = Plan.from_methods(dit, [["full"] * 2] * 3, cfg=False)
    md = p.metadata
    assert md["scheduler"] == type(dit.scheduler).__name__ and md["source"] == "hand-made"
    assert md["library_version"] == ditaccel.__version__
    created = datetime.datetime.fromisoformat(md["created"])
    assert created.utcoffset() == datetime.timedelta(0) and created.microsecond == 0  # UTC, to the second
    assert Plan.from_methods(dit, [["full"] * 2] * 3, cfg=False, scheduler="Mine").metadata["scheduler"] == "Mine"
    assert "scheduler" not in Plan.from_methods(dit.transformer, [["full"] * 2] * 3, cfg=False).metadata
    empty = Plan.from_methods(dit.transformer, [], cfg=False)
    assert (empty.num_layers, empty.num_steps, empty.metadata["num_steps"]) == (0, 0, 0)


def test_config_fingerprint_is_order_free_and_takes_any_value():
    from types import SimpleNamespace

    import torch

    from ditaccel.plan import config_fingerprint

    a = SimpleNamespace(config={"b": 1, "a": [2, 3], "dtype": torch.float16, "_name_or_path": "x"})
    b = SimpleNamespace(config={"dtype": torch.float16, "a": [2, 3], "b": 1})
    assert config_fingerprint(a) == config_fingerprint(b)
    assert len(config_fingerprint(a)) == 16
    assert config_fingerprint(SimpleNamespace(config={"b": 2, "a": [2, 3], "dtype": torch.float16})) != \
        config_fingerprint(a)


def test_counts_list_an_ablation_method_only_when_used():
    with_wa = Plan([["full", "wa", "wars"], ["wa", "ast", "full"]], _md(cfg=False))
    assert with_wa.counts() == {"full": 2, "wars": 1, "ast": 1, "asc": 0, "wars+asc": 0, "wa": 2}
    assert "wa" not in Plan([["full"] * 3] * 2, _md()).counts()


def test_window_size_one_is_valid():
    assert Plan([["full"] * 3] * 2, _md(window_size=1.0)).metadata["window_size"] == 1.0
    with pytest.raises(PlanError, match="window_size"):
        Plan([["full"] * 3] * 2, _md(window_size=1.5))


def test_summary_of_a_one_pair_plan_is_100_percent():
    p = Plan([["full"]], _md(num_layers=1, num_steps=1))
    assert "  full          1  100.0%" in p.summary().split("\n")
