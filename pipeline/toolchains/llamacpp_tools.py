"""The llama.cpp tools, run from the pinned toolchain (``pipeline.toolchains.llamacpp``):

- ``convert_hf_to_gguf.py`` (in a subprocess, with the recipe's metadata overrides);
- ``llama-imatrix`` (importance matrix over calibration text);
- ``llama-quantize`` (the built tool rather than the in-process binding ``llama_model_quantize``:
  both give the same tensors, but a crash in the tool cannot take the pipeline down, and the tool
  takes per-tensor type overrides as its own flags);
- ``llama-gguf-split`` (``-00001-of-0000N.gguf`` naming);
- ``llama-bench`` (prompt processing and generation tokens/s, median of repetitions).
"""

from __future__ import annotations

import json
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline import hardware, progress
from pipeline.errors import StageError, ToolError
from pipeline.files import atomic_write
from pipeline.toolchains import llamacpp as toolchain
from pipeline.toolchains.gguf_reader import tensor_types


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
    atomic_write(memo, json.dumps(names), durable=False)  # runs on one machine share the toolchain's folder
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


# A checkpoint's files that decide how the converter maps its vocabulary.
_VOCAB_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                "merges.txt", "special_tokens_map.json", "added_tokens.json")


def vocabulary_refusal(checkpoint: Path) -> str | None:
    """Why llama.cpp's converter cannot map this checkpoint's tokenizer, or None when it can.

    The converter itself decides (``--vocab-only``, a few seconds): a byte-level BPE vocabulary
    is mapped only when the hash of its ids on the converter's test text is in its table, which
    also depends on the tokenizer class transformers picks for the architecture. Remembered per
    toolchain by the digest of the files that decide it.
    """
    import hashlib
    import tempfile

    chain = toolchain.find()
    h = hashlib.sha256()
    for name in _VOCAB_FILES:
        if (checkpoint / name).is_file():
            h.update(name.encode() + b"\0" + (checkpoint / name).read_bytes())
    memo = chain.root / "vocab-checks" / h.hexdigest()
    if memo.is_file():
        return json.loads(memo.read_text())["refusal"]
    with tempfile.TemporaryDirectory(prefix="vocab-check-") as tmp:
        proc = subprocess.run(
            [sys.executable, str(chain.converter), str(checkpoint), "--vocab-only", "--outfile", str(Path(tmp) / "v.gguf")],
            env=chain.converter_env(), capture_output=True, text=True, check=False)
    refusal = _converter_failure(f"{proc.stdout}\n{proc.stderr}") if proc.returncode else None
    if proc.returncode and refusal is None:
        return None  # not a vocabulary the converter refuses: the conversion stage reports it
    memo.parent.mkdir(exist_ok=True)
    atomic_write(memo, json.dumps({"refusal": refusal}), durable=False)
    return refusal


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


def imatrix(model: Path, text: Path, out: Path, *, ctx: int, chunks: int, threads: int, gpu: bool = False) -> str:
    """``llama-imatrix``: importance matrix of ``model`` over ``text``; returns the tool's log tail.

    Run in ``text``'s folder with relative names: the matrix records its dataset's path, and
    quantized files copy it into their metadata (a name, not a path on this machine).
    """
    chain = toolchain.find()
    proc = _run([str(chain.tool("llama-imatrix")), "-m", str(model), "-f", text.name, "-o", str(out), "-c", str(ctx),
                 "--chunks", str(chunks), "-t", str(threads), "-b", str(ctx), "--no-ppl", *chain.gpu_layers(gpu)],
                what="llama-imatrix", cwd=text.parent)
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


# A busy machine's figures are measured again, at most this many times in all (the quietest kept).
BENCH_ATTEMPTS = 3


def bench(path: Path, *, threads: int, prompt_tokens: int, gen_tokens: int, repetitions: int) -> dict[str, Any]:
    """``llama-bench``: median prompt-processing and generation tokens/s over the repetitions,
    their min-max, and how busy other processes kept the machine meanwhile (``load``). A run
    during which others kept more than ``hardware.BUSY_CORES`` cores busy is repeated, up to
    ``BENCH_ATTEMPTS`` runs; the quietest is kept, flagged ``busy`` if even it was not quiet."""
    chain = toolchain.find()
    # The CPU's speed (the stage's key names the CPU): no layer offloaded, even from a CUDA build.
    cmd = [str(chain.tool("llama-bench")), "-m", str(path), "-t", str(threads), "-p", str(prompt_tokens),
           "-n", str(gen_tokens), "-r", str(repetitions), "-o", "json", *chain.gpu_layers(False)]
    attempts = []
    for _ in range(BENCH_ATTEMPTS):
        proc, others = _measured(cmd)
        attempts.append((others, proc))
        if others is None or others <= hardware.BUSY_CORES:
            break
    others, proc = min(attempts, key=lambda a: a[0] if a[0] is not None else 0.0)
    try:
        rows = json.loads(proc.stdout)
    except ValueError:
        raise StageError(f"llama-bench printed no JSON: {proc.stdout[-300:]}") from None
    out: dict[str, Any] = {"threads": threads, "repetitions": repetitions, "load": {
        "other_cores": None if others is None else round(others, 3), "attempts": len(attempts),
        "busy": others is not None and others > hardware.BUSY_CORES, "busy_above_cores": hardware.BUSY_CORES}}
    for row in rows:
        samples = row.get("samples_ts") or [row["avg_ts"]]
        if row.get("n_prompt", 0) > 0 and row.get("n_gen", 0) == 0:
            key = f"pp{row['n_prompt']}_tps"
        elif row.get("n_gen", 0) > 0 and row.get("n_prompt", 0) == 0:
            key = f"tg{row['n_gen']}_tps"
        else:
            continue
        out[key] = round(statistics.median(samples), 2)
        out[f"{key}_range"] = [round(min(samples), 2), round(max(samples), 2)]
        out.setdefault("cpu", row.get("cpu_info"))
        out.setdefault("backend", row.get("backends"))
    return out


def _measured(cmd: list[str]) -> tuple[subprocess.CompletedProcess, float | None]:
    """Run a benchmark; with it, the cores other processes kept busy meanwhile (None: unknown)."""
    busy, own, start = hardware.busy_cpu_seconds(), hardware.own_cpu_seconds(), time.monotonic()
    proc = _run(cmd, what="llama-bench")
    busy_after, own_after, wall = hardware.busy_cpu_seconds(), hardware.own_cpu_seconds(), time.monotonic() - start
    if busy is None or busy_after is None:
        return proc, None
    return proc, hardware.other_cores(busy, busy_after, own, own_after, wall)


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
