"""The data-path plan (worker/plan.py): defaults sized to the host and the device."""

from __future__ import annotations

import importlib.util
import logging
import os

import pytest
import torch
from pydantic import ValidationError

from worker.manifest import PackageError
from worker.plan import (
    ONLINE_FLUSHES,
    choose_gpu_decoder,
    gpu_decode_processes,
    host_cores,
    plan_data_path,
    quota_cores,
    worker_processes,
)
from worker.settings import WorkerSettings


def test_a_gpu_worker_runs_torch_on_one_cpu_thread_and_decodes_in_processes():
    """No GPU is needed to plan for one: with GPU decoding off, nothing touches the device."""
    settings = WorkerSettings(_env_file=None, gpu_decode="off")
    plan = plan_data_path(settings, torch.device("cuda:0"), batch_max=256, processes=1)
    assert plan.torch_threads == 1
    assert plan.decode_processes == max(1, host_cores() - 3)
    assert plan.tasks_in_flight == 8
    assert "1 torch thread," in plan.describe()


def test_the_plan_says_how_threads_wait_for_the_gpu():
    """KILN_GPU_WAIT: spin by default (quicker on small images, worker/gpu_wait.py), block when
    asked; a CPU worker waits for no GPU, and its plan line says nothing of it."""
    spin = plan_data_path(WorkerSettings(_env_file=None, gpu_decode="off"), torch.device("cuda:0"), 256, 1)
    assert "threads spin while waiting for the GPU" in spin.describe()
    block = WorkerSettings(_env_file=None, gpu_decode="off", gpu_wait="block")
    assert "threads block while waiting" in plan_data_path(block, torch.device("cuda:0"), 256, 1).describe()
    assert "waiting" not in plan_data_path(WorkerSettings(_env_file=None), torch.device("cpu"), 64, 1).describe()
    with pytest.raises(ValidationError):
        WorkerSettings(_env_file=None, gpu_wait="yield")


def test_blocking_while_waiting_is_a_no_op_without_an_nvidia_driver():
    """On a host with no driver (CI), nothing waits for a GPU: no error, nothing to say. On the
    H200, bench/gpu.py's workers started with it (bench/results/gpu-h200-camera-fix.log)."""
    from worker.gpu_wait import block_while_waiting

    if torch.cuda.is_available():
        pytest.skip("this host has an NVIDIA driver")
    assert block_while_waiting() is None


def test_a_cpu_worker_gives_torch_its_share_of_the_cores():
    settings = WorkerSettings(_env_file=None)
    plan = plan_data_path(settings, torch.device("cpu"), batch_max=64, processes=1)
    assert plan.torch_threads == host_cores() and plan.decode_processes == 0
    two = plan_data_path(settings, torch.device("cpu"), batch_max=64, processes=2)
    assert two.torch_threads == max(1, host_cores() // 2)


def test_settings_override_the_plan():
    settings = WorkerSettings(_env_file=None, gpu_decode="off", threads=4, decode_processes=2, batch_size=32)
    plan = plan_data_path(settings, torch.device("cuda:0"), batch_max=256, processes=1)
    assert (plan.torch_threads, plan.decode_processes, plan.batch_size) == (4, 2, 32)


def test_online_batches_get_task_threads_that_bulk_chunks_never_take():
    """Celery runs as many task threads as the plan says: the reserved bulk chunks', and for a
    worker that serves the online queue, ONLINE_FLUSHES more (tests/test_online.py runs it)."""
    both = plan_data_path(WorkerSettings(_env_file=None), torch.device("cpu"), batch_max=64, processes=1)
    assert both.task_threads == both.tasks_in_flight + ONLINE_FLUSHES and "4 online batches" in both.describe()
    bulk = WorkerSettings(_env_file=None, queues=["kiln.bulk"])
    assert plan_data_path(bulk, torch.device("cpu"), batch_max=64, processes=1).task_threads == both.tasks_in_flight


def test_a_gpu_host_runs_several_worker_processes_per_gpu_sized_to_its_cores():
    """The figures behind these defaults are in worker/plan.py (best of 1-6 processes on the H200)."""
    default = WorkerSettings(_env_file=None)
    assert worker_processes(default, "cuda", gpus=1, cores=16) == 4
    assert worker_processes(default, "cuda", gpus=2, cores=32) == 8
    assert worker_processes(default, "cuda", gpus=1, cores=8) == 2
    assert worker_processes(default, "cuda", gpus=2, cores=4) == 2  # one per GPU at least
    assert worker_processes(default, "cuda", gpus=1, cores=128) == 4  # at most 4 per GPU
    assert worker_processes(default, "cpu", gpus=0, cores=16) == 1
    assert worker_processes(WorkerSettings(_env_file=None, processes_per_gpu=2), "cuda", gpus=3, cores=16) == 6
    assert worker_processes(WorkerSettings(_env_file=None, concurrency=3), "cuda", gpus=2, cores=32) == 3
    assert worker_processes(WorkerSettings(_env_file=None, concurrency=2), "cpu", gpus=0, cores=16) == 2


def test_gpu_worker_processes_share_the_cores_left_for_decoding():
    assert [gpu_decode_processes(16, n) for n in (1, 2, 3, 4, 6)] == [13, 6, 4, 3, 1]
    assert gpu_decode_processes(32, 8) == 3
    assert gpu_decode_processes(2, 4) == 1  # never none


def test_a_containers_cpu_quota_caps_the_cores_planned_for():
    """`docker run --cpus 2.5` or a Kubernetes limit of 2500m on a 64-core node: plan for 3 cores,
    not 64 (the affinity still lists them all)."""
    assert quota_cores("250000 100000\n") == 3
    assert quota_cores("200000 100000") == 2
    assert quota_cores("50000 100000") == 1
    assert quota_cores("max 100000\n") is None
    assert 1 <= host_cores() <= len(os.sched_getaffinity(0))


@pytest.mark.skipif(importlib.util.find_spec("nvidia.nvimgcodec") is not None, reason="nvImageCodec is installed")
def test_a_cuda_worker_without_nvimagecodec_says_so_and_decodes_on_the_cpu(caplog):
    """KILN_GPU_DECODER=nvimgcodec where `kiln[gpu]` is not installed: auto logs why and plans the
    CPU decoders; on refuses to start, saying what to install. Nothing touches a GPU."""
    settings = WorkerSettings(_env_file=None, gpu_decoder="nvimgcodec")
    with caplog.at_level(logging.WARNING, logger="worker.plan"):
        plan = plan_data_path(settings, torch.device("cuda:0"), batch_max=256, processes=1)
    assert not plan.gpu_decode and plan.decode_processes >= 1
    assert "pip install 'kiln[gpu]'" in caplog.text and "decoding on the CPU" in caplog.text
    strict = WorkerSettings(_env_file=None, gpu_decoder="nvimgcodec", gpu_decode="on")
    with pytest.raises(PackageError, match=r"KILN_GPU_DECODE=on.*pip install 'kiln\[gpu\]'"):
        plan_data_path(strict, torch.device("cuda:0"), batch_max=256, processes=1)


def test_an_unknown_gpu_decoder_is_refused_with_the_choices():
    with pytest.raises(ValidationError, match=r"torchvision.*nvimgcodec"):
        WorkerSettings(_env_file=None, gpu_decoder="dali")


def test_the_gpu_decoder_auto_takes_nvimagecodec_only_where_installed_and_the_gpu_has_several_processes(
    monkeypatch,
):
    """Explicit choices stand; `auto` weighs nvImageCodec's exact pixels and its speed in several
    processes against its GIL use in one (the figures are in `choose_gpu_decoder`)."""
    assert choose_gpu_decoder("torchvision", 4) == "torchvision"
    assert choose_gpu_decoder("nvimgcodec", 1) == "nvimgcodec"
    installed = importlib.util.find_spec("nvidia.nvimgcodec") is not None
    assert choose_gpu_decoder("auto", 4) == ("nvimgcodec" if installed else "torchvision")
    assert choose_gpu_decoder("auto", 1) == "torchvision"
    # The other branch of this host: what a GPU host with `kiln[gpu]` installed (or without) chooses.
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if installed else object())
    assert choose_gpu_decoder("auto", 4) == ("torchvision" if installed else "nvimgcodec")
    assert choose_gpu_decoder("auto", 1) == "torchvision"


def test_gpu_decoding_asked_of_a_cpu_package_is_refused_or_noted(caplog):
    """KILN_GPU_DECODE=on refuses to start, as it does where a GPU decoder cannot start; a GPU
    decoder named for a CPU package is noted in the log, not silently dropped."""
    with pytest.raises(PackageError, match=r"KILN_GPU_DECODE=on, but the package runs on cpu"):
        plan_data_path(WorkerSettings(_env_file=None, gpu_decode="on"), torch.device("cpu"), 64, 1)
    with caplog.at_level(logging.WARNING, logger="worker.plan"):
        plan = plan_data_path(WorkerSettings(_env_file=None, gpu_decoder="nvimgcodec"), torch.device("cpu"), 64, 1)
    assert not plan.gpu_decode and "KILN_GPU_DECODER=nvimgcodec has no effect" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="worker.plan"):
        plan_data_path(WorkerSettings(_env_file=None), torch.device("cpu"), 64, 1)
    assert caplog.text == ""  # the defaults say nothing
