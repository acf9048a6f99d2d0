"""The device an encode runs on: its precision, the memory it offers, and which errors are its own.

Out of memory is a fact about one attempt (the batch was too large, or another process held memory), so callers
split and retry, and never record it as a property of the image. Any other device error (an illegal address, a
launch failure) leaves the CUDA context unusable, so the process must end and be replaced.
"""
import gc
import os

import torch

GPU_MEMORY_SHARE = 0.8  # of the GPU's free memory: the caching allocator's fragmentation needs the rest
CPU_MEMORY_SHARE = 0.5  # of the machine's available memory: other workers and the OS share it


class DeviceError(RuntimeError):
    """A device that cannot be used as asked: the message is one line that names it and the cause."""


def resolve(device: str | torch.device | None = None) -> torch.device:
    """torch.device for `device` (a name such as "cpu" or "cuda:1"), or CUDA where torch can use it, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise DeviceError(f"device {device!r}: not a device name such as cpu, cuda or cuda:1") from None
    if device.type == "cuda":
        reason = cuda_unusable_reason()
        if reason:
            raise DeviceError(f"device {device}: {reason}")
        if (device.index or 0) >= torch.cuda.device_count():
            raise DeviceError(f"device {device}: there are {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise DeviceError(f"device {device}: mrnet runs on cpu or cuda")
    return device


def use_full_precision() -> None:
    """IEEE fp32 for CUDA matrix products and cuDNN convolutions (the pyramid's blur, SSIM).

    TF32 keeps 10 mantissa bits: inside sin(30 x) that is a visible phase error, and cuDNN convolutions use TF32 by
    default. Entry points (the command line, the Ray workers) call this; a benchmark may choose otherwise.
    """
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    torch.backends.cudnn.conv.fp32_precision = "ieee"


def available_memory(device: str | torch.device | None) -> int:
    """Bytes an encode may use on `device` now: a share of the GPU's free memory, or of the machine's."""
    device = resolve(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0] * GPU_MEMORY_SHARE)
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * CPU_MEMORY_SHARE)


def cuda_unusable_reason() -> str | None:
    """Why torch cannot use a CUDA device here, in a phrase; None when it can."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no usable GPU: is the driver too old?"
    return None


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is an allocation that failed: CUDA's out-of-memory, or the CPU allocator's."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "can't allocate memory" in str(error)


def is_device_fault(error: BaseException) -> bool:
    """Whether `error` is a device failure other than out of memory, after which the device is unusable."""
    return isinstance(error, torch.AcceleratorError) and not is_out_of_memory(error)


def release(device: str | torch.device | None) -> None:
    """Return what a failed attempt held: its tensors to the allocator, and cached GPU blocks to the device."""
    gc.collect()
    if resolve(device).type == "cuda":
        torch.cuda.empty_cache()
