"""Images sent in chat messages: base64 `data:` URLs, and http(s) URLs only where the operator allows them.

Every limit is checked before the costly step it protects: the encoded length before base64 decoding, the
byte count and the time while downloading, the pixel count from the image header (`fetch_image` reads only the
header; decoding happens later, within the server's memory budget).

A downloading server can be made to reach addresses its clients cannot (cloud metadata endpoints, services on the
private network, itself), so remote URLs whose host resolves to a non-public address are refused unless the operator
also allows private hosts; every redirect is checked the same way. The check resolves the name before urllib does,
so a name that changes its answer in between (DNS rebinding) is not caught: a firewall is the complete answer.
"""
from __future__ import annotations

import base64
import binascii
import http.client
import ipaddress
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request

from mobilevlm.serve.apierror import ApiError
from mobilevlm.serve.pixels import ImageFile, probe_image

_DATA_URL = re.compile(r"data:(?P<mime>[^;,]*)(?P<params>(;[^;,]*)*),(?P<data>.*)", re.DOTALL)
FETCH_TIMEOUT_S = 15  # for each network operation, and for the whole download
_CHUNK = 64 * 1024


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


def check_remote_host(url: str, where: str, allow_private: bool) -> None:
    """ApiError 400 unless `url` is http(s) and (without `allow_private`) every address of its host is public."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ApiError(400, f"{where}: {url[:60]!r} is not an http(s) URL with a host", param=where)
    if allow_private:
        return
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(parts.hostname, parts.port or 80, type=socket.SOCK_STREAM)}
    except (socket.gaierror, UnicodeError, ValueError) as err:
        raise ApiError(400, f"{where}: could not fetch the image URL (cannot resolve {parts.hostname!r}: {err})",
                       param=where) from None
    private = sorted(a for a in addresses if not _is_public(ipaddress.ip_address(a.split("%")[0])))
    if private:
        raise ApiError(400, f"{where}: {parts.hostname!r} resolves to a non-public address ({', '.join(private)}); this "
                            "server only downloads from public hosts (--allow-private-image-hosts lifts that)",
                       param=where)


_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _is_public(address) -> bool:
    """Global, and for IPv6 forms that carry an IPv4 address (mapped, compatible, 6to4, NAT64), that one too."""
    if not address.is_global:
        return False
    if address.version == 6:
        value = int(address)
        embedded = (address.ipv4_mapped or address.sixtofour
                    or (ipaddress.IPv4Address(value & 0xFFFFFFFF) if address in _NAT64 or value >> 32 == 0 else None))
        if embedded is not None and not embedded.is_global:
            return False
    return True


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    def __init__(self, where: str, allow_private: bool):
        self.where, self.allow_private = where, allow_private

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        check_remote_host(urllib.parse.urljoin(req.full_url, newurl), self.where, self.allow_private)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch_url(url: str, where: str, max_bytes: int, allow_private: bool = False) -> bytes:
    check_remote_host(url, where, allow_private)
    opener = urllib.request.build_opener(_CheckedRedirects(where, allow_private))
    request = urllib.request.Request(url, headers={"User-Agent": "mobilevlm-server"})
    deadline = time.monotonic() + FETCH_TIMEOUT_S
    data = bytearray()
    try:
        with opener.open(request, timeout=FETCH_TIMEOUT_S) as response:
            # the socket timeout bounds each network read, the deadline a server that sends a byte at a time;
            # read1, since read(n) waits for all n bytes and would only look at the clock after them
            while len(data) <= max_bytes and (chunk := response.read1(min(_CHUNK, max_bytes + 1 - len(data)))):
                data += chunk
                if time.monotonic() > deadline:
                    raise ApiError(400, f"{where}: the image download took longer than {FETCH_TIMEOUT_S} s",
                                   param=where)
            if len(data) <= max_bytes and response.length:  # chunked reads end quietly where the server hung up
                raise ApiError(400, f"{where}: could not fetch the image URL (the connection closed after "
                                    f"{len(data)} of {len(data) + response.length} bytes)", param=where)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as err:
        raise ApiError(400, f"{where}: could not fetch the image URL ({getattr(err, 'reason', None) or err!r})",
                       param=where) from None
    if len(data) > max_bytes:
        raise _too_large(where, len(data), max_bytes)
    return bytes(data)


def fetch_image(url: str, where: str, *, max_bytes: int, max_pixels: int, allow_remote: bool,
                allow_private_hosts: bool = False) -> ImageFile:
    """The image file an `image_url` part points to, its header checked; ApiError (400 / 413) naming `where`."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        data = decode_data_url(url, where, max_bytes)
    elif scheme in ("http", "https"):
        if not allow_remote:
            raise ApiError(400, f"{where}: remote image URLs are disabled on this server (start it with "
                                "--allow-remote-images); send the image as a base64 data: URL", param=where)
        data = fetch_url(url, where, max_bytes, allow_private_hosts)
    else:
        raise ApiError(400, f"{where}: unsupported image URL scheme {scheme or url[:20]!r}; use a base64 data: URL",
                       param=where)
    return probe_image(data, where, max_pixels)
