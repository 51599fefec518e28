"""The plan: which method each (layer, step) uses, with the metadata that says where it is valid.

Plans are JSON files (never pickles) with a format version; loading validates every field and
fails with a message that names the field.
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from ._version import __version__
from .methods.ditfastattn import (ALL_METHODS, ASC, FULL, METHODS, RESIDUAL_REFRESHES, WA, WARS, WARS_ASC,
                                  WINDOW_KINDS, refreshes_residual)
from .runtime import split_target

FORMAT = "ditaccel.plan"
VERSION = 1

#: metadata keys every plan carries, with their types
REQUIRED_METADATA: dict[str, type | tuple[type, ...]] = {
    "model_class": str,
    "config_fingerprint": str,
    "num_layers": int,
    "num_steps": int,
    "cfg": bool,
    "window": str,
    "window_size": (int, float),
}


class PlanError(ValueError):
    """A plan file or plan that is invalid, or invalid for this model; the message names the field."""


def config_fingerprint(transformer: torch.nn.Module) -> str:
    """A short hash of the transformer's architecture config (private keys such as the path
    it was loaded from are ignored), so a plan cannot be applied to another model."""
    cfg = {k: v for k, v in dict(transformer.config).items() if not k.startswith("_")}
    blob = json.dumps(cfg, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def library_version() -> str:
    return __version__


@dataclass
class Plan:
    """``methods[layer][step]`` in ``{"full", "wars", "ast", "asc", "wars+asc"}`` (or the ablation
    method ``"wa"``: window attention without the residual) plus metadata.

    Metadata (all written by ``calibrate``): ``model_class``, ``config_fingerprint``,
    ``num_layers``, ``num_steps``, ``cfg``, ``window``, ``window_size`` (required),
    ``residual_refresh`` (``"full"`` when absent: which steps refresh the ``wars`` residual, see
    ``DiTFastAttnConfig``; it changes what the plan computes) and ``scheduler``, ``tokens``,
    ``grid``, ``threshold``, ``library_version``, ``created``, ``calibration_seconds``, ...
    (informative).
    """

    methods: list[list[str]]
    metadata: dict[str, Any] = field(default_factory=dict)
    method: str = "ditfastattn"

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------ shape
    @property
    def num_layers(self) -> int:
        return len(self.methods)

    @property
    def num_steps(self) -> int:
        return len(self.methods[0]) if self.methods else 0

    def counts(self) -> dict[str, int]:
        """(layer, step) pairs per method: every paper method, and the ablation methods in use."""
        c = Counter(m for row in self.methods for m in row)
        return {m: c.get(m, 0) for m in ALL_METHODS if m in METHODS or c.get(m)}

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        if self.method != "ditfastattn":
            raise PlanError(f"method: unknown plan method {self.method!r} (this version knows 'ditfastattn')")
        md = self.metadata
        if not isinstance(md, dict):
            raise PlanError("metadata: must be an object")
        for key, typ in REQUIRED_METADATA.items():
            if key not in md:
                raise PlanError(f"metadata.{key}: missing")
            if not isinstance(md[key], typ) or (typ is not bool and isinstance(md[key], bool)):
                raise PlanError(f"metadata.{key}: expected {getattr(typ, '__name__', typ)}, got {md[key]!r}")
        if md["window"] not in WINDOW_KINDS:
            raise PlanError(f"metadata.window: unknown window {md['window']!r}; known: {WINDOW_KINDS}")
        if not 0 < md["window_size"] <= 1:
            raise PlanError(f"metadata.window_size: must be in (0, 1], got {md['window_size']!r}")
        refresh = md.get("residual_refresh", "full")
        if refresh not in RESIDUAL_REFRESHES:
            raise PlanError(f"metadata.residual_refresh: unknown rule {refresh!r}; known: {RESIDUAL_REFRESHES}")
        refreshing = "'full'" if refresh == "full" else "'full' or 'asc'"
        rows = self.methods
        if not isinstance(rows, list) or not all(isinstance(r, list) for r in rows):
            raise PlanError("methods: must be a list (layers) of lists (steps)")
        if len(rows) != md["num_layers"]:
            raise PlanError(f"methods: {len(rows)} layers, but metadata.num_layers is {md['num_layers']}")
        for i, row in enumerate(rows):
            if len(row) != md["num_steps"]:
                raise PlanError(f"methods[{i}]: {len(row)} steps, but metadata.num_steps is {md['num_steps']}")
            seen_refresh = False
            for s, m in enumerate(row):
                where = f"methods[{i}][{s}]"
                if m not in ALL_METHODS:
                    raise PlanError(f"{where}: unknown method {m!r}; known: {ALL_METHODS}")
                if s == 0 and m not in (FULL, ASC, WA):
                    raise PlanError(f"{where}: step 0 must compute attention ('full', 'asc' or 'wa'), got {m!r}")
                if m in (WARS, WARS_ASC) and not seen_refresh:
                    raise PlanError(f"{where}: {m!r} needs an earlier {refreshing} step of the same layer (its "
                                    "residual)")
                if m in (ASC, WARS_ASC) and not md["cfg"]:
                    raise PlanError(f"{where}: {m!r} needs CFG, but metadata.cfg is false")
                seen_refresh |= refreshes_residual(m, refresh)

    def check_model(self, transformer: torch.nn.Module) -> None:
        """Raise ``PlanError`` if this plan was made for another model."""
        name = type(transformer).__name__
        if self.metadata["model_class"] != name:
            raise PlanError(f"metadata.model_class: plan made for {self.metadata['model_class']}, "
                            f"this transformer is {name}")
        fp = config_fingerprint(transformer)
        if self.metadata["config_fingerprint"] != fp:
            raise PlanError(f"metadata.config_fingerprint: plan made for a {name} with another config "
                            f"({self.metadata['config_fingerprint']} != {fp})")

    @classmethod
    def from_methods(cls, pipe_or_transformer, methods: list[list[str]], *, cfg: bool,
                     window: str = "band1d", window_size: float = 0.25, **metadata) -> Plan:
        """A hand-made plan for this model: ``methods[layer][step]``, validated like a loaded one."""
        pipe, transformer = split_target(pipe_or_transformer)
        if pipe is not None:
            metadata.setdefault("scheduler", type(pipe.scheduler).__name__)
        num_steps = len(methods[0]) if methods else 0
        md = new_metadata(transformer, num_steps, cfg, window, window_size, num_layers=len(methods),
                          source="hand-made", **metadata)
        return cls([list(r) for r in methods], md)

    # ------------------------------------------------------------------ derived plans
    def without_asc(self) -> Plan:
        """The same plan for a pipeline without CFG: ``asc`` → ``full``, ``wars+asc`` → ``wars``."""
        swap = {ASC: FULL, WARS_ASC: WARS}
        md = dict(self.metadata, cfg=False, derived_from="without_asc")
        return Plan([[swap.get(m, m) for m in row] for row in self.methods], md, self.method)

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy({"format": FORMAT, "version": VERSION, "method": self.method,
                              "metadata": self.metadata, "methods": self.methods})

    @classmethod
    def from_dict(cls, d: Any) -> Plan:
        if not isinstance(d, dict):
            raise PlanError("plan: the file must hold a JSON object")
        if d.get("format") != FORMAT:
            raise PlanError(f"format: expected {FORMAT!r}, got {d.get('format')!r}")
        v = d.get("version")
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise PlanError(f"version: expected a positive integer, got {v!r}")
        if v > VERSION:
            raise PlanError(f"version: plan format {v} is newer than this ditaccel reads ({VERSION}); "
                            "upgrade ditaccel")
        for key in ("metadata", "methods"):
            if key not in d:
                raise PlanError(f"{key}: missing")
        return cls(methods=d["methods"], metadata=d["metadata"], method=d.get("method", "ditfastattn"))

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)
            f.write("\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PlanError(f"plan file {os.fspath(path)!r} is not valid JSON: {e}") from None
        except OSError as e:
            raise PlanError(f"plan file {os.fspath(path)!r}: {e.strerror or e}") from None
        return cls.from_dict(d)

    # ------------------------------------------------------------------ display
    def summary(self) -> str:
        md = self.metadata
        n = self.num_layers * self.num_steps
        lines = [f"ditaccel plan ({self.method}, format {VERSION})",
                 f"  model      {md['model_class']} [{md['config_fingerprint']}], {self.num_layers} layers",
                 f"  steps      {self.num_steps} ({md.get('scheduler', '?')}), cfg={md['cfg']}",
                 f"  tokens     {md.get('tokens', '?')} (grid {md.get('grid', '?')})",
                 f"  window     {md['window']}, size {md['window_size']}"
                 + (f", residual refreshed at {md['residual_refresh']} steps" if "residual_refresh" in md else ""),
                 f"  threshold  {md.get('threshold', '?')}"]
        if isinstance(md.get("calibration_seconds"), (int, float)):
            lines.append(f"  calibrated in {md['calibration_seconds']:.1f} s on {md.get('calibration_inputs', '?')} inputs")
        for m, c in self.counts().items():
            lines.append(f"  {m:<9} {c:5d}  {100 * c / max(n, 1):5.1f}%")
        return "\n".join(lines)


def new_metadata(transformer: torch.nn.Module, num_steps: int, cfg: bool, window: str, window_size: float,
                 **extra) -> dict[str, Any]:
    n_layers = extra.pop("num_layers")
    return {
        "model_class": type(transformer).__name__,
        "config_fingerprint": config_fingerprint(transformer),
        "num_layers": n_layers,
        "num_steps": num_steps,
        "cfg": cfg,
        "window": window,
        "window_size": window_size,
        "library_version": library_version(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }
