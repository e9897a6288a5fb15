"""Device, precision and process-group set-up for a run."""
from __future__ import annotations

import contextlib
import functools
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_request: str) -> tuple[DistInfo, torch.device]:
    """Join the process group that torchrun describes in the environment (if any) and pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    info = DistInfo(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    device = resolve_device(device_request, info.local_rank if world > 1 else None)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    return info, device


def resolve_device(request: str, local_rank: int | None = None) -> torch.device:
    if request == "auto":
        request = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(request)
    except RuntimeError:
        raise ValueError(f"runtime.device: unknown device {request!r} (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("runtime.device asks for cuda but no GPU is available: use runtime.device=cpu")
        if local_rank is not None and device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def cpu_supports_bf16() -> bool:
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe and probe()) or bool(amx and amx())


def resolve_precision(request: str, device: torch.device) -> str:
    """'auto' -> bf16 where the hardware has it (GPUs with bf16, CPUs with AVX-512 BF16/AMX), else fp32/fp16."""
    if request == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_supports_bf16() else "fp32"
    if request == "fp16" and device.type != "cuda":
        raise ValueError("runtime.precision=fp16 needs a GPU; on the CPU use bf16 or fp32")
    return request


def cpu_name() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what the platform reports."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def describe_machine(precision_request: str = "auto", device_request: str = "auto") -> str:
    """One line for benchmark outputs: the CPU (name, the vector instructions PyTorch uses, bf16
    support), the device and the precision used."""
    device = resolve_device(device_request)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none used"
    return (f"CPU: {cpu_name()} ({torch.backends.cpu.get_cpu_capability()}), AVX-512 BF16 / AMX "
            f"{'yes' if cpu_supports_bf16() else 'no'}, {torch.get_num_threads()} threads; "
            f"GPU: {gpu}; precision {precision_request} -> {resolve_precision(precision_request, device)}")


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
_GLIBC_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # where glibc's dynamic threshold stops rising (64-bit)


@functools.lru_cache(maxsize=1)
def _glibc():
    """The C library when it is glibc (Linux), else None (looked up once: find_library runs ldconfig)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018  (only glibc has it)
        return libc
    except (OSError, AttributeError):
        return None


def reuse_freed_memory(enable: bool = True) -> bool:
    """CPU training: keep freed memory in the process for the next step's tensors.

    glibc's malloc serves every block over 32 MB (a batch of 128 feature maps of 64 x 32 x 32 in
    fp32 is 33.5 MB; ImageNet-sized maps far more) with a fresh ``mmap`` and returns it on free, so
    each such tensor pays a page fault per 4 KB page on first touch, every step: elementwise ops on
    those tensors ran 2.5-6x slower than on reused memory on a 2-core EPYC. Enabled: no ``mmap`` for
    blocks, and the heap is trimmed only when 2 GB lie free at its top (the process keeps up to its
    peak). ``enable=False`` restores glibc's steady state (blocks up to 32 MB reused, larger ones
    mapped). Process-wide; a no-op returning False where the C library is not glibc.
    """
    libc = _glibc()
    if libc is None:
        return False
    if enable:
        settings = {_M_MMAP_MAX: 0, _M_TRIM_THRESHOLD: 2**31 - 1}
    else:
        settings = {_M_MMAP_MAX: 65536, _M_MMAP_THRESHOLD: _GLIBC_MMAP_THRESHOLD_MAX,
                    _M_TRIM_THRESHOLD: 2 * _GLIBC_MMAP_THRESHOLD_MAX}
    return all(libc.mallopt(key, value) == 1 for key, value in settings.items())


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


# What CompiledOrEager compiles with (tests swap in others: "eager" traces without generating code).
COMPILE_BACKEND = "inductor"


class CompiledOrEager(torch.nn.Module):
    """``module`` under ``torch.compile``, falling back to running it eagerly when compiling fails.

    A failure of the compiler (an operation or a model it cannot handle, a backend error, no working
    C++ compiler for the CPU backend) makes this call and every later one run ``module`` as it is;
    ``on_fallback(reason)`` is told once. An error the eager module raises too is the module's own
    and propagates. Where a step breaks into several graphs, those before the failing one have
    already run once for that step (BatchNorm statistics may then move twice in that one step).
    """

    def __init__(self, module: torch.nn.Module, on_fallback=None, backend=None):
        super().__init__()
        self.module = module
        # not a registered submodule: its parameters are the module's own
        object.__setattr__(self, "_compiled", torch.compile(module, backend=backend or COMPILE_BACKEND))
        self.on_fallback = on_fallback or (lambda reason: None)
        self.compiled = True

    def forward(self, *args, **kwargs):
        if self.compiled:
            from torch._dynamo.exc import TorchDynamoException

            try:
                return self._compiled(*args, **kwargs)
            except TorchDynamoException as exc:
                self.compiled = False
                self.on_fallback(_first_line(getattr(exc, "inner_exception", None) or exc))
        return self.module(*args, **kwargs)


def _first_line(exc: BaseException) -> str:
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    name = type(exc).__name__
    return text if text.startswith(name) else f"{name}: {text}"
