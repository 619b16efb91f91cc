"""Running a convolutional network over overlapping tiles and blending the overlaps linearly.

Used by the VAE for large images: each tile is processed alone (so memory is that of one tile), and
in every overlap the two results are mixed with weights that ramp from one tile to the other, which
hides the small differences between tiles (their group-norm statistics differ) without visible edges.

With ``wrap`` (tiling, ``nn/circular.py``: the image is a torus) the tiles go round: they are spread evenly
over each side, the last overlapping the first across the edge, a tile that crosses an edge takes the
pixels from the other side, and every tile blends with its neighbours on both sides, so the image's edges
are seams like any other, blended; a side that fits one tile is processed whole.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def tile_starts(n: int, tile: int, overlap: int) -> list[int]:
    if n <= tile:
        return [0]
    stride = tile - overlap
    return sorted({*range(0, n - tile, stride), n - tile})


def wrapped_starts(n: int, tile: int, overlap: int, down: int = 1) -> list[int]:
    """Starts of tiles that go round a side of ``n`` pixels: as few as overlap each next one (the last the
    first, across the edge) by at least ``overlap``, spread evenly, multiples of ``down``."""
    if n <= tile:
        return [0]
    units, step = n // down, (tile - overlap) // down
    count = -(-units // step)
    return [k * units // count * down for k in range(count)]


def _ramp(length: int, ramp: int, first: bool, last: bool, device) -> Tensor:
    w = torch.ones(length, device=device)
    ramp = min(ramp, length // 2)
    if ramp > 0:
        up = (torch.arange(ramp, device=device, dtype=torch.float32) + 0.5) / ramp
        if not first:
            w[:ramp] = up
        if not last:
            w[-ramp:] = up.flip(0)
    return w


def _ends(index: int, count: int, wrap: bool) -> tuple[bool, bool]:
    """Whether the tile at ``index`` of ``count`` is the first and the last of its side (no ramp there);
    going round, every tile has neighbours on both sides unless it is the only one."""
    if wrap:
        return count == 1, count == 1
    return index == 0, index == count - 1


def _spans(start: int, length: int, n: int) -> list[tuple[slice, slice]]:
    """(where in a side of ``n``, where in the tile) of a tile of ``length`` at ``start``, cut at the edge
    when it goes round."""
    if start + length <= n:
        return [(slice(start, start + length), slice(0, length))]
    inside = n - start
    return [(slice(start, n), slice(0, inside)), (slice(0, length - inside), slice(inside, length))]


def _take(x: Tensor, dim: int, start: int, length: int) -> Tensor:
    """``length`` entries of ``x`` along ``dim`` from ``start``, going round the end."""
    if start + length <= x.shape[dim]:
        return x.narrow(dim, start, length)
    return torch.cat([x.narrow(dim, start, x.shape[dim] - start), x.narrow(dim, 0, start + length - x.shape[dim])], dim)


def tiled_apply(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    tile: int,
    overlap: int,
    up: int = 1,
    down: int = 1,
    wrap: bool = False,
) -> Tensor:
    """``fn`` maps (B, C, h, w) to (B, C', h * up / down, w * up / down); apply it tile by tile.
    ``tile`` and ``overlap`` are in input pixels (multiples of ``down``). ``wrap``: the image is periodic
    (see the module docstring)."""
    b, _, h, w = x.shape
    out = None
    weight = None
    if wrap:
        ys, xs = wrapped_starts(h, tile, overlap, down), wrapped_starts(w, tile, overlap, down)
    else:
        ys, xs = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    th, tw = min(tile, h), min(tile, w)
    for i, y0 in enumerate(ys):
        for j, x0 in enumerate(xs):
            if wrap:
                piece = fn(_take(_take(x, -2, y0, th), -1, x0, tw))
            else:
                piece = fn(x[..., y0 : y0 + tile, x0 : x0 + tile])
            if out is None:
                out = torch.zeros(
                    b, piece.shape[1], h * up // down, w * up // down, dtype=torch.float32, device=piece.device
                )
                weight = torch.zeros(1, 1, out.shape[2], out.shape[3], device=piece.device)
            oy, ox = y0 * up // down, x0 * up // down
            ph, pw = piece.shape[-2:]
            ramp = overlap * up // down
            wy = _ramp(ph, ramp, *_ends(i, len(ys), wrap), piece.device)
            wx = _ramp(pw, ramp, *_ends(j, len(xs), wrap), piece.device)
            mask = wy[:, None] * wx[None, :]
            weighted = piece.float() * mask
            for oys, pys in _spans(oy, ph, out.shape[2]):
                for oxs, pxs in _spans(ox, pw, out.shape[3]):
                    out[..., oys, oxs] += weighted[..., pys, pxs]
                    weight[..., oys, oxs] += mask[pys, pxs]
    return out / weight
