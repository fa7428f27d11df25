"""Settings, from `KILN_*` environment variables or a `.env` file (pydantic-settings).

`CommonSettings` holds what producers and workers must agree on; each side extends it. This
module imports no torch, so producers can use it.
"""

from __future__ import annotations

import contextlib
import difflib
import ipaddress
import os
import re
import urllib.parse
from collections.abc import Mapping
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from worker.object_store import parse_root

# What a photo pipeline needs (Pillow's names). Every other format Pillow knows (EPS runs
# Ghostscript, PSD, FITS, ICO, ...) is refused before its plugin parses anything.
DEFAULT_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF"})


# scheme://user:PASSWORD@ - up to the last @ before a space, since a password may hold a raw @, /,
# # or ? (not valid in a URL, but typed all the same): rather too much masked than a password shown
_PASSWORD_IN_URL = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^\s:/@]*:)\S*@")
_PASSWORD_IN_QUERY = re.compile(r"([?&]password=)[^\s&#'\"]*", re.IGNORECASE)


# redis-py's TLS options, which kombu passes on from a rediss:// URL as well.
TLS_URL_PARAMETERS = frozenset({"ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile"})


def mask_url(text: str) -> str:
    """`text` with the password of every URL in it replaced by `***`: in its user part
    (redis://:***@host:6379/0) or as a query parameter (redis://host/0?password=***, which
    redis-py accepts too)."""
    return _PASSWORD_IN_QUERY.sub(r"\1***", _PASSWORD_IN_URL.sub(r"\1***@", text))


def settings_error(error: ValidationError, where: str = "the environment or .env") -> str:
    """One line for invalid settings: each variable named (`KILN_CHUNK_SIZE='abc'`) with what is
    wrong and `where` settings come from, for the CLIs to print instead of pydantic's traceback."""
    problems = []
    for problem in error.errors():
        name = "KILN_" + "_".join(str(part) for part in problem["loc"]).upper()
        value = problem.get("input")
        if isinstance(value, str) and "://" in value:  # a password, with spaces or a # maybe
            value = re.sub(r"#.*", "#***", re.sub(r"://.*@", "://***@", value, flags=re.DOTALL), flags=re.DOTALL)
        shown = f"={mask_url(repr(value))}" if isinstance(value, str | int | float) else ""
        problems.append(f"{name}{shown}: {problem['msg']}")
    return f"invalid setting {'; '.join(problems)} (from {where})"


# Read outside the settings classes (worker/cxx_runtime.py), or by the tests and benchmarks only.
OTHER_VARIABLES = frozenset({"KILN_CXX_PRELOAD"})
OTHER_PREFIXES = ("KILN_TEST_", "KILN_BENCH_")


ENV_FILE = ".env"  # in the current folder, as every settings class reads it (CommonSettings)


def setting_variables() -> dict[str, str]:
    """The variables settings are read from, each with where it was set: `.env` or the
    environment (which wins where both set one)."""
    from dotenv import dotenv_values  # pydantic-settings' own reader of .env files

    found = {name: ENV_FILE for name in dotenv_values(ENV_FILE)} if os.path.isfile(ENV_FILE) else {}
    found.update((name, "the environment") for name in os.environ)
    return found


def unknown_variables(variables: Mapping[str, str]) -> list[str]:
    """One line for each `KILN_*` name in `variables` (name: where it was set, `setting_variables`)
    that no part of kiln reads, with the setting it may have meant: pydantic-settings ignores what
    it does not know, so a misspelt setting (`KILN_BATCH_SZE=64`) used to be dropped in silence.
    Producer and worker settings both count as known, since one environment often serves both."""
    from producer.settings import ProducerSettings  # here: producer.settings imports this module

    known = set(OTHER_VARIABLES)
    for settings in (WorkerSettings, ProducerSettings):
        for name, field in settings.model_fields.items():
            known.add(f"KILN_{name.upper()}")
            if isinstance(field.validation_alias, AliasChoices):
                known.update(str(choice).upper() for choice in field.validation_alias.choices)
    lines = []
    for name in sorted(n for n in variables if n.upper().startswith("KILN_")):
        if name.upper() in known or name.upper().startswith(OTHER_PREFIXES):
            continue
        close = difflib.get_close_matches(name.upper(), known, n=1)
        where = f" (in {ENV_FILE})" if variables[name] == ENV_FILE else ""
        lines.append(
            f"{name}{where} is not a kiln setting and is ignored" + (f" (did you mean {close[0]}?)" if close else "")
        )
    return lines


class EnvFileError(ValueError):
    """`.env` exists and cannot be read as settings: not UTF-8 text (or UTF-8 with NUL bytes, as
    UTF-16 text decodes), or not readable."""


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KILN_", env_file=ENV_FILE, extra="ignore")

    def __init__(self, **values: object) -> None:
        """Raises `EnvFileError` where `.env` (or `_env_file`) cannot be read (pydantic-settings
        raised the decoder's or the file system's traceback, a hostile tester's finding), and
        pydantic's ValidationError for invalid settings (`settings_error` says it in a line)."""
        env_file = values.get("_env_file", ENV_FILE)
        files = env_file if isinstance(env_file, list | tuple) else [] if env_file is None else [env_file]
        paths = [os.path.abspath(os.path.expanduser(file)) for file in files]
        path = " or ".join(paths)  # where a decoding error came from
        try:
            super().__init__(**values)
        except UnicodeDecodeError as e:
            raise EnvFileError(
                f"{path} is not UTF-8 text (byte {e.start} is {e.object[e.start]:#04x}): "
                "save it as UTF-8, or move it out of this folder, from which kiln reads its KILN_* settings"
            ) from None
        except OSError as e:
            raise EnvFileError(
                f"cannot read {path}: {e.strerror or e}; kiln reads its KILN_* settings from a "
                ".env in the current folder: make it readable, or move it out of this folder"
            ) from None
        # UTF-16 without a byte-order mark decodes as UTF-8 with a NUL after each letter: no name
        # in it is a setting's, so it was ignored without a word (a hostile tester's finding).
        # Regular files only: a pipe read again would wait for a writer for ever.
        if values.get("_env_file_encoding") not in (None, "utf-8", "utf8"):
            return  # text in another encoding was asked for, and read so
        for file in filter(os.path.isfile, paths):
            with contextlib.suppress(OSError), open(file, "rb") as text:
                if b"\0" in text.read():
                    raise EnvFileError(
                        f"{file} holds NUL bytes (UTF-16 or UTF-32 text, or not text): save it as UTF-8 text, or "
                        "move it out of this folder, from which kiln reads its KILN_* settings"
                    )

    redis_url: str | None = Field(
        default=None,
        description="Redis for the queue and the results, e.g. redis://host:6379/0. Unset: `producer label` "
        "starts its own Redis and a local worker (the embedded mode); workers require it.",
    )
    result_ttl_s: int = Field(
        default=7 * 24 * 3600, ge=0, description="seconds a job's records are kept after its last write; 0 keeps them"
    )
    allow_evicting_redis: bool = Field(
        default=False,
        description="run against a Redis whose maxmemory-policy is not noeviction (kiln's keys may then vanish "
        "when it is full); by default workers and producers refuse to start on one",
    )

    @field_validator("redis_url", mode="before")
    @classmethod
    def _redis_url_is_one_kiln_takes(cls, url: object) -> object:
        """`redis://[[user]:password@]host[:port][/db]`, or `rediss://` (TLS) with redis-py's
        `ssl_*` parameters: what both Celery's broker (kombu) and redis-py take. Anything else
        (another scheme, `unix://`, other query parameters, a database that is not a number)
        failed only at the first connection, in a traceback. Empty means unset. No message here
        quotes the URL: it may hold a password (`settings_error` shows it masked)."""
        if not isinstance(url, str) or not url.strip():
            return None if isinstance(url, str) else url
        if any(character.isspace() for character in url):
            raise ValueError("a URL holds no spaces or line breaks: percent-encode them (%20)")
        try:
            parts = urllib.parse.urlsplit(url)
            port = parts.port
        except ValueError:
            raise ValueError("its host or port cannot be read: the port is a number from 1 to 65535") from None
        if not url.startswith(("redis://", "rediss://")):  # lower case: redis-py takes no other
            raise ValueError(
                "use redis://[:password@]host[:port][/db], or rediss:// for TLS: workers reach Redis through "
                "Celery, which takes no other scheme (no unix:// sockets)"
            )
        if port == 0 or not parts.hostname:
            raise ValueError("it names no host, or port 0: redis://host:6379/0")
        if parts.username and parts.password is None:
            raise ValueError("a password goes after a colon: redis://:password@host (or user:password@)")
        if "#" in url:
            raise ValueError("a URL of Redis has no #fragment: percent-encode a # in a password (%23)")
        if re.search(r"%(?![0-9A-Fa-f]{2})", url):
            raise ValueError("a % that is not a percent-escape (%25 is a %)")
        database = parts.path.strip("/")
        if database and not (database.isascii() and database.isdigit() and int(database) < 2**31):
            raise ValueError("the database after the host is a number: redis://host:6379/0")
        allowed = TLS_URL_PARAMETERS if parts.scheme == "rediss" else frozenset()
        unknown = sorted(set(urllib.parse.parse_qs(parts.query, keep_blank_values=True)) - allowed)
        if unknown:
            raise ValueError(
                f"kiln takes no URL parameter {', '.join(unknown)}: timeouts and retries are KILN_REDIS_TIMEOUT_S "
                "and KILN_REDIS_RETRY_S, a password goes before the host (redis://:password@host)"
                + (f"; rediss:// takes {', '.join(sorted(TLS_URL_PARAMETERS))}" if parts.scheme == "rediss" else "")
            )
        return url


class WorkerSettings(CommonSettings):
    model: str | None = Field(default=None, description="the .pt2 package to serve (`--model`)")
    device: str | None = Field(default=None, description="cpu, cuda or cuda:N; default: the package's device")
    concurrency: int | None = Field(
        default=None,
        ge=1,
        description="worker processes on this host, each a whole worker with its own model and Redis "
        "connection; default: 1 on the CPU, processes_per_gpu for each GPU with a CUDA package",
    )
    processes_per_gpu: int | None = Field(
        default=None,
        ge=1,
        description="worker processes per GPU when concurrency is unset: one process's GIL bounds how fast it "
        "feeds a GPU; default: one per 4 cores of the GPU's share of the host, at most 4",
    )
    threads: int | None = Field(
        default=None,
        ge=1,
        description="torch threads per process; default: the cores divided among the processes (1 on a GPU)",
    )
    fetch_threads: int | None = Field(
        default=None,
        ge=1,
        description="threads fetching images (and decoding them where no other decoder does) in each process; "
        "default: 4 with a GPU, else 2",
    )
    decode_processes: int | None = Field(
        default=None,
        ge=0,
        description="processes decoding images on the CPU (Pillow) for each worker process; 0 decodes in the "
        "fetch threads; default with a GPU: (cores - max(3, worker processes)) / worker processes, at least 1; "
        "else 0",
    )
    gpu_decode: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="decode JPEGs on the GPU: auto does with CUDA packages where the GPU decoder works (else "
        "it logs why and decodes on the CPU); on refuses to start without it",
    )
    gpu_decoder: Literal["auto", "torchvision", "nvimgcodec"] = Field(
        default="auto",
        description="the GPU JPEG decoder: torchvision (nvJPEG, ships with the worker) or nvimgcodec "
        "(nvImageCodec, `pip install 'kiln[gpu]'`): libjpeg's own pixels, so the GPU path's answers are the "
        "CPU path's, and faster with several worker processes per GPU, slower with one; auto takes nvimgcodec "
        "where it is installed and each GPU has two worker processes or more (see the README's GPU section)",
    )
    gpu_wait: Literal["spin", "block"] = Field(
        default="spin",
        description="how a worker process's threads wait for its GPU: spin (CUDA's default: a core busy while "
        "the GPU works, the quickest wake-up) or block (the core is free meanwhile, for the CPU decode processes); "
        "on the H200, spin ran 640x480 JPEGs 9% faster, block a mixed folder 5% faster, camera photos alike",
    )
    tasks_in_flight: int | None = Field(
        default=None,
        ge=1,
        description="chunk tasks each worker process runs at once (threads): enough that the stages never "
        "wait for a chunk boundary; default: 8 with a GPU, else 2",
    )
    batch_size: int | None = Field(default=None, ge=1, description="images per model call; default: the package's max")
    keep_freed_memory: bool = Field(
        default=False,
        description="with a CPU package, keep the memory the model frees for its next batch rather than hand it "
        "back to the kernel (glibc's mmap and trim thresholds at their top): without it a CPU worker spent about "
        "as much system time faulting fresh pages in as it spent computing. Off by default: what the model used at its "
        "largest batch stays resident, and other freed blocks (an online request's bytes), so a worker's memory no "
        "longer returns to its idle size after a job. A decode's buffers above 32 MB are handed back either way",
    )
    queues: Annotated[list[str], NoDecode] = Field(
        default=["kiln.bulk", "kiln.online"], description="queues to consume, comma-separated"
    )
    allowed_roots: Annotated[list[str], NoDecode] = Field(
        default=[],
        description="folders (os.pathsep- or comma-separated) whose files jobs may reference, and object-store "
        "roots (comma-separated: s3://bucket/prefix/, s3://bucket/, s3:// for every bucket); other local paths "
        "and objects are refused",
    )
    max_image_bytes: int = Field(default=32 * 1024 * 1024, ge=1, description="largest image file or download")
    max_image_pixels: int = Field(
        default=50_000_000, ge=1, description="largest image, in pixels (decompression bombs)"
    )
    max_message_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=1024,
        description="largest task message, as stored in Redis; larger ones are dead-lettered unread. An inline "
        "image grows by 16/9 on the way (base64 twice): keep this above 1.8 x max_image_bytes",
    )
    decode_memory_mb: int = Field(
        default=256,
        ge=1,
        description="MB of decoded pixels a worker process holds at once across its decode threads; a larger "
        "image waits to be decoded alone",
    )
    formats: Annotated[frozenset[str], NoDecode] = Field(
        default=DEFAULT_FORMATS,
        description="image formats workers decode (Pillow names, comma-separated); any other is refused "
        "(format_refused) before its decoder runs",
    )
    fetch_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="deadline of one whole http(s) fetch (connects, redirects, headers and body) or object read "
        "(retries included)",
    )
    fetch_allowed_networks: Annotated[list[str], NoDecode] = Field(
        default=[],
        description="networks (CIDR, comma-separated) that http(s) fetches may reach besides public addresses; "
        "loopback, private and link-local addresses are refused otherwise",
    )
    online_batch_size: int = Field(default=32, ge=1, description="online requests batched into one model call")
    online_flush_ms: int = Field(default=20, ge=1, description="longest wait for an online batch to fill")
    lease_s: int = Field(
        default=60,
        ge=2,
        # KILN_VISIBILITY_TIMEOUT_S: the name this setting had before leases were renewed.
        validation_alias=AliasChoices("lease_s", "KILN_LEASE_S", "KILN_VISIBILITY_TIMEOUT_S"),
        description="lease on a delivered task: a live worker renews it every lease/6 s; a task whose lease "
        "lapsed (its worker died) is delivered again. Not a bound on how long a chunk may run",
    )
    max_deliveries: int = Field(
        default=3,
        ge=1,
        description="deaths of workers on one task before its images are recorded as failed (poison); only "
        "deliveries whose worker is gone count",
    )
    redis_timeout_s: float = Field(
        default=20.0,
        gt=0,
        description="socket and connect timeout of every Redis command a worker sends (redis-py's default is 5 s)",
    )
    redis_retry_s: float = Field(
        default=600.0,
        gt=0,
        description="how long a worker retries a failed Redis write (stalled, restarting, failing over or full) "
        "before it gives the task back to the queue",
    )
    sink_retry_s: float = Field(
        default=600.0,
        gt=0,
        description="how long a worker retries writing a chunk's Parquet shard (sharded output: out_dir "
        "unwritable, object store down) before it gives the chunk back to the queue",
    )
    metrics_port: int | None = Field(
        default=None, ge=0, le=65535, description="port of /metrics, /livez, /readyz; 0: any free port; unset: none"
    )
    metrics_port_file: str | None = Field(default=None, description="file the endpoint's port is written to")
    liveness_timeout_s: float = Field(
        default=300, gt=0, description="unreachable broker, or work waiting unconsumed, this long: not live"
    )
    task_events: bool = Field(default=False, description="send Celery task events (Flower, `celery events`)")

    @field_validator("formats", mode="before")
    @classmethod
    def _split_formats(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.split(",")
        if isinstance(value, list | tuple | set | frozenset):
            return frozenset(str(name).strip().upper() for name in value if str(name).strip())
        return value

    @field_validator("formats")
    @classmethod
    def _known_formats(cls, value: frozenset[str]) -> frozenset[str]:
        from worker.probe import known_formats  # imports Pillow: only where a worker's settings are read

        unknown = value - known_formats()
        if unknown:
            raise ValueError(f"unknown image formats {sorted(unknown)}; known: {', '.join(sorted(known_formats()))}")
        return value

    @field_validator("fetch_allowed_networks")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for network in value:
            ipaddress.ip_network(network.strip(), strict=False)  # ValueError names the bad one
        return [network.strip() for network in value]

    @field_validator("allowed_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: object) -> object:
        if isinstance(value, str):  # a URL's "://" holds os.pathsep: split URLs by commas only
            pieces = [p.strip() for p in value.split(",")]
            return [part for p in pieces for part in ([p] if "://" in p else p.split(os.pathsep)) if part]
        return value

    @field_validator("allowed_roots")
    @classmethod
    def _object_roots(cls, value: list[str]) -> list[str]:
        for root in value:
            if "://" in root:
                parse_root(root)  # ValueError names the bad one
        return value

    @field_validator("queues", "fetch_allowed_networks", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            return [part for chunk in value.split(os.pathsep) for part in chunk.split(",") if part.strip()]
        return value
