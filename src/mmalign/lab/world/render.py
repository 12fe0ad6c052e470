"""Deterministic rendering of a scene to an RGB image.

Shapes are drawn as filled polygons on a canvas ``SUPERSAMPLE`` times larger than the output and then
downsampled, so edges are anti-aliased while shape interiors keep their exact colour. Every length is a
fraction of the grid cell, so any ``image_size`` (64, 336, ...) gives the same picture.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable

from PIL import Image, ImageDraw

from mmalign.lab.world.config import Rgb, WorldConfig
from mmalign.lab.world.scenes import Scene

Point = tuple[float, float]
Outline = Callable[[float, float, float], list[Point]]

BACKGROUND: Rgb = (242, 240, 234)
TINT = 8  # per-channel background jitter, so backgrounds are not all identical
STAR_INNER = 0.45  # inner/outer radius; fatter than a geometric star so it reads at 10 px
CURVE_POINTS = 48


def supersample(image_size: int) -> int:
    """Canvas scale: large for small images (where anti-aliasing matters), 2 for big ones."""
    return 4 if image_size <= 160 else 2


def background(scene: Scene) -> Rgb:
    """A light background with a slight per-scene tint (from a stable hash of the image id)."""
    h = zlib.crc32(scene.image_id.encode())
    r, g, b = (min(255, max(0, c + ((h >> (8 * i)) & 0xFF) % (2 * TINT + 1) - TINT)) for i, c in enumerate(BACKGROUND))
    return (r, g, b)


def render_scene(scene: Scene, cfg: WorldConfig) -> Image.Image:
    """Draw a scene.

    Args:
        scene: the scene; each object is drawn centred in its grid cell.
        cfg: gives colours, size fractions, grid and ``image_size``.

    Returns:
        An RGB image of ``cfg.image_size`` x ``cfg.image_size`` pixels.
    """
    ss = supersample(cfg.image_size)
    side = cfg.image_size * ss
    canvas = Image.new("RGB", (side, side), background(scene))
    draw = ImageDraw.Draw(canvas)
    cell_w, cell_h = side / cfg.grid_cols, side / cfg.grid_rows
    for obj in scene.objects:
        cx, cy = (obj.col + 0.5) * cell_w, (obj.row + 0.5) * cell_h
        r = cfg.sizes[obj.size] * min(cell_w, cell_h) / 2
        draw.polygon(OUTLINES[obj.shape](cx, cy, r), fill=tuple(cfg.colours[obj.colour]))
    return canvas.resize((cfg.image_size, cfg.image_size), Image.Resampling.BOX)


def _regular(cx: float, cy: float, radii: list[float], start: float = -math.pi / 2) -> list[Point]:
    """Vertices at equal angular steps with the given radii (cycled), starting at ``start``."""
    n = len(radii)
    return [
        (
            cx + radii[k] * math.cos(start + 2 * math.pi * k / n),
            cy + radii[k] * math.sin(start + 2 * math.pi * k / n),
        )
        for k in range(n)
    ]


def circle(cx: float, cy: float, r: float) -> list[Point]:
    return _regular(cx, cy, [r] * CURVE_POINTS)


def square(cx: float, cy: float, r: float) -> list[Point]:
    h = 0.85 * r
    return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]


def triangle(cx: float, cy: float, r: float) -> list[Point]:
    # An upward triangle inscribed in radius r sits high; shift it down to balance it in the cell.
    return _regular(cx, cy + 0.2 * r, [1.1 * r] * 3)


def star(cx: float, cy: float, r: float) -> list[Point]:
    return _regular(cx, cy + 0.05 * r, [r, STAR_INNER * r] * 5)


def diamond(cx: float, cy: float, r: float) -> list[Point]:
    return [(cx, cy - r), (cx + 0.7 * r, cy), (cx, cy + r), (cx - 0.7 * r, cy)]


def cross(cx: float, cy: float, r: float) -> list[Point]:
    a, t = r, 0.33 * r  # arm length, half thickness
    return [
        (cx - t, cy - a), (cx + t, cy - a), (cx + t, cy - t), (cx + a, cy - t),
        (cx + a, cy + t), (cx + t, cy + t), (cx + t, cy + a), (cx - t, cy + a),
        (cx - t, cy + t), (cx - a, cy + t), (cx - a, cy - t), (cx - t, cy - t),
    ]  # fmt: skip


def heart(cx: float, cy: float, r: float) -> list[Point]:
    # The classic parametric heart spans x in [-16, 16], y in [-17, 12]; centre and scale it to r.
    pts = []
    for k in range(CURVE_POINTS):
        t = 2 * math.pi * k / CURVE_POINTS
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        pts.append((cx + x * r / 16, cy - (y + 2.5) * r / 15))
    return pts


def moon(cx: float, cy: float, r: float) -> list[Point]:
    """A crescent: the disc of radius r minus a disc of radius 0.8 r shifted right by 0.55 r."""
    d, r2 = 0.55 * r, 0.8 * r
    xi = (d * d + r * r - r2 * r2) / (2 * d)  # the circles intersect at (xi, ±yi)
    yi = math.sqrt(r * r - xi * xi)
    theta, phi = math.atan2(yi, xi), math.atan2(yi, xi - d)
    ox = cx + 0.2 * r  # the crescent spans [-r, xi]; recentre it
    n = CURVE_POINTS
    outer = [theta + (2 * math.pi - 2 * theta) * k / n for k in range(n + 1)]
    inner = [2 * math.pi - phi - (2 * math.pi - 2 * phi) * k / n for k in range(n + 1)]
    pts = [(ox + r * math.cos(a), cy + r * math.sin(a)) for a in outer]
    pts += [(ox + d + r2 * math.cos(a), cy + r2 * math.sin(a)) for a in inner]
    return pts


OUTLINES: dict[str, Outline] = {
    "circle": circle,
    "square": square,
    "triangle": triangle,
    "star": star,
    "heart": heart,
    "cross": cross,
    "diamond": diamond,
    "moon": moon,
}
