"""Per-epoch training checkpoints (safetensors, no pickle): model, optimizer, torch RNG
state, defense state and history, written through the store's one atomic writer.

A kill never leaves a partial checkpoint (the writer renames a complete file into place; a
killed write leaves only a temporary, removed by the next write of the same file).  A file
damaged some other way (disk trouble, a hand edit) is refused with :class:`CorruptCheckpoint`
naming it and the remedy -- it is never half-loaded into a training that then goes on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import CfbenchError
from ..models import unwrap
from ..store.io import load_tensors, save_tensors_atomic

CKPT_NAME = "last.safetensors"


class CorruptCheckpoint(CfbenchError):
    """A checkpoint file that cannot be read back."""


def save_checkpoint(path: Path, model, optimizer, epoch: int, history: list, state=None,
                    extra: dict | None = None) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for k, v in unwrap(model).state_dict().items():
        tensors[f"model.{k}"] = v.detach().cpu().contiguous()
    opt = optimizer.state_dict()
    opt_scalars: dict[str, Any] = {}
    for idx, st in opt["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                opt_scalars[f"{idx}.{k}"] = v
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():  # a resumed CUDA run must draw the same numbers as an uninterrupted one
        tensors["rng.cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    if state is not None:
        for k, v in state.state_tensors().items():
            tensors[f"defense.{k}"] = v.detach().cpu().contiguous()
    meta = {"epoch": epoch, "history": history, "param_groups": opt["param_groups"],
            "opt_scalars": opt_scalars, "extra": extra or {}}
    save_tensors_atomic(path, tensors, meta)


def checkpoint_meta(path: Path) -> tuple[dict | None, str | None]:
    """``(meta, None)`` when ``path`` is a readable checkpoint, else ``(None, why not)``; reads
    only the header."""
    from ..store.io import read_tensor_meta

    try:
        meta = read_tensor_meta(path)
    except Exception as e:  # noqa: BLE001 - any unreadable file
        return None, f"unreadable ({type(e).__name__}: {e})"
    missing = [k for k in ("epoch", "history", "param_groups", "opt_scalars") if k not in meta]
    return (None, f"missing metadata ({', '.join(missing)})") if missing else (meta, None)


def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` is not a readable checkpoint (None if it is); reads only the header."""
    return checkpoint_meta(path)[1]


def load_checkpoint(path: Path, model, optimizer, state=None) -> dict:
    problem = checkpoint_problem(path)
    if problem is None:
        try:
            tensors, meta = load_tensors(path)
        except Exception as e:  # noqa: BLE001
            problem = f"unreadable ({type(e).__name__}: {e})"
    if problem is not None:
        raise CorruptCheckpoint(f"checkpoint {path} is {problem}; delete it (or run `cfbench doctor --fix`) "
                                "and run the same command again to train from the start.")
    unwrap(model).load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    opt_state: dict[int, dict[str, Any]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, name = k.split(".", 2)
            opt_state.setdefault(int(idx), {})[name] = v
    for k, v in meta["opt_scalars"].items():
        idx, name = k.split(".", 1)
        opt_state.setdefault(int(idx), {})[name] = v
    optimizer.load_state_dict({"state": opt_state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(tensors["rng.cuda"]))
    if state is not None:
        state.load_state_tensors({k[8:]: v for k, v in tensors.items() if k.startswith("defense.")})
    return meta
