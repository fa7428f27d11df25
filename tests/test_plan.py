"""The data-path plan (worker/plan.py): defaults sized to the host and the device."""

from __future__ import annotations

import torch

from worker.plan import host_cores, plan_data_path
from worker.settings import WorkerSettings


def test_a_gpu_worker_runs_torch_on_one_cpu_thread_and_decodes_in_processes():
    """No GPU is needed to plan for one: with GPU decoding off, nothing touches the device."""
    settings = WorkerSettings(_env_file=None, gpu_decode="off")
    plan = plan_data_path(settings, torch.device("cuda:0"), batch_max=256, processes=1)
    assert plan.torch_threads == 1
    assert plan.decode_processes == max(1, host_cores() - 3)
    assert plan.tasks_in_flight == 8
    assert "1 torch thread," in plan.describe()


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
