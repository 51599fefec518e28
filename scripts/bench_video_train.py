"""Training speed of the video testbed's transformer by head count and SDPA backend.

One training step as ``train_video`` takes it (bf16 autocast, fp32 master weights, fused AdamW,
batch 32 of 8x48x48 videos + 16 text tokens), timed eagerly (no torch.compile, so that the
comparison is quick; compile speeds every variant up by its non-attention share) after warm-up.

    python scripts/bench_video_train.py --heads 6 3 --backends flash cudnn --json out.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from ditaccel.testbed.recipes import VIDEO_RECIPE
from ditaccel.testbed.training import SDPA_BACKENDS, adamw, autocast, sdpa_first
from ditaccel.testbed.video_training import build_video_components


def bench(heads: int, backend: str | None, batch: int, steps: int, warmup: int) -> dict:
    _, text_encoder, model = build_video_components(heads=heads, qk_norm_init=VIDEO_RECIPE["qk_norm_init"])
    dev = torch.device("cuda")
    model.to(dev).train()
    text_encoder.to(dev).train()
    cfg = model.config
    params = list(model.parameters()) + list(text_encoder.parameters())
    opt = adamw(params, VIDEO_RECIPE["lr"])
    x = torch.randn(batch, cfg.sample_frames, cfg.in_channels, cfg.sample_height, cfg.sample_width, device=dev)
    ids = torch.randint(0, text_encoder.config.vocab_size, (batch, cfg.max_text_seq_length), device=dev)
    t = torch.randint(0, 1000, (batch,), device=dev)

    def step():
        with autocast(dev):
            emb = text_encoder(ids)[0]
            pred = model(hidden_states=x, encoder_hidden_states=emb, timestep=t, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    with sdpa_first(backend):
        for _ in range(warmup):
            step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    return dict(heads=heads, head_dim=cfg.attention_head_dim, backend=backend or "default", batch=batch,
                steps_per_s=round(steps / dt, 2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--heads", type=int, nargs="+", default=[6, 3])
    ap.add_argument("--backends", nargs="+", default=["default", "flash", "cudnn"],
                    choices=["default", *SDPA_BACKENDS])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    rows = []
    for h in a.heads:
        for b in a.backends:
            r = bench(h, None if b == "default" else b, a.batch, a.steps, a.warmup)
            print(json.dumps(r), flush=True)
            rows.append(r)
    out = dict(rows=rows, device=torch.cuda.get_device_name(), torch=torch.__version__,
               date=time.strftime("%Y-%m-%d"))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
