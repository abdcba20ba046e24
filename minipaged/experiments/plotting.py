"""What every experiment's figures share: the Agg backend (no display needed), one colour per
memory category (the same in every figure), and saving."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

COLORS = {
    "token_states": "#4c9a2a",
    "reservation": "#f2b134",
    "internal_fragmentation": "#d1495b",
    "external_fragmentation": "#8d5a97",
    "free": "#d9d9d9",
}
LABELS = {
    "token_states": "token states",
    "reservation": "reservation",
    "internal_fragmentation": "internal fragmentation",
    "external_fragmentation": "external fragmentation",
    "free": "free",
}
SYSTEM_LABELS = {
    "contiguous-max": "Max",
    "contiguous-pow2": "Pow2",
    "contiguous-oracle": "Oracle",
    "paged": "paged",
}


def save(fig: plt.Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
