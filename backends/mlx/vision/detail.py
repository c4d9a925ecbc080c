"""OpenAI's image detail on MLX: what "low" changes before the processor.

"low" (OpenAI: a 512 x 512 view at a fixed small cost) is, for any model, the
image scaled down to at most ``LOW_DETAIL_SIDE`` pixels on its longest side
before the processor: a processor whose token count follows the resolution
(Pixtral's, Qwen2-VL's) then gives fewer tokens.  A processor that scales
every image to its own size first (Idefics3 and SmolVLM upscale to their
longest edge, then split it into tiles plus a global view) would undo that,
so where the image processor has a tiling switch, "low" also turns it off:
only the global view is encoded.  The switch is per processor call, so it
applies when every image of the request is "low".  "high" and "auto": the
processor as configured.
"""

from __future__ import annotations

import copy
from typing import Any, Optional

#: Longest side of a "low" detail image, in pixels (OpenAI's low detail is 512 x 512).
LOW_DETAIL_SIDE = 512
#: Image processor switches that split an image into more tiles (each costing tokens).
TILING_SWITCHES = ("do_image_splitting", "do_pan_and_scan")


def downscale(image, detail: str):
    """The PIL ``image`` as the processor gets it for ``detail``."""
    if detail != "low" or max(image.size) <= LOW_DETAIL_SIDE:
        return image
    scale = LOW_DETAIL_SIDE / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, resample=3)  # bicubic


def untiled(processor: Any) -> Optional[Any]:
    """A copy of ``processor`` whose image processor does not tile, or None
    when it has no tiling switch on (built once at load: processors are
    shared by worker threads, so none is changed in place)."""
    images = getattr(processor, "image_processor", None)
    switches = [s for s in TILING_SWITCHES if getattr(images, s, False) is True]
    if not switches:
        return None
    images = copy.copy(images)
    for s in switches:
        setattr(images, s, False)
    low = copy.copy(processor)
    low.image_processor = images
    return low
