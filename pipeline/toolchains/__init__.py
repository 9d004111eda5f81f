"""Tools that live outside modelbuild's own environment: llama.cpp (built from source) and
TensorRT-LLM (in its own Python on a GPU builder).

``VERSIONS`` maps the tool names stages list in ``Stage.tools`` to a cheap function giving the
installed version (llama.cpp: read from the toolchain's stamp file; TensorRT-LLM and TensorRT:
read from the package metadata of TensorRT-LLM's Python, nothing imported).
"""

from __future__ import annotations

import functools
import subprocess
from collections.abc import Callable
from importlib import metadata

from pipeline.toolchains import llamacpp


@functools.cache
def _trtllm_env_version(distribution: str) -> str:
    from pipeline.hardware import trtllm_python

    code = f"import importlib.metadata as m; print(m.version({distribution!r}))"
    try:
        done = subprocess.run([trtllm_python(), "-c", code], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return "not-installed"
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else "not-installed"


VERSIONS: dict[str, Callable[[], str]] = {
    "llama.cpp": llamacpp.installed_version,
    "tensorrt_llm": lambda: _trtllm_env_version("tensorrt_llm"),
    "tensorrt": lambda: _trtllm_env_version("tensorrt"),
}


def tool_version(distribution: str) -> str:
    """Installed version of a distribution, from its metadata (nothing is imported), or of a
    tool above (``VERSIONS``): what enters a stage's key for each name in ``Stage.tools``."""
    if distribution in VERSIONS:
        return VERSIONS[distribution]()
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not-installed"
