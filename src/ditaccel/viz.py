"""Pictures: plan heat maps (layers × steps, like the paper's Figure 5) and sample grids."""

from __future__ import annotations

import os

import numpy as np

#: one colour per method, light = more compute saved (``wa``: the ablation without the residual)
METHOD_COLORS = {"full": "#3b4cc0", "wars": "#7fb3d5", "asc": "#f4a582", "wars+asc": "#d6604d", "ast": "#fde0c5",
                 "wa": "#9e9e9e",
                 # mixed plans (format 2): AdaSpa's entries in greens, dark = more compute
                 "search": "#1b7837", "research": "#5aae61", "sparse": "#a6dba0"}


def plot_plan(plan, path: str | os.PathLike, title: str | None = None) -> None:
    """Write a heat map PNG of ``plan``: one row per layer, one column per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    counts = plan.counts()  # the paper's methods and the ablation methods in use
    shown = list(counts)
    index = {m: i for i, m in enumerate(shown)}
    grid = np.array([[index[m] for m in row] for row in plan.methods])
    cmap = ListedColormap([METHOD_COLORS[m] for m in shown])
    fig_w = min(14, max(7.0, 4.0 + 0.25 * plan.num_steps))
    fig_h = min(10, 1.8 + 0.22 * plan.num_layers)
    fig, ax = plt.subplots(figsize=(fig_w, fig_h))
    ax.imshow(grid, cmap=cmap, vmin=-0.5, vmax=len(shown) - 0.5, aspect="auto", interpolation="nearest")
    ax.set_xlabel("denoising step")
    ax.set_ylabel("layer")
    md = plan.metadata
    ax.set_title(title or f"{md['model_class']}  δ={md.get('threshold', '?')}  window={md['window']}", fontsize=10)
    total = max(1, plan.num_layers * plan.num_steps)
    handles = [Patch(color=METHOD_COLORS[m], label=f"{m} ({100 * counts[m] / total:.0f}%)") for m in shown]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def abs_diff(a: np.ndarray, b: np.ndarray) -> tuple[str, np.ndarray]:
    """A (label, image) row showing |a − b| stretched to the full range."""
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    peak = int(d.max())
    return f"|diff| x{255 / max(peak, 1):.0f}", (d * (255 / max(peak, 1))).astype(np.uint8)


def to_uint8(images) -> np.ndarray:
    """Pipeline output (PIL list, (B,H,W,C) numpy in [0,1] or (B,C,H,W) tensor in [0,1]) → uint8 (B,H,W,C)."""
    import torch

    if isinstance(images, list):
        return np.stack([np.asarray(im.convert("RGB")) for im in images])
    if isinstance(images, torch.Tensor):
        images = images.detach().float().cpu().permute(0, 2, 3, 1).numpy()
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)


def side_by_side(rows: list[tuple[str, np.ndarray]], path: str | os.PathLike, scale: int | None = None) -> None:
    """Save a PNG grid: one labelled row per variant, one column per sample (uint8 images).
    ``scale`` (nearest-neighbour) defaults to bringing small images to about 256 px."""
    from PIL import Image, ImageDraw

    label_w = 110
    n = max(len(imgs) for _, imgs in rows)
    h, w = rows[0][1].shape[1:3]
    scale = scale or max(1, round(256 / max(h, w)))
    H, W = h * scale, w * scale
    canvas = Image.new("RGB", (label_w + n * (W + 4), len(rows) * (H + 4)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (label, imgs) in enumerate(rows):
        y = r * (H + 4)
        draw.text((4, y + H // 2 - 6), label, fill="black")
        for c, img in enumerate(imgs):
            tile = Image.fromarray(img).resize((W, H), Image.NEAREST)
            canvas.paste(tile, (label_w + c * (W + 4), y))
    canvas.save(path)


def video_frames(video, frames: int = 4) -> np.ndarray:
    """``frames`` frames spread over one video (C, F, H, W) in [0, 1], as uint8 (frames, H, W, C)."""
    import torch

    idx = torch.linspace(0, video.shape[1] - 1, min(frames, video.shape[1])).round().long()
    return to_uint8(video[:, idx].transpose(0, 1))


def grid_rows(samples, label: str, per_row: int = 12, frames: int = 4) -> list[tuple[str, np.ndarray]]:
    """Rows for ``side_by_side`` from ``evaluate``'s samples in [0, 1]: images (N, C, H, W) give rows
    of ``per_row`` samples; videos (N, C, F, H, W) give one row per sample showing ``frames``
    frames spread over the clip."""
    if samples.ndim == 5:
        return [(f"{label} #{i}", video_frames(v, frames)) for i, v in enumerate(samples)]
    if samples.ndim != 4:
        raise ValueError(f"samples: expected (N, C, H, W) or (N, C, F, H, W), got shape {tuple(samples.shape)}")
    return [(label, to_uint8(samples[i:i + per_row])) for i in range(0, len(samples), per_row)]


def plot_density(details: dict, path: str | os.PathLike, title: str = "AdaSpa kept block fraction") -> None:
    """Heat map PNG of AdaSpa's density, layers × heads, from ``ditaccel.stats(pipe).details``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in details["density_per_head"] if r is not None]
    if not rows:
        raise ValueError("details: no searched layer in this generation (was AdaSpa's search step reached?)")
    grid = np.array(rows)
    fig, ax = plt.subplots(figsize=(min(14, 3 + 0.3 * grid.shape[1]), min(10, 1.8 + 0.22 * grid.shape[0])))
    im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=max(0.5, float(grid.max())), aspect="auto",
                   interpolation="nearest")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(f"{title} (mean {grid.mean():.3f})", fontsize=10)
    fig.colorbar(im, ax=ax, label="density")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
