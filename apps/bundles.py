"""Turn a `--bundle` argument into a runtime Bundle: a path, `random-tiny`, or `auto`.

`random-tiny` is an untrained `Bundle.random(ModelConfig.tiny(), seed=0)`: it exercises every
moving part (timing, transport, input) without claiming to show a world. `auto` picks the
bundle shipped under `models/` (`models/default` first, else the first by name) when there is
one, and falls back to `random-tiny` with a note.
"""

from __future__ import annotations

import sys
from pathlib import Path

RANDOM_TINY = "random-tiny"
AUTO = "auto"
DEFAULT_NAME = "default"
MODELS_DIR = Path(__file__).resolve().parent.parent / "models"


def shipped_bundles(models_dir: Path = MODELS_DIR) -> list[Path]:
    """Bundle directories under models/ (a bundle dir holds a config.json), sorted by name."""
    if not models_dir.is_dir():
        return []
    return sorted(p for p in models_dir.iterdir() if (p / "config.json").is_file())


def resolve_bundle(arg: str | None, models_dir: Path = MODELS_DIR):
    """Load the bundle named by a CLI argument (see the module docstring)."""
    from runtime import Bundle, ModelConfig

    arg = arg or AUTO
    if arg == AUTO:
        shipped = shipped_bundles(models_dir)
        if not shipped:
            print(f"note: no bundle under {models_dir}; using an untrained {RANDOM_TINY} bundle",
                  file=sys.stderr)
            arg = RANDOM_TINY
        else:
            named_default = [p for p in shipped if p.name == DEFAULT_NAME]
            arg = str((named_default or shipped)[0])
    if arg == RANDOM_TINY:
        return Bundle.random(ModelConfig.tiny(), seed=0)
    path = Path(arg)
    if not path.exists():
        raise FileNotFoundError(f"bundle {arg!r}: no such directory (or use {RANDOM_TINY!r} / {AUTO!r})")
    return Bundle.load(path)
