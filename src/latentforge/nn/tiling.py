"""Running a convolutional network over overlapping tiles and blending the overlaps linearly.

Used by the VAE for large images: each tile is processed alone (so memory is that of one tile), and
in every overlap the two results are mixed with weights that ramp from one tile to the other, which
hides the small differences between tiles (their group-norm statistics differ) without visible edges.
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


def tiled_apply(
    fn: Callable[[Tensor], Tensor], x: Tensor, tile: int, overlap: int, up: int = 1, down: int = 1
) -> Tensor:
    """``fn`` maps (B, C, h, w) to (B, C', h * up / down, w * up / down); apply it tile by tile.
    ``tile`` and ``overlap`` are in input pixels (multiples of ``down``)."""
    b, _, h, w = x.shape
    out = None
    weight = None
    ys, xs = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    for y0 in ys:
        for x0 in xs:
            piece = fn(x[..., y0 : y0 + tile, x0 : x0 + tile])
            if out is None:
                out = torch.zeros(
                    b, piece.shape[1], h * up // down, w * up // down, dtype=torch.float32, device=piece.device
                )
                weight = torch.zeros(1, 1, out.shape[2], out.shape[3], device=piece.device)
            oy, ox = y0 * up // down, x0 * up // down
            ph, pw = piece.shape[-2:]
            ramp = overlap * up // down
            wy = _ramp(ph, ramp, y0 == ys[0], y0 == ys[-1], piece.device)
            wx = _ramp(pw, ramp, x0 == xs[0], x0 == xs[-1], piece.device)
            mask = wy[:, None] * wx[None, :]
            out[..., oy : oy + ph, ox : ox + pw] += piece.float() * mask
            weight[..., oy : oy + ph, ox : ox + pw] += mask
    return out / weight
