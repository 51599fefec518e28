"""Plan files (JSON, never pickle): round trip, every rejection path, model checks, derived plans."""

import copy
import json
import math
import pickle
import re
from collections import Counter

import pytest
import torch
from conftest import STEPS, dit_call
from diffusers import DiTTransformer2DModel

import ditaccel
from ditaccel.methods.ditfastattn import METHODS
from ditaccel.models import adapter_for
from ditaccel.plan import FORMAT, REQUIRED_METADATA, VERSION, Plan, PlanError, config_fingerprint
from ditaccel.runtime import get_runtime

# 3 layers x STEPS (6) steps; uses every method, each where it is legal.
ROWS = [
    ["full", "wars", "ast", "asc", "wars+asc", "full"],
    ["full", "ast", "ast", "full", "wars", "wars+asc"],
    ["asc", "full", "wars", "wars+asc", "ast", "full"],
]


@pytest.fixture
def plan(dit):
    assert len(adapter_for(dit.transformer).attention_modules(dit.transformer)) == len(ROWS)
    return ditaccel.Plan.from_methods(dit, ROWS, cfg=True)


@pytest.fixture
def good(plan):
    """A valid plan dict, independent of ``plan`` (to_dict shares its lists)."""
    return copy.deepcopy(plan.to_dict())


def _processors(pipe):
    """Every attention processor of the transformer (self- and cross-attention), by module name."""
    procs = {n: m.processor for n, m in pipe.transformer.named_modules() if hasattr(m, "set_processor")}
    assert procs
    return procs


def _write(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f)
    return path


# ------------------------------------------------------------------ round trip
def test_plan_error_is_value_error():
    assert issubclass(PlanError, ValueError)


def test_save_load_round_trip(plan, tmp_path):
    path = tmp_path / "p.json"
    plan.save(path)
    raw = path.read_bytes()
    assert raw.startswith(b"{")  # JSON text, not a pickle (pickles start with b"\x80")
    with pytest.raises(pickle.UnpicklingError):
        pickle.loads(raw)
    with open(path) as f:
        d = json.load(f)
    assert d["format"] == FORMAT == "ditaccel.plan"
    assert d["version"] == 1 and VERSION == 2  # a plan without AdaSpa entries is still written as version 1
    assert d["methods"] == ROWS
    loaded = Plan.load(path)
    assert loaded.methods == plan.methods
    assert loaded.metadata == plan.metadata
    assert loaded.method == plan.method == "ditfastattn"
    assert (loaded.num_layers, loaded.num_steps) == (3, STEPS)
    # a second save of the loaded plan is byte-identical
    loaded.save(tmp_path / "q.json")
    assert (tmp_path / "q.json").read_bytes() == raw


def test_loaded_plan_gives_same_images(dit, plan, tmp_path):
    path = tmp_path / "p.json"
    plan.save(path)
    dense = dit_call(dit)
    ditaccel.apply(dit, plan)
    try:
        in_memory = dit_call(dit)
    finally:
        ditaccel.remove(dit)
    ditaccel.apply(dit, Plan.load(path))
    try:
        from_file = dit_call(dit)
    finally:
        ditaccel.remove(dit)
    assert not torch.equal(in_memory, dense)  # the plan does compress
    assert torch.equal(from_file, in_memory)
    # apply() also takes the path itself
    ditaccel.apply(dit, str(path))
    try:
        from_path = dit_call(dit)
    finally:
        ditaccel.remove(dit)
    assert torch.equal(from_path, in_memory)
    assert get_runtime(dit) is None


# ------------------------------------------------------------------ rejections: the file
def test_garbage_file_is_rejected(tmp_path):
    path = tmp_path / "p.json"
    path.write_text("this is { not json")
    with pytest.raises(PlanError, match=r"not valid JSON"):
        Plan.load(path)


def test_empty_file_is_rejected(tmp_path):
    path = tmp_path / "p.json"
    path.write_text("")
    with pytest.raises(PlanError, match=r"not valid JSON"):
        Plan.load(path)


def test_pickle_file_is_rejected_with_plan_error(plan, tmp_path):
    path = tmp_path / "p.pkl"
    path.write_bytes(pickle.dumps(plan.to_dict()))
    with pytest.raises(PlanError, match=r"not valid JSON"):
        Plan.load(path)


# ------------------------------------------------------------------ rejections: the document
def _set(*keys_and_value):
    *keys, value = keys_and_value

    def mutate(d):
        obj = d
        for k in keys[:-1]:
            obj = obj[k]
        obj[keys[-1]] = value
        return d
    return mutate


def _del(*keys):
    def mutate(d):
        obj = d
        for k in keys[:-1]:
            obj = obj[k]
        del obj[keys[-1]]
        return d
    return mutate


def _methods(fn):
    def mutate(d):
        fn(d["methods"])
        return d
    return mutate


DOCUMENT_CASES = {
    "json-list": (lambda d: [d], r"^plan: .*JSON object"),
    "json-string": (lambda d: "ditaccel.plan", r"^plan: .*JSON object"),
    "format-wrong": (_set("format", "ditaccel.plan.v2"), r"^format: expected 'ditaccel.plan'"),
    "format-missing": (_del("format"), r"^format: expected"),
    "version-newer": (_set("version", 3), r"^version: .*3 is newer"),
    "version-zero": (_set("version", 0), r"^version: expected a positive integer"),
    "version-negative": (_set("version", -1), r"^version: expected a positive integer"),
    "version-string": (_set("version", "1"), r"^version: expected a positive integer, got '1'"),
    "version-bool": (_set("version", True), r"^version: expected a positive integer, got True"),
    "version-float": (_set("version", 1.0), r"^version: expected a positive integer"),
    "version-missing": (_del("version"), r"^version: expected a positive integer, got None"),
    "metadata-missing": (_del("metadata"), r"^metadata: missing"),
    "methods-missing": (_del("methods"), r"^methods: missing"),
    "metadata-not-object": (_set("metadata", [1, 2]), r"^metadata: must be an object"),
    "method-unknown": (_set("method", "adaspa"), r"^method: unknown plan method 'adaspa'"),
    "methods-not-list": (_set("methods", "full"), r"^methods: must be a list"),
    "methods-row-not-list": (_set("methods", 1, "full"), r"^methods: must be a list"),
    "unknown-method-name": (_set("methods", 1, 2, "dense"), r"^methods\[1\]\[2\]: unknown method 'dense'"),
    "format-2-entry-in-version-1": (_set("methods", 1, 2, "sparse"),
                                    r"^methods\[1\]\[2\]: 'sparse' is a format-2 entry .*version 1"),
    "method-name-not-string": (_set("methods", 0, 1, 7), r"^methods\[0\]\[1\]: unknown method 7"),
    "ragged-rows": (_methods(lambda m: m[1].pop()), r"^methods\[1\]: 5 steps, but metadata.num_steps is 6"),
    "too-few-layers": (_methods(lambda m: m.pop()), r"^methods: 2 layers, but metadata.num_layers is 3"),
    "num-layers-mismatch": (_set("metadata", "num_layers", 4), r"^methods: 3 layers, but metadata.num_layers is 4"),
    "num-steps-mismatch": (_set("metadata", "num_steps", 7), r"^methods\[0\]: 6 steps, but metadata.num_steps is 7"),
    "all-rows-longer": (_methods(lambda m: [r.append("full") for r in m]),
                        r"^methods\[0\]: 7 steps, but metadata.num_steps is 6"),
    "step0-ast": (_set("methods", 1, 0, "ast"), r"^methods\[1\]\[0\]: step 0 must compute attention"),
    "step0-wars": (_set("methods", 2, 0, "wars"), r"^methods\[2\]\[0\]: step 0 must compute attention"),
    "step0-wars+asc": (_set("methods", 0, 0, "wars+asc"), r"^methods\[0\]\[0\]: step 0 must compute attention"),
    # layer 2 starts with asc: a wars right after it has no residual yet
    "wars-before-full": (_set("methods", 2, 1, "wars"), r"^methods\[2\]\[1\]: 'wars' needs an earlier 'full'"),
    "wars+asc-before-full": (_set("methods", 2, 1, "wars+asc"),
                             r"^methods\[2\]\[1\]: 'wars\+asc' needs an earlier 'full'"),
    # the first asc-like entry in row-major order is methods[0][3]
    "asc-without-cfg": (_set("metadata", "cfg", False), r"^methods\[0\]\[3\]: 'asc' needs CFG, but metadata.cfg is false"),
    "window-unknown": (_set("metadata", "window", "band2d"), r"^metadata\.window: unknown window 'band2d'"),
    "window-size-zero": (_set("metadata", "window_size", 0), r"^metadata\.window_size: must be in \(0, 1\]"),
    "window-size-negative": (_set("metadata", "window_size", -0.25), r"^metadata\.window_size: must be in"),
    "window-size-above-one": (_set("metadata", "window_size", 1.5), r"^metadata\.window_size: must be in"),
    "window-size-nan": (_set("metadata", "window_size", math.nan), r"^metadata\.window_size: must be in"),
    "window-size-inf": (_set("metadata", "window_size", math.inf), r"^metadata\.window_size: must be in"),
}


@pytest.mark.parametrize("case", list(DOCUMENT_CASES))
def test_invalid_document_is_rejected(good, tmp_path, case):
    mutate, pattern = DOCUMENT_CASES[case]
    Plan.from_dict(copy.deepcopy(good))  # the unmutated document is valid
    path = _write(tmp_path / "p.json", mutate(good))
    with pytest.raises(PlanError, match=pattern):
        Plan.load(path)


# wrong values for each required metadata key (bool is not an int)
WRONG_TYPES = {str: [1, None, ["x"]], int: ["3", 3.0, True, None], bool: [1, 0, "true", None],
               (int, float): ["0.25", None, [0.25]]}
METADATA_TYPE_CASES = [(key, bad) for key, typ in REQUIRED_METADATA.items() for bad in WRONG_TYPES[typ]]


def test_required_metadata_keys_are_the_documented_ones():
    assert set(REQUIRED_METADATA) == {"model_class", "config_fingerprint", "num_layers", "num_steps", "cfg",
                                      "window", "window_size"}


@pytest.mark.parametrize("key", list(REQUIRED_METADATA))
def test_missing_metadata_key_is_rejected(good, tmp_path, key):
    del good["metadata"][key]
    with pytest.raises(PlanError, match=rf"^metadata\.{key}: missing"):
        Plan.load(_write(tmp_path / "p.json", good))


@pytest.mark.parametrize("key,bad", METADATA_TYPE_CASES, ids=[f"{k}={v!r}" for k, v in METADATA_TYPE_CASES])
def test_wrong_metadata_type_is_rejected(good, tmp_path, key, bad):
    good["metadata"][key] = bad
    with pytest.raises(PlanError, match=rf"^metadata\.{key}: expected .*got {re.escape(repr(bad))}"):
        Plan.load(_write(tmp_path / "p.json", good))


def test_bool_window_size_is_rejected(good, tmp_path):
    good["metadata"]["window_size"] = True
    with pytest.raises(PlanError, match=r"^metadata\.window_size"):
        Plan.load(_write(tmp_path / "p.json", good))


def test_constructor_validates_like_load(dit):
    with pytest.raises(PlanError, match=r"^methods\[0\]\[0\]: step 0"):
        Plan.from_methods(dit, [["ast"] * STEPS] * 3, cfg=True)
    with pytest.raises(PlanError, match=r"^methods\[0\]\[0\]: 'asc' needs CFG"):
        Plan.from_methods(dit, [["asc"] + ["full"] * (STEPS - 1)] * 3, cfg=False)
    with pytest.raises(PlanError, match=r"^metadata\.window: unknown window"):
        Plan.from_methods(dit, [["full"] * STEPS] * 3, cfg=True, window="box")
    with pytest.raises(PlanError, match=r"^metadata\.window_size: must be in"):
        Plan.from_methods(dit, [["full"] * STEPS] * 3, cfg=True, window_size=0.0)


# ------------------------------------------------------------------ check_model
def test_plan_for_another_model_class_is_refused(plan, pixart):
    before = _processors(pixart)
    with pytest.raises(PlanError, match=r"^metadata\.model_class: plan made for DiTTransformer2DModel, "
                                        r"this transformer is PixArtTransformer2DModel"):
        ditaccel.apply(pixart, plan)
    after = _processors(pixart)
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert get_runtime(pixart) is None
    assert "set_timesteps" not in vars(pixart.scheduler)


def test_plan_for_another_config_is_refused(dit, good, tmp_path):
    good["metadata"]["config_fingerprint"] = "0123456789abcdef"
    path = _write(tmp_path / "p.json", good)
    plan = Plan.load(path)  # a valid file: the mismatch is only found against the model
    before = _processors(dit)
    with pytest.raises(PlanError, match=r"^metadata\.config_fingerprint: .*0123456789abcdef != "):
        plan.check_model(dit.transformer)
    for target in (plan, str(path)):  # apply() with the plan or with its path
        with pytest.raises(PlanError, match=r"^metadata\.config_fingerprint: .*0123456789abcdef != "):
            ditaccel.apply(dit, target)
        after = _processors(dit)
        assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
        assert get_runtime(dit) is None
        assert "set_timesteps" not in vars(dit.scheduler)


def test_check_model_accepts_own_model(dit, plan):
    plan.check_model(dit.transformer)  # no error
    assert plan.metadata["config_fingerprint"] == config_fingerprint(dit.transformer)
    assert plan.metadata["model_class"] == "DiTTransformer2DModel"


# ------------------------------------------------------------------ derived plans, counts
def test_without_asc(plan):
    w = plan.without_asc()
    swap = {"asc": "full", "wars+asc": "wars"}
    assert w.methods == [[swap.get(m, m) for m in row] for row in ROWS]
    assert w.metadata["cfg"] is False
    assert w.counts()["asc"] == 0 and w.counts()["wars+asc"] == 0
    assert w.counts()["full"] == plan.counts()["full"] + plan.counts()["asc"]
    assert w.counts()["wars"] == plan.counts()["wars"] + plan.counts()["wars+asc"]
    assert w.counts()["ast"] == plan.counts()["ast"]
    # the original plan is untouched
    assert plan.methods == ROWS and plan.metadata["cfg"] is True
    # the derived plan is itself valid (it validates in __post_init__) and survives a round trip
    assert Plan.from_dict(json.loads(json.dumps(w.to_dict()))).methods == w.methods


def test_without_asc_runs_without_cfg(dit, plan):
    ditaccel.apply(dit, plan.without_asc())
    try:
        out = dit_call(dit, guidance_scale=1.0)
        st = ditaccel.stats(dit)
    finally:
        ditaccel.remove(dit)
    assert torch.isfinite(out).all()
    assert st.method_counts.get("asc", 0) == 0 and st.method_counts.get("wars+asc", 0) == 0


def test_counts(plan):
    c = plan.counts()
    assert list(c) == list(METHODS)
    assert sum(c.values()) == plan.num_layers * plan.num_steps == 3 * STEPS
    expected = Counter(m for row in ROWS for m in row)
    assert c == {m: expected.get(m, 0) for m in METHODS}
    assert c == {"full": 6, "wars": 3, "ast": 4, "asc": 2, "wars+asc": 3}


def test_summary_names_model_and_counts(plan):
    s = plan.summary()
    assert "DiTTransformer2DModel" in s and plan.metadata["config_fingerprint"] in s
    assert f"{plan.num_layers} layers" in s and f"steps      {STEPS}" in s
    for m, n in plan.counts().items():
        assert any(line.split()[:2] == [m, str(n)] for line in s.splitlines()), m


# ------------------------------------------------------------------ fingerprint
def test_config_fingerprint_ignores_private_keys(dit):
    a = DiTTransformer2DModel.from_config(dit.transformer.config)
    b = DiTTransformer2DModel.from_config(dit.transformer.config)
    b.register_to_config(_name_or_path="/somewhere/else/dit")
    assert dict(b.config)["_name_or_path"] == "/somewhere/else/dit"
    assert config_fingerprint(a) == config_fingerprint(b) == config_fingerprint(dit.transformer)
    assert len(config_fingerprint(a)) == 16
    # a plan made for ``dit`` is valid for the copy loaded from elsewhere
    Plan.from_methods(dit, ROWS, cfg=True).check_model(b)
    # ...but an architecture change changes the fingerprint
    cfg = {k: v for k, v in dict(dit.transformer.config).items() if not k.startswith("_")}
    c = DiTTransformer2DModel.from_config(dict(cfg, num_layers=2))
    assert config_fingerprint(c) != config_fingerprint(a)
    b.register_to_config(sample_size=dit.transformer.config.sample_size * 2)
    assert config_fingerprint(b) != config_fingerprint(a)
