"""Image URLs fetched for the caller, only where the owner turned it on.

Off by default: an http(s) image URL is a 400 naming ``server.fetch_image_urls``
(``gateway.images.image_bytes``).  On (``ServerConfig.fetch_image_urls``),
a route reads its body with ``read_json_fetching``: every http(s) image URL
in it (``gateway/image_urls.py`` knows where each dialect puts them) is
fetched and replaced by the image, base64, in the dialect's own inline form.
Translation then stays free of I/O, and the bytes reach the inference
service as any inline image does, where its checks judge them (header,
pixels, bytes, count: ``backends/images.py``).  The front rather than the
service fetches: the contract carries image bytes only (a gRPC caller sends
its own), and the front is the part that speaks HTTP.

Bounds, so a request's cost stays bounded whatever the URLs:

- at most ``limits.MAX_IMAGES`` URLs per request, fetched together under one
  deadline (``fetch_image_timeout`` seconds for all of them: connections,
  redirects and bodies), through one connection pool of at most
  ``MAX_CONNECTIONS`` sockets for the whole front;
- each image at most ``limits.MAX_IMAGE_BYTES`` (a longer Content-Length is
  refused before reading, a longer body as soon as it passes the cap); all of
  a request's images together at most ``max_body_bytes`` less the body's own
  size, as if they had been sent inline;
- at most ``MAX_REDIRECTS`` redirects, http and https only, each target
  checked as the first; status 200, an ``image/*`` content type and no
  content encoding (identity is asked for: no decompression bomb); no proxy
  from the environment, no cookies kept.

Against SSRF, an address is checked where its socket is made: the
connector's ``socket_factory`` sees the very address it is about to connect
to, so neither a literal address, nor a name resolving to a refused address,
nor a redirect to one, nor a name whose answer changes between a check and
the connection (DNS rebinding) gets through.  Names are also filtered at
resolution (``_CheckingResolver``), so a name with public and private
addresses connects to the public ones only, and a refusal names the host.
Refused unless ``fetch_private``: loopback, private, link-local,
unspecified, multicast, reserved and any other non-global address
(IPv4-mapped IPv6 addresses as their IPv4 address).
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import socket
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractResolver
from aiohttp.resolver import DefaultResolver
from yarl import URL

from gateway.errors import bad_request
from gateway.parsing import read_json
from gateway.state import SERVER_CONFIG_KEY
from mlxgate import limits
from mlxgate.config import ServerConfig
from mlxgate.dialects.base import FETCH_PRIVATE_ENV

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

MAX_REDIRECTS = 3
#: Sockets the front's fetches may hold at once (all requests together).
MAX_CONNECTIONS = 64
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_CHUNK = 64 * 1024
#: Longest URL quoted back in an error message.
_URL_SHOWN = 200


def non_public(ip: IPAddress) -> Optional[str]:
    """Why a fetch may not connect to ``ip`` (the default policy); None when it may."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for kind in ("loopback", "unspecified", "link_local", "multicast", "private", "reserved"):
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")
    return None if ip.is_global else "non-public"


def _a(word: str) -> str:
    return f"{'an' if word[:1] in 'aeiou' else 'a'} {word}"


def _address(text: str) -> Optional[IPAddress]:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


class RefusedAddress(OSError):
    """A connection the policy refuses (never attempted)."""


class FetchFailed(Exception):
    """Why an image URL gave no image, for the caller."""


@dataclass
class ImageSlot:
    """An http(s) image URL in a request body, and how to put the image in its place."""

    name: str  # the field, as the dialect's errors name it
    url: str
    put: Callable[[bytes, str], None]  # (image bytes, content type) -> the body holds the image inline


def shown(url: str) -> str:
    return url if len(url) <= _URL_SHOWN else url[:_URL_SHOWN] + "..."


class _CheckingResolver(AbstractResolver):
    """The default resolver, keeping only the addresses the policy allows."""

    def __init__(self, refuse: Callable[[IPAddress], Optional[str]]) -> None:
        self._inner = DefaultResolver()
        self._refuse = refuse

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> Any:
        found = await self._inner.resolve(host, port, family)
        kept, why = [], None
        for r in found:
            ip = _address(r["host"])
            reason = "unparsable" if ip is None else self._refuse(ip)
            if reason is None:
                kept.append(r)
            elif why is None:
                why = f"{host} resolves to {r['host']}, {_a(reason)} address"
        if not kept:
            raise RefusedAddress(why or f"{host} has no address")
        return kept

    async def close(self) -> None:
        await self._inner.close()


class _Budget:
    """Bytes the images of one request may still take together."""

    def __init__(self, total: int) -> None:
        self.total = self.left = max(0, total)

    def take(self, n: int) -> None:
        self.left -= n
        if self.left < 0:
            raise FetchFailed(f"the request's images together exceed {self.total} bytes "
                              "(the request body's limit, less the body itself)")


class ImageFetcher:
    """The front's one client for image URLs (``ServerConfig.fetch_*``).

    ``refuse`` is the address policy (default ``non_public``; with
    ``fetch_private`` nothing is refused)."""

    def __init__(self, cfg: ServerConfig, refuse: Optional[Callable[[IPAddress], Optional[str]]] = None) -> None:
        self.timeout = cfg.fetch_image_timeout
        if refuse is None:
            refuse = (lambda ip: None) if cfg.fetch_private else non_public
        self._refuse = refuse
        self._session: Optional[aiohttp.ClientSession] = None

    def _socket(self, addr_info: Any) -> socket.socket:
        """The connector's socket factory: the last check, on the address connected to."""
        family, type_, proto, _, address = addr_info
        ip = _address(str(address[0]))
        reason = "unparsable" if ip is None else self._refuse(ip)
        if reason is not None:
            raise RefusedAddress(f"{address[0]} is {_a(reason)} address")
        return socket.socket(family=family, type=type_, proto=proto)

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            resolver=_CheckingResolver(self._refuse), socket_factory=self._socket, use_dns_cache=False,
            limit=MAX_CONNECTIONS,
        )
        self._session = aiohttp.ClientSession(
            connector=connector, trust_env=False, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.timeout),
            headers={"Accept": "image/*", "Accept-Encoding": "identity", "User-Agent": "mlxgate"},
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def fetch(self, url: str, budget: _Budget) -> tuple[bytes, str]:
        """(image bytes, content type) of ``url``; FetchFailed saying why not."""
        assert self._session is not None, "ImageFetcher.start() first"
        try:
            return await self._follow(url, budget)
        except aiohttp.ClientConnectorError as e:
            if isinstance(e.os_error, RefusedAddress):
                raise FetchFailed(f"refused: {e.os_error} ({FETCH_PRIVATE_ENV}=1 allows such addresses)") from None
            raise FetchFailed(f"cannot connect ({e.os_error})") from None
        except aiohttp.InvalidURL as e:
            raise FetchFailed(f"invalid URL ({e})") from None
        except (aiohttp.ClientError, ValueError) as e:
            raise FetchFailed(f"the fetch failed ({type(e).__name__}: {e})") from None

    async def _follow(self, url: str, budget: _Budget) -> tuple[bytes, str]:
        assert self._session is not None
        target = URL(url)
        for _ in range(MAX_REDIRECTS + 1):
            if target.scheme not in ("http", "https") or not target.host:
                raise FetchFailed(f"only http and https URLs are fetched, not {shown(str(target))}")
            async with self._session.get(target, allow_redirects=False) as r:
                if r.status in _REDIRECT_STATUSES:
                    location = r.headers.get("Location")
                    if not location:
                        raise FetchFailed(f"status {r.status} without a Location")
                    target = r.url.join(URL(location))
                    continue
                if r.status != 200:
                    raise FetchFailed(f"status {r.status} from {shown(str(target))}")
                return await self._body(r, budget), r.content_type
        raise FetchFailed(f"more than {MAX_REDIRECTS} redirects")

    @staticmethod
    async def _body(r: aiohttp.ClientResponse, budget: _Budget) -> bytes:
        ctype = r.content_type if r.headers.get("Content-Type") else ""
        if not ctype.startswith("image/"):
            raise FetchFailed(f"served as {ctype or 'no content type'}; only image/* is fetched")
        encoding = r.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise FetchFailed(f"served with Content-Encoding {encoding}; only unencoded images are fetched")
        cap = limits.MAX_IMAGE_BYTES
        if r.content_length is not None and r.content_length > cap:
            raise FetchFailed(f"{r.content_length} bytes; an image may have at most {cap}")
        data = bytearray()
        async for chunk in r.content.iter_chunked(_CHUNK):
            data += chunk
            if len(data) > cap:
                raise FetchFailed(f"more than {cap} bytes; an image may have at most {cap}")
            budget.take(len(chunk))
        return bytes(data)

    async def fill(self, slots: list[ImageSlot], budget_bytes: int) -> None:
        """Fetch every slot's URL and put the image in its place; a 400
        naming the first slot that failed (the others are cancelled)."""
        if len(slots) > limits.MAX_IMAGES:
            raise bad_request(f"{len(slots)} image URLs; a request may carry at most {limits.MAX_IMAGES} images")
        budget = _Budget(budget_bytes)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout

        failures: list[tuple[ImageSlot, str]] = []

        async def one(slot: ImageSlot) -> None:
            try:
                async with asyncio.timeout_at(deadline):
                    data, ctype = await self.fetch(slot.url, budget)
                slot.put(data, ctype)
            except (TimeoutError, FetchFailed) as e:
                why = f"not fetched within {self.timeout:g} s" if isinstance(e, TimeoutError) else str(e)
                failures.append((slot, why))
                raise FetchFailed(why) from None

        try:
            async with asyncio.TaskGroup() as group:
                for slot in slots:
                    group.create_task(one(slot))
        except* FetchFailed:
            slot, why = failures[0]
            raise bad_request(f"{slot.name}: could not fetch {shown(slot.url)}: {why}", param=slot.name) from None


def data_url(data: bytes, ctype: str) -> str:
    return f"data:{ctype};base64,{base64.b64encode(data).decode('ascii')}"


FETCHER_KEY = web.AppKey("image_fetcher", ImageFetcher)


def install(app: web.Application, cfg: ServerConfig) -> None:
    """Give ``app`` an image fetcher when the configuration turns fetching on."""
    if not cfg.fetch_image_urls:
        return
    fetcher = app[FETCHER_KEY] = ImageFetcher(cfg)

    async def ctx(_app: web.Application):
        await fetcher.start()
        yield
        await fetcher.close()

    app.cleanup_ctx.append(ctx)


async def read_json_fetching(request: web.Request, slots_of: Callable[[dict], list[ImageSlot]]) -> dict[str, Any]:
    """``read_json``, then (when fetching is on) the body's image URLs, found
    by ``slots_of``, replaced by their images."""
    body = await read_json(request)
    fetcher = request.app.get(FETCHER_KEY)
    if fetcher is None:
        return body
    slots = slots_of(body)
    if slots:
        spare = request.app[SERVER_CONFIG_KEY].max_body_bytes - len(await request.read())
        await fetcher.fill(slots, spare)
    return body
