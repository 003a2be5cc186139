"""Loading the small helper nets the apps run next to a bundle (the face locator, the audio -> mouth
ear): each is one torch file ``{"kind", "cfg", "model"}`` written by its `forcekit train` command."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def load_net_file(path: str | Path, filename: str, kind: str, what: str, command: str) -> dict[str, Any]:
    """The checkpoint dict of a ``kind`` net: ``path`` is a run dir holding ``filename``, or the file itself.
    Fails naming the file: missing (and the command that makes one), unreadable, or another kind."""
    path = Path(path)
    file = path / filename if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(f"{path}: no {what} (train one with `forcekit train {command}`)")
    try:
        d = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:   # truncated or not a torch file
        raise ValueError(f"{file}: unreadable {what} checkpoint ({exc})") from exc
    if not isinstance(d, dict) or d.get("kind") != kind:
        raise ValueError(f"{file}: not a {what} checkpoint")
    return d
