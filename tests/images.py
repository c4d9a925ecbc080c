"""Images for tests: real small ones (Pillow) and hostile ones built by hand."""

from __future__ import annotations

import base64
import io
import struct
import zlib


def png(width: int = 24, height: int = 16, color: tuple[int, int, int] = (200, 30, 30), fmt: str = "PNG") -> bytes:
    """A real image of one colour with a darker square, encoded by Pillow."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), color)
    ImageDraw.Draw(img).rectangle((width // 4, height // 4, width // 2, height // 2), fill=(20, 20, 20))
    out = io.BytesIO()
    img.save(out, format=fmt)
    return out.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int = 30_000, height: int = 30_000) -> bytes:
    """A valid 1-bit greyscale PNG of ``width`` x ``height`` black pixels:
    ~100 kB on the wire for 30,000², 2.7 GB once decoded to RGB."""
    row = b"\x00" + b"\x00" * ((width + 7) // 8)  # filter byte, then the packed bits
    z = zlib.compressobj(9)
    body = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", body) + _chunk(b"IEND", b"")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{b64(data)}"
