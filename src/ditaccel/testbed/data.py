"""Procedural training data for the testbed models: generated on the fly, nothing downloaded.

Two generators, both vectorised torch (one pass over a batch, any device) and bit-deterministic
per seed on a given device:

* ``ImageClasses``: class-conditional images, ``(N, 3, S, S)`` in ``[-1, 1]``. 12 classes that
  differ in spatial structure (a disc, a ring, a star, a dot grid, a checkerboard, ...), never in
  colour alone: foreground and background colours, position, size, rotation and background
  texture are drawn per sample, so a model has to learn the shapes.
* ``VideoCaptions``: short videos, ``(N, 3, F, S, S)`` in ``[-1, 1]``, of one object (shape x
  colour) moving in a direction (or standing still) over a background (plain, stripes,
  checkerboard), with a caption from a small vocabulary ("a red square moving left over stripes")
  and the structured label (object, colour, motion, background).

Determinism: every random number is drawn on the CPU from the ``torch.Generator`` (or seed) you
pass, in a fixed order that does not depend on the device or on the class mix; the rendering is
pure elementwise arithmetic on those numbers. The same seed therefore gives bit-identical
tensors on the same device (CPU vs. CUDA may differ in the last bits of ``sin``/``exp``).

Geometry is resolution-free: coordinates are normalised to ``[-1, 1]`` across the frame, so
``size=16`` gives a toy version of the same data for CPU tests.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch

__all__ = ["ImageClasses", "VideoCaptions", "hsv_to_rgb", "make_generator"]


def make_generator(generator: torch.Generator | int | None) -> torch.Generator:
    """A CPU ``torch.Generator`` from a generator (returned as is) or an int seed (``None`` = 0)."""
    if isinstance(generator, torch.Generator):
        if generator.device.type != "cpu":
            raise ValueError("generator: pass a CPU torch.Generator (parameters are drawn on the CPU, then "
                             "rendered on `device`)")
        return generator
    if generator is None:
        return torch.Generator().manual_seed(0)
    try:
        seed = operator.index(generator)
    except TypeError:
        raise TypeError(f"generator: expected a torch.Generator, an int seed or None, got {generator!r}") from None
    return torch.Generator().manual_seed(seed)


def hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """HSV in ``[0, 1]`` (any equal shapes) -> RGB in ``[0, 1]`` with a trailing dim of 3."""
    n = torch.tensor([5.0, 3.0, 1.0], device=h.device, dtype=h.dtype)
    k = (n + h[..., None] * 6.0) % 6.0
    return v[..., None] - v[..., None] * s[..., None] * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)


def _coverage(sdf: torch.Tensor, size: int) -> torch.Tensor:
    """Anti-aliased coverage of a signed distance (normalised units, < 0 inside): ~1 px ramp."""
    return torch.clamp(0.5 - sdf * (size / 2.0), 0.0, 1.0)


def _rotate(x: torch.Tensor, y: torch.Tensor, angle: torch.Tensor):
    c, s = torch.cos(angle), torch.sin(angle)
    return c * x + s * y, -s * x + c * y


def _box(x, y, hx, hy):
    """Signed distance of an axis-aligned box with half sizes (hx, hy) centred at the origin."""
    qx, qy = x.abs() - hx, y.abs() - hy
    outside = torch.sqrt(torch.clamp(qx, min=0.0) ** 2 + torch.clamp(qy, min=0.0) ** 2)
    return outside + torch.clamp(torch.maximum(qx, qy), max=0.0)


def _triangle(x, y, r):
    """Signed distance (exact inside the edges, good enough outside) of an upward equilateral
    triangle with circumradius r centred at the origin (y grows downwards in images: flip)."""
    y = -y
    k = math.sqrt(3.0)
    inradius = r / 2.0
    d1 = -y - inradius  # bottom edge
    d2 = (k * x + y) / 2.0 - inradius
    d3 = (-k * x + y) / 2.0 - inradius
    return torch.maximum(d1, torch.maximum(d2, d3))


def _grid(size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    c = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size * 2.0 - 1.0
    return c[None, :].expand(size, size), c[:, None].expand(size, size)  # x (columns), y (rows)


def _col(t: torch.Tensor, device, ndim: int) -> torch.Tensor:
    """(N,) CPU parameters -> (N, 1, ..., 1) on ``device`` for broadcasting over ``ndim`` dims."""
    return t.to(device).reshape(-1, *([1] * ndim))


def _balanced(n: int, k: int, g: torch.Generator) -> torch.Tensor:
    """n labels in [0, k), each value n // k or n // k + 1 times, in random order."""
    return (torch.arange(n) % k)[torch.randperm(n, generator=g)]


# ------------------------------------------------------------------------------------ images
class ImageClasses:
    """Class-conditional procedural images: 12 structurally distinct classes.

    ``sample(n, generator)`` returns ``(images, labels)``: images ``(n, 3, size, size)`` float32 in
    ``[-1, 1]``, labels ``(n,)`` int64. Without ``labels`` the classes are balanced (each class
    ``n // 12`` or ``n // 12 + 1`` times, shuffled).

    Per sample: position (centre within ±0.35 of the frame), size, rotation (a small jitter for
    shapes with an orientation, so "square" and "diamond" stay distinct), foreground hue
    (uniform), saturation and value, background colour (dark, low saturation: the shape always
    stands out) and background style (plain, two gradients, soft waves).
    """

    CLASSES: tuple[str, ...] = (
        "disc", "square", "triangle", "ring", "cross", "diamond",
        "star", "crescent", "two discs", "dot grid", "stripes", "checkerboard",
    )

    def __init__(self, size: int = 64):
        if size < 8:
            raise ValueError(f"size must be >= 8, got {size}")
        self.size = size

    @property
    def num_classes(self) -> int:
        return len(self.CLASSES)

    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.CLASSES))

    def sample(
        self,
        n: int,
        generator: torch.Generator | int | None = None,
        *,
        labels: Sequence[int] | torch.Tensor | None = None,
        device: str | torch.device = "cpu",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        g = make_generator(generator)
        C = self.num_classes
        if labels is None:
            labels = _balanced(n, C, g)
        else:
            labels = torch.as_tensor(labels, dtype=torch.long).flatten().cpu()
            if labels.numel() != n:
                raise ValueError(f"labels: expected {n} labels, got {labels.numel()}")
            if labels.numel() and (labels.min() < 0 or labels.max() >= C):
                raise ValueError(f"labels must be in [0, {C}), got {labels.tolist()}")
        # Every parameter for every sample, in a fixed order (independent of the classes drawn).
        u = torch.rand(n, 16, generator=g)
        cx, cy = (u[:, 0] - 0.5) * 0.7, (u[:, 1] - 0.5) * 0.7
        r = 0.28 + 0.17 * u[:, 2]
        jitter = (u[:, 3] - 0.5) * 0.4  # small rotation (rad) for oriented shapes
        angle = u[:, 4] * 2 * math.pi  # free rotation / direction
        fg = hsv_to_rgb(u[:, 5], 0.55 + 0.45 * u[:, 6], 0.75 + 0.25 * u[:, 7])
        bg = hsv_to_rgb(u[:, 8], 0.4 * u[:, 9], 0.08 + 0.3 * u[:, 10])
        bg_style = (u[:, 11] * 4).long().clamp(max=3)
        period = 0.25 + 0.2 * u[:, 12]  # texture period (normalised units): 8-14 px at 64 px
        phase = u[:, 13] * 2 * math.pi
        wave_freq = 2.0 + 3.0 * u[:, 14]

        S, dev = self.size, torch.device(device)
        X, Y = _grid(S, dev)
        X, Y = X[None], Y[None]  # (1, S, S)
        P = lambda t: _col(t, dev, 2)  # noqa: E731  (N, 1, 1)
        x, y = X - P(cx), Y - P(cy)
        rr, jit, ang = P(r), P(jitter), P(angle)
        ph, per = P(phase), P(period)
        alpha = torch.empty(n, S, S, device=dev)
        for c in range(C):
            idx = (labels == c).nonzero().flatten()  # on the CPU: no device sync per class
            if idx.numel() == 0:
                continue
            idx = idx.to(dev)
            xs, ys, r_, j_, a_ = x[idx], y[idx], rr[idx], jit[idx], ang[idx]
            name = self.CLASSES[c]
            if name == "disc":
                d = torch.sqrt(xs**2 + ys**2) - r_
            elif name == "square":
                u_, v_ = _rotate(xs, ys, j_)
                d = _box(u_, v_, 0.82 * r_, 0.82 * r_)
            elif name == "triangle":
                u_, v_ = _rotate(xs, ys, j_)
                d = _triangle(u_, v_, 1.15 * r_)
            elif name == "ring":
                d = (torch.sqrt(xs**2 + ys**2) - 0.8 * r_).abs() - 0.22 * r_
            elif name == "cross":
                u_, v_ = _rotate(xs, ys, j_)
                d = torch.minimum(_box(u_, v_, r_, 0.3 * r_), _box(u_, v_, 0.3 * r_, r_))
            elif name == "diamond":
                u_, v_ = _rotate(xs, ys, j_ + math.pi / 4)
                d = _box(u_, v_, 0.75 * r_, 0.75 * r_)
            elif name == "star":
                rad = torch.sqrt(xs**2 + ys**2)
                theta = torch.atan2(ys, xs) - a_
                d = rad - 1.1 * r_ * (0.62 + 0.38 * torch.cos(5 * theta))
            elif name == "crescent":
                d1 = torch.sqrt(xs**2 + ys**2) - r_
                ox, oy = 0.5 * r_ * torch.cos(a_), 0.5 * r_ * torch.sin(a_)
                d2 = torch.sqrt((xs - ox) ** 2 + (ys - oy) ** 2) - 0.85 * r_
                d = torch.maximum(d1, -d2)
            elif name == "two discs":
                ox, oy = 0.85 * r_ * torch.cos(a_), 0.85 * r_ * torch.sin(a_)
                d = torch.minimum(torch.sqrt((xs - ox) ** 2 + (ys - oy) ** 2),
                                  torch.sqrt((xs + ox) ** 2 + (ys + oy) ** 2)) - 0.55 * r_
            elif name == "dot grid":
                u_, v_ = _rotate(xs, ys, j_)
                step = 0.75 * r_
                qx = u_ - step * torch.clamp(torch.round(u_ / step), -1, 1)
                qy = v_ - step * torch.clamp(torch.round(v_ / step), -1, 1)
                d = torch.sqrt(qx**2 + qy**2) - 0.24 * r_
            else:
                d = None
            if d is not None:
                alpha[idx] = _coverage(d, S)
                continue
            # full-frame textures: the shape's position shifts the phase only
            u_, v_ = _rotate(X.expand(idx.numel(), S, S), Y.expand(idx.numel(), S, S), a_ if name == "stripes" else j_)
            k = 2 * math.pi / per[idx]
            if name == "stripes":
                s = torch.sin(k * u_ + ph[idx])
            else:  # checkerboard
                s = torch.sin(k * u_ + ph[idx]) * torch.sin(k * v_ + ph[idx])
            # soft but crisp edges: ~1 px ramp at the zero crossings
            sharp = S / (per[idx] * 2.0)
            alpha[idx] = torch.clamp(0.5 + s * sharp * 0.5, 0.0, 1.0)

        # background: plain, horizontal gradient, vertical gradient, soft waves
        style = _col(bg_style, dev, 2)
        gx, gy = _rotate(X, Y, P(angle))
        shade = torch.where(style == 1, 0.75 + 0.25 * X, torch.ones_like(gx))
        shade = torch.where(style == 2, 0.75 + 0.25 * Y, shade)
        shade = torch.where(style == 3, 0.85 + 0.15 * torch.sin(P(wave_freq) * gx + ph), shade)
        bgc = bg.to(dev)[:, :, None, None] * shade[:, None]
        fgc = fg.to(dev)[:, :, None, None]
        a = alpha[:, None]
        img = bgc * (1 - a) + fgc * a
        return (img * 2 - 1).clamp(-1, 1).contiguous(), labels.clone()


# ------------------------------------------------------------------------------------ videos
class VideoCaptions:
    """Captioned procedural videos: one object moving (or not) over a background.

    ``sample(n, generator)`` returns ``(videos, captions, labels)``: videos ``(n, 3, frames, size,
    size)`` float32 in ``[-1, 1]``; captions a list of n strings; labels a dict of ``(n,)`` int64
    tensors ``object``, ``colour``, ``motion``, ``background`` (indices into ``OBJECTS``,
    ``COLOURS``, ``MOTIONS``, ``BACKGROUNDS``). Each factor is balanced over the batch (shuffled
    independently), so every combination occurs.

    Per sample: size (radius 0.36-0.46 of the half-width), start position (the whole path stays
    inside the frame), speed (a travel of 0.5-0.9 of the half-width over the clip), small
    rotation, colour jitter around the named hue, background colour (dark, low saturation), stripe
    orientation and period, checker period.
    Captions: ``"a {colour} {object} moving {left|right|up|down} over {background}"`` or
    ``"a {colour} {object} standing still over {background}"``, background one of
    ``"a plain background"``, ``"stripes"``, ``"a checkerboard"``.
    """

    OBJECTS: tuple[str, ...] = ("circle", "square", "triangle", "cross")
    COLOURS: tuple[str, ...] = ("red", "yellow", "green", "blue", "purple")
    MOTIONS: tuple[str, ...] = ("left", "right", "up", "down", "still")
    BACKGROUNDS: tuple[str, ...] = ("plain", "stripes", "checker")
    HUES = (0.0, 0.15, 0.33, 0.62, 0.8)
    BACKGROUND_PHRASES = {"plain": "a plain background", "stripes": "stripes", "checker": "a checkerboard"}
    FACTORS = ("object", "colour", "motion", "background")

    def __init__(self, frames: int = 8, size: int = 48):
        if frames < 2 or size < 8:
            raise ValueError(f"need frames >= 2 and size >= 8, got frames={frames}, size={size}")
        self.frames, self.size = frames, size

    # ---- vocabulary
    @classmethod
    def vocabulary(cls) -> list[str]:
        """Every word a caption can contain (for a word-level tokenizer)."""
        words = ["a", "moving", "standing", "over", "background", "checkerboard"]
        words += list(cls.COLOURS) + list(cls.OBJECTS) + list(cls.MOTIONS) + ["plain", "stripes"]
        return list(dict.fromkeys(words))

    @property
    def num_classes(self) -> dict[str, int]:
        return {"object": len(self.OBJECTS), "colour": len(self.COLOURS), "motion": len(self.MOTIONS),
                "background": len(self.BACKGROUNDS)}

    @classmethod
    def caption(cls, obj: int, colour: int, motion: int, background: int) -> str:
        m = cls.MOTIONS[motion]
        verb = "standing still" if m == "still" else f"moving {m}"
        where = cls.BACKGROUND_PHRASES[cls.BACKGROUNDS[background]]
        return f"a {cls.COLOURS[colour]} {cls.OBJECTS[obj]} {verb} over {where}"

    @classmethod
    def captions(cls, labels: dict[str, torch.Tensor]) -> list[str]:
        return [cls.caption(*(int(labels[f][i]) for f in cls.FACTORS)) for i in range(len(labels["object"]))]

    @classmethod
    def parse(cls, caption: str) -> dict[str, int]:
        """Structured label of a caption written by ``caption`` (raises ``ValueError`` otherwise)."""
        words = caption.lower().replace(",", " ").split()
        out = {}
        for factor, names in (("object", cls.OBJECTS), ("colour", cls.COLOURS), ("motion", cls.MOTIONS)):
            hits = [i for i, name in enumerate(names) if name in words]
            if len(hits) != 1:
                raise ValueError(f"caption {caption!r}: expected exactly one {factor} word of {names}")
            out[factor] = hits[0]
        if "checkerboard" in words:
            out["background"] = cls.BACKGROUNDS.index("checker")
        elif "stripes" in words:
            out["background"] = cls.BACKGROUNDS.index("stripes")
        elif "plain" in words:
            out["background"] = cls.BACKGROUNDS.index("plain")
        else:
            raise ValueError(f"caption {caption!r}: no background word (plain, stripes, checkerboard)")
        return out

    def balanced_labels(self, n: int, generator: torch.Generator | int | None = None) -> dict[str, torch.Tensor]:
        g = make_generator(generator)
        return {f: _balanced(n, k, g) for f, k in self.num_classes.items()}

    # ---- rendering
    def sample(
        self,
        n: int,
        generator: torch.Generator | int | None = None,
        *,
        labels: dict[str, Sequence[int] | torch.Tensor] | None = None,
        device: str | torch.device = "cpu",
    ) -> tuple[torch.Tensor, list[str], dict[str, torch.Tensor]]:
        g = make_generator(generator)
        if labels is None:
            labels = self.balanced_labels(n, g)
        else:
            labels = {f: torch.as_tensor(labels[f], dtype=torch.long).flatten().cpu() for f in self.FACTORS}
            for f, k in self.num_classes.items():
                t = labels[f]
                if t.numel() != n or (n and (t.min() < 0 or t.max() >= k)):
                    raise ValueError(f"labels[{f!r}]: expected {n} values in [0, {k})")
        u = torch.rand(n, 16, generator=g)
        obj, col, mot, bgk = (labels[f] for f in self.FACTORS)
        # object radius 0.36-0.46 of the half-width (8.6-11 px at 48 px): at 0.20-0.30 (5-7 px) the
        # first trained video model drew every shape as the same blob (object accuracy 42-52%), at
        # 0.30-0.42 squares still came out as circles (56-71%). Travel 0.5-0.9 keeps the path inside.
        r = 0.36 + 0.10 * u[:, 0]
        travel = 0.5 + 0.4 * u[:, 1]
        jitter = (u[:, 2] - 0.5) * 0.4
        hue = (torch.tensor(self.HUES)[col] + (u[:, 3] - 0.5) * 0.05) % 1.0
        fg = hsv_to_rgb(hue, 0.75 + 0.25 * u[:, 4], 0.8 + 0.2 * u[:, 5])
        bg = hsv_to_rgb(u[:, 6], 0.25 * u[:, 7], 0.1 + 0.3 * u[:, 8])
        contrast = 0.12 + 0.12 * u[:, 9]
        period = 0.25 + 0.25 * u[:, 10]
        stripe_angle = (u[:, 11] * 4).floor() * (math.pi / 4)  # 0, 45, 90, 135 degrees
        phase = u[:, 12] * 2 * math.pi
        # path: along the motion axis start so that the whole travel stays within ±lim
        lim = 0.95 - r
        along = -lim + (2 * lim - travel) * u[:, 13]  # start coordinate, moving in + direction
        across = (u[:, 14] - 0.5) * 2 * lim
        still = mot == self.MOTIONS.index("still")
        travel = torch.where(still, torch.zeros_like(travel), travel)
        along = torch.where(still, (u[:, 13] - 0.5) * 2 * lim, along)
        sign = torch.ones(n)
        sign[(mot == self.MOTIONS.index("left")) | (mot == self.MOTIONS.index("up"))] = -1.0
        along = torch.where(sign < 0, -along, along)  # mirrored start for -x / -y motion
        horizontal = (mot == self.MOTIONS.index("left")) | (mot == self.MOTIONS.index("right")) | still
        t = torch.linspace(0.0, 1.0, self.frames)
        pos = along[:, None] + sign[:, None] * travel[:, None] * t[None]  # (n, F)
        cx = torch.where(horizontal[:, None], pos, across[:, None].expand_as(pos))
        cy = torch.where(horizontal[:, None], across[:, None].expand_as(pos), pos)

        S, F, dev = self.size, self.frames, torch.device(device)
        X, Y = _grid(S, dev)
        X, Y = X[None, None], Y[None, None]  # (1, 1, S, S)
        P = lambda v: _col(v, dev, 3)  # noqa: E731  (n, 1, 1, 1)
        x = X - cx.to(dev)[:, :, None, None]
        y = Y - cy.to(dev)[:, :, None, None]  # (n, F, S, S)
        rr, jit = P(r), P(jitter)
        sdf = torch.empty(n, F, S, S, device=dev)
        for k, name in enumerate(self.OBJECTS):
            idx = (obj == k).nonzero().flatten()  # on the CPU: no device sync per object
            if idx.numel() == 0:
                continue
            idx = idx.to(dev)
            u_, v_ = _rotate(x[idx], y[idx], jit[idx])
            r_ = rr[idx]
            if name == "circle":
                d = torch.sqrt(u_**2 + v_**2) - r_
            elif name == "square":  # half-side 0.9 r (corners at 1.27 r): at 0.82 r the trained model's
                d = _box(u_, v_, 0.9 * r_, 0.9 * r_)  # squares over stripes came out as circles
            elif name == "triangle":
                d = _triangle(u_, v_, 1.15 * r_)
            else:  # cross
                d = torch.minimum(_box(u_, v_, r_, 0.32 * r_), _box(u_, v_, 0.32 * r_, r_))
            sdf[idx] = d
        alpha = _coverage(sdf, S)[:, None]  # (n, 1, F, S, S)

        # background pattern (static): 0 plain, 1 stripes, 2 checkerboard
        su, sv = _rotate(X[0], Y[0], P(stripe_angle)[:, 0])  # (n, S, S)
        k = 2 * math.pi / P(period)[:, 0]
        ph = P(phase)[:, 0]
        sharp = S / (P(period)[:, 0] * 2.0)
        stripes = torch.clamp(0.5 + torch.sin(k * su + ph) * sharp * 0.5, 0, 1)
        cu, cv = X[0, 0] + 0 * su, Y[0, 0] + 0 * sv
        checker = torch.clamp(0.5 + torch.sin(k * cu + ph) * torch.sin(k * cv + ph) * sharp * 0.5, 0, 1)
        style = P(bgk)[:, 0]
        pattern = torch.where(style == 1, stripes, torch.where(style == 2, checker, torch.zeros_like(stripes)))
        bgc = bg.to(dev)[:, :, None, None] + P(contrast)[:, 0, None] * pattern[:, None]  # (n, 3, S, S)
        bgc = bgc[:, :, None]  # (n, 3, 1, S, S)
        fgc = fg.to(dev)[:, :, None, None, None]
        video = bgc * (1 - alpha) + fgc * alpha
        video = (video * 2 - 1).clamp(-1, 1).contiguous()
        return video, self.captions(labels), {f: v.clone() for f, v in labels.items()}
