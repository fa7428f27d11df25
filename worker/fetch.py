"""Turn an image reference into bytes: local paths under allowed roots, `file://`, `http(s)://`,
and object stores (`s3://` and the other schemes of worker.object_store) under allowed roots.

Every failure is an `InputError` with a kind, so it becomes that image's record and nothing else.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import ipaddress
import os
import socket
import stat
import threading
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from worker.beneath import open_beneath
from worker.contract import InputError
from worker.object_store import OBJECT_SCHEMES, filesystem, parse_root, split_object_url, unsafe_segment

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Python's urllib follows redirects to ftp:// as well; kiln fetches these schemes only, on every hop.
HTTP_SCHEMES = ("http", "https")


@dataclass(frozen=True)
class FetchPolicy:
    """What a worker is willing to read. Local files are refused unless they lie under one of
    `allowed_roots`, objects unless they lie under one of `object_roots`, and http(s) fetches unless
    they reach a public address or one inside `allowed_networks`: a queue message must not make a
    worker read any file or bucket or reach any service it likes (Redis on loopback, a cloud
    metadata endpoint on a link-local address)."""

    allowed_roots: tuple[str, ...] = ()  # resolved, with a trailing separator: compared as prefixes
    max_bytes: int = 32 * 1024 * 1024
    timeout_s: float = 30.0  # the whole fetch: connects, redirects, headers and body
    allowed_networks: tuple[Network, ...] = field(default=())
    object_roots: tuple[str, ...] = ()  # object_store.parse_root forms: compared as prefixes

    @classmethod
    def create(
        cls,
        allowed_roots: list[str] | tuple[str, ...],
        max_bytes: int,
        timeout_s: float,
        allowed_networks: list[str] | tuple[str, ...] = (),
    ) -> FetchPolicy:
        """`allowed_roots` mixes folders and object-store roots (`s3://bucket/prefix/`).
        Raises ValueError for a malformed object-store root or network."""
        local = tuple(os.path.join(os.path.realpath(r), "") for r in allowed_roots if "://" not in r)
        objects = tuple(parse_root(r) for r in allowed_roots if "://" in r)
        networks = tuple(ipaddress.ip_network(n, strict=False) for n in allowed_networks)
        return cls(local, max_bytes, timeout_s, networks, objects)


def roots_notes(allowed_roots: list[str] | tuple[str, ...]) -> list[str]:
    """What a worker says at start about its KILN_ALLOWED_ROOTS: where it reads from, or that it
    reads no local file or object at all, and which local roots are not folders here (a typo,
    or a share not mounted). Else every image of a job failed as `forbidden`, and the worker had
    said nothing."""
    if not allowed_roots:
        return [
            "no KILN_ALLOWED_ROOTS (--allowed-roots): every local path and object-store reference is "
            "refused as forbidden; only inline images and http(s) URLs are served"
        ]
    shown = ", ".join(r if "://" in r else os.path.realpath(r) for r in allowed_roots)
    notes = [f"reads images under: {shown}"]
    for root in allowed_roots:
        if "://" in root:
            problem = _object_store_missing(root.split("://", 1)[0])
            if problem:
                notes.append(f"allowed root {root}: {problem}: nothing under it can be read")
        elif not os.path.isdir(root):
            notes.append(f"allowed root {root} is not a folder on this host: nothing under it can be read")
    return notes


def _object_store_missing(protocol: str) -> str | None:
    """Why this host cannot read `protocol://` objects (fsspec, or the library fsspec names for
    it, such as gcsfs, not installed), or None."""
    try:
        import fsspec
    except ImportError:
        return "fsspec is not installed: pip install 'kiln[s3]'"
    try:
        fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError) as e:  # its library missing ("Please install gcsfs ..."), or no such protocol
        return str(e)
    return None


def fetch(ref: str, policy: FetchPolicy) -> bytes:
    """The bytes of one image reference (an absolute path, a `file://`, `http(s)://` or object-store
    URL), at most `policy.max_bytes` of them. Raises InputError: `bad_ref`, `unsupported_ref`,
    `forbidden`, `forbidden_address`, `not_found`, `too_large`, `fetch_failed`."""
    if "://" not in ref:
        return _read_local(ref, policy)
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in ref):  # no URL holds raw control characters
        raise InputError("bad_ref", f"reference {ref!r} holds a control character")
    try:
        parts = urllib.parse.urlsplit(ref)
        path = urllib.request.url2pathname(parts.path)
    except ValueError as e:  # e.g. an unclosed IPv6 bracket
        raise InputError("bad_ref", f"malformed URL {ref!r}: {e}") from None
    scheme = parts.scheme.lower()
    if scheme in HTTP_SCHEMES:
        return _fetch_http(ref, policy)
    if scheme == "file":
        return _read_local(path, policy)
    if scheme in OBJECT_SCHEMES:
        return _read_object(ref, policy)
    raise InputError(
        "unsupported_ref",
        f"unsupported reference scheme {scheme!r}: use a path, file://, http(s):// or one of "
        + ", ".join(s + "://" for s in OBJECT_SCHEMES),
    )


# -- local files ----------------------------------------------------------------------------------


def _read_local(path_text: str, policy: FetchPolicy) -> bytes:
    try:
        if b"\0" in os.fsencode(path_text):  # no file name holds one; the OS would refuse it with a ValueError
            raise InputError("bad_ref", f"path {path_text!r} holds a NUL byte")
    except UnicodeEncodeError:  # a lone surrogate that no file system encoding can express
        raise InputError("bad_ref", f"path {path_text!r} is not a valid file name") from None
    if not os.path.isabs(path_text):
        raise InputError("unsupported_ref", f"relative path {path_text!r}: workers need absolute paths")
    # Fast path: a path spelled beneath an allowed root opens in one call that cannot leave it.
    root = next((r for r in policy.allowed_roots if path_text.startswith(r)), None)
    fd = open_beneath(root, path_text[len(root) :]) if root is not None else None
    if fd is None:
        fd = _open_checked(path_text, policy)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):  # a folder, a FIFO, a device
            raise InputError("fetch_failed", f"{path_text}: not a regular file")
        if info.st_size > policy.max_bytes:
            raise InputError("too_large", f"{path_text} is {info.st_size} bytes, over the limit of {policy.max_bytes}")
        with open(fd, "rb", closefd=False) as f:
            return f.read(info.st_size + 1)  # sized to the file: a max_bytes buffer per image costs more
    except OSError as e:
        raise InputError("fetch_failed", f"{path_text}: {e.strerror or e}") from None
    finally:
        os.close(fd)


def _open_checked(path_text: str, policy: FetchPolicy) -> int:
    """The slow path, which also says why a file is refused: resolve the links, check the result
    against the roots, then open it beneath its root without following any link."""
    try:
        real = os.path.realpath(path_text)  # symlinks resolved, so a link cannot lead outside the roots
    except OSError as e:  # a link loop, or the path changing under the resolution
        raise InputError("fetch_failed", f"{path_text}: {e.strerror or e}") from None
    root = next((r for r in policy.allowed_roots if real.startswith(r)), None)
    if root is None:
        roots = ", ".join(policy.allowed_roots) or "none configured"
        target = f" (it resolves to {real})" if real != path_text else ""
        raise InputError(
            "forbidden",
            f"{path_text}{target} is outside the worker's allowed roots ({roots}); see KILN_ALLOWED_ROOTS",
        )
    try:
        return _open_beneath(root, real[len(root) :].split(os.sep))
    except FileNotFoundError:
        raise InputError("not_found", f"{path_text}: no such file") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise InputError("forbidden", f"{path_text}: a symlink appeared on the path as it was opened") from None
        raise InputError("fetch_failed", f"{path_text}: {e.strerror or e}") from None


def _open_beneath(root: str, parts: list[str]) -> int:
    """Open `root/parts...` for reading one component at a time, each relative to its parent's
    descriptor and with O_NOFOLLOW: the path was checked after resolving its links, and a link
    swapped in since (a rename race) fails the open instead of leading outside `root`. A FIFO opens
    without blocking (and is then refused as not a regular file)."""
    walk = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts[:-1]:
            try:
                child = os.open(part, walk, dir_fd=fd)
            except NotADirectoryError:  # a file, or a symlink swapped in: O_PATH opens links themselves
                if stat.S_ISLNK(os.stat(part, dir_fd=fd, follow_symlinks=False).st_mode):
                    raise OSError(errno.ELOOP, "symlink on the path") from None
                raise
            os.close(fd)
            fd = child
        return os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=fd)
    finally:
        os.close(fd)


# -- object stores --------------------------------------------------------------------------------


def _read_object(ref: str, policy: FetchPolicy) -> bytes:
    try:
        url = split_object_url(ref)
    except ValueError as e:
        raise InputError("bad_ref", str(e)) from None
    if not url.key:
        raise InputError("bad_ref", f"{ref} names a bucket, not an object")
    segment = unsafe_segment(url.key)
    if segment is not None:
        raise InputError(
            "forbidden", f"{ref}: the key holds a {segment!r} segment, which stores resolve differently; refused"
        )
    if not any(str(url).startswith(root) for root in policy.object_roots):
        roots = ", ".join(policy.object_roots) or "none configured"
        raise InputError("forbidden", f"{ref} is outside the worker's allowed roots ({roots}); see KILN_ALLOWED_ROOTS")
    try:
        fs = filesystem(url.scheme)
    except ImportError as e:
        raise InputError("unsupported_ref", str(e)) from None
    from fsspec.asyn import sync
    from fsspec.exceptions import FSTimeoutError

    try:
        # One ranged GET of at most max_bytes + 1 bytes: the cap holds whatever the object's size,
        # without a size lookup first (a round trip more per image).
        data = sync(fs.loop, fs._cat_file, url.path, start=0, end=policy.max_bytes + 1, timeout=policy.timeout_s)
    except FileNotFoundError as e:
        raise InputError("not_found", f"{ref}: {e}") from None
    except PermissionError as e:
        raise InputError(
            "forbidden",
            f"{ref}: the store refused access ({e}); S3 also answers so for a missing key when the credentials "
            "may not list the bucket",
        ) from None
    except (FSTimeoutError, TimeoutError):
        raise InputError("fetch_failed", f"{ref}: no complete answer within {policy.timeout_s:g} s") from None
    except Exception as e:  # botocore's and the other stores' errors share no base class but Exception
        if _range_past_end(e):  # an empty object: a range starting at 0 lies past its end
            return b""
        raise InputError("fetch_failed", f"{ref}: {type(e).__name__}: {e}") from None
    if len(data) > policy.max_bytes:
        raise InputError("too_large", f"{ref} is over the limit of {policy.max_bytes} bytes")
    return data


def _range_past_end(error: Exception) -> bool:
    """Whether a store answered a ranged read with 416 (S3's InvalidRange): the object is empty."""
    response = getattr(error.__cause__, "response", None) or {}
    return response.get("Error", {}).get("Code") == "InvalidRange"


# -- http(s) --------------------------------------------------------------------------------------


def _fetch_http(url: str, policy: FetchPolicy) -> bytes:
    guard = _Guard(policy)
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}),  # direct connections only: the address check must see the server
        _CheckedHTTPHandler(guard),
        _CheckedHTTPSHandler(guard),
        _CheckedRedirects(),
    )
    request = urllib.request.Request(url, headers={"User-Agent": "kiln-worker"})
    watchdog = threading.Timer(policy.timeout_s, guard.cut)
    watchdog.daemon = True
    watchdog.start()
    try:
        with opener.open(request, timeout=policy.timeout_s) as response:
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > policy.max_bytes:
                raise InputError("too_large", f"{url} is {declared} bytes, over the limit of {policy.max_bytes}")
            data = response.read(policy.max_bytes + 1)
    except urllib.error.HTTPError as e:
        kind = "not_found" if e.code in (404, 410) else "fetch_failed"
        raise InputError(kind, f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        if guard.expired.is_set():
            raise guard.timeout_error(url) from None
        reason = getattr(e, "reason", e)
        raise InputError("fetch_failed", f"{url}: {reason}") from None
    finally:
        watchdog.cancel()
        guard.close()
    if guard.expired.is_set():  # a body without a length ends quietly when its socket is cut
        raise guard.timeout_error(url)
    if len(data) > policy.max_bytes:
        raise InputError("too_large", f"{url} is over the limit of {policy.max_bytes} bytes")
    return data


# IPv6 ranges refused whatever they embed: deprecated (IPv4-compatible ::a.b.c.d, site-local, the
# returned 6bone) or meaningful only inside one network (local-use NAT64, RFC 8215).
_REFUSED_IPV6 = tuple(ipaddress.IPv6Network(n) for n in ("::/96", "fec0::/10", "3ffe::/16", "64:ff9b:1::/48"))
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052's well-known prefix
_ISATAP_IDS = (0x00005EFE, 0x02005EFE)  # an ISATAP interface id: 0[02]00:5efe:a.b.c.d, any prefix


def _embedded_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address stands for (IPv4-mapped, NAT64, 6to4, Teredo server and
    client, ISATAP); empty when it embeds none. Python's `is_global` judges these forms as IPv6
    addresses, so a NAT64 gateway would carry 64:ff9b::a00:1 to 10.0.0.1 unchecked."""
    value = int(address)
    if address.ipv4_mapped is not None:
        return [address.ipv4_mapped]
    if address in _NAT64:
        return [ipaddress.IPv4Address(value & 0xFFFFFFFF)]
    if address.sixtofour is not None:
        return [address.sixtofour]
    if address.teredo is not None:
        return list(address.teredo)
    if (value >> 32) & 0xFFFFFFFF in _ISATAP_IDS:
        return [ipaddress.IPv4Address(value & 0xFFFFFFFF)]
    return []


class _Guard:
    """One fetch's connections: each made only to an address the policy allows, and all of them
    cut when the fetch's total deadline passes (socket timeouts only bound a single read, so a
    server sending a byte every few seconds would otherwise hold the fetch for ever)."""

    def __init__(self, policy: FetchPolicy) -> None:
        self.policy = policy
        self.sockets: list[socket.socket] = []
        self.expired = threading.Event()
        self._lock = threading.Lock()

    def connect(self, host: str, port: int, timeout: float | None) -> socket.socket:
        """Resolve `host`, then connect only to an allowed address: the address connected to is the
        one checked, so a name that resolves differently on a second lookup (DNS rebinding) gains
        nothing."""
        refused, last_error = [], None
        for family, kind, proto, _, address in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
            if not self.allows(address[0]):
                refused.append(address[0])
                continue
            sock = socket.socket(family, kind, proto)
            with self._lock:
                if self.expired.is_set():
                    sock.close()
                    raise TimeoutError("deadline passed")
                self.sockets.append(sock)
            try:
                sock.settimeout(timeout)
                sock.connect(address)
                return sock
            except OSError as e:
                last_error = e
        if last_error is not None:
            raise last_error
        raise InputError(
            "forbidden_address",
            f"{host} resolves to {', '.join(refused)}: loopback, private or link-local addresses are refused; "
            "see KILN_FETCH_ALLOWED_NETWORKS",
        )

    def allows(self, address_text: str) -> bool:
        address = ipaddress.ip_address(address_text.split("%", 1)[0])  # an IPv6 scope id is no part of it
        if any(address in network for network in self.policy.allowed_networks):
            return True
        if isinstance(address, ipaddress.IPv6Address):
            if any(address in network for network in _REFUSED_IPV6):
                return False
            embedded = _embedded_ipv4(address)
            if embedded:  # a gateway or tunnel delivers it to these IPv4 addresses: judge those
                return all(self.allows(str(ipv4)) for ipv4 in embedded)
        return address.is_global and not address.is_multicast

    def cut(self) -> None:
        with self._lock:
            self.expired.set()
            for sock in self.sockets:
                with contextlib.suppress(OSError):  # not connected yet, or closed already
                    sock.shutdown(socket.SHUT_RDWR)  # wakes a read blocked in another thread

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()

    def timeout_error(self, url: str) -> InputError:
        return InputError("fetch_failed", f"{url}: no complete answer within {self.policy.timeout_s:g} s")


class _CheckedHTTPConnection(http.client.HTTPConnection):
    guard: _Guard

    def connect(self) -> None:
        self.sock = self.guard.connect(self.host, self.port, self.timeout)


class _CheckedHTTPSConnection(http.client.HTTPSConnection, _CheckedHTTPConnection):
    """HTTPSConnection.connect wraps what its parent connects: here, the checked socket."""


def _connection_factory(cls: type[_CheckedHTTPConnection], guard: _Guard) -> Any:
    def make(host: str, **kwargs: Any) -> _CheckedHTTPConnection:
        connection = cls(host, **kwargs)
        connection.guard = guard
        return connection

    return make


class _CheckedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, guard: _Guard) -> None:
        super().__init__()
        self._factory = _connection_factory(_CheckedHTTPConnection, guard)

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(self._factory, req)


class _CheckedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, guard: _Guard) -> None:
        super().__init__()
        self._factory = _connection_factory(_CheckedHTTPSConnection, guard)

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(self._factory, req, context=self._context)


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    def http_error_302(self, req, fp, code, msg, headers):  # urllib's signature
        target = urllib.parse.urljoin(req.full_url, headers.get("Location") or headers.get("URI") or "")
        scheme = urllib.parse.urlsplit(target).scheme.lower()
        if scheme not in HTTP_SCHEMES:
            fp.close()
            raise InputError("unsupported_ref", f"{req.full_url} redirects to {scheme}://, which kiln does not fetch")
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302
