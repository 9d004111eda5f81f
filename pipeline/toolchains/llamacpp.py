"""llama.cpp, pinned to the version that the pinned llama-cpp-python vendors, built once per
environment and shared by the bindings and the command-line tools.

Why not ``pip install llama-cpp-python`` as is: its wheel compiles llama.cpp with
``-march=native`` and no command-line tools, and the converter and its ``gguf-py`` ship only in
the source distribution. So from that one source distribution this module

- builds llama.cpp's shared libraries and the tools modelbuild uses (``llama-quantize``,
  ``llama-imatrix``, ``llama-perplexity``, ``llama-bench``, ``llama-gguf-split``, and the
  OpenAI-compatible ``llama-server`` that serving replicas run) with cmake,
  for the x86-64 AVX2 baseline rather than ``-march=native``: on CPUs that report AMX (Sapphire
  Rapids and later) a native build emits AMX tile instructions that fault under hypervisors that
  do not grant AMX state (``ldtilecfg`` → SIGSEGV in ``ggml_backend_amx_mul_mat``), and an AVX2
  build runs on every x86-64 machine this project targets;
- installs the Python bindings without their own build (``-DLLAMA_BUILD=OFF``) and points them at
  these libraries (``LLAMA_CPP_LIB_PATH``), so bindings and tools are the very same llama.cpp;
- uses the converter ``convert_hf_to_gguf.py`` in place, with the source distribution's own
  ``gguf-py`` first on its path (PyPI's ``gguf`` of the same version number lacks what it needs).

Everything lives under ``<sys.prefix>/share/modelbuild/llama.cpp-<version>/`` (or
``$MODELBUILD_TOOLCHAINS``): one build per environment, reused by every run; ``toolchain.json``
is written last, so a build interrupted half-way is redone, never used.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import ToolError

BINDINGS = "llama-cpp-python"
BINDINGS_VERSION = "0.3.36"
TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity", "llama-bench", "llama-gguf-split", "llama-server")
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=ON",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=ON",  # llama-server: what the published GGUF profiles start
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_USE_PREBUILT_UI=OFF",  # offline: the web UI would be downloaded
    "-DGGML_NATIVE=OFF",
    "-DGGML_AVX=ON",
    "-DGGML_AVX2=ON",
    "-DGGML_FMA=ON",
    "-DGGML_F16C=ON",
    "-DGGML_BMI2=ON",
)
STAMP = "toolchain.json"
FIX = "run `modelbuild toolchain install` (part of the README's set-up command)"


@dataclass(frozen=True)
class Toolchain:
    """A built llama.cpp.

    Attributes:
        root: the toolchain folder.
        commit: llama.cpp's commit (from the source distribution's submodule record).
        version: what enters stage keys and manifests: bindings version, commit, build flags.
    """

    root: Path
    commit: str
    version: str

    @property
    def source(self) -> Path:
        return self.root / "src" / "vendor" / "llama.cpp"

    @property
    def bin(self) -> Path:
        return self.root / "build" / "bin"

    @property
    def converter(self) -> Path:
        return self.source / "convert_hf_to_gguf.py"

    def tool(self, name: str) -> Path:
        return self.bin / name

    def converter_env(self) -> dict[str, str]:
        """Environment for the converter: the source distribution's gguf-py before PyPI's."""
        path = os.pathsep.join(p for p in (str(self.source / "gguf-py"), os.environ.get("PYTHONPATH")) if p)
        return {**os.environ, "PYTHONPATH": path}


def root() -> Path:
    base = os.environ.get("MODELBUILD_TOOLCHAINS") or str(Path(sys.prefix) / "share" / "modelbuild")
    return Path(base) / f"llama.cpp-{BINDINGS_VERSION}"


def installed_version() -> str:
    """The toolchain's version string for stage keys, or ``not-installed`` (reads one small file)."""
    try:
        return json.loads((root() / STAMP).read_text())["version"]
    except (OSError, ValueError, KeyError):
        return "not-installed"


def find() -> Toolchain:
    """The built toolchain.

    Raises:
        ToolError: not built (or built with other flags) in this environment.
    """
    folder = root()
    try:
        stamp = json.loads((folder / STAMP).read_text())
    except (OSError, ValueError):
        raise ToolError(f"llama.cpp toolchain is not built in {folder}", fix=FIX) from None
    if stamp.get("flags") != list(CMAKE_FLAGS) or stamp.get("bindings") != BINDINGS_VERSION:
        raise ToolError(f"llama.cpp toolchain in {folder} was built with other settings", fix=FIX)
    return Toolchain(root=folder, commit=stamp["commit"], version=stamp["version"])


def import_bindings(chain: Toolchain):
    """``llama_cpp`` loaded against this toolchain's libraries.

    Raises:
        ToolError: bindings missing, or already imported against other libraries.
    """
    os.environ["LLAMA_CPP_LIB_PATH"] = str(chain.bin)
    loaded = sys.modules.get("llama_cpp.llama_cpp")
    if loaded is not None and Path(loaded._base_path) != chain.bin:
        raise ToolError(f"llama_cpp was imported against {loaded._base_path}, not {chain.bin}",
                        fix="import modelbuild's llama.cpp backend before llama_cpp")
    try:
        import llama_cpp
    except ImportError:
        raise ToolError(f"{BINDINGS} is not installed", fix=FIX) from None
    return llama_cpp


def install(log=print, jobs: int | None = None) -> Toolchain:
    """Download the pinned source distribution, install the bindings and build llama.cpp (once).

    Raises:
        ToolError: pip, cmake or the compiler failed (their output's tail in the message).
    """
    folder = root()
    try:
        chain = find()
        if _bindings_installed():
            log(f"llama.cpp {chain.commit[:7]} already built in {folder}")
            return chain
    except ToolError:
        pass
    for exe in ("cmake", "c++"):
        if shutil.which(exe) is None:
            raise ToolError(f"building llama.cpp needs {exe}, which is not on PATH",
                            fix="install cmake and a C++ compiler (Debian: apt-get install cmake g++)")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / STAMP).unlink(missing_ok=True)
    sdist = _download_sdist(folder, log)
    src = folder / "src"
    if not (src / "vendor" / "llama.cpp" / "CMakeLists.txt").exists():
        log(f"extracting {sdist.name}")
        shutil.rmtree(src, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(dir=folder, prefix=".src-"))
        with tarfile.open(sdist) as tar:
            tar.extractall(staging, filter="tar")
        [top] = list(staging.iterdir())
        top.rename(src)
        staging.rmdir()
    commit = _commit(src)
    log(f"installing {BINDINGS}=={BINDINGS_VERSION} bindings (no bundled build)")
    _run([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q", str(sdist)],
         env={**os.environ, "CMAKE_ARGS": "-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF"}, what="installing the bindings")
    build = folder / "build"
    log(f"building llama.cpp {commit[:7]} ({', '.join(TOOLS)}); about 4-12 minutes on 2 cores")
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    _run(["cmake", "-S", str(src / "vendor" / "llama.cpp"), "-B", str(build), *generator, *CMAKE_FLAGS],
         what="configuring llama.cpp")
    _run(["cmake", "--build", str(build), "-j", str(jobs or os.cpu_count() or 2), "--target", *TOOLS],
         what="building llama.cpp")
    version = f"{BINDINGS_VERSION}+{commit[:12]}.avx2"
    stamp = {"bindings": BINDINGS_VERSION, "commit": commit, "flags": list(CMAKE_FLAGS), "version": version}
    tmp = folder / f".{STAMP}.tmp"
    tmp.write_text(json.dumps(stamp, indent=1))
    tmp.rename(folder / STAMP)
    log(f"llama.cpp {commit[:7]} built in {folder}")
    return find()


def _bindings_installed() -> bool:
    from importlib import metadata

    try:
        return metadata.version(BINDINGS) == BINDINGS_VERSION
    except metadata.PackageNotFoundError:
        return False


def _download_sdist(folder: Path, log) -> Path:
    name = f"{BINDINGS.replace('-', '_')}-{BINDINGS_VERSION}.tar.gz"
    target = folder / name
    if not target.exists():
        log(f"downloading the {BINDINGS}=={BINDINGS_VERSION} source distribution")
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            _run([sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q", "--no-deps",
                  "--no-binary", ":all:", "-d", tmp, f"{BINDINGS}=={BINDINGS_VERSION}"], what="downloading the sources")
            (Path(tmp) / name).rename(target)
    return target


def _commit(src: Path) -> str:
    """llama.cpp's commit, as recorded for the vendored submodule in the source distribution."""
    head = src / ".git" / "modules" / "vendor" / "llama.cpp" / "HEAD"
    try:
        commit = head.read_text().strip()
    except OSError:
        return "unknown"
    return commit if len(commit) == 40 else "unknown"


def _run(cmd: list[str], *, what: str, env: dict | None = None) -> None:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-4:])
        raise ToolError(f"{what} failed (exit {proc.returncode}): {tail}", fix="see the command's output above")
