"""Token merging for Stable Diffusion (Bolya & Hoffman 2023, "Token Merging for Fast Stable Diffusion").

ToMe's bipartite soft matching (Bolya et al. 2023, "Token Merging: Your ViT but Faster") with the 2D
destination set of ToMe for SD: the token grid (h x w) is cut into sy x sx regions from the top left; one
token of each whole region is a *destination* (the top-left one, or one drawn at random), every other
token a *source*. Each source is paired with its most similar destination (cosine similarity of the
metric); the r best-paired sources are merged into their destinations (the mean of the group), the rest
are kept. ``merge`` makes N - r tokens; ``unmerge`` gives every token the value of the token it became
(a merged source receives its destination's value), so unmerge(merge(x)) is x wherever no merge happened.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

Merge = Callable[[Tensor], Tensor]

# src x dst similarity entries computed at once (bounds memory for large images: 64 MiB of float32)
_SCORE_CHUNK = 1 << 24


def merged_count(n: int, h: int, w: int, ratio: float, sx: int = 2, sy: int = 2) -> int:
    """Tokens left after merging ``ratio`` of ``n = h * w`` tokens: n - r with r = int(n * ratio), at
    most the number of sources (n minus one destination per whole sy x sx region)."""
    destinations = (h // sy) * (w // sx)
    if destinations == 0:
        return n
    return n - max(0, min(int(n * ratio), n - destinations))


def _identity(x: Tensor) -> Tensor:
    return x


def _destinations(h: int, w: int, sx: int, sy: int, generator: torch.Generator | None) -> Tensor:
    """A boolean (h * w,) mask of the destination tokens: one per whole sy x sx region."""
    hs, ws = h // sy, w // sx
    if generator is None:
        pick = torch.zeros(hs, ws, dtype=torch.long)
    else:  # one draw per region, its offset k read as row k // sx, column k % sx of the region
        pick = torch.randint(sx * sy, (hs, ws), generator=generator, device=generator.device).cpu()
    rows = torch.arange(hs)[:, None] * sy + pick // sx
    cols = torch.arange(ws)[None, :] * sx + pick % sx
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[rows, cols] = True
    return mask.flatten()


def bipartite_merge(
    metric: Tensor,
    h: int,
    w: int,
    ratio: float,
    *,
    sx: int = 2,
    sy: int = 2,
    generator: torch.Generator | None = None,
) -> tuple[Merge, Merge]:
    """(merge, unmerge) for tokens ``metric`` (B, N, C) on an h x w grid (N = h * w), merging
    ``merged_count``'s r tokens; each batch row is matched on its own. ``generator``: draw each region's
    destination at random (None: its top-left token)."""
    b, n, _ = metric.shape
    if n != h * w:
        raise ValueError(f"token merging: {n} tokens are not a {h} x {w} grid")
    r = n - merged_count(n, h, w, ratio, sx, sy)
    if r <= 0:
        return _identity, _identity
    device = metric.device
    is_dst = _destinations(h, w, sx, sy, generator).to(device)
    dst_idx = is_dst.nonzero().squeeze(1)
    src_idx = (~is_dst).nonzero().squeeze(1)
    n_dst, n_src = len(dst_idx), len(src_idx)
    with torch.no_grad():
        unit = F.normalize(metric.float(), dim=-1)
        a, d = unit[:, src_idx], unit[:, dst_idx].transpose(1, 2)
        best = torch.empty(b, n_src, dtype=unit.dtype, device=device)
        target = torch.empty(b, n_src, dtype=torch.long, device=device)
        step = max(1, _SCORE_CHUNK // max(1, n_dst))
        for i in range(0, n_src, step):  # each source's most similar destination
            best[:, i : i + step], target[:, i : i + step] = (a[:, i : i + step] @ d).max(dim=-1)
        order = best.argsort(dim=-1, descending=True)
        merged, kept = order[:, :r], order[:, r:]  # positions among the sources
        into = target.gather(1, merged)  # their destinations, positions among the destinations

    def rows(index: Tensor, c: int) -> Tensor:
        return index[..., None].expand(-1, -1, c)

    def merge(x: Tensor) -> Tensor:
        c = x.shape[-1]
        src, dst = x[:, src_idx], x[:, dst_idx]
        keep = src.gather(1, rows(kept, c))
        total = dst.scatter_add(1, rows(into, c), src.gather(1, rows(merged, c)))
        count = torch.ones(b, n_dst, 1, dtype=x.dtype, device=x.device)
        count = count.scatter_add(1, into[..., None], torch.ones(b, r, 1, dtype=x.dtype, device=x.device))
        return torch.cat([keep, total / count], dim=1)

    def unmerge(y: Tensor) -> Tensor:
        c = y.shape[-1]
        n_keep = n_src - r
        keep, dst = y[:, :n_keep], y[:, n_keep:]
        src = y.new_empty(b, n_src, c)
        src.scatter_(1, rows(kept, c), keep)
        src.scatter_(1, rows(merged, c), dst.gather(1, rows(into, c)))
        out = y.new_empty(b, n, c)
        out[:, src_idx] = src
        out[:, dst_idx] = dst
        return out

    return merge, unmerge
