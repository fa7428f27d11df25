"""Reading a weights file for `python -m compile build --weights`."""

from __future__ import annotations

import os
from typing import Any

import torch


def read_state_dict(path: str | os.PathLike[str]) -> Any:
    """The object saved in `path` (a state_dict, or a dict holding one), loaded with torch's
    `weights_only`, so that a file cannot run code. Raises ValueError, naming `path`, for a file
    that cannot be read or is not one torch saved."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        raise ValueError(f"cannot read weights {path}: {e.strerror}") from e
    except Exception as e:  # torch.load raises many types for a file that is not a state_dict
        raise ValueError(f"cannot read weights {path}: not a PyTorch state_dict file ({type(e).__name__})") from e
