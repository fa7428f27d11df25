"""Turn an image reference into bytes: local paths under allowed roots, `file://`, `http(s)://`.

Every failure is an `InputError` with a kind, so it becomes that image's record and nothing else.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from worker.contract import InputError


@dataclass(frozen=True)
class FetchPolicy:
    """What a worker is willing to read. Local files are refused unless they lie under one of
    `allowed_roots`: a queue message must not be able to make a worker read any file it likes."""

    allowed_roots: tuple[str, ...] = ()  # resolved, with a trailing separator: compared as prefixes
    max_bytes: int = 32 * 1024 * 1024
    timeout_s: float = 30.0

    @classmethod
    def create(cls, allowed_roots: list[str] | tuple[str, ...], max_bytes: int, timeout_s: float) -> FetchPolicy:
        roots = tuple(os.path.join(os.path.realpath(r), "") for r in allowed_roots)
        return cls(roots, max_bytes, timeout_s)


def fetch(ref: str, policy: FetchPolicy) -> bytes:
    scheme = urllib.parse.urlsplit(ref).scheme.lower() if "://" in ref else ""
    if scheme in ("http", "https"):
        return _fetch_http(ref, policy)
    if scheme == "file":
        return _read_local(urllib.request.url2pathname(urllib.parse.urlsplit(ref).path), policy)
    if scheme:
        raise InputError(
            "unsupported_ref", f"unsupported reference scheme {scheme!r}: use a path, file:// or http(s)://"
        )
    return _read_local(ref, policy)


def _read_local(path_text: str, policy: FetchPolicy) -> bytes:
    if not os.path.isabs(path_text):
        raise InputError("unsupported_ref", f"relative path {path_text!r}: workers need absolute paths")
    real = os.path.realpath(path_text)  # symlinks resolved, so a link cannot lead outside the roots
    if not real.startswith(policy.allowed_roots) or not policy.allowed_roots:
        roots = ", ".join(policy.allowed_roots) or "none configured"
        raise InputError(
            "forbidden", f"{path_text} is outside the worker's allowed roots ({roots}); see KILN_ALLOWED_ROOTS"
        )
    try:
        with open(real, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > policy.max_bytes:
                raise InputError("too_large", f"{path_text} is {size} bytes, over the limit of {policy.max_bytes}")
            return f.read(size + 1)  # sized to the file: a max_bytes buffer per image costs more than the read
    except FileNotFoundError:
        raise InputError("not_found", f"{path_text}: no such file") from None
    except OSError as e:
        raise InputError("fetch_failed", f"{path_text}: {e.strerror or e}") from None


def _fetch_http(url: str, policy: FetchPolicy) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "kiln-worker"})
    try:
        with urllib.request.urlopen(request, timeout=policy.timeout_s) as response:
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > policy.max_bytes:
                raise InputError("too_large", f"{url} is {declared} bytes, over the limit of {policy.max_bytes}")
            data = response.read(policy.max_bytes + 1)
    except urllib.error.HTTPError as e:
        kind = "not_found" if e.code in (404, 410) else "fetch_failed"
        raise InputError(kind, f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise InputError("fetch_failed", f"{url}: {reason}") from None
    if len(data) > policy.max_bytes:
        raise InputError("too_large", f"{url} is over the limit of {policy.max_bytes} bytes")
    return data
