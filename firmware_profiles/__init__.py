"""Hardware profiles as data: one TOML file per class of box, validated by
`edge_bundle.profiles`. This module only says where the files are."""

from __future__ import annotations

from pathlib import Path

PROFILE_DIR = Path(__file__).resolve().parent


def profile_paths() -> list[Path]:
    """Every shipped profile file, sorted by name."""
    return sorted(PROFILE_DIR.glob("*.toml"))
