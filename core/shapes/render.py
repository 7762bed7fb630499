"""Draw a Shapes scene as a small RGB image (PIL), deterministically: same scene → same bytes.

Shapes are drawn at 4× the target size and box-downsampled, which gives clean anti-aliased
edges at 64 px without any randomness.
"""
from __future__ import annotations

import math

from PIL import Image, ImageDraw

from core.shapes.world import COLOURS, GRID, SIZE_RADIUS, Obj, Scene

SUPERSAMPLE = 4
MARGIN = 0.03  # fraction of a cell kept free between a shape and its cell border


def _polygon(obj: Obj, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Vertices of `obj`'s shape centred (by bounding box) on (cx, cy); None for the circle.

    Each shape is scaled so that shapes of one size cover about the same area.
    """
    if obj.shape == "square":
        h = 0.8 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if obj.shape == "diamond":
        # Taller than wide so it never reads as a rotated square.
        return [(cx, cy - r), (cx + 0.68 * r, cy), (cx, cy + r), (cx - 0.68 * r, cy)]
    if obj.shape == "triangle":
        # Equilateral, apex up; shifted so the bounding box, not the centroid, is centred.
        R = 1.1 * r
        pts = [(cx + R * math.cos(a), cy + R * math.sin(a) + 0.25 * R) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        return pts
    if obj.shape == "star":
        # Five points with a fat inner radius: thin spikes vanish at 64 px.
        inner = 0.47 * r
        shift = r * (1 - math.cos(math.pi / 5)) / 2
        pts = []
        for k in range(10):
            a = -math.pi / 2 + k * math.pi / 5
            rad = r if k % 2 == 0 else inner
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a) + shift))
        return pts
    if obj.shape == "cross":
        t, a = 0.32 * r, 0.95 * r  # half arm thickness, arm reach
        return [
            (cx - t, cy - a), (cx + t, cy - a), (cx + t, cy - t), (cx + a, cy - t),
            (cx + a, cy + t), (cx + t, cy + t), (cx + t, cy + a), (cx - t, cy + a),
            (cx - t, cy + t), (cx - a, cy + t), (cx - a, cy - t), (cx - t, cy - t),
        ]
    return None


def object_box(obj: Obj, image_size: int) -> tuple[float, float, float]:
    """(cx, cy, r) of `obj` in pixels of an `image_size` image; jitter is clamped inside the cell."""
    cell = image_size / GRID
    rf = SIZE_RADIUS[obj.size]
    room = max(0.0, 0.5 - rf - MARGIN)
    dx = min(max(obj.dx, -room), room)
    dy = min(max(obj.dy, -room), room)
    return (obj.col + 0.5 + dx) * cell, (obj.row + 0.5 + dy) * cell, rf * cell


def render(scene: Scene, image_size: int = 64) -> Image.Image:
    """The scene as an `image_size`×`image_size` RGB image."""
    big = image_size * SUPERSAMPLE
    img = Image.new("RGB", (big, big), scene.background)
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        cx, cy, r = object_box(obj, big)
        fill = COLOURS[obj.colour]
        pts = _polygon(obj, cx, cy, r)
        if pts is None:
            rr = 0.9 * r
            draw.ellipse((cx - rr, cy - rr, cx + rr, cy + rr), fill=fill)
        else:
            draw.polygon(pts, fill=fill)
    return img.reduce(SUPERSAMPLE)
