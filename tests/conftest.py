import logging
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)  # 2 threads on a shared 2-core box wait on each other: 1 is faster and stable
logging.getLogger("diffusers").setLevel(logging.ERROR)

from ditaccel.testbed import tiny_dit_pipeline, tiny_pixart_sigma_pipeline  # noqa: E402

STEPS = 6


def run_main(main, argv):
    """(exit code, stdout, stderr) of a command's ``main(argv)``."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="session")
def toy_weights(tmp_path_factory):
    """Toy-trained testbed weights (image, video and both classifiers), trained once per session."""
    from ditaccel.testbed.train import train_classifiers, train_image, train_video

    root = tmp_path_factory.mktemp("toy-weights")
    train_classifiers(root, toy=True, progress=False)
    train_image(root / "image", toy=True, progress=False)
    train_video(root / "video", toy=True, progress=False)
    return root


@pytest.fixture(scope="session")
def dit():
    return tiny_dit_pipeline(sample_size=8, num_layers=3)


@pytest.fixture(scope="session")
def pixart():
    return tiny_pixart_sigma_pipeline(sample_size=16, num_layers=3)


def dit_call(pipe, labels=(1, 2), steps=STEPS, seed=0, **kw):
    return pipe(class_labels=list(labels), num_inference_steps=steps, generator=gen(seed), output_type="pt",
                **kw).images


def pixart_call(pipe, prompts=("a red circle", "a blue square"), steps=STEPS, seed=0, **kw):
    kw.setdefault("max_sequence_length", 16)
    kw.setdefault("use_resolution_binning", False)
    return pipe(prompt=list(prompts), num_inference_steps=steps, generator=gen(seed), output_type="pt",
                clean_caption=False, **kw).images
