"""The smallest patch SwinUNETR trains on, shared by the trainers (``swin_patch_size``) and the plan aligner
(``swin_patch_within``); a module of its own so that the aligner needs no torch to import it.

SwinUNETR's deepest feature map is the input divided by 32 per side (a patch embedding of 2, then four 2x patch
mergings), and the instance norm of the block on it raises in training when a channel has a single element
("Expected more than 1 spatial element when training"). A 32 x 32 x 32 patch gives 1 x 1 x 1; one side of 64
gives two elements, which is enough.
"""
from __future__ import annotations

from typing import Sequence


def widen_single_voxel_bottleneck(patch: list[int], lengths: Sequence[float], divisor: int) -> list[int]:
    """``patch`` with the side where ``lengths`` is largest doubled to ``2 x divisor`` if every side is
    ``divisor`` (a single-element bottleneck); otherwise ``patch`` unchanged."""
    if any(side != divisor for side in patch):
        return patch
    widened = list(patch)
    widened[max(range(len(patch)), key=lambda i: lengths[i])] = 2 * divisor
    return widened
