"""Images sent in chat messages: base64 `data:` URLs, and http(s) URLs only where the operator allows them.

Every limit is checked before the costly step it protects: the encoded length before base64 decoding, the
byte count while downloading, the pixel count from the image header before decoding (`load_image`).
"""
from __future__ import annotations

import base64
import binascii
import re
import urllib.error
import urllib.request

from PIL import Image

from mobilevlm.errors import ImageError
from mobilevlm.processing import load_image
from mobilevlm.serve.apierror import ApiError

_DATA_URL = re.compile(r"data:(?P<mime>[^;,]*)(?P<params>(;[^;,]*)*),(?P<data>.*)", re.DOTALL)
FETCH_TIMEOUT_S = 15


def _too_large(where: str, size: int, limit: int) -> ApiError:
    return ApiError(413, f"{where}: image is {size} bytes, the limit is {limit}", param=where, code="image_too_large")


def decode_data_url(url: str, where: str, max_bytes: int) -> bytes:
    match = _DATA_URL.fullmatch(url)
    if not match:
        raise ApiError(400, f"{where}: malformed data: URL", param=where)
    if "base64" not in match["params"].split(";"):
        raise ApiError(400, f"{where}: only base64 data: URLs are supported", param=where)
    payload = "".join(match["data"].split())
    if len(payload) * 3 // 4 > max_bytes + 2:
        raise _too_large(where, len(payload) * 3 // 4, max_bytes)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ApiError(400, f"{where}: invalid base64 image data ({err})", param=where) from None
    if len(data) > max_bytes:
        raise _too_large(where, len(data), max_bytes)
    return data


def fetch_url(url: str, where: str, max_bytes: int) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "mobilevlm-server"})
    try:
        with urllib.request.urlopen(request, timeout=FETCH_TIMEOUT_S) as response:
            data = response.read(max_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise ApiError(400, f"{where}: could not fetch the image URL ({getattr(err, 'reason', err)})",
                       param=where) from None
    if len(data) > max_bytes:
        raise _too_large(where, len(data), max_bytes)
    return data


def fetch_image(url: str, where: str, *, max_bytes: int, max_pixels: int, allow_remote: bool) -> Image.Image:
    """The RGB image an `image_url` part points to; ApiError (400 / 413) naming `where` otherwise."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        data = decode_data_url(url, where, max_bytes)
    elif scheme in ("http", "https"):
        if not allow_remote:
            raise ApiError(400, f"{where}: remote image URLs are disabled on this server (start it with "
                                "--allow-remote-images); send the image as a base64 data: URL", param=where)
        data = fetch_url(url, where, max_bytes)
    else:
        raise ApiError(400, f"{where}: unsupported image URL scheme {scheme or url[:20]!r}; use a base64 data: URL",
                       param=where)
    try:
        return load_image(data, max_pixels=max_pixels, name=where)
    except ImageError as err:
        raise ApiError(400, str(err), param=where, code="invalid_image") from None
