"""Failures become a stable code and a message a user can act on."""

import errno

import pytest
import torch

from worker.runner import classify_error


@pytest.mark.parametrize("exc", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    MemoryError(),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                 "you tried to allocate 8589934592 bytes. Error code 12 (Cannot allocate memory)"),
])
def test_out_of_memory_is_recognised_and_says_what_to_lower(exc):
    code, message = classify_error(exc)
    assert code == "out_of_memory" and "batch_size" in message


@pytest.mark.parametrize("exc", [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError("failed to write adapter_model.safetensors (os error 28)"),
    OSError(errno.EFBIG, "File too large"),
])
def test_full_disk_is_recognised(exc):
    assert classify_error(exc)[0] == "disk_full"


def test_anything_else_is_internal_without_a_traceback():
    code, message = classify_error(KeyError("boom"))
    assert code == "internal_error" and message == "KeyError: 'boom'" and "Traceback" not in message
