"""Resource requests that pin an expert worker to one device (pure; no Ray started)."""

import pytest

from actors.experts.worker.spec import worker_options


def test_cuda_worker_asks_for_a_gpu():
    opts = worker_options("cuda", num_gpus=1, num_cpus=1)
    assert opts["num_gpus"] == 1 and "resources" not in opts


def test_fractional_gpu_for_small_gpus_and_tests():
    assert worker_options("cuda", num_gpus=0.5)["num_gpus"] == 0.5


def test_npu_worker_asks_for_the_npu_resource():
    opts = worker_options("npu", num_gpus=1)
    assert opts["resources"] == {"NPU": 1} and "num_gpus" not in opts


def test_cpu_worker_asks_for_a_cpu_slot_only():
    opts = worker_options("cpu", num_cpus=0.25)
    assert opts["num_cpus"] == 0.25 and "num_gpus" not in opts and "resources" not in opts


def test_named_worker_is_detached_and_reusable():
    opts = worker_options("cpu", name="moge-expert-w0", namespace="ns")
    assert opts["name"] == "moge-expert-w0" and opts["get_if_exists"] and opts["lifetime"] == "detached"
    assert opts["namespace"] == "ns"


def test_bad_requests_are_rejected():
    with pytest.raises(ValueError):
        worker_options("tpu")
    with pytest.raises(ValueError):
        worker_options("cuda", num_gpus=0)
