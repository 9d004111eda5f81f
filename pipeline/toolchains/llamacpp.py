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

The environment sees its toolchain at ``<sys.prefix>/share/modelbuild/llama.cpp-<version>/`` (or
``$MODELBUILD_TOOLCHAINS``). The build itself lives in a per-user cache outside the environment,
``${XDG_CACHE_HOME:-~/.cache}/modelbuild/toolchains/<key>/`` (``$MODELBUILD_TOOLCHAIN_CACHE``;
``off`` builds inside the environment as before), and the environment's folder is a symbolic link
to it: a second clone or a new virtualenv on the same machine reuses the build instead of
compiling llama.cpp again. The key (``cache_key``) covers everything that changes the binaries:
the bindings version, llama.cpp's commit, the cmake flags, the compiler and cmake versions, the
machine architecture and ``CFLAGS``/``CXXFLAGS``/``CPPFLAGS``/``LDFLAGS`` (the host CPU's flags
too, should the flags ever ask for a native build). The build happens in place in the cache
folder (its shared libraries' paths are absolute), under an exclusive lock, and ``toolchain.json``
is written last: a build interrupted half-way is redone, never used.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Mapping, Sequence
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
# ``toolchain install --cuda`` (GPU builders): the same build with ggml's CUDA backend, for the
# tools and bindings alike; a build of its own (the flags are in the cache key). The compute
# capabilities are CMake's choice for the installed toolkit unless CMAKE_CUDA_ARCHITECTURES is set.
CUDA_FLAGS = ("-DGGML_CUDA=ON",)
NVCC_PLACES = ("/usr/local/cuda/bin/nvcc",)  # where the toolkit installs it off PATH (CMake looks there too)
STAMP = "toolchain.json"
CACHE_ENV = "MODELBUILD_TOOLCHAIN_CACHE"
ENV_FLAGS = ("CFLAGS", "CXXFLAGS", "CPPFLAGS", "LDFLAGS")
_OFF = ("off", "0", "no", "false", "none")
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
    cuda: bool = False

    def gpu_layers(self, on_gpu: bool) -> list[str]:
        """The tools' ``-ngl`` for a computation planned on the GPU (all layers) or on the CPU
        (none: a CUDA build offloads every layer by default, and a CPU stage's key says CPU)."""
        return ["-ngl", "all" if on_gpu else "0"] if self.cuda else []

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
    """Where this environment sees its toolchain (a folder, or a link into the build cache)."""
    base = os.environ.get("MODELBUILD_TOOLCHAINS") or str(Path(sys.prefix) / "share" / "modelbuild")
    return Path(base) / f"llama.cpp-{BINDINGS_VERSION}"


def cache_dir() -> Path | None:
    """The per-user build cache, or None when ``$MODELBUILD_TOOLCHAIN_CACHE`` is ``off``."""
    env = os.environ.get(CACHE_ENV, "").strip()
    if env.lower() in _OFF:
        return None
    if env:
        return Path(env).expanduser().absolute()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return (Path(base) / "modelbuild" / "toolchains").absolute()


def cache_key(*, bindings: str, commit: str, flags: Sequence[str], compiler: str, cmake: str, machine: str,
              env_flags: Mapping[str, str], cpu_flags: str = "") -> str:
    """The build cache's folder name for one build: same key, same binaries (a pure function).

    Args:
        bindings: llama-cpp-python's version (its source distribution is what gets built).
        commit: llama.cpp's commit in that source distribution.
        flags: the cmake flags, in order (a later flag overrides an earlier one).
        compiler: the C and C++ compilers' ``--version`` lines.
        cmake: cmake's ``--version`` line.
        machine: the architecture (``platform.machine()``).
        env_flags: ``CFLAGS`` and the like as the build sees them (empty ones are ignored).
        cpu_flags: the host CPU's feature flags; they enter the key only when the flags leave
            ``GGML_NATIVE`` on (llama.cpp's default), since only then do they change the code.

    Returns:
        ``llama.cpp-<bindings>-<commit[:12]>-<16 hex digits of a sha256 over all of the above>``.
    """
    record = {
        "bindings": bindings,
        "commit": commit,
        "flags": list(flags),
        "compiler": compiler.strip(),
        "cmake": cmake.strip(),
        "machine": machine,
        "env": {name: value for name, value in sorted(env_flags.items()) if value},
        "cpu": " ".join(sorted(set(cpu_flags.split()))) if native(flags) else "",
    }
    digest = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]
    return f"llama.cpp-{bindings}-{commit[:12]}-{digest}"


def native(flags: Sequence[str]) -> bool:
    """Whether these cmake flags build for the host CPU (``GGML_NATIVE`` is on unless turned off)."""
    value = "ON"
    for flag in flags:
        name, _, setting = flag.partition("=")
        if name.split(":")[0] == "-DGGML_NATIVE":
            value = setting
    return value.upper() not in ("OFF", "0", "FALSE", "NO", "N")


def flags(cuda: bool = False) -> tuple[str, ...]:
    """The cmake flags of the CPU build, or of the CUDA build."""
    return CMAKE_FLAGS + (CUDA_FLAGS if cuda else ())


def host_facts(cuda: bool = False) -> dict:
    """What ``cache_key`` needs besides the commit, read from this machine (runs cc, c++, cmake,
    and nvcc for a CUDA build)."""
    cc, cxx = os.environ.get("CC") or "cc", os.environ.get("CXX") or "c++"
    compilers = [_first_line([cc, "--version"]), _first_line([cxx, "--version"])]
    if cuda:
        compilers.append(_first_line([_nvcc(), "--version"], last=True))
    return {
        "bindings": BINDINGS_VERSION,
        "flags": flags(cuda),
        "compiler": " | ".join(compilers),
        "cmake": _first_line(["cmake", "--version"]),
        "machine": platform.machine(),
        "env_flags": {name: os.environ.get(name, "") for name in ENV_FLAGS},
        "cpu_flags": _cpu_flags() if native(CMAKE_FLAGS) else "",
    }


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
    if stamp.get("flags") not in (list(flags()), list(flags(cuda=True))) or stamp.get("bindings") != BINDINGS_VERSION:
        raise ToolError(f"llama.cpp toolchain in {folder} was built with other settings", fix=FIX)
    return Toolchain(root=folder, commit=stamp["commit"], version=stamp["version"],
                     cuda=stamp["flags"] == list(flags(cuda=True)))


def built_with_cuda() -> bool:
    """Whether this environment's llama.cpp has the CUDA backend (reads one small file; False
    when none is built): the planner then plans the GGUF stages that can use a GPU for it."""
    try:
        return find().cuda
    except ToolError:
        return False


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


def install(log=print, jobs: int | None = None, *, cache: bool = True, bindings: bool = True,
            cuda: bool = False) -> Toolchain:
    """Build llama.cpp (or reuse the cached build) and install the bindings; a no-op when done.

    Args:
        log: called with one line per step.
        jobs: parallel compile jobs (default: the CPUs this process may use).
        cache: build in (or reuse from) the per-user build cache; False builds inside the environment.
        bindings: also install the Python bindings into this environment (``.ci/setup`` builds
            first, in parallel with its pip installs, and installs the bindings afterwards).
        cuda: build with the CUDA backend (needs the CUDA toolkit's nvcc); the environment then
            uses that build, and a later install without it goes back to the CPU build.

    Raises:
        ToolError: pip, cmake, nvcc or the compiler failed or is missing (their output's tail in the message).
    """
    started = time.monotonic()
    folder = root()
    store = cache_dir() if cache else None
    chain: Toolchain | None
    try:
        chain = find()
    except ToolError:
        chain = None
    if chain is not None and chain.cuda != cuda:
        chain = None  # the other build is wanted
    if chain is not None and (not bindings or _bindings_installed()):
        log(f"llama.cpp {chain.commit[:7]} already built in {_shown(chain.root)}: nothing to do")
        return chain
    if chain is None:
        for exe in ("cmake", "c++"):
            if shutil.which(exe) is None:
                raise ToolError(f"building llama.cpp needs {exe}, which is not on PATH",
                                fix="install cmake and a C++ compiler (Debian: apt-get install cmake g++)")
        if cuda:
            _nvcc()
        if store is None:
            if folder.is_symlink():
                folder.unlink()
            sdist = _sdist(folder, log)
            _build(folder, sdist, _sdist_commit(sdist), log, jobs, cuda)
        else:
            sdist = _sdist(store / "sdist", log)
            commit = _sdist_commit(sdist)
            key = cache_key(commit=commit, **host_facts(cuda))
            entry = store / key
            with _locked(store / f"{key}.lock", log):
                if _stamp_ok(entry, commit, cuda):
                    log(f"reusing the cached llama.cpp {commit[:7]} build: {_shown(entry)}")
                else:
                    _build(entry, sdist, commit, log, jobs, cuda)
            _link(folder, entry)
        chain = find()
    if bindings and not _bindings_installed():
        sdist = _sdist(store / "sdist" if store is not None else folder, log)
        log(f"installing the {BINDINGS}=={BINDINGS_VERSION} bindings (no bundled build)")
        _run([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q", str(sdist)],
             env={**os.environ, "CMAKE_ARGS": "-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF"}, what="installing the bindings")
    log(f"llama.cpp {chain.commit[:7]} ready in {_shown(folder)} ({time.monotonic() - started:.0f} s)")
    return chain


def _build(folder: Path, sdist: Path, commit: str, log, jobs: int | None, cuda: bool = False) -> None:
    """Extract, configure and build in ``folder``; the stamp is written last (so only a whole build counts)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / STAMP).unlink(missing_ok=True)
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
    build = folder / "build"
    jobs = jobs or _cpus()
    log(f"building llama.cpp {commit[:7]}{' with CUDA' if cuda else ''} ({', '.join(TOOLS)}) with {jobs} parallel "
        f"jobs in {_shown(folder)}; "
        "once per machine (later environments reuse it)")
    began = time.monotonic()
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    _run(["cmake", "-S", str(src / "vendor" / "llama.cpp"), "-B", str(build), *generator, *flags(cuda)],
         what="configuring llama.cpp")
    _run_with_progress(["cmake", "--build", str(build), "--parallel", str(jobs), "--target", *TOOLS],
                       what="building llama.cpp", log=log)
    version = f"{BINDINGS_VERSION}+{commit[:12]}.avx2" + (".cuda" if cuda else "")
    stamp = {"bindings": BINDINGS_VERSION, "commit": commit, "flags": list(flags(cuda)), "version": version,
             "built_s": round(time.monotonic() - began, 1), "facts": host_facts(cuda)}
    tmp = folder / f".{STAMP}.tmp"
    tmp.write_text(json.dumps(stamp, indent=1))
    tmp.rename(folder / STAMP)
    log(f"llama.cpp {commit[:7]} built in {time.monotonic() - began:.0f} s")


def _stamp_ok(folder: Path, commit: str, cuda: bool = False) -> bool:
    try:
        stamp = json.loads((folder / STAMP).read_text())
    except (OSError, ValueError):
        return False
    return (stamp.get("bindings"), stamp.get("commit"), stamp.get("flags")) == (BINDINGS_VERSION, commit,
                                                                              list(flags(cuda)))


def _link(folder: Path, entry: Path) -> None:
    """Point the environment's toolchain folder at a cache entry (one rename; replaces what was there)."""
    if folder.is_symlink() and Path(os.readlink(folder)) == entry:
        return
    folder.parent.mkdir(parents=True, exist_ok=True)
    if folder.exists() and not folder.is_symlink():
        shutil.rmtree(folder)  # an unfinished or outdated build inside the environment (find() refused it)
    tmp = folder.with_name(f".{folder.name}.link-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(entry, target_is_directory=True)
    os.replace(tmp, folder)


@contextlib.contextmanager
def _locked(path: Path, log):
    """An exclusive lock on ``path``: two set-ups on one machine never build into one folder at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another process building llama.cpp into {_shown(path.with_suffix(''))}")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _bindings_installed() -> bool:
    from importlib import metadata

    try:
        return metadata.version(BINDINGS) == BINDINGS_VERSION
    except metadata.PackageNotFoundError:
        return False


def _sdist(folder: Path, log) -> Path:
    """The pinned source distribution in ``folder`` (downloaded through pip when it is not there yet)."""
    name = f"{BINDINGS.replace('-', '_')}-{BINDINGS_VERSION}.tar.gz"
    target = folder / name
    if not target.exists():
        folder.mkdir(parents=True, exist_ok=True)
        log(f"downloading the {BINDINGS}=={BINDINGS_VERSION} source distribution")
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            _run([sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q", "--no-deps",
                  "--no-binary", ":all:", "-d", tmp, f"{BINDINGS}=={BINDINGS_VERSION}"], what="downloading the sources")
            (Path(tmp) / name).rename(target)
    return target


def _sdist_commit(sdist: Path) -> str:
    """llama.cpp's commit, read from the source distribution without extracting it."""
    top = f"{BINDINGS.replace('-', '_')}-{BINDINGS_VERSION}"
    try:
        with tarfile.open(sdist) as tar:
            handle = tar.extractfile(f"{top}/.git/modules/vendor/llama.cpp/HEAD")
            commit = handle.read().decode().strip() if handle else ""
    except (OSError, KeyError, tarfile.TarError):
        return "unknown"
    return commit if len(commit) == 40 else "unknown"


def _run_with_progress(cmd: list[str], *, what: str, log, every_s: float = 30.0) -> None:
    """Run a build, logging how far along it is (ninja's or make's own counters) every ``every_s``."""
    began = last = time.monotonic()
    tail: collections.deque[str] = collections.deque(maxlen=40)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            tail.append(line.rstrip())
            now = time.monotonic()
            if now - last >= every_s and (done := progress(line)):
                last = now
                log(f"  {what}: {done} ({now - began:.0f} s)")
    except BaseException:  # Ctrl-C, or SIGTERM turned into SystemExit: stop the compilers too
        proc.terminate()
        proc.wait()
        raise
    if proc.wait() != 0:
        errors = [line for line in tail if "error" in line.lower()] or list(tail)
        raise ToolError(f"{what} failed (exit {proc.returncode}): {' | '.join(errors[-4:])}",
                        fix="see the command's output above")


def progress(line: str) -> str | None:
    """``"123/456 steps"`` from a ninja line, ``"45%"`` from a make line, else None."""
    if match := re.match(r"\[(\d+)/(\d+)\]", line):
        return f"{match[1]}/{match[2]} steps"
    if match := re.match(r"\[\s*(\d+)%\]", line):
        return f"{match[1]}%"
    return None


def _nvcc() -> str:
    """The CUDA compiler a CUDA build uses (``$CUDACXX``, else ``nvcc`` on PATH or in
    /usr/local/cuda, where CMake looks too)."""
    for candidate in (os.environ.get("CUDACXX"), shutil.which("nvcc"), *NVCC_PLACES):
        if candidate and Path(candidate).is_file():
            return candidate
    raise ToolError("building llama.cpp with CUDA needs nvcc (the CUDA toolkit), which is not on PATH",
                    fix="install the CUDA toolkit (NVIDIA's cuda-toolkit package) or set CUDACXX to its nvcc")


def _first_line(cmd: list[str], *, last: bool = False) -> str:
    """The first line a version command prints (``last``: its last, where nvcc names its release)."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return f"{cmd[0]}: not found"
    return out.strip().splitlines()[-1 if last else 0] if out.strip() else f"{cmd[0]}: no version"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return ""


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 2


def _shown(path: Path) -> str:
    """A path as the log shows it (the home folder as ~)."""
    home = str(Path.home())
    text = str(path)
    return "~" + text[len(home):] if home != "/" and text.startswith(home + os.sep) else text


def _run(cmd: list[str], *, what: str, env: dict | None = None) -> None:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-4:])
        raise ToolError(f"{what} failed (exit {proc.returncode}): {tail}", fix="see the command's output above")
