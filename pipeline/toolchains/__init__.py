"""Tools that are built rather than pip-installed (llama.cpp), one module each.

``VERSIONS`` maps the tool names stages list in ``Stage.tools`` to a cheap function giving the
installed version (read from the toolchain's stamp file; nothing is imported or run).
"""

from __future__ import annotations

from collections.abc import Callable

from pipeline.toolchains import llamacpp

VERSIONS: dict[str, Callable[[], str]] = {"llama.cpp": llamacpp.installed_version}
