"""Producer settings (`KILN_*` variables or `.env`), on top of what producers and workers share."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from worker.settings import CommonSettings


def _cache_dir() -> Path:
    return Path.home() / ".cache" / "kiln"


def default_model_path() -> Path:
    """Where the embedded mode keeps the default package: one per torch release, since a package
    only loads on the torch it was built with (read from the metadata: no torch import here)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        torch_version = version("torch").split("+")[0]
    except PackageNotFoundError:
        torch_version = "none"
    return _cache_dir() / "models" / f"efficientnet_lite0-cpu-float32-torch{torch_version}.pt2"


class ProducerSettings(CommonSettings):
    chunk_size: int = Field(default=128, ge=1, le=100_000, description="images per bulk task message")
    max_pending_chunks: int = Field(
        default=64,
        ge=1,
        description="backpressure: `submit` pauses while the bulk queue holds this many chunks or more",
    )
    poll_interval_s: float = Field(
        default=0.25, gt=0, le=60, description="how often `wait` reads a job's counters, in seconds"
    )
    online_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description="how long `classify` waits for its answer: longer than the workers' KILN_FETCH_TIMEOUT_S "
        "(30 s), so that a reference that times out there comes back as its fetch_failed record",
    )
    max_inline_bytes: int = Field(
        default=32 * 1024 * 1024,
        ge=1,
        description="largest image `classify` sends inline; keep it at most the workers' KILN_MAX_IMAGE_BYTES",
    )
    redis_retry_s: float = Field(
        default=60.0,
        ge=0,
        description="how long a call with no timeout of its own keeps retrying a Redis that does not answer",
    )
    redis_timeout_s: float = Field(
        default=10.0, gt=0, description="socket timeout of one Redis command (a paused Redis fails after this long)"
    )
    data_dir: Path = Field(
        default_factory=lambda: _cache_dir() / "embedded",
        description="embedded mode: where its Redis keeps results between runs (so a job can resume)",
    )
    model: Path | None = Field(
        default=None,
        description="embedded mode: the package its local worker serves; default: EfficientNet-Lite0, "
        "compiled on first use into the cache folder",
    )
