"""The data-path plan of one worker process: which decoders, how many threads and processes, what
batch size, sized to the host unless the settings say otherwise. Logged in one line at start.

Why these defaults (measured on the H200 host, 16 cores, docs/FACTS.md and bench/results/gpu-h200*.json):
the GPU decodes 640x480 JPEGs about 8x faster than Pillow in 16 processes (19,393 against 2,351
img/s in bench/results/gpu-h200.json), but 4000x3000 JPEGs under 2x as fast as Pillow's DCT-scaled
`draft` decode (1,053 against 584), so a GPU worker runs both.
One worker process's GIL bounds how fast it feeds a GPU (torchvision's batched `decode_jpeg` needs
the GIL once per image), so a GPU gets several worker processes: ResNet-18 on 640x480 JPEGs end to
end, 4,796 img/s with one process (13 decode processes), 6,829 with two (6 each), 7,931 with three
(4 each), 8,622 with four (3 each), 8,048 with four (2 each), 7,564 with six (2 each)
(bench/results/gpu-h200-processes.json). Each worker process keeps a core for its own threads
(fetch and route, GPU decode, model, writes); one process alone keeps 3.
A CUDA worker runs torch with one CPU thread: its model runs on the GPU, and an intra-op pool of
16 threads only contended with the threads that feed the GPU (in-process 640x480 pipeline on the
H200, bench/results/gpu-h200-diag.json: 4,078 img/s with 16 torch threads, 6,165 with 1).
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from worker.contract import ONLINE_QUEUE
from worker.manifest import PackageError
from worker.settings import WorkerSettings

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

RESERVED_CORES = 3  # at least, for the worker processes' own threads: fetch and route, GPU decode, model, writes
CORES_PER_GPU_PROCESS = 4  # a worker process per 4 cores of a GPU's share of the host ...
MAX_PROCESSES_PER_GPU = 4  # ... up to 4: the best of 1, 2, 3, 4 and 6 on the H200 (module docstring); a
# later run had three 8% ahead of four (bench/results/gpu-h200.json), and one in the 16th session five
# 7% ahead and six 3% (bench/results/gpu-h200-small-processes.json): within the runs' spread
ONLINE_FLUSHES = 4  # online batches a worker process runs at once, each on a Celery thread of its own


@dataclass(frozen=True)
class DataPathPlan:
    device: str
    gpu_decode: bool
    gpu_decoder: str  # worker.jpeg_codecs.LIBRARIES
    decode_processes: int
    fetch_threads: int
    torch_threads: int
    batch_size: int
    tasks_in_flight: int
    online_flushes: int  # 0 where the worker does not serve the online queue
    gpu_wait: str = ""  # KILN_GPU_WAIT on a GPU; "" on the CPU

    @property
    def task_threads(self) -> int:
        """Celery's task threads: one per bulk chunk the broker reserves (worker/broker.py caps
        them at `tasks_in_flight`), and `online_flushes` more that bulk chunks never take, so that
        an online batch never waits for a chunk to finish."""
        return self.tasks_in_flight + self.online_flushes

    def describe(self) -> str:
        from worker.jpeg_codecs import LIBRARIES

        decoders = " + ".join(
            part
            for part in (
                f"GPU ({LIBRARIES[self.gpu_decoder]}) for JPEGs" if self.gpu_decode else "",
                f"{self.decode_processes} CPU decode process{'es' if self.decode_processes != 1 else ''}"
                if self.decode_processes
                else "",
                "" if self.decode_processes else f"decoding in the {self.fetch_threads} fetch threads",
            )
            if part
        )
        return (
            f"data path on {self.device}: {decoders}; {self.fetch_threads} fetch threads, batch {self.batch_size}, "
            f"{self.torch_threads} torch thread{'s' if self.torch_threads != 1 else ''}, "
            f"{self.tasks_in_flight} chunk tasks in flight"
            + (f", {self.online_flushes} online batches" if self.online_flushes else "")
            + (f", threads {self.gpu_wait} while waiting for the GPU" if self.gpu_wait else "")
        )


def host_cores() -> int:
    """Cores this process may use: its CPU affinity (taskset, a container's cpuset), capped by the
    cgroup v2 CPU quota of its container (`docker run --cpus`, a Kubernetes CPU limit)."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota = quota_cores(Path("/sys/fs/cgroup/cpu.max").read_text())
    except OSError:  # cgroup v1, or no cgroup file system: the affinity says it all
        quota = None
    return min(cores, quota) if quota else cores


def quota_cores(cpu_max: str) -> int | None:
    """Whole cores a cgroup v2 `cpu.max` ("QUOTA PERIOD" in microseconds, or "max PERIOD") allows,
    rounded up; None without a quota."""
    quota, _, period = cpu_max.strip().partition(" ")
    if quota == "max" or not period:
        return None
    return max(1, math.ceil(int(quota) / int(period)))


def worker_processes(settings: WorkerSettings, device_type: str, gpus: int, cores: int) -> int:
    """Worker processes on a host of `cores`: `concurrency`, else one on the CPU and
    `processes_per_gpu` (default: sized to the cores) for each of the `gpus` a CUDA package uses."""
    if settings.concurrency is not None:
        return settings.concurrency
    if device_type != "cuda":
        return 1
    gpus = max(gpus, 1)
    per_gpu = settings.processes_per_gpu or max(1, min(MAX_PROCESSES_PER_GPU, cores // gpus // CORES_PER_GPU_PROCESS))
    return per_gpu * gpus


def gpu_decode_processes(cores: int, processes: int) -> int:
    """CPU decode processes of each of `processes` GPU worker processes on a host of `cores`: the
    cores left once each worker process has one (three at least, for one alone), shared evenly."""
    return max(1, (cores - max(RESERVED_CORES, processes)) // processes)


def tasks_in_flight(settings: WorkerSettings, device_type: str) -> int:
    """Chunk tasks one worker process runs at once: enough chunks (128 images by default) to keep
    two model batches ahead on a GPU; on the CPU the model is the bottleneck, two suffice."""
    return settings.tasks_in_flight or (8 if device_type == "cuda" else 2)


def choose_gpu_decoder(setting: str, processes_per_gpu: int) -> str:
    """The GPU JPEG decoder (`worker.jpeg_codecs.LIBRARIES`) for KILN_GPU_DECODER=`setting`:
    `auto` takes nvImageCodec where `pip install 'kiln[gpu]'` installed it and the GPU has two
    worker processes or more, else torchvision's nvJPEG.

    Why (the H200, bench/results/gpu-h200-routing.json): nvImageCodec gives the CPU path's own
    pixels (top-1 equal on 1,000 of 1,000 JPEGs, where torchvision's nvJPEG gives 975-977) and
    four worker processes ran faster with it (640x480 12,125 img/s against 11,006; 4000x3000
    1,230 against 1,199; a mixed folder 2,717 against 2,552 in its steady part; 640x480 11,361
    against 10,439 on another host, gpu-h200-worker-variants.json), but its batch
    call takes the GIL back about twice an image, so one process alone ran at 1,717 against 5,872."""
    if setting != "auto":
        return setting
    if processes_per_gpu >= 2 and importlib.util.find_spec("nvidia.nvimgcodec") is not None:
        return "nvimgcodec"
    return "torchvision"


def plan_data_path(settings: WorkerSettings, device: torch.device, batch_max: int, processes: int) -> DataPathPlan:
    """The plan for one of `processes` worker processes on this host serving a package whose
    largest batch is `batch_max`. Raises `PackageError` when `gpu_decode="on"` cannot be met."""
    cores = host_cores()
    share = max(1, cores // processes)
    cuda = device.type == "cuda"
    gpu_decode, gpu_decoder = False, "torchvision"
    if cuda and settings.gpu_decode != "off":
        gpu_decode, gpu_decoder = _gpu_decoder(settings, device, processes)
    elif not cuda and settings.gpu_decode == "on":
        raise PackageError(f"KILN_GPU_DECODE=on, but the package runs on {device}: use a CUDA package, or unset it")
    elif not cuda and settings.gpu_decoder != "auto":
        log.warning("KILN_GPU_DECODER=%s has no effect: the package runs on %s", settings.gpu_decoder, device)
    if settings.decode_processes is not None:
        decode_processes = settings.decode_processes
    else:
        decode_processes = gpu_decode_processes(cores, processes) if cuda else 0
    return DataPathPlan(
        device=str(device),
        gpu_decode=gpu_decode,
        gpu_decoder=gpu_decoder,
        decode_processes=decode_processes,
        fetch_threads=settings.fetch_threads or (4 if cuda else 2),
        torch_threads=settings.threads or (1 if cuda else share),
        batch_size=min(settings.batch_size or batch_max, batch_max),
        tasks_in_flight=tasks_in_flight(settings, device.type),
        online_flushes=ONLINE_FLUSHES if ONLINE_QUEUE in settings.queues else 0,
        gpu_wait=settings.gpu_wait if cuda else "",
    )


def _gpu_decoder(settings: WorkerSettings, device: torch.device, processes: int) -> tuple[bool, str]:
    """(whether JPEGs are decoded on `device`, by which library): the chosen library where it
    starts; under KILN_GPU_DECODER=auto, torchvision's where nvImageCodec does not; none, with a
    warning (or `PackageError` under KILN_GPU_DECODE=on), where the library asked for does not."""
    import torch

    from worker.gpu_decode import decoder_available

    per_gpu = max(1, processes // max(1, torch.cuda.device_count()))
    library = choose_gpu_decoder(settings.gpu_decoder, per_gpu)
    why_not = decoder_available(device, library)
    if why_not is not None and settings.gpu_decoder == "auto" and library != "torchvision":
        log.warning("nvImageCodec cannot decode JPEGs on %s (%s): decoding them with torchvision's", device, why_not)
        library = "torchvision"
        why_not = decoder_available(device, library)
    if why_not is None:
        return True, library
    if settings.gpu_decode == "on":
        raise PackageError(f"KILN_GPU_DECODE=on, but the GPU decoder cannot decode JPEGs on {device}: {why_not}")
    log.warning("no GPU JPEG decoder on %s (%s): decoding on the CPU", device, why_not)
    return False, library
