"""Progress bars (tqdm) that stay quiet in non-interactive runs when asked."""

from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm


def progress_bar(total: int, desc: str, initial: int = 0, enabled: bool = True, unit: str = "step") -> Any:
    """A tqdm bar; ``enabled=False`` gives a disabled bar with the same methods."""
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        disable=not enabled,
        unit=unit,
        dynamic_ncols=True,
        mininterval=0.5,
    )
