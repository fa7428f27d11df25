"""kiln's producer side: enqueue jobs, follow them, read and export results. Imports no torch."""

from producer.client import JobNotFound, JobTimeout, Kiln, ListingStopped, SubmitIncomplete, SubmittedJob
from producer.enqueue import SubmitTimeout
from producer.faults import RedisUnavailable
from producer.progress import JobProgress
from producer.sources import Expansion, SourceError, expand, iter_items
from worker.contract import Item, Record
from worker.settings import EnvFileError
from worker.store import JobConflict

__all__ = [
    "EnvFileError",
    "Expansion",
    "Item",
    "JobConflict",
    "JobNotFound",
    "JobProgress",
    "JobTimeout",
    "Kiln",
    "ListingStopped",
    "Record",
    "RedisUnavailable",
    "SourceError",
    "SubmitIncomplete",
    "SubmitTimeout",
    "SubmittedJob",
    "expand",
    "iter_items",
]
