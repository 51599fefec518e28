"""Procedural testbed data, the pixel-space pipelines, toy training runs and the size budget."""

import json

import pytest
import torch
from safetensors import safe_open

from ditaccel.testbed.classifier import ImageClassifier, VideoClassifier
from ditaccel.testbed.data import ImageClasses, VideoCaptions, make_generator
from ditaccel.testbed.pixel import (
    IMAGE_MODEL_CONFIG,
    VIDEO_MODEL_CONFIG,
    PixelCogVideoXPipeline,
    PixelDiTPipeline,
    build_caption_tokenizer,
    load_image_pipeline,
    load_video_pipeline,
)
from ditaccel.testbed.train import (
    build_image_transformer,
    build_video_components,
    weights_bytes,
    train_classifiers,
    train_image,
    train_video,
)


# ------------------------------------------------------------------------------ images
def test_images_deterministic_per_seed():
    data = ImageClasses(size=32)
    a, la = data.sample(24, 7)
    b, lb = data.sample(24, torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and torch.equal(la, lb)
    c, _ = data.sample(24, 8)
    assert not torch.equal(a, c)
    g = make_generator(3)  # a generator continues its stream: two draws differ
    d1, _ = data.sample(4, g)
    d2, _ = data.sample(4, g)
    assert not torch.equal(d1, d2)


def test_images_shape_range_and_balance():
    data = ImageClasses(size=32)
    assert data.num_classes == 12 >= 10
    x, y = data.sample(30, 0)
    assert x.shape == (30, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() >= -1 and x.max() <= 1
    counts = torch.bincount(y, minlength=12)
    assert counts.min() >= 2 and counts.max() <= 3 and counts.sum() == 30
    x, y = data.sample(24, 1)
    assert (torch.bincount(y, minlength=12) == 2).all()


def test_images_explicit_labels_and_visible_structure():
    data = ImageClasses(size=32)
    labels = torch.arange(12)
    x, y = data.sample(12, 5, labels=labels)
    assert torch.equal(y, labels)
    # every class draws something: strong local contrast in every image
    assert (x.flatten(1).std(1) > 0.1).all()
    # same parameters, different class -> different picture (the class is in the structure)
    x2, _ = data.sample(12, 5, labels=(labels + 1) % 12)
    assert ((x - x2).abs().flatten(1).amax(1) > 0.5).all()
    with pytest.raises(ValueError, match="labels"):
        data.sample(2, 0, labels=[0, 12])
    with pytest.raises(TypeError):
        data.sample(2, "seed")


# ------------------------------------------------------------------------------ videos
def test_videos_deterministic_shapes_and_balance():
    data = VideoCaptions(frames=6, size=24)
    v, caps, lab = data.sample(20, 3)
    v2, caps2, lab2 = data.sample(20, 3)
    assert torch.equal(v, v2) and caps == caps2 and all(torch.equal(lab[k], lab2[k]) for k in lab)
    assert v.shape == (20, 3, 6, 24, 24) and v.min() >= -1 and v.max() <= 1
    for k, n in data.num_classes.items():
        counts = torch.bincount(lab[k], minlength=n)
        assert counts.max() - counts.min() <= 1, k
    assert not torch.equal(v, data.sample(20, 4)[0])


def test_captions_round_trip_and_tokenize_without_unknowns():
    data = VideoCaptions(frames=4, size=16)
    _, caps, lab = data.sample(30, 0)
    for i, c in enumerate(caps):
        assert VideoCaptions.parse(c) == {k: int(lab[k][i]) for k in VideoCaptions.FACTORS}
    assert caps[0].startswith("a ") and len(set(caps)) > 10
    tok = build_caption_tokenizer(16)
    ids = tok(caps, padding="max_length", max_length=16).input_ids
    assert all(tok.unk_token_id not in row and row.count(1) == 1 for row in ids)  # one </s>, no <unk>
    with pytest.raises(ValueError):
        VideoCaptions.parse("a red blue circle")


def _centroids(video):
    """Centre (x, y) per frame of the saturated (object) pixels of one video in [-1, 1]."""
    rgb = (video + 1) / 2
    sat = rgb.amax(0) - rgb.amin(0)  # (F, H, W)
    m = (sat > 0.45).float()
    h, w = m.shape[-2:]
    ys = torch.arange(h, dtype=torch.float32)[:, None]
    xs = torch.arange(w, dtype=torch.float32)[None, :]
    tot = m.sum((1, 2))
    return (m * xs).sum((1, 2)) / tot, (m * ys).sum((1, 2)) / tot


def test_videos_move_as_captioned():
    data = VideoCaptions(frames=8, size=32)
    n = 10
    labels = {"object": torch.arange(n) % 4, "colour": torch.arange(n) % 5, "motion": torch.arange(n) % 5,
              "background": torch.zeros(n, dtype=torch.long)}  # plain: the object is the only saturated thing
    v, caps, _ = data.sample(n, 11, labels=labels)
    for i in range(n):
        cx, cy = _centroids(v[i])
        dx, dy = float(cx[-1] - cx[0]), float(cy[-1] - cy[0])
        motion = VideoCaptions.MOTIONS[int(labels["motion"][i])]
        expect = {"left": (dx < -4, abs(dy) < 1), "right": (dx > 4, abs(dy) < 1), "up": (dy < -4, abs(dx) < 1),
                  "down": (dy > 4, abs(dx) < 1), "still": (abs(dx) < 0.5, abs(dy) < 0.5)}[motion]
        assert all(expect), (caps[i], dx, dy)


# ------------------------------------------------------------------------------ pipelines + training
def _safetensors_dtypes(path):
    with safe_open(str(path), "pt") as f:
        return {f.get_tensor(k).dtype for k in f.keys()}


def test_toy_image_training_saves_fp16_and_loads_with_from_pretrained(tmp_path):
    from diffusers import DiTTransformer2DModel

    info = train_image(tmp_path / "image", toy=True, device="cpu", seed=3, progress=False)
    assert info["steps_done"] == 3 and (tmp_path / "image" / "train_info.json").is_file()
    assert _safetensors_dtypes(tmp_path / "image/transformer/diffusion_pytorch_model.safetensors") == {torch.float16}
    tr = DiTTransformer2DModel.from_pretrained(str(tmp_path / "image/transformer"))
    assert tr.config.num_embeds_ada_norm == 12 and tr.config.in_channels == 3
    pipe = load_image_pipeline(tmp_path / "image")
    assert isinstance(pipe, PixelDiTPipeline) and pipe.get_label_ids(["ring"]) == [3]
    img = pipe([0, 11], num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert img.shape == (2, 3, 16, 16) and img.min() >= 0 and img.max() <= 1
    # deterministic per seed: a second run gives the same weights
    train_image(tmp_path / "again", toy=True, device="cpu", seed=3, progress=False)
    a = DiTTransformer2DModel.from_pretrained(str(tmp_path / "again/transformer")).state_dict()
    assert all(torch.equal(v, a[k]) for k, v in tr.state_dict().items())


def test_step_plan_is_fitted_to_the_budget_only_when_no_step_count_is_given():
    from ditaccel.testbed.training import Budget, StepPlan

    budget = Budget(1.0)
    t = budget.t0
    fixed = StepPlan(1000, 50, start=0, first=10, every=100)
    for done in range(1, 300):
        fixed.update(done, budget, now=t + done * 0.1)
    assert fixed.steps == 1000 and fixed.history == []
    plan = StepPlan(None, 50, start=5, first=10, every=100)
    for done in range(1, 15):  # mark at step 5; fitted at 15: 10 steps/s with 58.5 s left
        plan.update(done, budget, now=t + done * 0.1)
    assert plan.steps == 50 and plan.history == []
    plan.update(15, budget, now=t + 1.5)
    assert plan.steps == 15 + int(10 * 58.5 * 0.97) and len(plan.history) == 1
    for done in range(16, 115):  # next fit only 100 steps later
        plan.update(done, budget, now=t + 1.5 + (done - 15) * 0.05)
    assert len(plan.history) == 1
    plan.update(115, budget, now=t + 6.5)  # the rate doubled (a job sharing the GPU ended): refit
    assert plan.history[-1] == (115, 115 + int(20 * 53.5 * 0.97)) == (115, plan.steps)


def test_training_continues_from_saved_weights(tmp_path):
    from ditaccel.testbed.checkpoint import load_saved_weights

    train_image(tmp_path / "image", toy=True, device="cpu", seed=3, progress=False)
    train_video(tmp_path / "video", toy=True, device="cpu", seed=3, progress=False)
    fresh = build_image_transformer(toy=True, seed=5)
    load_saved_weights(tmp_path / "image", {"transformer": fresh})
    saved = load_image_pipeline(tmp_path / "image").transformer.state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in fresh.state_dict().items())
    _, text_encoder, transformer = build_video_components(toy=True, seed=5)
    load_saved_weights(tmp_path / "video", {"transformer": transformer, "text_encoder": text_encoder})
    pipe = load_video_pipeline(tmp_path / "video")
    for mine, theirs in ((transformer, pipe.transformer), (text_encoder, pipe.text_encoder)):
        ref = theirs.state_dict()
        assert all(torch.equal(v, ref[k]) for k, v in mine.state_dict().items())
    with pytest.raises(ValueError, match="init_from.*does not match"):
        train_image(tmp_path / "x", toy=True, device="cpu", progress=False, init_from=tmp_path / "video")
    with pytest.raises(FileNotFoundError, match="init_from"):
        train_image(tmp_path / "x", toy=True, device="cpu", progress=False, init_from=tmp_path / "nothing")
    assert not (tmp_path / "x").exists()
    info = train_image(tmp_path / "more", toy=True, device="cpu", progress=False, init_from=tmp_path / "image")
    assert info["init_from"] == str(tmp_path / "image")


def test_a_compiler_failure_falls_back_to_eager_training(monkeypatch):
    from ditaccel.testbed import training as T

    def broken_compile(model):
        def run(*args, **kwargs):
            raise RuntimeError("no compiler here")
        return run

    monkeypatch.setattr(T.torch, "compile", broken_compile)
    lin = torch.nn.Linear(3, 2)
    fwd = T.maybe_compiled(lin, True)
    x = torch.randn(4, 3)
    with pytest.warns(UserWarning, match="torch.compile failed.*no compiler here"):
        assert torch.equal(fwd(x), lin(x))
    assert torch.equal(fwd(x), lin(x))  # eager from then on, no second warning needed
    assert T.maybe_compiled(lin, False) is lin


def test_learning_curve_probes_the_ema_weights_without_changing_the_training(tmp_path):
    from diffusers import DiTTransformer2DModel

    train_classifiers(tmp_path, toy=True, device="cpu", progress=False, which=("image",))
    with pytest.raises(ValueError, match="probe_classifier"):
        train_image(tmp_path / "x", toy=True, device="cpu", progress=False, probe_every=1.0)
    kw = dict(toy=True, device="cpu", seed=3, progress=False)
    info = train_image(tmp_path / "probed", probe_every=0.0, probe_classifier=tmp_path / "image_classifier",
                       probe_samples=2, **kw)
    assert [p["step"] for p in info["curve"]] == [1, 2, 3, 3]  # every step (every=0), then the end
    assert all(0.0 <= p["accuracy_dense"] <= 1.0 and p["fd_dense"] >= 0 for p in info["curve"])
    assert json.loads((tmp_path / "probed/train_info.json").read_text())["curve"] == info["curve"]
    train_image(tmp_path / "plain", **kw)
    a = DiTTransformer2DModel.from_pretrained(str(tmp_path / "probed/transformer")).state_dict()
    b = DiTTransformer2DModel.from_pretrained(str(tmp_path / "plain/transformer")).state_dict()
    assert all(torch.equal(v, b[k]) for k, v in a.items())  # probing swaps the EMA in and back out


def test_learning_curve_of_the_video_model(tmp_path):
    train_classifiers(tmp_path, toy=True, device="cpu", progress=False, which=("video",))
    info = train_video(tmp_path / "video", toy=True, device="cpu", progress=False, probe_every=60.0,
                       probe_classifier=tmp_path / "video_classifier", probe_samples=2)
    (point,) = info["curve"]  # the budget's schedule never came: only the final probe
    assert point["step"] == 3 and {"accuracy_dense_object", "accuracy_dense_motion"} <= set(point)


def test_image_training_target_is_checked_and_recorded(tmp_path):
    with pytest.raises(ValueError, match="prediction_type"):
        train_image(tmp_path / "x", toy=True, device="cpu", progress=False, prediction_type="sample")
    assert not (tmp_path / "x").exists()
    train_image(tmp_path / "eps", toy=True, device="cpu", progress=False, prediction_type="epsilon")
    sched = json.loads((tmp_path / "eps/scheduler/scheduler_config.json").read_text())
    assert sched["prediction_type"] == "epsilon"
    assert json.loads((tmp_path / "eps/train_info.json").read_text())["recipe"]["prediction_type"] == "epsilon"


def test_toy_video_training_saves_and_loads(tmp_path):
    info = train_video(tmp_path / "video", toy=True, device="cpu", progress=False)
    assert info["steps_done"] == 3
    json.loads((tmp_path / "video/model_index.json").read_text())
    pipe = load_video_pipeline(tmp_path / "video")
    assert isinstance(pipe, PixelCogVideoXPipeline)
    frames = pipe(["a red square moving left over stripes"], num_inference_steps=2, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).frames
    assert frames.shape == (1, 4, 3, 16, 16)  # (B, F, C, H, W), transformer's default size and frames


def test_toy_classifiers_train_and_load(tmp_path):
    info = train_classifiers(tmp_path, toy=True, device="cpu", progress=False)
    assert set(info) == {"image", "video"} and 0 <= info["image"]["eval_accuracy"] <= 1
    assert set(info["video"]["eval_accuracy"]) == set(VideoCaptions.FACTORS)
    clf = ImageClassifier.from_pretrained(str(tmp_path / "image_classifier"))
    vclf = VideoClassifier.from_pretrained(str(tmp_path / "video_classifier"))
    assert clf(torch.zeros(2, 3, 16, 16)).shape == (2, 12)
    out = vclf(torch.zeros(2, 3, 4, 16, 16))
    assert {k: v.shape[-1] for k, v in out.items()} == VideoCaptions().num_classes
    assert vclf.features(torch.zeros(2, 3, 4, 16, 16)).shape == (2, vclf.config.feature_dim)
    assert weights_bytes(tmp_path) > 0


def test_full_size_models_meet_token_counts_and_the_24mb_budget():
    tr = build_image_transformer()
    assert (IMAGE_MODEL_CONFIG["sample_size"] // IMAGE_MODEL_CONFIG["patch_size"]) ** 2 >= 1024
    c = VIDEO_MODEL_CONFIG
    video_tokens = c["sample_frames"] * (c["sample_height"] // c["patch_size"]) * (c["sample_width"] // c["patch_size"])
    assert video_tokens >= 4096
    _, te, vt = build_video_components()
    n = sum(p.numel() for m in (tr, te, vt, ImageClassifier(), VideoClassifier()) for p in m.parameters())
    assert 2 * n < 23_000_000  # fp16 weights, leaving room for configs and the tokenizer in 24 MB


# ------------------------------------------------------------------------------ the shipped weights
def test_shipped_weights_fit_the_budget_and_load_with_from_pretrained():
    from ditaccel.testbed.pixel import WEIGHTS_DIR
    from ditaccel.testbed.train import weights_bytes

    assert weights_bytes(WEIGHTS_DIR) <= 24_000_000
    for part in ("image", "video", "image_classifier", "video_classifier"):
        info = json.loads((WEIGHTS_DIR / part / "train_info.json").read_text())
        assert info["device"] == "cuda" and not info["toy"]
    # the shipped video model was trained with today's recipe (its step count fitted to the budget)
    from ditaccel.testbed.train import VIDEO_RECIPE

    video_info = json.loads((WEIGHTS_DIR / "video" / "train_info.json").read_text())
    assert {k: v for k, v in video_info["recipe"].items() if k != "steps"} == \
        {k: v for k, v in VIDEO_RECIPE.items() if k != "steps"}
    shipped_cfg = json.loads((WEIGHTS_DIR / "video" / "transformer" / "config.json").read_text())
    assert {k: shipped_cfg[k] for k in VIDEO_MODEL_CONFIG} == VIDEO_MODEL_CONFIG  # and its architecture
    image = load_image_pipeline()  # the default: the shipped folder
    assert image.transformer.config.sample_size == 64 and image.transformer.config.num_layers == 6
    x = image([0, 3], num_inference_steps=1, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert x.shape == (2, 3, 64, 64) and torch.isfinite(x).all()
    video = load_video_pipeline()
    assert video.transformer.config.sample_frames == 8
    frames = video(["a red square moving left over stripes"], num_inference_steps=1,  # default size: the config's
                   output_type="pt", generator=torch.Generator().manual_seed(0)).frames
    assert frames.shape == (1, 8, 3, 48, 48) and torch.isfinite(frames).all()
    clf = ImageClassifier.from_pretrained(str(WEIGHTS_DIR / "image_classifier")).float().eval()
    data, labels = ImageClasses(64).sample(24, 5)
    with torch.no_grad():
        assert (clf(data).argmax(-1) == labels).float().mean() >= 0.9  # it knows the real data
    vclf = VideoClassifier.from_pretrained(str(WEIGHTS_DIR / "video_classifier")).float().eval()
    cfg = video.transformer.config
    clips, _, lab = VideoCaptions(frames=cfg.sample_frames, size=cfg.sample_height).sample(16, 5)
    with torch.no_grad():
        out = vclf(clips)
    for factor in ("object", "motion"):  # the factors of the video bar
        assert (out[factor].argmax(-1) == lab[factor]).float().mean() >= 0.8, factor


def test_a_step_with_non_finite_gradients_is_skipped_and_counted():
    from ditaccel.testbed.training import adamw, clipped_step

    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3)
    opt, skipped = adamw(lin.parameters(), 0.1), torch.zeros(())
    lin(torch.randn(2, 4)).sum().backward()
    clipped_step(opt, lin.parameters(), skipped)
    before = [p.detach().clone() for p in lin.parameters()]
    state = [{k: v.clone() for k, v in opt.state[p].items()} for p in lin.parameters()]
    opt.zero_grad()
    (lin(torch.randn(2, 4)).sum() * float("inf")).backward()  # inf/NaN gradients
    clipped_step(opt, lin.parameters(), skipped)
    assert skipped.item() == 1
    assert all(torch.equal(a, b) for a, b in zip(before, lin.parameters()))
    assert all(torch.equal(v, opt.state[p][k]) for s, p in zip(state, lin.parameters()) for k, v in s.items())
    opt.zero_grad()
    lin(torch.randn(2, 4)).sum().backward()
    clipped_step(opt, lin.parameters(), skipped)  # finite again: it steps
    assert skipped.item() == 1 and not torch.equal(before[0], lin.weight)


def test_chunked_batches_are_consecutive_slices_of_one_draw():
    from ditaccel.testbed.training import Chunks

    draws = []

    def draw(n):
        x = torch.arange(len(draws) * 100, len(draws) * 100 + n)
        draws.append(n)
        return x, [f"c{int(v)}" for v in x]

    chunks = Chunks(draw, batch_size=3, chunk=2)
    got = [chunks.next() for _ in range(3)]
    assert draws == [6, 6]
    assert got[0][0].tolist() == [0, 1, 2] and got[1][0].tolist() == [3, 4, 5] and got[2][0].tolist() == [100, 101, 102]
    assert got[1][1] == ["c3", "c4", "c5"]


def test_the_training_script_runs_every_phase_at_toy_size(tmp_path):
    """scripts/train_testbed.sh (how the shipped weights are made), end to end at toy size."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "scripts" / "train_testbed.sh"
    env = dict(os.environ, EXTRA="--toy", SAMPLES="2", EXTRA_EVAL="--steps 2 --device cpu",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    subprocess.run(["bash", str(script), "all", str(tmp_path / "w"), str(tmp_path / "out")], env=env, check=True,
                   capture_output=True, timeout=300)
    made = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert made == ["classifiers.tgz", "eval_image.json", "eval_video.json", "image.tgz", "samples_image.png",
                    "samples_video.png", "video.tgz"]
    assert json.loads((tmp_path / "out" / "eval_video.json").read_text())["n"] == 2
    import tarfile

    with tarfile.open(tmp_path / "out" / "image.tgz") as tar:  # classifiers first: a learning curve too
        info = json.load(tar.extractfile("image/train_info.json"))
    assert len(info["curve"]) == 1 and "accuracy_dense" in info["curve"][0]


def test_video_qk_norm_init_sets_every_q_k_layernorm_and_nothing_else():
    from ditaccel.testbed.train import build_video_components

    _, te1, base = build_video_components(toy=True, seed=2)
    _, te2, sharp = build_video_components(toy=True, seed=2, qk_norm_init=1.5)
    ref = base.state_dict()
    changed = {k for k, v in sharp.state_dict().items() if not torch.equal(v, ref[k])}
    norms = {k for k in ref if (".norm_q.weight" in k or ".norm_k.weight" in k)}
    assert norms and changed == norms
    assert all(torch.all(sharp.state_dict()[k] == 1.5) for k in norms)
    assert all(torch.equal(a, b) for a, b in zip(te1.state_dict().values(), te2.state_dict().values()))
    for bad in (0, -1.0, "2", float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="qk_norm_init"):
            build_video_components(toy=True, qk_norm_init=bad)


def test_video_depth_and_width_are_options(tmp_path):
    from ditaccel.testbed.train import build_video_components, main

    _, _, m = build_video_components(toy=True, layers=3, width=48, heads=3)
    assert (m.config.num_layers, m.config.num_attention_heads, m.config.attention_head_dim) == (3, 3, 16)
    assert len(m.transformer_blocks) == 3
    _, _, m = build_video_components(toy=True, width=32)  # the config's 2 heads: head dim 16
    assert (m.config.num_attention_heads, m.config.attention_head_dim) == (2, 16)
    for name, bad in (("layers", 0), ("width", 20.0), ("layers", True), ("width", -8)):
        with pytest.raises(ValueError, match=name):
            build_video_components(toy=True, **{name: bad})
    with pytest.raises(ValueError, match="heads must divide the width 32"):
        build_video_components(toy=True, width=32, heads=3)
    with pytest.raises(ValueError, match="width must be a multiple of 16"):
        build_video_components(toy=True, width=24, heads=3)
    assert main(["image", "--toy", "--layers", "3", "--out", str(tmp_path / "i")]) == 2  # one line, no training
    assert not (tmp_path / "i").exists()
    train_video(tmp_path / "v", toy=True, device="cpu", progress=False, layers=2, width=48, heads=3)
    cfg = json.loads((tmp_path / "v/transformer/config.json").read_text())
    assert (cfg["num_layers"], cfg["num_attention_heads"], cfg["attention_head_dim"]) == (2, 3, 16)


def test_video_heads_keep_the_width_and_are_saved_in_the_config(tmp_path):
    from ditaccel.testbed.train import build_video_components

    _, _, m = build_video_components(toy=True, heads=1)  # toy width 2 x 8
    assert (m.config.num_attention_heads, m.config.attention_head_dim) == (1, 16)
    for bad in (0, 3, -2, 1.0, True, "2"):
        with pytest.raises(ValueError, match="heads"):
            build_video_components(toy=True, heads=bad)
    info = train_video(tmp_path / "v", toy=True, device="cpu", progress=False, heads=1, attention_backend="flash")
    assert info["attention_backend"] == "flash"
    cfg = json.loads((tmp_path / "v/transformer/config.json").read_text())
    assert (cfg["num_attention_heads"], cfg["attention_head_dim"]) == (1, 16)
    with pytest.raises(ValueError, match="attention_backend"):
        train_video(tmp_path / "w", toy=True, device="cpu", progress=False, attention_backend="fa3")
    assert not (tmp_path / "w").exists()


def test_video_rope_option_trains_with_the_pipelines_rotary_tables(tmp_path, monkeypatch):
    from diffusers import CogVideoXTransformer3DModel

    from ditaccel.testbed.train import build_video_components

    seen = []
    forward = CogVideoXTransformer3DModel.forward

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("image_rotary_emb"))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(CogVideoXTransformer3DModel, "forward", spy)
    info = train_video(tmp_path / "r", toy=True, device="cpu", progress=False, heads=1, rope=True, compile=False)
    assert info["rope"] is True and len(seen) == info["steps_done"] == 3
    pipe = load_video_pipeline(tmp_path / "r")
    assert pipe.transformer.config.use_rotary_positional_embeddings
    assert pipe.transformer.patch_embed.use_positional_embeddings is False  # RoPE replaces the sin-cos table
    cos, sin = pipe._prepare_rotary_positional_embeddings(16, 16, 4, torch.device("cpu"))
    assert cos.shape == (4 * 8 * 8, 16)
    assert all(torch.equal(r[0], cos) and torch.equal(r[1], sin) for r in seen)
    seen.clear()
    frames = pipe(["a red square moving left over stripes"], num_inference_steps=2, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).frames
    assert frames.shape == (1, 4, 3, 16, 16) and seen and all(r is not None for r in seen)
    # no RoPE: no tables; continuing a RoPE run without --rope is refused before any step
    seen.clear()
    train_video(tmp_path / "n", toy=True, device="cpu", progress=False, heads=1, compile=False)
    assert seen and all(r is None for r in seen)
    with pytest.raises(ValueError, match="use_rotary_positional_embeddings: saved True, this run False"):
        train_video(tmp_path / "x", toy=True, device="cpu", progress=False, heads=1, init_from=tmp_path / "r")
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="rope: the head dim must be a multiple of 16"):
        build_video_components(toy=True, rope=True)  # toy head dim 8
