"""Tile geometry: the one definition of how a frame of W×H pixels splits into ``cols x rows`` tiles.

A frame split into ``cols x rows`` tiles has column edges ``x_i = i*W // cols`` and row edges
``y_j = j*H // rows``, rows counted from the top of the image. Consecutive edges are distinct when
``cols <= W`` and ``rows <= H``, so the tiles cover every pixel exactly once for any size, odd or not. The
coordinator's planner (``farm.kinds.tiles``), the Blender runtime (which region to render) and the
assembler (where a tile goes, and whether it has the size it should) all use these functions, so they
cannot disagree.
"""
from __future__ import annotations

from common import limits as C


def edges(n: int, size: int) -> list[int]:
    """The n+1 pixel edges that split ``size`` pixels into n parts (first 0, last ``size``)."""
    return [i * size // n for i in range(n + 1)]


def tile_rect(cols: int, rows: int, col: int, row: int, width: int, height: int) -> tuple[int, int, int, int]:
    """Pixel rectangle ``(x0, x1, y0, y1)`` (ends exclusive, y from the top) of tile (col, row)."""
    xs, ys = edges(cols, width), edges(rows, height)
    return xs[col], xs[col + 1], ys[row], ys[row + 1]


def too_many_tiles(cols: int, rows: int, width: int, height: int) -> str:
    """Why a ``width``×``height`` frame cannot be split into cols×rows tiles ("" when it can)."""
    if cols <= width and rows <= height:
        return ""
    return (f"tiles {cols}x{rows} need a frame of at least {cols}x{rows} pixels, but this frame renders at "
            f"{width}x{height}: use fewer tiles (at most {min(width, C.MAX_TILES_PER_SIDE)}x"
            f"{min(height, C.MAX_TILES_PER_SIDE)}) or a higher resolution")


def tile_name(frame: int, row: int, col: int, fmt: str) -> str:
    """Output name of one tile, e.g. ``tile_0007_r1_c2.png`` (row from the top, column from the left)."""
    return f"tile_{frame:04d}_r{row}_c{col}.{'exr' if fmt == 'EXR' else 'png'}"
