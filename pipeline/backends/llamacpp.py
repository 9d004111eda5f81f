"""GGUF files for llama.cpp, made and measured by llama.cpp itself.

Everything goes through the pinned toolchain (``pipeline.toolchains.llamacpp``):

- conversion: llama.cpp's ``convert_hf_to_gguf.py`` (run in place, in a subprocess), once per
  model into F16 (and BF16 when a variant asks for it), with the recipe's metadata overrides;
- importance matrix: ``llama-imatrix`` over the recipe's calibration text;
- quantization: ``llama-quantize`` (the built tool rather than the in-process binding
  ``llama_model_quantize``: both give the same tensors, but a crash in the tool cannot take the
  pipeline down, and the tool takes per-tensor type overrides as its own flags);
- splitting: ``llama-gguf-split`` (``-00001-of-0000N.gguf`` naming);
- evaluation: llama.cpp's own forward pass through llama-cpp-python (``logits_all``), so the
  numbers are what a llama.cpp replica computes;
- speed: ``llama-bench`` (prompt processing and generation tokens/s, median of repetitions).

The real per-tensor types of every file are read back with llama.cpp's GGUF parser: small models
whose rows are not multiples of 256 get simpler types than the file type's name says.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from pipeline import progress
from pipeline.backends.base import Backend, FormatInfo
from pipeline.errors import RecipeError, StageError, ToolError
from pipeline.recipe.variants import GGUF_TYPES
from pipeline.toolchains import llamacpp as toolchain

EVALUATION = ("llama.cpp's own forward pass on the CPU (llama-cpp-python over the pinned llama.cpp, all "
              "logits): weights and activations exactly as a llama.cpp replica computes them")


class LlamaCppBackend(Backend):
    name = "llamacpp"
    distributions = (("llama_cpp", "llama-cpp-python"),)
    extra = "gguf"

    @property
    def tools(self) -> tuple[str, ...]:
        # The toolchain version names the bindings' version, llama.cpp's commit and build flags.
        return ("llama.cpp",)

    def check_environment(self) -> None:
        toolchain.find()

    def plan_stages(self, variant: Any, planning: Any) -> list:
        """A shared F16 conversion, importance matrix and fidelity checks, then per type:
        quantize, evaluate (in llama.cpp), speed, gate, publish (``pipeline.plan.gguf``)."""
        from pipeline.plan.gguf import gguf_stages

        return gguf_stages(variant, planning)

    def describe(self, variant: Any) -> FormatInfo:
        return FormatInfo(
            format="gguf",
            scheme=variant.type,
            weight_bits=GGUF_TYPES[variant.type],
            engines=("llama.cpp",),
            min_compute_capability=None,
            serve={"llama.cpp": "llama-server -m {path}/{file}"},
            cpu_evaluation=EVALUATION,
        )

    def check_variant(self, variant: Any, model_config: Any) -> None:
        architectures = list(getattr(model_config, "architectures", None) or [])
        supported = supported_architectures()
        if architectures and not any(a in supported for a in architectures):
            chain = toolchain.find()
            raise RecipeError(
                f"architecture {', '.join(architectures)} is not supported by llama.cpp's converter "
                f"(llama.cpp {chain.commit[:7]}, llama-cpp-python {toolchain.BINDINGS_VERSION})",
                field="type", fix="drop the GGUF variants or use a model llama.cpp supports",
            )

    def quantize(self, variant, source, out, *, calibration, device):  # pragma: no cover - see gguf stages
        raise StageError("GGUF variants are built by the gguf_* stages, not the generic quantize stage")

    def load_for_eval(self, path: Path, device: str) -> Any:
        return LlamaEval(gguf_file(path))

    def forward(self, model: Any):
        return model


class LlamaEval:
    """Next-token logits of a GGUF model for one window of token ids, computed by llama.cpp.

    The context is created on the first call, sized to the window (the whole window is one
    batch, so every position's logits come from one decode, as in llama-perplexity).
    """

    def __init__(self, path: Path, threads: int | None = None):
        self.path = path
        self.threads = threads or max(1, os.cpu_count() or 1)
        self.llm = None

    def __call__(self, ids):
        import numpy as np
        import torch

        tokens = [int(t) for t in ids.reshape(-1).tolist()]
        if self.llm is None or self.llm.n_ctx() < len(tokens):
            llama_cpp = toolchain.import_bindings(toolchain.find())
            self.close()
            self.llm = llama_cpp.Llama(
                model_path=str(self.path), n_ctx=len(tokens), n_batch=len(tokens), n_ubatch=len(tokens),
                logits_all=True, n_threads=self.threads, n_threads_batch=self.threads, verbose=False,
            )
        self.llm.reset()
        self.llm.eval(tokens)
        return torch.from_numpy(np.array(self.llm.scores[: len(tokens)], dtype=np.float32, copy=True))

    def close(self) -> None:
        """Free llama.cpp's model and context now (not at interpreter exit, where the bindings'
        finalisers fail noisily)."""
        if self.llm is not None:
            self.llm.close()
            self.llm = None


# --- files ------------------------------------------------------------------------------------


def gguf_file(folder: Path) -> Path:
    """The model file in a stage's output folder (the first shard when split)."""
    files = sorted(p for p in folder.glob("*.gguf") if not p.name.startswith("imatrix"))
    if not files:
        raise StageError(f"no .gguf file in {folder}")
    return files[0]


def file_name(meta: dict[str, Any], type_name: str) -> str:
    """The GGUF spec's file name: ``<BaseName>-<SizeLabel>-<FineTune>-<Version>-<Type>.gguf``.

    Absent parts are left out; spaces become dashes (the spec's naming convention).
    """
    parts = [meta.get("general.basename") or meta.get("general.name") or "model", meta.get("general.size_label"),
             meta.get("general.finetune"), meta.get("general.version"), type_name]
    return "-".join(str(p).strip().replace(" ", "-") for p in parts if p) + ".gguf"


def read_metadata(path: Path) -> dict[str, Any]:
    """A GGUF file's scalar metadata (``general.*``, ``tokenizer.ggml.*`` ids and names, the chat
    template, ``split.*``; arrays such as the vocabulary are left out) and its tensor type counts.

    Read with llama.cpp's own GGUF parser (``gguf.h`` in the toolchain's ``libggml-base``): the
    header only, in milliseconds, where the Python ``gguf`` reader parses every vocabulary entry
    (3.4 s on SmolLM2's 49,152 tokens, twice per quantized type).

    Raises:
        StageError: not a readable GGUF file.
    """
    lib = _gguf_library()
    ctx = lib.gguf_init_from_file(str(path).encode(), _GGUFInitParams(True, None))
    if not ctx:
        raise StageError(f"llama.cpp cannot read {path.name} as GGUF")
    try:
        meta: dict[str, Any] = {}
        for i in range(lib.gguf_get_n_kv(ctx)):
            key = lib.gguf_get_key(ctx, i).decode()
            getter = _GGUF_SCALARS.get(lib.gguf_get_kv_type(ctx, i))
            if getter is not None:
                value = getattr(lib, getter)(ctx, i)
                meta[key] = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        # Lower-case, as recipes spell ggml types (ggml's own names mix cases: q4_K).
        types = Counter(lib.ggml_type_name(lib.gguf_get_tensor_type(ctx, i)).decode().lower()
                        for i in range(lib.gguf_get_n_tensors(ctx)))
    finally:
        lib.gguf_free(ctx)
    meta["tensor_types"] = dict(sorted(types.items(), key=lambda kv: (-kv[1], kv[0])))
    meta["tensor_count"] = sum(types.values())
    return meta


def tensor_types(path: Path) -> dict[str, str]:
    """Each tensor's ggml type, by name."""
    lib = _gguf_library()
    ctx = lib.gguf_init_from_file(str(path).encode(), _GGUFInitParams(True, None))
    if not ctx:
        raise StageError(f"llama.cpp cannot read {path.name} as GGUF")
    try:
        return {lib.gguf_get_tensor_name(ctx, i).decode(): lib.ggml_type_name(lib.gguf_get_tensor_type(ctx, i)).decode().lower()
                for i in range(lib.gguf_get_n_tensors(ctx))}
    finally:
        lib.gguf_free(ctx)


class _GGUFInitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]


# enum gguf_type → the gguf.h getter of that scalar type (arrays, 9, are skipped).
_GGUF_SCALARS = {0: "gguf_get_val_u8", 1: "gguf_get_val_i8", 2: "gguf_get_val_u16", 3: "gguf_get_val_i16",
                 4: "gguf_get_val_u32", 5: "gguf_get_val_i32", 6: "gguf_get_val_f32", 7: "gguf_get_val_bool",
                 8: "gguf_get_val_str", 10: "gguf_get_val_u64", 11: "gguf_get_val_i64", 12: "gguf_get_val_f64"}
_GGUF_RETURNS = {"gguf_get_val_u8": ctypes.c_uint8, "gguf_get_val_i8": ctypes.c_int8,
                 "gguf_get_val_u16": ctypes.c_uint16, "gguf_get_val_i16": ctypes.c_int16,
                 "gguf_get_val_u32": ctypes.c_uint32, "gguf_get_val_i32": ctypes.c_int32,
                 "gguf_get_val_f32": ctypes.c_float, "gguf_get_val_bool": ctypes.c_bool,
                 "gguf_get_val_str": ctypes.c_char_p, "gguf_get_val_u64": ctypes.c_uint64,
                 "gguf_get_val_i64": ctypes.c_int64, "gguf_get_val_f64": ctypes.c_double}


@functools.cache
def _gguf_library():
    """ctypes bindings of the few ``gguf.h``/``ggml.h`` functions used above."""
    lib = ctypes.CDLL(str(toolchain.find().bin / "libggml-base.so"))
    c_ctx, c_i64 = ctypes.c_void_p, ctypes.c_int64
    signatures = {
        "gguf_init_from_file": (c_ctx, [ctypes.c_char_p, _GGUFInitParams]),
        "gguf_free": (None, [c_ctx]),
        "gguf_get_n_kv": (c_i64, [c_ctx]),
        "gguf_get_key": (ctypes.c_char_p, [c_ctx, c_i64]),
        "gguf_get_kv_type": (ctypes.c_int, [c_ctx, c_i64]),
        "gguf_get_n_tensors": (c_i64, [c_ctx]),
        "gguf_get_tensor_name": (ctypes.c_char_p, [c_ctx, c_i64]),
        "gguf_get_tensor_type": (ctypes.c_int, [c_ctx, c_i64]),
        "ggml_type_name": (ctypes.c_char_p, [ctypes.c_int]),
        **{name: (restype, [c_ctx, c_i64]) for name, restype in _GGUF_RETURNS.items()},
    }
    for name, (restype, argtypes) in signatures.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


# --- tools ------------------------------------------------------------------------------------


def supported_architectures() -> frozenset[str]:
    """Model classes llama.cpp's converter maps (``--print-supported-models``), remembered per
    toolchain in its folder."""
    chain = toolchain.find()
    memo = chain.root / "supported-models.json"
    if memo.exists():
        return frozenset(json.loads(memo.read_text()))
    proc = _run([sys.executable, str(chain.converter), "--print-supported-models"], env=chain.converter_env(),
                what="listing the converter's architectures")
    names = sorted(set(re.findall(r"^\s*-\s*([A-Za-z0-9_]+)\s*$", proc.stdout + proc.stderr, flags=re.M)))
    if not names:
        raise StageError("llama.cpp's converter listed no supported architectures (--print-supported-models)")
    memo.write_text(json.dumps(names))
    return frozenset(names)


def convert(checkpoint: Path, out_file: Path, outtype: str, metadata: dict[str, Any],
            license: str | None = None) -> None:
    """HF checkpoint → GGUF with llama.cpp's converter.

    ``metadata`` holds the converter's ``--metadata`` overrides. The license is not one of them:
    the converter reads it from the model card, so a checkpoint without a ``README.md`` is given a
    minimal card (front matter ``license:``) in a folder of links to its files.

    Raises:
        ToolError: the converter cannot map the model (architecture or tokenizer), with its reason.
    """
    chain = toolchain.find()
    work = out_file.parent / ".convert-input"
    work.mkdir()
    try:
        for item in checkpoint.iterdir():
            (work / item.name).symlink_to(item.resolve())
        if license and not (work / "README.md").exists():
            (work / "README.md").write_text(f"---\nlicense: {license}\n---\n", encoding="utf-8")
        override = work / ".metadata-override.json"
        override.write_text(json.dumps(metadata))
        _run([sys.executable, str(chain.converter), str(work), "--outfile", str(out_file), "--outtype", outtype,
              "--metadata", str(override)],
             env=chain.converter_env(), what="llama.cpp's converter", explain=_converter_failure,
             on_line=progress.tool_bars())  # its "Writing" bar (bytes written) as the run's detail
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _converter_failure(output: str) -> str | None:
    chain = toolchain.find()
    version = f"llama.cpp {chain.commit[:7]}"
    m = re.search(r"Model (\S+) is not supported", output)
    if m:
        return f"architecture {m.group(1)} is not supported by {version}'s converter"
    if "BPE pre-tokenizer was not recognized" in output or "pre-tokenizer" in output and "not recognized" in output:
        return (f"the model's tokenizer cannot be mapped by {version}'s converter (BPE pre-tokenizer not "
                "recognized: its hash is not in the converter's table)")
    return None


def imatrix(model: Path, text: Path, out: Path, *, ctx: int, chunks: int, threads: int) -> str:
    """``llama-imatrix``: importance matrix of ``model`` over ``text``; returns the tool's log tail.

    Run in ``text``'s folder with relative names: the matrix records its dataset's path, and
    quantized files copy it into their metadata (a name, not a path on this machine).
    """
    tool = toolchain.find().tool("llama-imatrix")
    proc = _run([str(tool), "-m", str(model), "-f", text.name, "-o", str(out), "-c", str(ctx), "--chunks",
                 str(chunks), "-t", str(threads), "-b", str(ctx), "--no-ppl"], what="llama-imatrix", cwd=text.parent)
    return (proc.stderr or "")[-500:]


def quantize(source: Path, out_file: Path, variant, *, imatrix_file: Path | None, threads: int) -> None:
    """``llama-quantize`` with the variant's type, importance matrix and per-tensor types."""
    tool = toolchain.find().tool("llama-quantize")
    cmd = [str(tool)]
    if imatrix_file is not None:
        # By name, from its folder: the name goes into the file's quantize.imatrix.file.
        cmd += ["--imatrix", imatrix_file.name]
    for pattern, ggml_type in sorted(variant.tensor_types.items()):
        cmd += ["--tensor-type", f"{pattern}={ggml_type}"]
    if variant.output_type:
        cmd += ["--output-tensor-type", variant.output_type]
    if variant.token_embedding_type:
        cmd += ["--token-embedding-type", variant.token_embedding_type]
    cmd += [str(source.resolve()), str(out_file.resolve()), variant.type, str(threads)]
    # llama-quantize prints "[  k/ N] <tensor> ..." as it writes each tensor: the step's progress.
    with progress.steps("tensors", len(tensor_types(source))) as advance:
        written = 0

        def on_line(line: str) -> None:
            nonlocal written
            m = re.match(r"\[\s*(\d+)/\s*\d+\]", line)
            if m and int(m[1]) > written:
                advance(int(m[1]) - written)
                written = int(m[1])

        _run(cmd, what="llama-quantize", cwd=imatrix_file.parent if imatrix_file is not None else None, on_line=on_line)


def split(path: Path, max_size: str) -> list[Path]:
    """Split ``path`` into ``<stem>-0000i-of-0000N.gguf`` files of at most ``max_size``; the
    unsplit file is removed. A file already under the limit stays whole."""
    size = path.stat().st_size
    limit = int(max_size[:-1]) * (1024**3 if max_size.endswith("G") else 1024**2)
    if size <= limit:
        return [path]
    tool = toolchain.find().tool("llama-gguf-split")
    prefix = path.with_suffix("")
    _run([str(tool), "--split", "--split-max-size", max_size, str(path), str(prefix)], what="llama-gguf-split")
    path.unlink()
    return sorted(path.parent.glob(f"{prefix.name}-*-of-*.gguf"))


def bench(path: Path, *, threads: int, prompt_tokens: int, gen_tokens: int, repetitions: int) -> dict[str, Any]:
    """``llama-bench``: median prompt-processing and generation tokens/s over the repetitions."""
    tool = toolchain.find().tool("llama-bench")
    proc = _run([str(tool), "-m", str(path), "-t", str(threads), "-p", str(prompt_tokens), "-n", str(gen_tokens),
                 "-r", str(repetitions), "-o", "json"], what="llama-bench")
    try:
        rows = json.loads(proc.stdout)
    except ValueError:
        raise StageError(f"llama-bench printed no JSON: {proc.stdout[-300:]}") from None
    out: dict[str, Any] = {"threads": threads, "repetitions": repetitions}
    for row in rows:
        samples = row.get("samples_ts") or [row["avg_ts"]]
        if row.get("n_prompt", 0) > 0 and row.get("n_gen", 0) == 0:
            out[f"pp{row['n_prompt']}_tps"] = round(statistics.median(samples), 2)
        elif row.get("n_gen", 0) > 0 and row.get("n_prompt", 0) == 0:
            out[f"tg{row['n_gen']}_tps"] = round(statistics.median(samples), 2)
        out.setdefault("cpu", row.get("cpu_info"))
        out.setdefault("backend", row.get("backends"))
    return out


def _run(cmd: list[str], *, what: str, env: dict | None = None, explain=None, cwd: Path | None = None,
         on_line: Callable[[str], None] | None = None) -> subprocess.CompletedProcess:
    """Run a tool, its output captured; ``on_line`` sees each line (stdout's and stderr's, a
    progress bar's ``\r`` frames included) as it comes, for the run's progress."""
    if on_line is None:
        proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, check=False)
    else:
        proc = _streamed(cmd, env=env, cwd=cwd, on_line=on_line)
    if proc.returncode != 0:
        output = f"{proc.stdout}\n{proc.stderr}"
        reason = explain(output) if explain is not None else None
        if reason is not None:
            raise ToolError(reason, fix="see llama.cpp's supported models; the GGUF variants cannot be built")
        lines = [ln.strip() for ln in output.strip().splitlines() if ln.strip() and "%|" not in ln]
        # The error lines, not the progress bars or the traceback's source lines.
        errors = [ln for ln in lines if re.search(r"error|Error|failed|cannot|unable", ln)]
        raise StageError(f"{what} failed (exit {proc.returncode}): {' | '.join((errors or lines)[-2:])}")
    return proc


def _streamed(cmd: list[str], *, env: dict | None, cwd: Path | None, on_line: Callable[[str], None]
              ) -> subprocess.CompletedProcess:
    """``subprocess.run`` with both pipes read line by line as the tool writes them (one thread
    per pipe, so neither fills up and blocks the tool)."""
    import threading

    # Text mode's universal newlines make each "\r" redraw of a bar a line of its own.
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    captured: dict[str, list[str]] = {"stdout": [], "stderr": []}

    def drain(name: str, pipe) -> None:
        report = True
        for line in pipe:
            captured[name].append(line)
            if report:
                try:
                    on_line(line.rstrip("\n"))
                except Exception:  # noqa: BLE001 - a progress fault must not stop the draining (the tool would block)
                    report = False

    readers = [threading.Thread(target=drain, args=(name, getattr(proc, name)), daemon=True) for name in captured]
    for reader in readers:
        reader.start()
    try:
        for reader in readers:
            reader.join()
        returncode = proc.wait()
    except BaseException:  # Ctrl-C: the tool goes too, nothing half-run keeps writing
        proc.kill()
        proc.wait()
        raise
    return subprocess.CompletedProcess(cmd, returncode, "".join(captured["stdout"]), "".join(captured["stderr"]))
