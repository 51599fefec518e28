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
from .methods.adaspa import PLAN_ENTRIES, RESEARCH, SCHEDULE_FIELDS, SEARCH, SPARSE, AdaSpaConfig
from .methods.ditfastattn import (ALL_METHODS, ASC, CACHE_DTYPES, FULL, METHODS, RESIDUAL_REFRESHES, WA, WARS,
                                  WARS_ASC, WINDOW_KINDS, refreshes_residual)
from .runtime import split_target

FORMAT = "ditaccel.plan"
#: the newest format this version reads and writes: 2 = mixed plans (AdaSpa's entries too); a plan
#: without AdaSpa entries is still written as version 1, which every ditaccel reads
VERSION = 2
#: every entry a plan may hold: DiTFastAttn's methods (format 1) and AdaSpa's (format 2)
ENTRIES: tuple[str, ...] = ALL_METHODS + PLAN_ENTRIES

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
    method ``"wa"``: window attention without the residual) plus metadata. A mixed plan (format
    version 2) may also hold AdaSpa's entries ``"search"`` (dense attention that also searches the
    layer's block mask; a ``full`` step for DiTFastAttn's rules), ``"research"`` (re-search from the
    cached LSE, then block-sparse attention) and ``"sparse"`` (block-sparse attention with the
    layer's latest mask); see ``ditaccel.methods.mixed``. It then needs ``metadata["adaspa"]``:
    AdaSpa's per-call settings (``AdaSpaConfig`` fields but its schedule fields, e.g.
    ``{"sparsity": 0.8, "block_size": 64}``).

    Metadata (all written by ``calibrate``): ``model_class``, ``config_fingerprint``,
    ``num_layers``, ``num_steps``, ``cfg``, ``window``, ``window_size`` (required),
    ``residual_refresh`` (``"full"`` when absent: which steps refresh the ``wars`` residual, see
    ``DiTFastAttnConfig``; it changes what the plan computes), ``cache_dtype`` (``"model"`` when
    absent: how the caches kept between steps are stored, ``"model"`` or ``"float8"``, see
    ``DiTFastAttnConfig``; :meth:`with_cache_dtype` makes the same plan with another) and
    ``scheduler``, ``tokens``,
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
        """(layer, step) pairs per method: every paper method, and the ablation and AdaSpa entries in use."""
        c = Counter(m for row in self.methods for m in row)
        return {m: c.get(m, 0) for m in ENTRIES if m in METHODS or c.get(m)}

    @property
    def is_mixed(self) -> bool:
        """Whether any entry is AdaSpa's (``"search"``, ``"research"``, ``"sparse"``)."""
        return any(m in PLAN_ENTRIES for row in self.methods for m in row)

    @property
    def version(self) -> int:
        """The format version this plan is written as: 2 for a mixed plan, else 1."""
        return 2 if self.is_mixed else 1

    def adaspa_config(self) -> AdaSpaConfig | None:
        """AdaSpa's settings of a mixed plan (``metadata["adaspa"]``), else ``None``."""
        d = self.metadata.get("adaspa")
        return None if d is None else AdaSpaConfig(**d)

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
        cache_dtype = md.get("cache_dtype", "model")
        if not isinstance(cache_dtype, str) or cache_dtype not in CACHE_DTYPES:
            raise PlanError(f"metadata.cache_dtype: unknown cache dtype {cache_dtype!r}; known: {CACHE_DTYPES}")
        refreshing = "'full'" if refresh == "full" else "'full' or 'asc'"
        rows = self.methods
        if not isinstance(rows, list) or not all(isinstance(r, list) for r in rows):
            raise PlanError("methods: must be a list (layers) of lists (steps)")
        if len(rows) != md["num_layers"]:
            raise PlanError(f"methods: {len(rows)} layers, but metadata.num_layers is {md['num_layers']}")
        for i, row in enumerate(rows):
            if len(row) != md["num_steps"]:
                raise PlanError(f"methods[{i}]: {len(row)} steps, but metadata.num_steps is {md['num_steps']}")
            seen_refresh = seen_search = False
            for s, m in enumerate(row):
                where = f"methods[{i}][{s}]"
                if not isinstance(m, str) or m not in ENTRIES:
                    raise PlanError(f"{where}: unknown method {m!r}; known: {ENTRIES}")
                if s == 0 and m not in (FULL, ASC, WA, SEARCH):
                    raise PlanError(f"{where}: step 0 must compute attention ('full', 'asc', 'wa' or 'search'), "
                                    f"got {m!r}")
                if m in (SPARSE, RESEARCH) and not seen_search:
                    what = "its cached LSE" if m == RESEARCH else "its block mask"
                    raise PlanError(f"{where}: {m!r} needs an earlier 'search' step of the same layer ({what})")
                seen_search |= m == SEARCH
                if m in (WARS, WARS_ASC) and not seen_refresh:
                    raise PlanError(f"{where}: {m!r} needs an earlier {refreshing} step of the same layer (its "
                                    "residual)")
                if m in (ASC, WARS_ASC) and not md["cfg"]:
                    raise PlanError(f"{where}: {m!r} needs CFG, but metadata.cfg is false")
                seen_refresh |= refreshes_residual(m, refresh) or m == SEARCH
        self._validate_adaspa()

    def _validate_adaspa(self) -> None:
        md = self.metadata
        if not self.is_mixed:
            if "adaspa" in md:
                raise PlanError("metadata.adaspa: AdaSpa settings in a plan without 'search', 'research' or "
                                "'sparse' entries")
            return
        if "adaspa" not in md:
            raise PlanError("metadata.adaspa: missing (a plan with 'search' / 'research' / 'sparse' entries needs "
                            "AdaSpa's settings, e.g. {\"sparsity\": 0.8, \"block_size\": 64})")
        d = md["adaspa"]
        if not isinstance(d, dict):
            raise PlanError(f"metadata.adaspa: expected an object, got {d!r}")
        known = set(AdaSpaConfig.__dataclass_fields__) - set(SCHEDULE_FIELDS)
        for key in d:
            if key in SCHEDULE_FIELDS:
                raise PlanError(f"metadata.adaspa.{key}: a schedule setting; in a plan the entries are the schedule")
            if key not in known:
                raise PlanError(f"metadata.adaspa.{key}: unknown AdaSpa setting; known: {sorted(known)}")
        try:
            AdaSpaConfig(**d)
        except (ValueError, TypeError) as e:
            raise PlanError(f"metadata.adaspa: {e}") from None

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

    def with_cache_dtype(self, cache_dtype: str) -> Plan:
        """The same plan with its caches stored as ``cache_dtype`` (``"model"`` or ``"float8"``; see
        ``DiTFastAttnConfig.cache_dtype``), e.g. to compare both on one plan; its search ran with the
        caches it was calibrated with."""
        if not isinstance(cache_dtype, str) or cache_dtype not in CACHE_DTYPES:
            raise PlanError(f"cache_dtype: unknown cache dtype {cache_dtype!r}; known: {CACHE_DTYPES}")
        return Plan([list(r) for r in self.methods], dict(self.metadata, cache_dtype=cache_dtype), self.method)

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy({"format": FORMAT, "version": self.version, "method": self.method,
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
        if v == 1 and isinstance(d["methods"], list):
            for i, row in enumerate(d["methods"]):
                for s, m in enumerate(row if isinstance(row, list) else []):
                    if isinstance(m, str) and m in PLAN_ENTRIES:
                        raise PlanError(f"methods[{i}][{s}]: {m!r} is a format-2 entry (mixed plans), but the "
                                        "file says version 1")
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
        lines = [f"ditaccel plan ({self.method}, format {self.version})",
                 f"  model      {md['model_class']} [{md['config_fingerprint']}], {self.num_layers} layers",
                 f"  steps      {self.num_steps} ({md.get('scheduler', '?')}), cfg={md['cfg']}",
                 f"  tokens     {md.get('tokens', '?')} (grid {md.get('grid', '?')})",
                 f"  window     {md['window']}, size {md['window_size']}"
                 + (f", residual refreshed at {md['residual_refresh']} steps" if "residual_refresh" in md else "")
                 + (f", caches in {md['cache_dtype']}" if md.get("cache_dtype", "model") != "model" else ""),
                 f"  threshold  {md.get('threshold', '?')}"]
        if self.is_mixed:
            lines.append("  adaspa     " + ", ".join(f"{k}={v}" for k, v in sorted(md["adaspa"].items())))
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
