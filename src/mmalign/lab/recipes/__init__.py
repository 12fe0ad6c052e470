"""Recipes of the world lab: warm-ups of a random-init vision path that a real checkpoint does not need."""

from __future__ import annotations

from mmalign.runtime.launch import Recipe


def recipes() -> dict[str, Recipe]:
    """The lab's recipes by command name, after the library's."""
    from mmalign import recipes as library
    from mmalign.lab.recipes import contrastive, vision

    return {**library.recipes(), **{m.RECIPE.name: m.RECIPE for m in (contrastive, vision)}}


def recipe(name: str) -> Recipe:
    """A library or lab recipe by name."""
    found = recipes()
    if name not in found:
        raise ValueError(f"unknown recipe {name!r}; choose one of {sorted(found)}")
    return found[name]
