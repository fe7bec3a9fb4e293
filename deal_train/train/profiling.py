"""Peak memory of one phase of a run (a task's training, an evaluation, a benchmark repeat), right for the device.

CUDA: ``torch.cuda.reset_peak_memory_stats`` at the start, then ``max_memory_allocated`` (bytes held by tensors)
and ``max_memory_reserved`` (bytes the caching allocator took from the driver; what ``nvidia-smi`` shows minus the
CUDA context) at the end. With ``snapshot_path`` the allocator's history is recorded for the phase
(``torch.cuda.memory._record_memory_history``) and dumped with ``torch.cuda.memory._dump_snapshot``: a pickle that
https://pytorch.org/memory_viz opens (drag and drop), showing every live tensor over time with its stack trace.

CPU: the process's peak resident set size (RSS) during the phase. Linux keeps a high-water mark ``VmHWM`` in
``/proc/self/status``; writing ``5`` to ``/proc/self/clear_refs`` resets it to the current RSS (kernel >= 4.0;
documented in ``man 5 proc``). So a phase is measured as: ``gc.collect()``, glibc ``malloc_trim(0)`` (hands
memory freed by earlier phases back to the kernel, so that the RSS at the start is close to the live data and an
earlier phase's peak does not linger), reset, run, read ``VmHWM``. Measured on the development machine
(kernel 6.18, in a container): the reset works -- after a 300 MiB buffer is freed, VmHWM drops from 313 MiB to the
current 13 MiB, and ``getrusage``'s ``ru_maxrss`` follows it (it reads the same counter while the process lives).
Where the reset is refused (no ``/proc``, a kernel without it), the fallback is ``resource.getrusage``'s
``ru_maxrss``, which cannot be reset: the reported peak is then the process's peak *so far*, an upper bound for the
phase (``MemoryPeak.resettable`` is False and ``source`` says ``ru_maxrss``).

RSS includes everything the process maps: the Python interpreter, torch's libraries (~0.3-0.5 GiB), the model's
weights and the allocator's slack, so compare phases of one process (``delta_bytes``: peak minus RSS at the
start) or methods measured the same way, not RSS with a GPU's ``max_memory_allocated``.

The slack can be large: glibc serves a block below its *dynamic* mmap threshold from the heap, and the threshold
rises (up to 32 MiB) each time a larger mmapped block is freed, so after the first backward pass most activations
live in a heap that fragments and is not handed back. Measured on SmolLM2-135M (batch 4 × 195 tokens, one LoRA
step, RSS above the process before the model was built): 1682 MiB with glibc's defaults, 1336 MiB with a fixed
64 KiB threshold -- the latter equals the tensors' bytes (the analytic estimate of ``deal_train.estimate_memory``
gives 1337 MiB). ``fix_malloc_mmap_threshold()`` (``mallopt(M_MMAP_THRESHOLD, 64 KiB)``, the same as starting the
process with ``MALLOC_MMAP_THRESHOLD_=65536``) makes RSS follow tensor memory; ``deal_train.bench`` calls it on CPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import os
import resource
from dataclasses import asdict, dataclass
from typing import Iterator

import torch

CLEAR_REFS = "/proc/self/clear_refs"
PROC_STATUS = "/proc/self/status"
SNAPSHOT_MAX_ENTRIES = 100_000
"""Allocation events kept by ``_record_memory_history`` (a ring buffer; older events drop out)."""


@dataclass
class MemoryPeak:
    """Peak memory of one phase, in bytes.

    Attributes:
        device: ``cuda`` / ``cuda:N`` or ``cpu``.
        source: how it was measured: ``cuda_allocator``, ``vmhwm`` (reset high-water mark) or ``ru_maxrss``
            (not resettable: peak of the process so far).
        start_bytes: memory at the start of the phase (CUDA: ``memory_allocated``; CPU: current RSS).
        peak_bytes: peak during the phase (CUDA: ``max_memory_allocated``; CPU: peak RSS).
        reserved_peak_bytes: CUDA only, ``max_memory_reserved``; None on CPU.
        resettable: False when the CPU fallback could not reset the peak (then ``peak_bytes`` is an upper bound).
        snapshot: path of the dumped CUDA memory snapshot, if one was written.
    """

    device: str
    source: str
    start_bytes: int = 0
    peak_bytes: int = 0
    reserved_peak_bytes: int | None = None
    resettable: bool = True
    snapshot: str | None = None

    @property
    def delta_bytes(self) -> int:
        """``peak_bytes - start_bytes``: what the phase added on top of what was live when it started."""
        return self.peak_bytes - self.start_bytes

    def to_dict(self) -> dict:
        """All fields plus ``delta_bytes`` (JSON-ready)."""
        return {**asdict(self), "delta_bytes": self.delta_bytes}


def _status_bytes(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in bytes; None where there is no /proc."""
    try:
        with open(PROC_STATUS, encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def current_rss_bytes() -> int:
    """Resident set size of this process now, in bytes (``VmRSS``; falls back to ``ru_maxrss``)."""
    value = _status_bytes("VmRSS")
    return value if value is not None else ru_maxrss_bytes()


def ru_maxrss_bytes() -> int:
    """Peak RSS of this process as ``getrusage`` reports it, in bytes (Linux reports KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (``VmHWM``) to the current RSS by writing ``5`` to
    ``/proc/self/clear_refs``. Returns False where that is not possible (not Linux, no permission)."""
    try:
        with open(CLEAR_REFS, "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak RSS since the last ``reset_peak_rss`` (or process start), in bytes: ``VmHWM``, else ``ru_maxrss``."""
    value = _status_bytes("VmHWM")
    return value if value is not None else ru_maxrss_bytes()


def release_freed_memory() -> None:
    """``gc.collect()`` and, with glibc, ``malloc_trim(0)``: give memory freed by earlier phases back to the
    kernel so that the RSS at the start of the next phase is close to the live data. A no-op elsewhere."""
    gc.collect()
    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim(ctypes.c_size_t(0))
    except (OSError, AttributeError):
        pass


MMAP_THRESHOLD_BYTES = 64 * 1024
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)


def fix_malloc_mmap_threshold(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes (``mallopt(M_MMAP_THRESHOLD, ...)``), which also turns off
    its dynamic adjustment: every block of at least that size is mmapped and returned to the kernel when freed, so
    the process's RSS follows the bytes held by tensors (see the module docstring). Affects allocations made after
    the call. Returns False where glibc is not available (nothing changed)."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        return bool(ctypes.CDLL(name).mallopt(ctypes.c_int(_M_MMAP_THRESHOLD), ctypes.c_int(threshold)))
    except (OSError, AttributeError):
        return False


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


class MemoryProfiler:
    """Context manager that measures the peak memory of the code inside it; the result is ``.result``.

    ``with MemoryProfiler("cuda", snapshot_path="snap.pickle") as prof: train()`` then ``prof.result.peak_bytes``.

    Args:
        device: the device the phase runs on (a ``torch.device`` or a string); ``cuda*`` measures the CUDA
            caching allocator of that device, anything else the process's RSS (see the module docstring).
        snapshot_path: CUDA only: record the allocator history during the phase and dump it to this file
            (open it at https://pytorch.org/memory_viz). Ignored on CPU (``result.snapshot`` stays None).
    Raises:
        RuntimeError: a CUDA device is requested but CUDA is not available.
    """

    def __init__(self, device: torch.device | str = "cpu", snapshot_path: str | None = None):
        self.device = torch.device(device)
        self.snapshot_path = snapshot_path
        self.result: MemoryPeak | None = None
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"MemoryProfiler: device {self.device} requested but CUDA is not available.")

    def __enter__(self) -> "MemoryProfiler":
        if self.device.type == "cuda":
            index = _cuda_index(self.device)
            gc.collect()
            torch.cuda.synchronize(index)
            torch.cuda.reset_peak_memory_stats(index)
            self.result = MemoryPeak(device=str(self.device), source="cuda_allocator",
                                     start_bytes=torch.cuda.memory_allocated(index))
            if self.snapshot_path:
                torch.cuda.memory._record_memory_history(max_entries=SNAPSHOT_MAX_ENTRIES)
        else:
            release_freed_memory()
            resettable = reset_peak_rss()
            self.result = MemoryPeak(device=str(self.device), source="vmhwm" if resettable else "ru_maxrss",
                                     start_bytes=current_rss_bytes(), resettable=resettable)
        return self

    def __exit__(self, *exc) -> None:
        res = self.result
        if self.device.type == "cuda":
            index = _cuda_index(self.device)
            torch.cuda.synchronize(index)
            res.peak_bytes = torch.cuda.max_memory_allocated(index)
            res.reserved_peak_bytes = torch.cuda.max_memory_reserved(index)
            if self.snapshot_path:
                os.makedirs(os.path.dirname(os.path.abspath(self.snapshot_path)), exist_ok=True)
                torch.cuda.memory._dump_snapshot(self.snapshot_path)
                torch.cuda.memory._record_memory_history(enabled=None)
                res.snapshot = self.snapshot_path
        else:
            res.peak_bytes = peak_rss_bytes() if res.resettable else ru_maxrss_bytes()
            res.peak_bytes = max(res.peak_bytes, res.start_bytes)


@contextlib.contextmanager
def memory_phase(enabled: bool, device: torch.device | str, snapshot_path: str | None = None
                 ) -> Iterator[MemoryProfiler | None]:
    """``MemoryProfiler(device, snapshot_path)`` when ``enabled``, else a context that yields None."""
    if not enabled:
        yield None
        return
    with MemoryProfiler(device, snapshot_path) as prof:
        yield prof


def memory_stats(train: MemoryProfiler | None, evaluation: MemoryProfiler | None) -> dict:
    """A task's ``metrics.json`` entries from the profilers of its training and evaluation phases:
    ``{"peak_memory": {"train": MemoryPeak.to_dict(), "eval": ...}}``, or ``{}`` when profiling is off.

    On CPU each phase resets the process's RSS high-water mark, so the trainer's ``peak_rss_bytes`` (read after
    evaluation) would only cover the evaluation; the entries then also hold ``peak_rss_bytes`` = the larger of
    the two phases' peaks, the task's peak.
    """
    profs = [(name, prof.result) for name, prof in (("train", train), ("eval", evaluation))
             if prof is not None and prof.result is not None]
    if not profs:
        return {}
    out: dict = {"peak_memory": {name: res.to_dict() for name, res in profs}}
    cpu = [res.peak_bytes for _, res in profs if res.source != "cuda_allocator"]
    if cpu:
        out["peak_rss_bytes"] = max(cpu)
    return out


def memory_scalars(stats: dict) -> dict[str, float]:
    """TensorBoard scalars (GiB) from a task's ``memory_stats`` entries: ``memory/<phase>_peak_gib``,
    ``memory/<phase>_delta_gib`` and on CUDA ``memory/<phase>_reserved_peak_gib``; ``{}`` when there are none."""
    out = {}
    for phase, peak in stats.get("peak_memory", {}).items():
        out[f"memory/{phase}_peak_gib"] = gib(peak["peak_bytes"])
        out[f"memory/{phase}_delta_gib"] = gib(peak["delta_bytes"])
        if peak.get("reserved_peak_bytes") is not None:
            out[f"memory/{phase}_reserved_peak_gib"] = gib(peak["reserved_peak_bytes"])
    return out


def gib(n_bytes: float | None) -> float | None:
    """Bytes to GiB (2**30 bytes); None stays None."""
    return None if n_bytes is None else n_bytes / 2**30
