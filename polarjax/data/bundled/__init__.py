"""Datasets shipped with polarjax (see docs/ and the data README in the repository)."""

from pathlib import Path

BUNDLED_DIR = Path(__file__).resolve().parent


def bundled_path(name: str) -> Path:
    """Path of a bundled dataset file, e.g. ``bundled_path("nacl_clusters.xyz")``."""
    path = BUNDLED_DIR / name
    if not path.exists():
        available = sorted(p.name for p in BUNDLED_DIR.glob("*.xyz"))
        raise FileNotFoundError(f"no bundled dataset {name!r}; available: {available}")
    return path
