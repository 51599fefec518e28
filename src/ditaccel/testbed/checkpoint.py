"""The testbed models' weights in and out: DiT-style initialisation helpers, continuing from a
saved folder (``load_saved_weights``, ``check_init_config``), and saving a run (``save_run``: the
EMA weights in fp16 safetensors with ``save_pretrained``, plus ``train_info.json``: steps done,
time, losses, config, seed). Saved folders load back with diffusers' ``from_pretrained``
(``ditaccel.testbed.pixel.load_image_pipeline`` etc.).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .training import EMA

__all__ = [
    "check_init_config",
    "init_linear",
    "load_saved_weights",
    "save_run",
    "to_float16",
    "weights_bytes",
    "write_info",
    "zero_init",
]


def write_info(out_dir: Path, info: dict):
    """``info`` as ``out_dir/train_info.json``."""
    (out_dir / "train_info.json").write_text(json.dumps(info, indent=2, default=str))


def init_linear(m: torch.nn.Module):
    """DiT's initialisation of a linear layer (``module.apply(init_linear)``): xavier weights, zero bias."""
    if isinstance(m, torch.nn.Linear):
        torch.nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            torch.nn.init.zeros_(m.bias)


def zero_init(*mods):
    """Zero the weights and biases of ``mods`` (adaLN-Zero: modulation and output projections)."""
    for m in mods:
        torch.nn.init.zeros_(m.weight)
        if getattr(m, "bias", None) is not None:
            torch.nn.init.zeros_(m.bias)


def to_float16(module: torch.nn.Module) -> None:
    """Cast ``module`` to fp16 in place, as saved (``nn.Module.to``: no diffusers dtype warning)."""
    torch.nn.Module.to(module, dtype=torch.float16)


def weights_bytes(root: str | os.PathLike) -> int:
    """Total size of the files under ``root`` (the 24 MB budget of all shipped testbed files)."""
    return sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file())


def load_saved_weights(folder, modules: dict[str, torch.nn.Module]) -> str | None:
    """Continue from a saved pipeline folder: load each ``modules[name]`` from ``folder/name``
    (diffusers / transformers safetensors). Returns the folder as recorded in ``train_info``."""
    if folder is None:
        return None
    from safetensors.torch import load_file

    folder = Path(folder)
    for name, module in modules.items():
        files = sorted((folder / name).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"init_from: no safetensors weights in {folder / name}")
        state = {}
        for f in files:
            state.update(load_file(str(f)))
        missing, unexpected = module.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
        # tied weights (T5's embeddings) are saved once: their other names may be missing
        tied = set(module.state_dict()) - set(dict(module.named_parameters())) - set(dict(module.named_buffers()))
        missing = [k for k in missing if k not in tied]
        if missing or unexpected:
            raise ValueError(f"init_from: {folder / name} does not match this model "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return str(folder)


def check_init_config(folder, config, keys) -> None:
    """Refuse to continue from a folder whose transformer differs in any of ``keys`` (e.g. RoPE,
    which has no weights of its own and would otherwise pass the state-dict check silently)."""
    if folder is None:
        return
    path = Path(folder) / "transformer" / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"init_from: no transformer config at {path}")
    saved = json.loads(path.read_text())
    diff = {k: (saved.get(k), config[k]) for k in keys if saved.get(k, config[k]) != config[k]}
    if diff:
        raise ValueError(f"init_from: {folder} has a different transformer ("
                         + ", ".join(f"{k}: saved {a}, this run {b}" for k, (a, b) in diff.items())
                         + "); pass the same --layers/--heads/--width/--rope")


def save_run(out_dir: Path, ema: EMA, modules, make_pipe, info: dict) -> dict:
    """The EMA weights in fp16, saved as the pipeline ``make_pipe()`` builds, plus ``train_info.json``."""
    ema.copy_to()
    for m in modules:
        m.eval().cpu()
        to_float16(m)
    out_dir.mkdir(parents=True, exist_ok=True)
    make_pipe().save_pretrained(out_dir)
    write_info(out_dir, info)
    return info
