"""kiln needs a Redis that never evicts: with any other `maxmemory-policy`, a full Redis drops
keys without a word, and with them records, counters, the job's images and queued chunks. Every
key of a job has a TTL, so the `volatile-*` policies (volatile-lru is ElastiCache's default)
evict exactly kiln's data. Workers and producers therefore check the policy when they start and
refuse an evicting Redis, unless told to run anyway (`KILN_ALLOW_EVICTING_REDIS`).
"""

from __future__ import annotations

import logging

import redis

from worker.retry import is_transient

log = logging.getLogger(__name__)

SAFE_POLICY = "noeviction"


class EvictingRedis(ValueError):
    """Redis's maxmemory-policy lets it evict kiln's keys: a setting to change."""


def check_eviction_policy(client: redis.Redis, allow: bool) -> str | None:
    """Read `maxmemory-policy` and raise EvictingRedis unless it is `noeviction` or `allow`.

    Returns the policy, or None where Redis refuses CONFIG (managed services, ACLs): that is
    logged once, as a warning, and the caller goes on. Transient errors (Redis not up yet)
    propagate, for the caller to retry."""
    try:
        reply = client.config_get("maxmemory-policy")
    except redis.ResponseError as e:
        if is_transient(e):
            raise
        log.warning(
            "could not read Redis's maxmemory-policy (CONFIG refused: %s); make sure it is %s, or kiln's data "
            "may be evicted when Redis is full",
            e, SAFE_POLICY,
        )  # fmt: skip
        return None
    raw = next(iter(reply.values()), b"") if reply else b""
    policy = raw.decode() if isinstance(raw, bytes) else str(raw)
    if policy == SAFE_POLICY:
        return policy
    message = (
        f"Redis's maxmemory-policy is {policy}: when full it evicts keys, and kiln's records, counters and "
        f"queued work vanish without an error. Set maxmemory-policy to {SAFE_POLICY} (redis.conf, "
        f"`CONFIG SET maxmemory-policy {SAFE_POLICY}`, or your provider's parameter group)"
    )
    if not allow:
        raise EvictingRedis(f"{message}, or set KILN_ALLOW_EVICTING_REDIS=true to run anyway")
    log.warning("%s. Running anyway: KILN_ALLOW_EVICTING_REDIS is set", message)
    return policy
