"""Training recipes: one linear file per algorithm, each declaring a ``RECIPE`` (``mmalign.runtime.launch.Recipe``)."""

from __future__ import annotations

from mmalign.runtime.launch import Recipe


def recipes() -> dict[str, Recipe]:
    """The library's recipes by command name (imported here, on demand: each pulls in torch)."""
    from mmalign.recipes import dpo, online_dpo, pretrain, rl, rm, sft

    return {m.RECIPE.name: m.RECIPE for m in (pretrain, sft, dpo, online_dpo, rm, rl)}
