"""Small CNN classifiers for the procedural testbed data: accuracy and Fréchet features.

* ``ImageClassifier``: ``(N, 3, H, W)`` in ``[-1, 1]`` -> logits over ``ImageClasses.CLASSES``.
* ``VideoClassifier``: ``(N, 3, F, H, W)`` in ``[-1, 1]`` -> a dict of logits, one head per factor
  of ``VideoCaptions`` (``object``, ``colour``, ``motion``, ``background``).

Both expose ``features(x)``: the pooled penultimate activations (``feature_dim`` wide), the
embedding ``ditaccel.evaluate`` computes Fréchet distances on. Both are diffusers ``ModelMixin`` +
``ConfigMixin``: ``save_pretrained(dir)`` writes ``config.json`` + safetensors and
``ImageClassifier.from_pretrained(dir)`` reads them back (no pickle anywhere). Global average
pooling makes them resolution-agnostic (toy sizes work), GroupNorm makes train and eval mode
identical.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .data import ImageClasses, VideoCaptions

__all__ = ["ImageClassifier", "VideoClassifier"]


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, c), c)


class ImageClassifier(ModelMixin, ConfigMixin):
    """Conv stem + stride-2 stages (conv-GN-SiLU x 2) + global average pool + linear head.

    Args:
        num_classes: output classes (default: the 12 ``ImageClasses``).
        channels: width of each stage; every stage after the first halves the resolution.
        feature_dim: width of the pooled feature (a 1x1 projection of the last stage).
    """

    @register_to_config
    def __init__(self, num_classes: int = len(ImageClasses.CLASSES), channels: tuple[int, ...] = (32, 64, 96, 128),
                 feature_dim: int = 128, in_channels: int = 3):
        super().__init__()
        layers, c_in = [], in_channels
        for i, c in enumerate(channels):
            layers += [nn.Conv2d(c_in, c, 3, stride=1 if i == 0 else 2, padding=1), _norm(c), nn.SiLU(),
                       nn.Conv2d(c, c, 3, padding=1), _norm(c), nn.SiLU()]
            c_in = c
        layers += [nn.Conv2d(c_in, feature_dim, 1), _norm(feature_dim), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, feature_dim) pooled features of images in [-1, 1]."""
        return self.body(x.to(self.head.weight.dtype)).mean(dim=(-2, -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class VideoClassifier(ModelMixin, ConfigMixin):
    """3D conv stages (stride (1,2,2) first, then (2,2,2)) + global pool + one linear head per
    caption factor. ``forward`` returns ``{factor: logits}``.

    Args:
        heads: classes per factor (default: ``VideoCaptions().num_classes``).
        channels: width of each stage.
        feature_dim: width of the pooled feature.
    """

    @register_to_config
    def __init__(self, heads: dict[str, int] | None = None, channels: tuple[int, ...] = (24, 48, 96, 128),
                 feature_dim: int = 128, in_channels: int = 3):
        super().__init__()
        heads = dict(heads or VideoCaptions().num_classes)
        layers, c_in = [], in_channels
        for i, c in enumerate(channels):
            stride = (1, 1, 1) if i == 0 else ((1, 2, 2) if i == 1 else (2, 2, 2))
            layers += [nn.Conv3d(c_in, c, 3, stride=stride, padding=1), _norm(c), nn.SiLU()]
            if i > 0:
                layers += [nn.Conv3d(c, c, (3, 1, 1), padding=(1, 0, 0)), _norm(c), nn.SiLU()]  # temporal mixing
            c_in = c
        layers += [nn.Conv3d(c_in, feature_dim, 1), _norm(feature_dim), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.outputs = nn.ModuleDict({k: nn.Linear(feature_dim, n) for k, n in heads.items()})

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, feature_dim) pooled features of videos (N, 3, F, H, W) in [-1, 1]."""
        w = next(iter(self.outputs.values())).weight
        return self.body(x.to(w.dtype)).mean(dim=(-3, -2, -1))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(x)
        return {k: h(f) for k, h in self.outputs.items()}
