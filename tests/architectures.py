"""Tiny random models of the architecture families the pipeline is tested on, built offline.

Each family is a transformers config class with a few overrides that keep what makes the family
itself (tied embeddings, soft-capping, sliding windows, fused projections, experts and their
router) at hidden size 64 and 2 decoder layers: seeded random weights in bf16, a few seconds
each. Tokenizers come in both kinds and are made without a hub:

- ``spm``: a SentencePiece model (``tokenizer.model``, byte fallback) trained deterministically
  on a slice of the repository's WikiText-2 valid text, in Llama's special pieces (a fast
  tokenizer in the Hub's Llama layout) or Gemma's (transformers' ``GemmaTokenizer``);
- ``bpe``: byte-level BPE, SmolLM2's real tokenizer imported from the GGUF file the repository
  sources the demo from (llama.cpp's converter recognises its pre-tokenizer; a freshly trained
  BPE vocabulary has a hash no converter table knows, see ``tests/backends/test_llamacpp.py``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
WIKITEXT = REPO / "evals" / "data" / "wikitext-2"
SPM_VOCAB = 1024
_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "max_position_embeddings": 1024}


@dataclass(frozen=True)
class Family:
    """One architecture family: its config class, overrides and tokenizer kind."""

    name: str  # display name
    config: str  # transformers config class
    tokenizer: str  # "spm" or "bpe"
    overrides: dict[str, Any] = field(default_factory=dict)
    moe: bool = False
    spm_class: str = "LlamaTokenizer"  # the transformers tokenizer of an spm family
    notes: str = ""  # what the tiny model keeps of the family, for the table


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("llama", "LlamaConfig", "spm", {"tie_word_embeddings": True},
           notes="tied embeddings"),
    Family("qwen2", "Qwen2Config", "bpe", {"tie_word_embeddings": True},
           notes="q/k/v biases, tied embeddings"),
    Family("qwen3", "Qwen3Config", "bpe", {"head_dim": 16, "tie_word_embeddings": True},
           notes="q/k norms"),
    Family("mistral", "MistralConfig", "spm", {"sliding_window": None},
           notes="untied output head"),
    Family("gemma2", "Gemma2Config", "spm",
           {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 32, "attn_logit_softcapping": 50.0,
            "final_logit_softcapping": 30.0, "layer_types": ["sliding_attention", "full_attention"]},
           spm_class="GemmaTokenizer", notes="tied, attention and final soft-capping, 32-token sliding window"),
    # Six layers: Gemma 3's own pattern (five sliding-window layers, then a global one), which
    # llama.cpp assumes for every Gemma 3 (its converter writes no layer types).
    Family("gemma3", "Gemma3TextConfig", "spm",
           {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 32, "num_hidden_layers": 6},
           spm_class="GemmaTokenizer", notes="text model, tied, q/k norms, 5 sliding-window (32) layers then a global one"),
    Family("phi3", "Phi3Config", "spm", {"pad_token_id": 0, "tie_word_embeddings": False},
           notes="fused qkv_proj and gate_up_proj"),
    Family("qwen3_moe", "Qwen3MoeConfig", "bpe",
           {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
            "decoder_sparse_step": 1, "tie_word_embeddings": True},
           moe=True, notes="4 experts, top-2 router"),
    Family("mixtral", "MixtralConfig", "spm", {"num_local_experts": 4, "num_experts_per_tok": 2},
           moe=True, notes="4 experts, top-2 router"),
)}


# SentencePiece special pieces in each style: (id, piece) of unk, bos, eos, pad (-1: none), and
# whether a space is prefixed to the text (Gemma's tokenizers do not; llama.cpp's converter
# writes Gemma's GGUFs without it).
_SPM_STYLES = {
    "LlamaTokenizer": {"unk": (0, "<unk>"), "bos": (1, "<s>"), "eos": (2, "</s>"), "pad": (-1, "<pad>"),
                       "dummy_prefix": True},
    "GemmaTokenizer": {"unk": (3, "<unk>"), "bos": (2, "<bos>"), "eos": (1, "<eos>"), "pad": (0, "<pad>"),
                       "dummy_prefix": False},
}


def spm_model(cache: Path, style: str) -> Path:
    """A SentencePiece BPE model with byte fallback, trained on WikiText-2 valid in ``style``'s
    special pieces (deterministic: one thread, a fixed slice, input order kept)."""
    import io

    import sentencepiece as spm

    folder = cache / f"spm-{style}"
    path = folder / "tokenizer.model"
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    sp = _SPM_STYLES[style]
    text = (WIKITEXT / "valid.txt").read_text(encoding="utf-8")[:300_000]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    model = io.BytesIO()  # the trainer records a model_prefix path in the model: none here
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe",
        vocab_size=SPM_VOCAB, byte_fallback=True, character_coverage=1.0, num_threads=1,
        shuffle_input_sentence=False, add_dummy_prefix=sp["dummy_prefix"], remove_extra_whitespaces=False,
        normalization_rule_name="identity", minloglevel=2,
        **{f"{k}_id": sp[k][0] for k in ("unk", "bos", "eos", "pad")},
        **{f"{k}_piece": sp[k][1] for k in ("unk", "bos", "eos", "pad")},
    )
    path.write_bytes(model.getvalue())
    return path


def _spm_tokenizer(family: Family, cache: Path, out: Path):
    import shutil

    import transformers
    from tokenizers import normalizers
    from transformers import PreTrainedTokenizerFast

    model = spm_model(cache, family.spm_class)
    sp = _SPM_STYLES[family.spm_class]
    specials = {f"{k}_token": sp[k][1] if sp[k][0] >= 0 else None for k in ("unk", "bos", "eos", "pad")}
    # from_pretrained reads tokenizer.model (the constructor alone gives an empty vocabulary).
    tokenizer = getattr(transformers, family.spm_class).from_pretrained(model.parent, **specials)
    if sp["dummy_prefix"]:
        # SentencePiece (and llama.cpp reading the GGUF) prefix one "▁" to every text. transformers'
        # LlamaTokenizer class prefixes none to a text that already starts with a space (a
        # Metaspace pre-tokenizer, "first"), whatever tokenizer.json says, so it splits such
        # texts (WikiText's start with " = ") differently from the GGUF and the fidelity gate
        # fails the GGUF variants. The Hub's Llama-style tokenizer.json layout (spaces to "▁",
        # one prefixed) under the generic fast class is what SentencePiece computes.
        backend = tokenizer.backend_tokenizer
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        backend.pre_tokenizer = None
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **specials)
    tokenizer.save_pretrained(out)
    shutil.copy(model, out / "tokenizer.model")  # what llama.cpp's converter reads
    return tokenizer


def _bpe_tokenizer(gguf: Path, cache: Path, out: Path):
    import shutil

    from transformers import AutoTokenizer

    from pipeline.sources.gguf import _faithful_tokenizer

    saved = cache / "smollm2-tokenizer"
    if not saved.is_dir():  # the import from the GGUF takes ~10 s: once per session
        _faithful_tokenizer(AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name), gguf).save_pretrained(saved)
    for f in saved.iterdir():
        shutil.copy(f, out / f.name)
    return AutoTokenizer.from_pretrained(out)


def build(name: str, out: Path, *, cache: Path, gguf: Path | None = None) -> Path:
    """Write family ``name``'s tiny model (config, bf16 safetensors, tokenizer) into ``out``.

    ``cache`` holds the trained SentencePiece model between families; ``gguf`` is SmolLM2's GGUF
    for the byte-level BPE families.
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    family = FAMILIES[name]
    out.mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    if family.tokenizer == "spm":
        tokenizer = _spm_tokenizer(family, cache, out)
    else:
        if gguf is None:
            raise ValueError(f"{name} takes SmolLM2's byte-level BPE tokenizer: pass its GGUF file")
        tokenizer = _bpe_tokenizer(gguf, cache, out)
    shape = dict(_SHAPE)
    if family.moe:
        shape["intermediate_size"] = 64
    config = getattr(transformers, family.config)(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        **{**shape, **family.overrides},
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(out)
    return out



def digest(folder: Path) -> str:
    """sha256 over a built model's files (names and bytes)."""
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


# --- the matrix --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Format:
    """One column of the matrix: a variant every family is planned (and, if accepted, built) with."""

    name: str  # the variant's name in the recipe
    title: str  # the table's column heading
    variant: str  # the variant's recipe lines after ``backend``
    engines: tuple[str, ...]  # engines its serving profiles are written for
    from_gguf: bool = False  # built from the family's published GGUF Q8_0 as a ``kind: gguf`` source


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("fp8-dynamic", "llm-compressor FP8_DYNAMIC", "backend: llmcompressor\nscheme: FP8_DYNAMIC", ("vllm",)),
    Format("w4a16-gptq", "llm-compressor W4A16 GPTQ",
           "backend: llmcompressor\nscheme: W4A16\nalgorithm: gptq\ngroup_size: 32\ngptq: {actorder: null}", ("vllm",)),
    Format("gguf-q8", "GGUF Q8_0", "backend: llamacpp\ntype: Q8_0", ("llamacpp",)),
    Format("modelopt-fp8", "ModelOpt FP8", "backend: modelopt\nqformat: fp8", ("trtllm", "vllm")),
    Format("from-gguf", "GGUF Q8_0 file as the source → FP8_DYNAMIC",
           "backend: llmcompressor\nscheme: FP8_DYNAMIC", ("vllm",), from_gguf=True),
)}

PASS = "pass"
NO_GGUF = "no GGUF to start from"  # a from-GGUF cell of a family whose GGUF is refused


def _moe_llmc(scheme: str, architecture: str, experts: str) -> str:
    return (f"llm-compressor {scheme} of the mixture-of-experts architecture {architecture}: transformers 5.14.1 "
            f"cannot load its per-expert compressed checkpoint back into {experts} for evaluation")


def _moe_modelopt(architecture: str, experts: str) -> str:
    return (f"ModelOpt fp8 of the mixture-of-experts architecture {architecture}: its per-expert export cannot be "
            f"loaded back into transformers 5.14.1's {experts} for evaluation")


# Every cell's outcome: PASS (planned, built, evaluated, gated, published with its serving
# profiles), or the planner's refusal (the message of its one line, exit 2). The tests assert
# each family's outcomes equal these, and docs/compatibility.md is rendered from them (a test
# checks the committed file): a change in what the matrix yields fails until both are updated.
EXPECTED: dict[str, dict[str, str]] = {family: {fmt: PASS for fmt in FORMATS} for family in FAMILIES}
EXPECTED["qwen2"]["gguf-q8"] = (
    "GGUF Q8_0 of Qwen2ForCausalLM: the model's tokenizer cannot be mapped by llama.cpp 0c1e570's converter "
    "(BPE pre-tokenizer not recognized: its hash is not in the converter's table)")
EXPECTED["qwen2"]["from-gguf"] = NO_GGUF
for _family, _arch, _experts in (("qwen3_moe", "Qwen3MoeForCausalLM", "Qwen3MoeExperts"),
                                 ("mixtral", "MixtralForCausalLM", "MixtralExperts")):
    EXPECTED[_family].update({"fp8-dynamic": _moe_llmc("FP8_DYNAMIC", _arch, _experts),
                              "w4a16-gptq": _moe_llmc("W4A16", _arch, _experts),
                              "modelopt-fp8": _moe_modelopt(_arch, _experts)})
EXPECTED["qwen3"]["from-gguf"] = (
    "transformers cannot import this GGUF: You set `ignore_mismatched_sizes` to `False`, thus raising an error.")
EXPECTED["qwen3_moe"]["from-gguf"] = _moe_llmc("FP8_DYNAMIC", "Qwen3MoeForCausalLM", "Qwen3MoeExperts")
EXPECTED["mixtral"]["from-gguf"] = ("a mixture-of-experts GGUF (llama, 4 experts) that transformers imports as the "
                                    "dense LlamaForCausalLM, dropping its experts")


def render_table() -> str:
    """docs/compatibility.md, from ``FAMILIES``, ``FORMATS`` and ``EXPECTED``."""
    from pipeline import engines

    def engine_names(fmt: Format) -> str:
        return ", ".join(engines.display(e) for e in fmt.engines)

    lines = [
        "# Compatibility",
        "",
        "Which architecture family each format is built for, and which engines its serving profiles",
        "name. Generated from the architecture matrix (`tests/architectures.py`, run by",
        "`tests/test_architectures.py`): every family is a tiny random model built from its",
        "transformers config (hidden size 64, 2 layers; 6 for Gemma 3); each cell is planned, and what the planner",
        "accepts is built, evaluated against the baseline, gated and published with its serving profiles.",
        "Regenerate with `python -m tests.architectures > docs/compatibility.md`; a test fails while",
        "this file differs from what the matrix asserts.",
        "",
        "Every family also goes through fetch (from a local folder), the baseline, llama.cpp's F16",
        "conversion and its tokenizer fidelity check (llama.cpp's ids equal the Hugging Face",
        "tokenizer's on the eval text). The last column starts again from the family's own published",
        "GGUF Q8_0 file (`source: kind: gguf`: transformers' import, the tokenizer rebuilt from the file",
        "and checked against llama.cpp's). ✅ built and published; ⛔ refused with one line and exit 2,",
        "at plan time, or at fetch for a GGUF source (before anything is built on it); — no GGUF to start from.",
        "",
        "| architecture | tokenizer | what the tiny model keeps | "
        + " | ".join(f"{f.title} ({engine_names(f)})" for f in FORMATS.values()) + " |",
        "|---|---|---|" + "---|" * len(FORMATS),
    ]
    kinds = {"spm": "SentencePiece (`tokenizer.model`)", "bpe": "byte-level BPE (from a GGUF)"}
    refusals: list[str] = []
    for family in FAMILIES.values():
        cells = []
        for fmt in FORMATS:
            outcome = EXPECTED[family.name][fmt]
            if outcome == PASS:
                cells.append("✅")
            elif outcome == NO_GGUF:
                cells.append("—")
            else:
                refusals.append(f"{family.name} × {FORMATS[fmt].title}: {outcome}")
                cells.append(f"⛔ [{len(refusals)}]")
        lines.append(f"| {family.name} (`{family.config.removesuffix('Config')}`) | {kinds[family.tokenizer]} | "
                     f"{family.notes}{' (MoE)' if family.moe else ''} | " + " | ".join(cells) + " |")
    if refusals:
        lines += ["", "Refusals, as the planner words them:", ""]
        lines += [f"{i}. {r}" for i, r in enumerate(refusals, 1)]
    lines += [
        "",
        "Mixture-of-experts families: llm-compressor (FP8_DYNAMIC) and ModelOpt (FP8) quantize the",
        "experts and leave the routers (`mlp.gate`) unquantized, as their MoE examples recommend (tested",
        "on the quantized files, outside a run, since evaluating them is refused above); the GGUF holds",
        "llama.cpp's stacked expert tensors (`ffn_gate_exps`, `ffn_up_exps`, `ffn_down_exps`) and the",
        "router (`ffn_gate_inp`).",
        "",
        "The byte-level BPE families use SmolLM2's tokenizer (imported from the demo's GGUF): llama.cpp's",
        "converter maps a BPE vocabulary only when the hash of its ids on a test text is in its table.",
        "transformers picks Qwen2's own tokenizer class for a `qwen2` model, whose pre-tokenizer gives",
        "other ids, hence refusal 1; a real Qwen2 checkpoint has a vocabulary the table knows.",
        "A SentencePiece tokenizer loaded through transformers' `LlamaTokenizer` class prefixes no space",
        "to a text that starts with one, where SentencePiece and llama.cpp do: the fidelity check then",
        "fails the GGUF variants; the tests' Llama-style tokenizers use the Hub's `tokenizer.json` layout",
        "under the generic fast class, which agrees with SentencePiece.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(render_table(), end="")
