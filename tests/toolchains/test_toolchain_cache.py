"""The llama.cpp build cache: its key (a pure function of what changes the binaries), and that a
second environment reuses a finished build while an interrupted one (no stamp) is built again.
Nothing here compiles: the build itself is replaced by a stand-in that writes what a build leaves."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from pipeline.errors import ToolError
from pipeline.toolchains import llamacpp

COMMIT = "0c1e57098bba" + "0" * 28
FACTS = {
    "bindings": "0.3.36",
    "flags": ("-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=OFF", "-DGGML_AVX2=ON"),
    "compiler": "cc (Debian 14.2.0-19) 14.2.0 | c++ (Debian 14.2.0-19) 14.2.0",
    "cmake": "cmake version 3.31.6",
    "machine": "x86_64",
    "env_flags": {"CFLAGS": "", "CXXFLAGS": ""},
    "cpu_flags": "fpu sse2 avx2 amx_tile",
}


def key(**changes):
    return llamacpp.cache_key(**{"commit": COMMIT, **FACTS, **changes})


def test_the_key_is_stable_and_readable():
    assert key() == key()
    assert key().startswith("llama.cpp-0.3.36-0c1e57098bba-") and len(key().rsplit("-", 1)[1]) == 16


@pytest.mark.parametrize("change", [
    {"bindings": "0.3.37"},
    {"commit": "1" * 40},
    {"flags": FACTS["flags"] + ("-DGGML_AVX512=ON",)},
    {"flags": tuple(reversed(FACTS["flags"]))},  # a later cmake flag overrides an earlier one
    {"compiler": "cc (Debian 15.1.0-1) 15.1.0 | c++ (Debian 15.1.0-1) 15.1.0"},
    {"cmake": "cmake version 4.0.0"},
    {"machine": "aarch64"},
    {"env_flags": {"CFLAGS": "-O1", "CXXFLAGS": ""}},
], ids=lambda c: next(iter(c)))
def test_whatever_changes_the_binaries_changes_the_key(change):
    assert key(**change) != key()


def test_what_does_not_change_the_binaries_keeps_the_key():
    assert key(env_flags={}) == key()  # an empty CFLAGS is no CFLAGS
    assert key(compiler="  " + FACTS["compiler"] + "\n") == key()
    # GGML_NATIVE=OFF: the build targets the flags' ISA, whatever this CPU reports
    assert key(cpu_flags="fpu sse2") == key()


def test_a_native_build_is_keyed_by_the_host_cpu():
    native = ("-DCMAKE_BUILD_TYPE=Release",)  # llama.cpp's default is GGML_NATIVE=ON
    assert llamacpp.native(native) and not llamacpp.native(FACTS["flags"])
    assert llamacpp.native(("-DGGML_NATIVE=OFF", "-DGGML_NATIVE:BOOL=ON"))
    assert key(flags=native, cpu_flags="avx2 fpu") == key(flags=native, cpu_flags="fpu avx2 fpu")
    assert key(flags=native, cpu_flags="fpu avx2") != key(flags=native, cpu_flags="fpu avx2 amx_tile")


def test_the_real_flags_build_for_a_fixed_isa():
    assert not llamacpp.native(llamacpp.CMAKE_FLAGS)  # so machines with other CPUs share a key


def test_cache_folder(monkeypatch, tmp_path):
    monkeypatch.delenv(llamacpp.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert llamacpp.cache_dir() == tmp_path / "xdg" / "modelbuild" / "toolchains"
    monkeypatch.setenv(llamacpp.CACHE_ENV, str(tmp_path / "tc"))
    assert llamacpp.cache_dir() == tmp_path / "tc"
    for off in ("off", "0", "OFF"):
        monkeypatch.setenv(llamacpp.CACHE_ENV, off)
        assert llamacpp.cache_dir() is None


def test_build_progress_lines():
    assert llamacpp.progress("[12/345] Building CXX object src/CMakeFiles/llama.dir/llama.cpp.o") == "12/345 steps"
    assert llamacpp.progress("[ 45%] Building CXX object ...") == "45%"
    assert llamacpp.progress("-- Configuring done") is None


@pytest.fixture
def fake_build(monkeypatch, tmp_path):
    """install() with the download and the compile replaced by stand-ins; counts the builds."""
    sdist = tmp_path / "sdist" / "llama_cpp_python-0.3.36.tar.gz"
    sdist.parent.mkdir()
    with tarfile.open(sdist, "w:gz") as tar:
        data = (COMMIT + "\n").encode()
        info = tarfile.TarInfo("llama_cpp_python-0.3.36/.git/modules/vendor/llama.cpp/HEAD")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    class Builds(list):
        fail_at = [0]  # the build number that is interrupted (0: none)

    builds = Builds()
    fail_at = builds.fail_at

    def build(folder, sdist_, commit, log, jobs, cuda=False):
        builds.append(folder)
        (folder / "build" / "bin").mkdir(parents=True, exist_ok=True)
        if len(builds) == fail_at[0]:
            raise ToolError("building llama.cpp failed (exit 1): stand-in")
        (folder / llamacpp.STAMP).write_text(json.dumps(
            {"bindings": llamacpp.BINDINGS_VERSION, "commit": commit, "flags": list(llamacpp.flags(cuda)),
             "version": "v"}))

    monkeypatch.setattr(llamacpp, "_sdist", lambda folder, log: sdist)
    monkeypatch.setattr(llamacpp, "_build", build)
    monkeypatch.setattr(llamacpp, "_bindings_installed", lambda: True)
    monkeypatch.setattr(llamacpp, "host_facts", lambda cuda=False: dict(FACTS, flags=llamacpp.flags(cuda)))
    monkeypatch.setenv(llamacpp.CACHE_ENV, str(tmp_path / "cache"))
    return builds


def _env(monkeypatch, tmp_path, name):
    monkeypatch.setenv("MODELBUILD_TOOLCHAINS", str(tmp_path / name))
    return llamacpp.root()


def test_a_second_environment_reuses_the_build(fake_build, monkeypatch, tmp_path):
    first = _env(monkeypatch, tmp_path, "env-a")
    chain = llamacpp.install(log=lambda _: None)
    assert len(fake_build) == 1 and fake_build[0].parent == tmp_path / "cache"
    assert first.is_symlink() and first.resolve() == fake_build[0] and chain.commit == COMMIT
    second = _env(monkeypatch, tmp_path, "env-b")
    lines = []
    llamacpp.install(log=lines.append)
    assert len(fake_build) == 1, "the second environment compiled again"
    assert second.resolve() == first.resolve() and any("reusing the cached" in line for line in lines)
    assert llamacpp.install(log=lambda _: None).root == second  # a rerun: nothing to do


def test_an_interrupted_build_is_never_used(fake_build, monkeypatch, tmp_path):
    _env(monkeypatch, tmp_path, "env-a")
    fake_build.fail_at[0] = 1
    with pytest.raises(ToolError):
        llamacpp.install(log=lambda _: None)
    entry = fake_build[0]
    assert entry.is_dir() and not (entry / llamacpp.STAMP).exists()
    env_b = _env(monkeypatch, tmp_path, "env-b")
    with pytest.raises(ToolError, match="not built"):
        llamacpp.find()
    llamacpp.install(log=lambda _: None)  # built again, in the same folder, this time whole
    assert fake_build == [entry, entry] and env_b.resolve() == entry


def test_an_old_build_inside_the_environment_is_replaced_by_the_link(fake_build, monkeypatch, tmp_path):
    folder = _env(monkeypatch, tmp_path, "env-a")
    (folder / "build").mkdir(parents=True)  # unfinished (no stamp), from before the cache existed
    llamacpp.install(log=lambda _: None)
    assert folder.is_symlink() and (folder / llamacpp.STAMP).exists()


def test_no_cache_builds_inside_the_environment(fake_build, monkeypatch, tmp_path):
    folder = _env(monkeypatch, tmp_path, "env-a")
    llamacpp.install(log=lambda _: None, cache=False)
    assert fake_build == [folder] and not folder.is_symlink()


def test_a_cuda_build_is_a_build_of_its_own_that_offloads_only_what_is_planned_on_the_gpu(fake_build, monkeypatch,
                                                                                          tmp_path):
    """``toolchain install --cuda``: the CUDA flags make another cache entry; the environment then
    uses it (and the planner may plan GGUF stages on the GPU); the tools offload every layer
    for a GPU computation and none for a CPU one (a CUDA build offloads all by default)."""
    monkeypatch.setattr(llamacpp, "_nvcc", lambda: "/usr/local/cuda/bin/nvcc")
    _env(monkeypatch, tmp_path, "env-a")
    cpu = llamacpp.install(log=lambda _: None)
    assert not cpu.cuda and not llamacpp.built_with_cuda() and cpu.gpu_layers(True) == []
    gpu = llamacpp.install(log=lambda _: None, cuda=True)
    assert len(fake_build) == 2 and fake_build[0] != fake_build[1]
    assert gpu.cuda and llamacpp.built_with_cuda() and llamacpp.find().cuda
    assert gpu.gpu_layers(True) == ["-ngl", "all"] and gpu.gpu_layers(False) == ["-ngl", "0"]
    assert not llamacpp.install(log=lambda _: None).cuda and len(fake_build) == 2  # back to the CPU build, reused


def test_a_cuda_build_without_nvcc_is_one_line(cli, monkeypatch, tmp_path):
    monkeypatch.setenv("MODELBUILD_TOOLCHAINS", str(tmp_path / "env"))
    monkeypatch.delenv("CUDACXX", raising=False)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.setattr(llamacpp, "NVCC_PLACES", ())
    code, _out, err = cli("toolchain", "install", "--cuda")
    assert code == 2 and err.strip().count("\n") == 0 and "needs nvcc (the CUDA toolkit)" in err, err
