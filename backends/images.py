"""Images checked from their headers, before anything is decoded.

Every image reaching the service (from any dialect or gRPC) passes here at
validation (``backends/accept.py``), whichever backend will answer: the
bytes, the format and the dimensions are read from the header alone
(Pillow's ``Image.open`` is lazy: it parses the header and stops), so a
30,000 x 30,000 PNG of 100 kB is refused in microseconds with no pixel
buffer allocated.  Decoding, for the backends that decode (the MLX engine's
vision models), comes later and only for images that passed
(``backends/mlx/vision/images.py``).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from backends.errors import InvalidArgument
from mlxgate import limits


@dataclass(frozen=True)
class ImageHeader:
    format: str
    width: int
    height: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


def _open(data: bytes):
    """Pillow's lazy open, its decompression-bomb guard turned into our error."""
    from PIL import Image, UnidentifiedImageError

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return Image.open(io.BytesIO(data), formats=None)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            return None
        except UnidentifiedImageError:
            raise ValueError("not an image (the bytes are no PNG, JPEG, GIF or WebP)") from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise ValueError(f"not a readable image ({e})") from None


def inspect(data: bytes, name: str) -> ImageHeader:
    """The image's format and size from its header; InvalidArgument naming
    ``name`` when it is too large, not an image or in a format not accepted."""
    if len(data) > limits.MAX_IMAGE_BYTES:
        raise InvalidArgument(f"{name}: an image may have at most {limits.MAX_IMAGE_BYTES} bytes, got {len(data)}")
    if not data:
        raise InvalidArgument(f"{name}: empty image")
    try:
        img = _open(data)
    except ValueError as e:
        raise InvalidArgument(f"{name}: {e}") from None
    if img is None:  # Pillow's own bomb guard tripped: far beyond ours
        raise InvalidArgument(f"{name}: the image has more than {limits.MAX_IMAGE_PIXELS} pixels")
    with img:
        fmt, (width, height) = img.format or "", img.size
    if fmt not in limits.IMAGE_FORMATS:
        raise InvalidArgument(
            f"{name}: unsupported image format {fmt or 'unknown'}; send one of {', '.join(limits.IMAGE_FORMATS)}"
        )
    if width <= 0 or height <= 0:
        raise InvalidArgument(f"{name}: the image has no pixels ({width} x {height})")
    header = ImageHeader(fmt, width, height)
    if header.pixels > limits.MAX_IMAGE_PIXELS:
        raise InvalidArgument(
            f"{name}: the image is {width} x {height} = {header.pixels} pixels; at most {limits.MAX_IMAGE_PIXELS} "
            "are accepted"
        )
    return header


def check_all(images: list[tuple[str, bytes]]) -> list[ImageHeader]:
    """Every image of one request, and their pixels together."""
    headers = [inspect(data, name) for name, data in images]
    total = sum(h.pixels for h in headers)
    if total > limits.MAX_REQUEST_IMAGE_PIXELS:
        raise InvalidArgument(
            f"images: {total} pixels in all; a request may carry at most {limits.MAX_REQUEST_IMAGE_PIXELS}"
        )
    return headers
