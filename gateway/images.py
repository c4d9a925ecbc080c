"""An image's bytes from what a request carries: a base64 ``data:`` URL (or
bare base64); URLs are not fetched.  The service checks and decodes them (``backends/images.py``)."""

from __future__ import annotations

import base64
import binascii

from gateway.errors import bad_request
from mlxgate.dialects.base import FETCH_IMAGE_URLS_ENV
from mlxgate.v1 import inference_pb2 as pb

#: Why an http(s) image URL is refused, and what turns fetching on.
NOT_FETCHED = (
    f"image URLs are not fetched (turn fetching on with {FETCH_IMAGE_URLS_ENV}=1); "
    "send the image as a data: URL (base64)"
)


def image_bytes(url: str, name: str, bare_base64: bool = False) -> bytes:
    """An image's bytes from a base64 ``data:`` URL (or, with ``bare_base64``,
    from bare base64: the Responses API sends either); other URLs are not
    fetched.  A 400 naming ``name`` otherwise."""
    if not url.startswith("data:"):
        if bare_base64 and "://" not in url and url:
            try:
                return base64.b64decode(url, validate=True)
            except (binascii.Error, ValueError):
                raise bad_request(f"{name}: invalid base64 image; send data: URLs (base64) or base64",
                                  param=name) from None
        if url.lower().startswith(("http://", "https://")):
            raise bad_request(f"{name}: {NOT_FETCHED}", param=name)
        accepted = "data: URLs (base64) or base64" if bare_base64 else "data: URLs (base64)"
        raise bad_request(f"{name}: only {accepted} are supported for images", param=name)
    head, _, payload = url.partition(",")
    if ";base64" not in head:
        raise bad_request(f"{name}: the data: URL must be base64-encoded", param=name)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{name}: invalid base64 in data: URL", param=name) from None


#: OpenAI's image detail as the contract's (absent and "auto": UNSPECIFIED).
_DETAILS = {"low": pb.IMAGE_DETAIL_LOW, "high": pb.IMAGE_DETAIL_HIGH}


def image_detail(detail) -> int:
    """The proto's ``ImageDetail`` of an OpenAI ``detail`` (already checked by the dialect model)."""
    return _DETAILS.get(detail, pb.IMAGE_DETAIL_UNSPECIFIED) if isinstance(detail, str) else pb.IMAGE_DETAIL_UNSPECIFIED
