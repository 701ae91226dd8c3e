"""Training state on disk: compressor weights, optimizer momentum, step and RNG, atomically.

`save_state` writes a tensor file, then the JSON that names it (the commit point), then removes
older tensor files; `load_state` refuses a state written with other settings, naming the key.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mc_core.io import staged_file, write_json

__all__ = ["STATE_JSON", "has_state", "load_state", "save_state"]

STATE_JSON = "train_state.json"


def has_state(out_dir: Path) -> bool:
    """Whether `out_dir` holds a committed training state."""
    return (out_dir / STATE_JSON).is_file()


def save_state(out_dir: Path, compressor, opt, step: int, info: dict[str, Any]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {
        f"gen.{k}": v.detach().cpu().contiguous() for k, v in compressor.state_dict().items()
    }
    params = list(compressor.parameters())
    for i, p in enumerate(params):
        buf = opt.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            tensors[f"opt.momentum.{i}"] = buf.detach().cpu().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    name = f"state-{step:08d}.safetensors"
    with staged_file(out_dir / name) as tmp:
        save_file(tensors, str(tmp))
    # The JSON is the commit point: it names the tensor file of the last complete checkpoint.
    write_json(out_dir / STATE_JSON, {**info, "step": step, "file": name}, indent=1)
    for old in out_dir.glob("state-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)


def load_state(out_dir: Path, compressor, opt, expect: dict[str, Any]) -> tuple[int, dict]:
    try:
        info = json.loads((out_dir / STATE_JSON).read_text())
        tensors = load_file(str(out_dir / info["file"]))
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as err:  # by hand
        raise ValueError(
            f"{out_dir}: unreadable training state ({type(err).__name__}: {err});"
            f" delete that folder to train from the start"
        ) from None
    for key, value in expect.items():
        if info.get(key) != value:
            raise ValueError(
                f"{out_dir / STATE_JSON}: checkpoint has {key}={info.get(key)!r}, this run "
                f"{value!r}; resume with the same settings or use another out_dir"
            )
    compressor.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("gen.")})
    for i, p in enumerate(compressor.parameters()):
        buf = tensors.get(f"opt.momentum.{i}")
        if buf is not None:
            opt.state[p]["momentum_buffer"] = buf.to(p.device).clone()
    torch.set_rng_state(tensors["rng.torch"])
    return int(info["step"]), info
