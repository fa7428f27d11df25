"""The result store: one record per (job, image) in Redis, written as an idempotent upsert; or,
for a sharded job (records in Parquet shards under its out_dir, worker/sink.py), only counters
and per-chunk completion: O(chunks) in Redis, nothing per image.

Keys of a job share the hash tag `{job}`, so they live on one Redis Cluster slot and one Lua
script can update them together:

    kiln:{job}:meta      hash: total, done, failed, created_at, online, topk, listing ("open"
                         while a submission enqueues chunks, "done" once one has enqueued every
                         chunk: total is final then; absent for jobs of online requests); sharded
                         jobs also sink (the out_dir URL), chunks (chunks enqueued), sink_error (why
                         a worker last gave a chunk back unwritten; cleared when a shard is written);
                         model (the model key of the first worker that took a chunk: its records'
                         model), other_model (a worker of another model gave a chunk back)
    kiln:{job}:listers   hash: run id ("INPUTS#RUN") -> "running LAST_BEAT" | "stopped", for each
                         run of a submission that opened the listing and has not finished it
    kiln:{job}:lister:{id} string, expiring: that run's heartbeat while it runs
    kiln:{job}:listed    hash: chunk id -> images, once enqueued (sharded; what total counts)
    kiln:{job}:chunks    hash: chunk id -> "ok|failed" once its shard is written (sharded)
    kiln:{job}:items     hash: image key -> reference   (the job's images; total is its length)
    kiln:{job}:records   hash: image key -> record JSON
    kiln:{job}:status    hash: image key -> "ok" | "error"   (what the counters count)
                         (items, records and status: Redis-store jobs only)
    kiln:{job}:delivery  hash: chunk task id -> "holder|deaths" while it runs, "done" once its records
                         are written (online requests: deliveries so far)
    kiln:{job}:executions hash: chunk task id -> times it started running (for the soak benchmark)
    kiln:reply:{id}      list: the answer to one online request
    kiln:dead-letters    list: messages that name no job (or no caller), with the reason

A record is written with its counters in one script call, so a redelivered task rewrites its
records without counting them twice, and a success is never replaced by a later failure. A
sharded chunk is counted once, when the first of its deliveries marks it complete.
This module imports no torch: producers read through it too.
"""

from __future__ import annotations

import json
import secrets
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import redis

from worker.contract import Item, Record, is_reply_key

# Only keys that the job holds (KEYS[4], registered by its producer) are written: a message may
# not add images to a job, or write into another job. Returns the keys refused.
_UPSERT = """
local ttl = tonumber(ARGV[1])
local refused = {}
for i = 2, #ARGV, 3 do
  local key, status, record = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local old = redis.call('HGET', KEYS[3], key)
  if redis.call('HEXISTS', KEYS[4], key) == 0 then
    refused[#refused + 1] = key
  elseif not (old == 'ok' and status == 'error') then
    redis.call('HSET', KEYS[2], key, record)
    if old ~= status then
      redis.call('HSET', KEYS[3], key, status)
      if old then redis.call('HINCRBY', KEYS[1], old == 'ok' and 'done' or 'failed', -1) end
      redis.call('HINCRBY', KEYS[1], status == 'ok' and 'done' or 'failed', 1)
    end
  end
end
if ttl > 0 then
  for _, k in ipairs(KEYS) do redis.call('EXPIRE', k, ttl) end
end
return refused
"""

# Register images in a job, all or nothing: a key that the job already holds with another
# reference refuses the whole call, as does another top-k than the job's (an export has one
# column per label: records of more would be cut, silently). `total` is the number of images the job holds, whoever
# registered them, so done + failed never exceeds it. Returns {'ok', {new keys}}, or a refusal.
_REGISTER = """
local ttl, now, online, topk = tonumber(ARGV[1]), ARGV[2], ARGV[3], ARGV[4]
local sink = redis.call('HGET', KEYS[1], 'sink')
if sink then return {'sharded', sink} end
for i = 5, #ARGV, 2 do
  local old = redis.call('HGET', KEYS[2], ARGV[i])
  if old and old ~= ARGV[i + 1] then return {'conflict', ARGV[i], old} end
end
if redis.call('HSETNX', KEYS[1], 'created_at', now) == 1 then
  redis.call('HSET', KEYS[1], 'online', online, 'topk', topk)
elseif online == '1' and redis.call('HGET', KEYS[1], 'online') ~= '1' then
  return {'bulk_only'}
else
  local had = redis.call('HGET', KEYS[1], 'topk')
  if had and had ~= topk then return {'other_topk', had} end
end
local added = {}
for i = 5, #ARGV, 2 do
  if redis.call('HSETNX', KEYS[2], ARGV[i], ARGV[i + 1]) == 1 then added[#added + 1] = ARGV[i] end
end
redis.call('HSET', KEYS[1], 'total', redis.call('HLEN', KEYS[2]))
redis.call('HINCRBY', KEYS[1], 'done', 0)
redis.call('HINCRBY', KEYS[1], 'failed', 0)
if ttl > 0 then
  for _, k in ipairs(KEYS) do redis.call('EXPIRE', k, ttl) end
end
return {'ok', added}
"""

# Take failed images' records back out (a retry): their keys count as unfinished again until a
# worker writes a new record, so a wait cannot mistake the old error for the new outcome. Only
# "error" ones: a success that landed since the caller looked stays. Returns the keys cleared.
_FORGET_FAILED = """
local cleared = {}
for i = 1, #ARGV do
  if redis.call('HGET', KEYS[3], ARGV[i]) == 'error' then
    redis.call('HDEL', KEYS[2], ARGV[i])
    redis.call('HDEL', KEYS[3], ARGV[i])
    redis.call('HINCRBY', KEYS[1], 'failed', -1)
    cleared[#cleared + 1] = ARGV[i]
  end
end
return cleared
"""

_UNREGISTER = """
for i = 1, #ARGV do redis.call('HDEL', KEYS[2], ARGV[i]) end
redis.call('HSET', KEYS[1], 'total', redis.call('HLEN', KEYS[2]))
"""

# One online answer, all or nothing: never an EXPIRE on a key the push did not land on.
_REPLY = """
local kind = redis.call('TYPE', KEYS[1]).ok
if kind ~= 'none' and kind ~= 'list' then
  return redis.error_reply('WRONGTYPE ' .. KEYS[1] .. ' holds a ' .. kind .. ', not a reply list')
end
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""

REPLY_TTL_S = 300
_REPLY_POLL_S = 2.0  # longest single BLPOP: below any sane socket timeout, so a long wait never trips it
# Take over a chunk's delivery entry: only from the holder the caller saw (compare and set), so two
# deliveries of one chunk never both run it. A death (ARGV[4] = 1) counts towards poison.
_CLAIM = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current == 'done' then return {'done', 0} end
local holder, deaths = '', 0
if current then
  local h, d = string.match(current, '^(.*)|(%d+)$')
  holder, deaths = h, tonumber(d)
end
if holder ~= ARGV[3] then return {'conflict', deaths} end
deaths = deaths + tonumber(ARGV[4])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. '|' .. deaths)
redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
for _, k in ipairs(KEYS) do redis.call('EXPIRE', k, tonumber(ARGV[5])) end
return {'run', deaths}
"""

# Create or resume a sharded job: refused for a job that keeps its records in Redis, or that
# writes to another out_dir, or with another top-k (its shards would have other columns).
_BEGIN_SHARDED = """
local ttl, out_dir, topk, now = tonumber(ARGV[1]), ARGV[2], ARGV[3], ARGV[4]
local sink = redis.call('HGET', KEYS[1], 'sink')
if not sink then
  if redis.call('HEXISTS', KEYS[1], 'created_at') == 1 then return {'records'} end
  redis.call('HSET', KEYS[1], 'sink', out_dir, 'topk', topk, 'created_at', now,
             'total', 0, 'done', 0, 'failed', 0, 'chunks', 0)
elseif sink ~= out_dir then
  return {'other_sink', sink}
elseif redis.call('HGET', KEYS[1], 'topk') ~= topk then
  return {'other_topk', redis.call('HGET', KEYS[1], 'topk')}
end
redis.call('HSET', KEYS[1], 'listing', 'open')
if ttl > 0 then redis.call('EXPIRE', KEYS[1], ttl) end
return {'ok'}
"""

# A submission opens the job's listing: KEYS meta, listers, its heartbeat; ARGV its id, heartbeat
# TTL, job TTL. A job it creates gets the job's TTL (one killed before its first chunk leaves nothing
# for good); an existing one keeps its own, and the submissions' hash gets the job's. Returns
# whether the job existed and the listing before.
_OPEN_LISTING = """
local existed = redis.call('EXISTS', KEYS[1])
local previous = redis.call('HGET', KEYS[1], 'listing') or ''
redis.call('HSET', KEYS[1], 'listing', 'open')
redis.call('HSET', KEYS[2], ARGV[1], 'running ' .. redis.call('TIME')[1])
redis.call('SET', KEYS[3], 1, 'EX', ARGV[2])
local ttl = tonumber(ARGV[3])
if ttl > 0 and existed == 0 then redis.call('EXPIRE', KEYS[1], ttl) end
local left = redis.call('PTTL', KEYS[1])  -- the submissions' hash lives as long as the job
if left > 0 then redis.call('PEXPIRE', KEYS[2], left) else redis.call('PERSIST', KEYS[2]) end
return {existed, previous}
"""

# A run of a submission has enqueued all it listed: it leaves, and so do the earlier runs of the
# same submission (its inputs, the part of the id before '#') that stopped or lapsed: this run
# listed what they left out. Live runs stay, each its own entry: two runs of one submission at
# once must not end each other's part. The listing is done once no entry is left. KEYS as
# above; ARGV the run's id, its submission's prefix ("INPUTS#"), the heartbeats' key prefix.
_FINISH_LISTING = """
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[3])
local members = redis.call('HGETALL', KEYS[2])
for i = 1, #members, 2 do
  local id = members[i]
  if string.sub(id, 1, #ARGV[2]) == ARGV[2]
     and (members[i + 1] == 'stopped' or redis.call('EXISTS', ARGV[3] .. id) == 0) then
    redis.call('HDEL', KEYS[2], id)
  end
end
if redis.call('HLEN', KEYS[2]) == 0 then redis.call('HSET', KEYS[1], 'listing', 'done') end
return 1
"""

# A run that enqueued nothing is taken back (earlier runs of its submission stay as they were):
# KEYS meta, listers, its heartbeat, listed, chunks; ARGV its id, whether the job existed before
# it, the listing before it.
_RESET_LISTING = """
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[3])
if redis.call('HLEN', KEYS[2]) > 0 then return 0 end
if ARGV[2] == '0' and tonumber(redis.call('HGET', KEYS[1], 'total') or '0') == 0 then
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[4], KEYS[5])
elseif ARGV[3] == '' then
  redis.call('HDEL', KEYS[1], 'listing')
else
  redis.call('HSET', KEYS[1], 'listing', ARGV[3])
end
return 1
"""

# The job's meta and its submissions by state: heartbeat alive, stopped, lapsed. KEYS meta,
# listers; ARGV the heartbeats' key prefix.
_LISTING_STATE = """
local alive, stopped, lapsed = 0, 0, 0
local now = tonumber(redis.call('TIME')[1])
local members = redis.call('HGETALL', KEYS[2])
for i = 1, #members, 2 do
  local beat = tonumber(string.match(members[i + 1], '^running (%d+)$'))
  if members[i + 1] == 'stopped' then stopped = stopped + 1
  elseif redis.call('EXISTS', ARGV[1] .. members[i]) == 1 then alive = alive + 1
  elseif beat and now - beat > tonumber(ARGV[2]) then stopped = stopped + 1
  else lapsed = lapsed + 1 end
end
return {redis.call('HGETALL', KEYS[1]), alive, stopped, lapsed}
"""

# A run's heartbeat, and the time of it in its entry (while it is a running one): a lapsed entry
# whose last beat is older than the grace reads as stopped. KEYS listers, its heartbeat; ARGV its
# id, the heartbeat's seconds.
_KEEP_LISTING = """
if string.sub(redis.call('HGET', KEYS[1], ARGV[1]) or '', 1, 7) == 'running' then
  redis.call('HSET', KEYS[1], ARGV[1], 'running ' .. redis.call('TIME')[1])
end
redis.call('SET', KEYS[2], 1, 'EX', ARGV[2])
return 1
"""

# Count a chunk into the job once, however often it is enqueued (a resumed job enqueues again
# the chunks that were not complete).
_ADD_CHUNK = """
local ttl = tonumber(ARGV[3])
local added = redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2])
if added == 1 then
  redis.call('HINCRBY', KEYS[1], 'total', tonumber(ARGV[2]))
  redis.call('HINCRBY', KEYS[1], 'chunks', 1)
end
if ttl > 0 then for _, k in ipairs(KEYS) do redis.call('EXPIRE', k, ttl) end end
return added
"""

# Bind a job to the model of the first worker that takes one of its chunks (a worker of that
# model taking one clears a refusal noted before). KEYS meta; ARGV the worker's model key.
# Returns the job's model key, or nil where the job does not exist.
_BIND_MODEL = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
redis.call('HSETNX', KEYS[1], 'model', ARGV[1])
local bound = redis.call('HGET', KEYS[1], 'model')
if bound == ARGV[1] then redis.call('HDEL', KEYS[1], 'other_model') end
return bound
"""

# Mark a chunk's shard written, and count its images, once: a redelivered chunk rewrote the same
# shard, so it must not be counted again.
_COMPLETE_CHUNK = """
local ttl = tonumber(ARGV[4])
local new = redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2] .. '|' .. ARGV[3])
if new == 1 then
  redis.call('HINCRBY', KEYS[1], 'done', tonumber(ARGV[2]))
  redis.call('HINCRBY', KEYS[1], 'failed', tonumber(ARGV[3]))
end
redis.call('HDEL', KEYS[1], 'sink_error')
if ttl > 0 then for _, k in ipairs(KEYS) do redis.call('EXPIRE', k, ttl) end end
return new
"""

DEAD_LETTERS = "kiln:dead-letters"  # messages too broken to name a job or a caller
DELIVERY_TTL_S = 24 * 3600  # at least: delivery entries outlive the workers that wrote them


# A listing submission's heartbeat lives this long (seconds); the submission renews it every third
# of that, from a thread of its own, so a slow listing or a full queue never lets it lapse.
LISTER_TTL_S = 30
# A lapsed heartbeat this long is a run that was killed (or lost its host): a live one renews it
# within a third of LISTER_TTL_S once Redis is back from an outage. `wait` and `status` then
# call its listing stopped.
LAPSE_GRACE_S = LISTER_TTL_S / 2


def _key(job: str, part: str) -> str:
    return f"kiln:{{{job}}}:{part}"


class JobConflict(ValueError):
    """A submission that a job refuses: a key it holds for another image, or online writes into a
    job created for bulk work only."""


@dataclass(frozen=True)
class Delivery:
    """A chunk's delivery entry: who runs it and how many workers died on it, or done."""

    done: bool = False
    holder: str = ""
    deaths: int = 0


@dataclass(frozen=True)
class JobCounts:
    """Images of a job: `total` so far, `done` (classified), `failed` (an error record).

    `listing`: whether `total` is final. A job's total grows while submissions enqueue its chunks:
    "running" while one of them is at it (its heartbeat alive), "done" once every submission that
    opened the listing has finished it; "stopped" where the last one running was interrupted or
    failed, or was killed: its heartbeat lapsed over LAPSE_GRACE_S ago; "lapsed" where its
    heartbeat expired since (killed, or Redis away longer than the heartbeat: a live one renews
    it within a third of LISTER_TTL_S of Redis's return)."""

    total: int
    done: int
    failed: int
    listing: Literal["done", "running", "stopped", "lapsed"] = "done"
    sink_error: str | None = None  # sharded jobs: why a worker's last shard write failed, until one succeeds
    model: str | None = None  # the model its records come from (`Manifest.model_key`), once a worker took a chunk
    other_model: str | None = None  # a worker serving another model gave a chunk back: which, and what it serves

    @property
    def listed(self) -> bool:
        return self.listing == "done"

    @property
    def finished(self) -> int:
        return self.done + self.failed

    @property
    def complete(self) -> bool:
        return self.listed and self.total > 0 and self.finished >= self.total


def listing_run(submission: str) -> str:
    """One run's id in a job's listing: its submission's (the inputs', or the first chunk's), '#',
    and its own, so that two runs of one submission at once each hold the listing open."""
    return f"{submission}#{secrets.token_hex(4)}"


@dataclass(frozen=True)
class ListingBefore:
    """A job as a submission found it when it opened its listing (`ResultStore.open_listing`)."""

    existed: bool
    listing: str | None  # the meta's listing: "open", "done", or None


def _other_topk(job: str, started: str, topk: int) -> JobConflict:
    """The refusal of a submission asking another top-k than its job's, in either output mode."""
    return JobConflict(
        f"job {job} was started with topk={started}, not {topk}: submit with that top-k (--topk, topk=), "
        "or use a new job name"
    )


class ResultStore:
    """Records and counters of jobs in one Redis. Thread-safe (redis-py's pool)."""

    def __init__(self, client: redis.Redis, ttl_s: int = 0) -> None:
        self.redis = client
        self.ttl_s = ttl_s
        self._upsert = client.register_script(_UPSERT)
        self._register = client.register_script(_REGISTER)
        self._unregister = client.register_script(_UNREGISTER)
        self._forget_failed = client.register_script(_FORGET_FAILED)
        self._reply = client.register_script(_REPLY)
        self._claim = client.register_script(_CLAIM)
        self._begin_sharded = client.register_script(_BEGIN_SHARDED)
        self._bind_model = client.register_script(_BIND_MODEL)
        self._keep_listing = client.register_script(_KEEP_LISTING)
        self._add_chunk = client.register_script(_ADD_CHUNK)
        self._complete_chunk = client.register_script(_COMPLETE_CHUNK)
        self._open_listing = client.register_script(_OPEN_LISTING)
        self._finish_listing = client.register_script(_FINISH_LISTING)
        self._reset_listing = client.register_script(_RESET_LISTING)
        self._listing_state = client.register_script(_LISTING_STATE)

    @classmethod
    def from_url(cls, url: str, ttl_s: int = 0, timeout_s: float | None = None) -> ResultStore:
        """`timeout_s`: socket and connect timeout of each command (None: redis-py's, 5 s)."""
        timeouts = {} if timeout_s is None else {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
        return cls(redis.Redis.from_url(url, health_check_interval=30, **timeouts), ttl_s)

    def register(self, job: str, items: Sequence[Item], topk: int = 5, online: bool = False) -> list[str]:
        """Add images to a job (creating it), all or nothing; return the keys that were new.

        `online` creates a job that online requests may write into; asking it of a job created
        without it raises JobConflict, as do a key the job holds with another reference and a
        `topk` other than the job's."""
        args = [arg for item in items for arg in (item.key, item.ref)]
        keys = [_key(job, part) for part in ("meta", "items", "records", "status")]
        answer = self._register(keys=keys, args=[self.ttl_s, time.time(), int(online), topk, *args])
        verdict = answer[0].decode()
        if verdict == "conflict":
            key, old = answer[1].decode(), answer[2].decode()
            raise JobConflict(
                f"job {job} already holds image key {key!r} for {old}; this submission names another image for it. "
                "Use a new job name, or give the images other keys"
            )
        if verdict == "other_topk":
            raise _other_topk(job, answer[1].decode(), topk)
        if verdict == "bulk_only":
            raise JobConflict(f"job {job} was created for bulk work only; online requests may not write into it")
        if verdict == "sharded":
            raise JobConflict(
                f"job {job} writes its records as Parquet shards to {answer[1].decode()}, not to Redis; "
                "submit to it with that output folder (--out-dir, out_dir=), or use a new job name"
            )
        return [key.decode() for key in answer[1]]

    def begin_sharded(self, job: str, out_dir: str, topk: int) -> None:
        """Create a sharded job writing to `out_dir`, or resume it (after `open_listing`). Raises
        JobConflict for a job that keeps its records in Redis, or that writes to another out_dir
        or with another top-k."""
        answer = self._begin_sharded(keys=[_key(job, "meta")], args=[self.ttl_s, out_dir, topk, time.time()])
        verdict = answer[0].decode()
        if verdict == "records":
            raise JobConflict(
                f"job {job} keeps its records in Redis; it cannot write shards to {out_dir}. "
                "Submit to it without an out_dir, or use a new job name"
            )
        if verdict == "other_sink":
            raise JobConflict(f"job {job} writes its shards to {answer[1].decode()}, not {out_dir}")
        if verdict == "other_topk":
            raise _other_topk(job, answer[1].decode(), topk)

    def add_chunk(self, job: str, chunk: str, n_images: int) -> bool:
        """Count a chunk of `n_images` into a sharded job's `total` and `chunks`, once however
        often it is enqueued. Returns whether it was new."""
        keys = [_key(job, "meta"), _key(job, "listed")]
        return bool(self._add_chunk(keys=keys, args=[chunk, n_images, self.ttl_s]))

    def open_listing(self, job: str, run: str) -> ListingBefore:
        """Say that `run` (`listing_run`: a submission's id and this run's) is enqueueing the
        job's chunks: its total is not final. `keep_listing` must renew the run's heartbeat at
        least every `LISTER_TTL_S` until `finish_listing`, `stop_listing` or `reset_listing`, else
        the listing counts as lapsed. Returns how the job was before, for `reset_listing`."""
        keys = self._listing_keys(job, run)
        existed, listing = self._open_listing(keys=keys, args=[run, LISTER_TTL_S, self.ttl_s])
        return ListingBefore(bool(existed), listing.decode() or None)

    def keep_listing(self, job: str, run: str) -> None:
        """The listing run's heartbeat (see `open_listing`)."""
        self._keep_listing(keys=[_key(job, "listers"), _key(job, f"lister:{run}")], args=[run, LISTER_TTL_S])

    def finish_listing(self, job: str, run: str = "") -> None:
        """Say that `run` has enqueued every chunk it listed. Earlier runs of its submission that
        stopped or lapsed leave with it: it listed what they left out. The listing is done once no
        run is left in it, live or stopped."""
        prefix = run.partition("#")[0] + "#"
        self._finish_listing(keys=self._listing_keys(job, run), args=[run, prefix, _key(job, "lister:")])

    def stop_listing(self, job: str, submission: str) -> None:
        """Say that `submission` stopped before its end: `wait` then stops too, once what was
        enqueued has its records and no other submission runs, instead of waiting for chunks
        that will not come."""
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(_key(job, "listers"), submission, "stopped").delete(_key(job, f"lister:{submission}"))
            pipe.execute()

    def reset_listing(self, job: str, submission: str, before: ListingBefore) -> None:
        """Take back `submission`, which stopped before it enqueued anything (a conflict at its
        first chunk, say), as `open_listing` found the job (`before`): a job it made that holds
        nothing is deleted, another one's listing put back, unless other runs are in it (earlier
        runs of its submission, stopped, stay so)."""
        keys = [*self._listing_keys(job, submission), _key(job, "listed"), _key(job, "chunks")]
        self._reset_listing(keys=keys, args=[submission, int(before.existed), before.listing or ""])

    @staticmethod
    def _listing_keys(job: str, submission: str) -> list[str]:
        return [_key(job, "meta"), _key(job, "listers"), _key(job, f"lister:{submission}")]

    def listed_images(self, job: str, chunk: str) -> int | None:
        """How many images a sharded job's producer counted in for `chunk` (None: not one of its chunks)."""
        raw = self.redis.hget(_key(job, "listed"), chunk)
        return None if raw is None else int(raw)

    def completed_chunks(self, job: str) -> set[str]:
        """Ids of a sharded job's chunks whose shard is written."""
        return {chunk.decode() for chunk, _ in self.redis.hscan_iter(_key(job, "chunks"), count=1000)}

    def chunk_complete(self, job: str, chunk: str) -> bool:
        """Whether the shard of a sharded job's chunk is written (and counted)."""
        return bool(self.redis.hexists(_key(job, "chunks"), chunk))

    def complete_chunk(self, job: str, chunk: str, ok: int, failed: int) -> bool:
        """Mark a chunk's shard written and count its `ok` and `failed` images into the job, once:
        True if it was new, False if an earlier delivery had completed it (nothing counted)."""
        keys = [_key(job, "meta"), _key(job, "chunks")]
        return bool(self._complete_chunk(keys=keys, args=[chunk, ok, failed, self.ttl_s]))

    def bind_model(self, job: str, model_key: str) -> str | None:
        """The model a job's records come from (`Manifest.model_key`): the first worker to take
        one of its chunks binds it to its own. Returns the job's, or None for no such job."""
        answer = self._bind_model(keys=[_key(job, "meta")], args=[model_key])
        return None if answer is None else answer.decode()

    def note_other_model(self, job: str, message: str) -> None:
        """Keep why a worker gave a chunk back (it serves another model than the job's), for
        `kiln status` and `wait` to show, until a worker of the job's model takes a chunk."""
        self.redis.hset(_key(job, "meta"), "other_model", message[:2000])

    def note_sink_error(self, job: str, message: str) -> None:
        """Keep why a worker gave a sharded chunk back unwritten (out_dir unwritable, store down,
        pyarrow missing), for the producer to show; the next shard written clears it."""
        self.redis.hset(_key(job, "meta"), "sink_error", message[:2000])

    def sink(self, job: str) -> str | None:
        """The out_dir of a sharded job; None for a job that keeps its records in Redis (or none)."""
        return self.output(job)[0]

    def output(self, job: str) -> tuple[str | None, int | None]:
        """(out_dir, topk) of a sharded job; (None, topk or None) for a job that keeps its records in Redis."""
        out_dir, topk = self.redis.hmget(_key(job, "meta"), ["sink", "topk"])
        return (None if out_dir is None else out_dir.decode()), (None if topk is None else int(topk))

    def unregister(self, job: str, keys: Sequence[str]) -> None:
        """Take images out of a job again (those a failed submission registered but never enqueued)."""
        if keys:
            self._unregister(keys=[_key(job, "meta"), _key(job, "items")], args=list(keys))

    def forget_failed(self, job: str, keys: Sequence[str]) -> list[str]:
        """Delete the error records (and their `failed` count) of those `keys` that have one, in
        one script call, so that they count as unfinished until retried; return those keys."""
        if not keys:
            return []
        meta_records_status = [_key(job, part) for part in ("meta", "records", "status")]
        return [key.decode() for key in self._forget_failed(keys=meta_records_status, args=list(keys))]

    def registered_refs(self, job: str, keys: Sequence[str]) -> list[str | None]:
        """The reference the job holds for each key (None where it holds none), in order."""
        raw = self.redis.hmget(_key(job, "items"), list(keys)) if keys else []
        return [None if ref is None else ref.decode() for ref in raw]

    def statuses(self, job: str, keys: Sequence[str]) -> list[str | None]:
        """ "ok", "error" or None (no record yet) for each key, in order."""
        raw = self.redis.hmget(_key(job, "status"), list(keys)) if keys else []
        return [None if status is None else status.decode() for status in raw]

    def online_refusals(self, targets: Sequence[tuple[str, str]]) -> list[str | None]:
        """For (job, key) pairs that online requests want to write: why each is refused, or None.

        A job accepts online writes only if it was created with `online` (see `register`), and
        only for keys it holds: a message cannot write into someone else's bulk job."""
        with self.redis.pipeline(transaction=False) as pipe:
            for job, key in targets:
                pipe.hget(_key(job, "meta"), "online").hexists(_key(job, "items"), key)
            answers = pipe.execute()
        refusals: list[str | None] = []
        for (job, key), online, holds in zip(targets, answers[::2], answers[1::2], strict=True):
            if online != b"1":
                refusals.append(f"job {job} does not accept online requests (create it with online=True)")
            elif not holds:
                refusals.append(f"job {job} holds no image key {key!r} (register it with Kiln.classify(job=, key=))")
            else:
                refusals.append(None)
        return refusals

    def write(self, records: Sequence[Record]) -> list[tuple[str, str]]:
        """Upsert records: one round trip for a whole batch, whatever the jobs. Returns the
        (job, key) pairs refused, not written: keys their job does not hold."""
        by_job: dict[str, list[str]] = defaultdict(list)
        for record in records:
            by_job[record.job] += [record.key, record.status, record.model_dump_json(exclude_none=True)]
        with self.redis.pipeline(transaction=False) as pipe:
            for job, args in by_job.items():
                # The job's images (KEYS[4]) expire with its records, which the script refreshes.
                keys = [_key(job, "meta"), _key(job, "records"), _key(job, "status"), _key(job, "items")]
                self._upsert(keys=keys, args=[self.ttl_s, *args], client=pipe)
            refused = pipe.execute()
        return [(job, key.decode()) for job, keys in zip(by_job, refused, strict=True) for key in keys]

    def counts(self, job: str) -> JobCounts:
        """The job's counters, Redis-store or sharded (where `listed` says whether total is final)."""
        raw, alive, stopped, lapsed = self._listing_state(
            keys=[_key(job, "meta"), _key(job, "listers")], args=[_key(job, "lister:"), LISTER_TTL_S + LAPSE_GRACE_S]
        )
        meta = dict(zip(raw[::2], raw[1::2], strict=True))
        total, done, failed = (int(meta.get(k, 0)) for k in (b"total", b"done", b"failed"))
        if alive:
            listing = "running"
        elif stopped:
            listing = "stopped"
        elif lapsed or meta.get(b"listing") == b"open":  # open with no submission: one of an older kiln
            listing = "lapsed"
        else:
            listing = "done"
        names = ("sink_error", "model", "other_model")
        text = {name: value.decode() for name in names if (value := meta.get(name.encode())) is not None}
        return JobCounts(total, done, failed, listing, **text)

    def exists(self, job: str) -> bool:
        return bool(self.redis.exists(_key(job, "meta")))

    def recorded_keys(self, job: str, include_failed: bool = True) -> set[str]:
        """Keys of the images that have a record (only the successes, with include_failed=False)."""
        return {
            key.decode()
            for key, status in self.redis.hscan_iter(_key(job, "status"), count=1000)
            if include_failed or status == b"ok"
        }

    def failure_kinds(self, job: str, limit: int) -> Counter[str]:
        """Error kinds of the first `limit` failed images found in a Redis-store job (empty for a
        sharded job: its records are in its shards). Reads their records only, not the job's."""
        failed = []
        for key, status in self.redis.hscan_iter(_key(job, "status"), count=1000):
            if len(failed) >= limit:
                break
            if status == b"error":
                failed.append(key)
        raws = self.redis.hmget(_key(job, "records"), failed) if failed else []
        return Counter(Record.model_validate_json(raw).error.kind for raw in raws if raw is not None)

    def records(self, job: str) -> Iterator[Record]:
        for _, raw in self.redis.hscan_iter(_key(job, "records"), count=1000):
            yield Record.model_validate_json(raw)

    def records_page(self, job: str, cursor: int = 0, count: int = 1000) -> tuple[int, list[Record]]:
        """One HSCAN page of a job's records: (next cursor, records); the cursor is 0 at the end.
        A cursor stays valid across reconnects, so a reader can retry a page and go on."""
        cursor, page = self.redis.hscan(_key(job, "records"), cursor, count=count)
        return cursor, [Record.model_validate_json(raw) for raw in page.values()]

    def get(self, job: str, key: str) -> Record | None:
        raw = self.redis.hget(_key(job, "records"), key)
        return None if raw is None else Record.model_validate_json(raw)

    def deliveries(self, job: str) -> int:
        """How many chunk tasks of the job workers have taken so far (entries in its delivery hash)."""
        return int(self.redis.hlen(_key(job, "delivery")))

    def delivery(self, job: str, task_id: str) -> Delivery | None:
        raw = self.redis.hget(_key(job, "delivery"), task_id)
        if raw is None:
            return None
        if raw == b"done":
            return Delivery(done=True)
        holder, _, deaths = raw.decode().rpartition("|")
        return Delivery(holder=holder, deaths=int(deaths))

    def claim(self, job: str, task_id: str, worker: str, seen: Delivery | None, died: bool) -> Delivery | None:
        """Make `worker` the chunk's holder, if its entry is still `seen`; count a death if `died`.
        Returns the new entry (`done` if the chunk was finished meanwhile), or None on a conflict."""
        keys = [_key(job, "delivery"), _key(job, "executions")]
        args = [task_id, worker, seen.holder if seen else "", int(died), max(self.ttl_s, DELIVERY_TTL_S)]
        state, deaths = self._claim(keys=keys, args=args)
        if state == b"conflict":
            return None
        return Delivery(done=state == b"done", holder=worker, deaths=int(deaths))

    def orphaned_chunks(self, job: str) -> int:
        """Chunks of the job that a worker holds by its delivery entry but no longer runs: its
        heartbeat (`worker.lease`) expired or names other tasks, so it was killed or lost its
        host. They run again once their lease lapses. One pass over the job's delivery entries."""
        from worker.lease import heartbeat_key  # worker.lease imports Celery: not at this module's import

        held = []
        for task_id, raw in self.redis.hscan_iter(_key(job, "delivery"), count=1000):
            holder = raw.decode().rpartition("|")[0] if raw != b"done" else ""
            if holder:
                held.append((task_id, holder))
        if not held:
            return 0
        beats = self.redis.mget([heartbeat_key(holder) for _, holder in held])
        return sum(beat is None or task_id not in beat.split() for (task_id, _), beat in zip(held, beats, strict=True))

    def release(self, job: str, task_id: str, deaths: int) -> None:
        """Give a chunk up unfinished and alive (it goes back to the queue): no holder, no death."""
        self.redis.hset(_key(job, "delivery"), task_id, f"|{deaths}")

    def finish(self, job: str, task_id: str) -> None:
        """Mark a chunk done: its records are written, so a later delivery is acknowledged unrun."""
        self.redis.hset(_key(job, "delivery"), task_id, "done")

    def executions(self, job: str) -> dict[str, int]:
        """Chunk task id -> times it started running."""
        return {k.decode(): int(v) for k, v in self.redis.hgetall(_key(job, "executions")).items()}

    def dead_letter(self, entry: dict[str, Any]) -> None:
        """Keep a message that names no job or caller, with its reason (the last 1,000)."""
        raw = json.dumps(entry, default=repr)[:65536]
        with self.redis.pipeline() as pipe:
            pipe.lpush(DEAD_LETTERS, raw).ltrim(DEAD_LETTERS, 0, 999).execute()

    def count_deliveries(self, job: str, task_ids: Sequence[str]) -> list[int]:
        """Count one more delivery of each task (online requests); counts survive worker deaths."""
        delivery = _key(job, "delivery")
        with self.redis.pipeline() as pipe:
            for task_id in task_ids:
                pipe.hincrby(delivery, task_id, 1)
            pipe.expire(delivery, max(self.ttl_s, 24 * 3600))
            return [int(n) for n in pipe.execute()[:-1]]

    def reply(self, answers: Iterable[tuple[str, Record]]) -> list[tuple[str, Exception]]:
        """Answer online requests: push each record on its caller's reply list, each push on its
        own, so one bad reply key costs only its own answer. Returns (reply_to, error) for each
        answer not delivered; only kiln's reply keys (`kiln:reply:<id>`) are ever written. Raises
        redis.RedisError when the whole round trip fails."""
        answers = list(answers)
        failed: list[tuple[str, Exception]] = [
            (to, ValueError("not a kiln reply key")) for to, _ in answers if not is_reply_key(to)
        ]
        valid = [(to, record) for to, record in answers if is_reply_key(to)]
        with self.redis.pipeline(transaction=False) as pipe:
            for reply_to, record in valid:
                self._reply(keys=[reply_to], args=[record.model_dump_json(exclude_none=True), REPLY_TTL_S], client=pipe)
            outcomes = pipe.execute(raise_on_error=False) if valid else []
        failed += [(to, out) for (to, _), out in zip(valid, outcomes, strict=True) if isinstance(out, Exception)]
        return failed

    def wait_reply(self, reply_to: str, timeout_s: float) -> Record | None:
        """Wait up to `timeout_s` for the answer on `reply_to`; None if none came.

        The wait is a series of short BLPOPs, so a timeout of any length works with the client's
        socket timeout (redis-py's default is 5 s, and a BLPOP longer than it fails)."""
        socket_timeout = self.redis.connection_pool.connection_kwargs.get("socket_timeout")
        longest = min(_REPLY_POLL_S, socket_timeout / 2) if socket_timeout else _REPLY_POLL_S
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0.001:
            popped = self.redis.blpop([reply_to], timeout=min(left, longest))
            if popped is not None:
                return Record.model_validate_json(popped[1])
        return None
