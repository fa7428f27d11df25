"""The result store: one record per (job, image) in Redis, written as an idempotent upsert.

Keys of a job share the hash tag `{job}`, so they live on one Redis Cluster slot and one Lua
script can update them together:

    kiln:{job}:meta      hash: total, done, failed, created_at, ...
    kiln:{job}:records   hash: image key -> record JSON
    kiln:{job}:status    hash: image key -> "ok" | "error"   (what the counters count)
    kiln:{job}:delivery  hash: task id -> deliveries so far  (the poison-message cap)
    kiln:reply:{id}      list: the answer to one online request

A record is written with its counters in one script call, so a redelivered task rewrites its
records without counting them twice, and a success is never replaced by a later failure.
This module imports no torch: producers read through it too.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import redis

from worker.contract import Record

_UPSERT = """
local ttl = tonumber(ARGV[1])
for i = 2, #ARGV, 3 do
  local key, status, record = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local old = redis.call('HGET', KEYS[3], key)
  if not (old == 'ok' and status == 'error') then
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
"""

REPLY_TTL_S = 300


def _key(job: str, part: str) -> str:
    return f"kiln:{{{job}}}:{part}"


def reply_key(request_id: str) -> str:
    return f"kiln:reply:{request_id}"


@dataclass(frozen=True)
class JobCounts:
    total: int
    done: int
    failed: int

    @property
    def finished(self) -> int:
        return self.done + self.failed

    @property
    def complete(self) -> bool:
        return self.total > 0 and self.finished >= self.total


class ResultStore:
    """Records and counters of jobs in one Redis. Thread-safe (redis-py's pool)."""

    def __init__(self, client: redis.Redis, ttl_s: int = 0) -> None:
        self.redis = client
        self.ttl_s = ttl_s
        self._upsert = client.register_script(_UPSERT)

    @classmethod
    def from_url(cls, url: str, ttl_s: int = 0) -> ResultStore:
        return cls(redis.Redis.from_url(url, health_check_interval=30), ttl_s)

    def begin_job(self, job: str, total: int, **info: str | int) -> None:
        """Record a job's size (the whole job, also when resumed) and what it was started with."""
        meta = _key(job, "meta")
        with self.redis.pipeline() as pipe:
            pipe.hsetnx(meta, "created_at", time.time())
            pipe.hset(meta, mapping={"total": total, **info})
            for part in ("done", "failed"):
                pipe.hincrby(meta, part, 0)
            if self.ttl_s:
                for part in ("meta", "records", "status"):
                    pipe.expire(_key(job, part), self.ttl_s)
            pipe.execute()

    def write(self, records: Sequence[Record]) -> None:
        """Upsert records: one round trip for a whole batch, whatever the jobs."""
        by_job: dict[str, list[str]] = defaultdict(list)
        for record in records:
            by_job[record.job] += [record.key, record.status, record.model_dump_json(exclude_none=True)]
        with self.redis.pipeline(transaction=False) as pipe:
            for job, args in by_job.items():
                keys = [_key(job, "meta"), _key(job, "records"), _key(job, "status")]
                self._upsert(keys=keys, args=[self.ttl_s, *args], client=pipe)
            pipe.execute()

    def counts(self, job: str) -> JobCounts:
        meta = self.redis.hgetall(_key(job, "meta"))
        return JobCounts(*(int(meta.get(k, 0)) for k in (b"total", b"done", b"failed")))

    def exists(self, job: str) -> bool:
        return bool(self.redis.exists(_key(job, "meta")))

    def recorded_keys(self, job: str, include_failed: bool = True) -> set[str]:
        """Keys of the images that have a record (only the successes, with include_failed=False)."""
        return {
            key.decode()
            for key, status in self.redis.hscan_iter(_key(job, "status"), count=1000)
            if include_failed or status == b"ok"
        }

    def records(self, job: str) -> Iterator[Record]:
        for _, raw in self.redis.hscan_iter(_key(job, "records"), count=1000):
            yield Record.model_validate_json(raw)

    def get(self, job: str, key: str) -> Record | None:
        raw = self.redis.hget(_key(job, "records"), key)
        return None if raw is None else Record.model_validate_json(raw)

    def count_delivery(self, job: str, task_id: str) -> int:
        """Count one more delivery of a task; the count survives worker deaths (it is in Redis)."""
        return self.count_deliveries(job, [task_id])[0]

    def count_deliveries(self, job: str, task_ids: Sequence[str]) -> list[int]:
        """`count_delivery` for many tasks of one job, in one round trip."""
        delivery = _key(job, "delivery")
        with self.redis.pipeline() as pipe:
            for task_id in task_ids:
                pipe.hincrby(delivery, task_id, 1)
            pipe.expire(delivery, max(self.ttl_s, 24 * 3600))
            return [int(n) for n in pipe.execute()[:-1]]

    def reply(self, answers: Iterable[tuple[str, Record]]) -> None:
        """Answer online requests: push each record on its caller's reply list."""
        with self.redis.pipeline(transaction=False) as pipe:
            for reply_to, record in answers:
                pipe.rpush(reply_to, record.model_dump_json(exclude_none=True))
                pipe.expire(reply_to, REPLY_TTL_S)
            pipe.execute()

    def wait_reply(self, reply_to: str, timeout_s: float) -> Record | None:
        popped = self.redis.blpop([reply_to], timeout=timeout_s)
        return None if popped is None else Record.model_validate_json(popped[1])
