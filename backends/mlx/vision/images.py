"""Decoding images for a VLM's processor, within the caps.

The service already read every image's header and refused what is too
large or not an image (``backends/images.py``); this checks the header once
more (a backend can be called without the service, in tests or embedded),
decodes the first frame, and converts it to RGB.  An image whose header is
fine but whose data is cut short or corrupt is a 400 naming it, never a 500.
"""

from __future__ import annotations

import io

from backends.errors import InvalidArgument
from backends.images import inspect


def decode(data: bytes, name: str):
    """A PIL RGB image of ``data`` (worker thread)."""
    from PIL import Image

    inspect(data, name)
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.seek(0)  # the first frame of an animation
            img.load()
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise InvalidArgument(f"{name}: the image data is cut short or corrupt ({e})") from None
