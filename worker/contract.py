"""The wire contract between producers and workers: task names, queues, messages and records.

Both sides import this module, so it imports neither torch nor Celery. Messages travel as JSON
(never pickle) and carry a version; a worker refuses a version it does not know, as a failed
record, instead of guessing.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    model_validator,
)

MESSAGE_VERSION = 1

CHUNK_TASK = "kiln.classify_chunk"
ONLINE_TASK = "kiln.classify_one"
BULK_QUEUE = "kiln.bulk"
ONLINE_QUEUE = "kiln.online"

ErrorKind = Literal[
    "bad_message",  # the task message failed validation
    "bad_ref",  # a malformed reference: a NUL or control character, an unparsable URL
    "unsupported_ref",  # a reference kiln cannot fetch (unknown scheme, a redirect to one, a relative path)
    "forbidden",  # a path or object outside the allowed roots, a symlink swapped in while opening, access denied
    "forbidden_address",  # an http(s) fetch or redirect to a loopback/private/link-local address not allowed
    "not_found",  # a local file, object or bucket that does not exist
    "fetch_failed",  # network or I/O error while fetching
    "too_large",  # over the byte cap, or over the pixel cap (decompression bomb)
    "not_an_image",  # bytes that no image decoder recognises
    "format_refused",  # a known image format outside the worker's allowlist (KILN_FORMATS); HEIC without kiln[heif]
    "unreadable",  # an image file that is truncated or corrupt
    "poison",  # a message delivered too many times (its workers died on it)
    "internal",  # a bug or a failed model run; the reason says which
]

REPLY_PREFIX = "kiln:reply:"
RequestId = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_-]+$")]
_REPLY_KEY = re.compile(r"kiln:reply:[A-Za-z0-9_-]{1,128}")


def reply_key(request_id: str) -> str:
    """The Redis list an online request's answer goes to."""
    return REPLY_PREFIX + request_id


def is_reply_key(name: object) -> bool:
    """Whether `name` has the shape of kiln's reply keys: workers write to no other key for a caller."""
    return isinstance(name, str) and _REPLY_KEY.fullmatch(name) is not None


Key = Annotated[str, StringConstraints(min_length=1, max_length=4096)]


def _not_only_dots(job: str) -> str:
    if not job.strip("."):
        raise ValueError("a job name of dots only names a folder above the shards' out_dir")
    return job


# A job name is part of Redis keys and of its shards' folder (out_dir/JOB/): `.` or `..` would be
# out_dir itself or the folder above it, whose shards `export` would then read as this job's.
JobId = Annotated[
    str, StringConstraints(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._:@-]+$"), AfterValidator(_not_only_dots)
]


class InputError(Exception):
    """One image could not be classified, for a reason that belongs in its record."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind: ErrorKind = kind


class Item(BaseModel):
    """One image of a job: a stable key (the record's identity) and where to get the bytes."""

    model_config = ConfigDict(extra="forbid")

    key: Key
    ref: Annotated[str, StringConstraints(min_length=1, max_length=8192)]


ChunkId = Annotated[str, StringConstraints(pattern=r"^[0-9]{9}-[0-9a-f]{8}$")]


def chunk_id(index: int, items: Sequence[Item]) -> str:
    """A chunk's id: its position in the job (0 <= index < 10**9) and the first 8 hex digits of a
    SHA-256 over its (key, ref) pairs as a JSON list. The same inputs chunked the same way give the
    same ids (so a resumed job finds its written shards); other content at an index, another id.
    Raises ValueError for an index outside the range."""
    if not 0 <= index < 10**9:
        raise ValueError(f"chunk index {index} outside 0..999999999")
    pairs = json.dumps([[item.key, item.ref] for item in items])
    return f"{index:09d}-{hashlib.sha256(pairs.encode()).hexdigest()[:8]}"


def shard_name(job: str, chunk: str) -> str:
    """Where a chunk's Parquet shard lives, relative to the job's out_dir: `{job}/part-{chunk}.parquet`."""
    return f"{job}/part-{chunk}.parquet"


# Labels per image: a whole number (a float or a string was stored as given in the job and
# failed the worker's reading of it, losing the chunk), at most what a message may ask.
TopK = Annotated[StrictInt, Field(ge=1, le=1000)]


def check_topk(topk: object) -> int:
    """`topk` as messages take it; ValueError saying what is wrong otherwise (before any job is
    made or changed)."""
    try:
        return TypeAdapter(TopK).validate_python(topk)
    except ValidationError:
        raise ValueError(f"topk must be a whole number from 1 to 1000, not {topk!r}") from None


class ChunkMessage(BaseModel):
    """Bulk work: many image references of one job, classified in batches by one worker.

    With `out_dir` (a folder or an fsspec URL such as s3://bucket/prefix) and `chunk`, the chunk's
    records go to one Parquet shard, `out_dir/shard_name(job, chunk)`, instead of the Redis store."""

    model_config = ConfigDict(extra="forbid")

    v: Literal[1] = MESSAGE_VERSION
    job: JobId
    items: list[Item] = Field(min_length=1, max_length=100_000)
    topk: TopK = 5
    chunk: ChunkId | None = None
    out_dir: Annotated[str, StringConstraints(min_length=1, max_length=4096)] | None = None

    @model_validator(mode="after")
    def _sharded(self) -> ChunkMessage:
        if (self.chunk is None) != (self.out_dir is None):
            raise ValueError("give both chunk and out_dir (sharded output), or neither")
        if self.out_dir is not None and self.job in (".", ".."):
            raise ValueError(f"job {self.job!r} cannot name a folder of out_dir")
        return self


class OnlineMessage(BaseModel):
    """Online work: one image, by reference or inline (base64), answered on `reply_to`, which
    must be `reply_key(id)`: a message cannot make a worker write into any other key. With `job`
    (and `key`, default: the id), the record is also written into that job, if the job allows it
    (created with online=True, holding that key)."""

    model_config = ConfigDict(extra="forbid")

    v: Literal[1] = MESSAGE_VERSION
    id: RequestId
    reply_to: Annotated[str, StringConstraints(min_length=1, max_length=300)]
    ref: str | None = None
    data_b64: str | None = None
    topk: TopK = 5
    job: JobId | None = None
    key: Key | None = None

    @model_validator(mode="after")
    def _one_source(self) -> OnlineMessage:
        if (self.ref is None) == (self.data_b64 is None):
            raise ValueError("give exactly one of ref and data_b64")
        if self.reply_to != reply_key(self.id):
            raise ValueError(f"reply_to must be {reply_key(self.id)!r}, the reply key of this request's id")
        if self.key is not None and self.job is None:
            raise ValueError("key needs a job")
        return self


class Label(BaseModel):
    label: str
    index: int
    score: float


class RecordError(BaseModel):
    kind: ErrorKind
    message: str


class Record(BaseModel):
    """The result for one (job, image): top-k labels, or the error that stopped it."""

    v: Literal[1] = MESSAGE_VERSION
    job: str
    key: str
    ref: str | None = None
    status: Literal["ok", "error"]
    topk: list[Label] = Field(default_factory=list)
    error: RecordError | None = None
    model: str | None = None
    model_digest: str | None = None
    worker: str | None = None
    timings_ms: dict[str, float] = Field(default_factory=dict)
    finished_at: float | None = Field(default=None, description="unix time")

    @classmethod
    def failure(cls, job: str, key: str, kind: ErrorKind, message: str, **fields: Any) -> Record:
        return cls(job=job, key=key, status="error", error=RecordError(kind=kind, message=message), **fields)
