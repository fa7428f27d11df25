"""kiln's producer side: enqueue jobs, follow them, read and export results. Imports no torch."""

from producer.client import JobTimeout, Kiln, SubmittedJob
from producer.sources import expand
from worker.contract import Item, Record

__all__ = ["Item", "JobTimeout", "Kiln", "Record", "SubmittedJob", "expand"]
