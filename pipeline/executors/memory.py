"""Peak resident memory of one stage, measured where it runs (Linux).

Before the stage the process's high-water mark is reset (``5`` written to
``/proc/self/clear_refs``); after it ``VmHWM`` (``/proc/self/status``) is the most resident memory
the process had during the stage: anonymous memory and the file pages it mapped (safetensors and
GGUF files read by memory map count). Tools a stage runs as child processes (llama.cpp's) are not
in that figure: ``getrusage(RUSAGE_CHILDREN)`` gives the largest peak of any child that has ended,
which cannot be reset, so a child's peak is known only when it set a new maximum during the
stage. Where a figure cannot be had (not Linux, a kernel without ``clear_refs``) it is None,
never a guess. The figures are reported (stage lines, ``summary.json``, ``entry.json``): they
enter no stage key and no manifest.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

_LINUX = sys.platform.startswith("linux")  # clear_refs, VmHWM, and ru_maxrss in kB
_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


@dataclass
class Peak:
    """Peak resident bytes of one stage (None: not measurable here).

    Attributes:
        process: this process's peak during the stage.
        children: the peak of a child process that ended during the stage, when it exceeded
            every earlier child's (see the module docstring).
    """

    process: int | None = None
    children: int | None = None

    def record(self) -> dict[str, int]:
        """The known figures, by the names reports use."""
        figures = {"peak_rss_bytes": self.process, "children_peak_rss_bytes": self.children}
        return {k: v for k, v in figures.items() if v is not None}


class PeakMemory:
    """``with PeakMemory() as peak: ...``: ``peak`` is filled when the block ends (also on error)."""

    def __init__(self) -> None:
        self.peak = Peak()
        self._reset = False
        self._children = 0

    def __enter__(self) -> Peak:
        return_freed_memory()
        if not _LINUX:
            return self.peak
        try:
            _CLEAR_REFS.write_text("5")
            self._reset = True
        except OSError:
            self._reset = False  # no reset, so VmHWM would be the whole process's: not reported
        self._children = _children_max()
        return self.peak

    def __exit__(self, *exc) -> None:
        if not _LINUX:
            return
        if self._reset:
            self.peak.process = _hwm()
        after = _children_max()
        if after > self._children:
            self.peak.children = after


def return_freed_memory() -> None:
    """What earlier stages freed handed back to the system before the next stage starts.

    A stage's tensors are gone when it returns, but reference cycles wait for the collector and
    glibc keeps freed heap pages mapped: the next stage would start with the last one's peak
    still resident (and charged to a memory limit). ``malloc_trim`` returns them; elsewhere only
    the collection happens.
    """
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    if _LINUX:
        try:
            ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass  # not glibc


def _hwm() -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _children_max() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # kB on Linux
