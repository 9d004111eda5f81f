"""The ``README.md`` published with every variant: a Hugging Face model card for a quantized model.

Front matter follows the Hub's conventions for quantizations (``base_model``,
``base_model_relation: quantized``, ``quantized_by``, ``license`` from the source, format and
engine ``tags``), written by ``huggingface_hub``'s own ``ModelCardData``. The body says how the
variant was made, how good it measured against the unquantized baseline, how fast where it was
measured, and how to serve it in each engine that loads it — all read from the manifest.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from pipeline import engines as catalogue
from pipeline.figures import kld

FORMAT_NAMES = {"gguf": "GGUF", "modelopt-hf": "NVIDIA ModelOpt (Hugging Face export, hf_quant_config.json)"}
BACKEND_TAGS = {"llmcompressor": ["llm-compressor", "compressed-tensors"], "modelopt": ["modelopt"],
                "llamacpp": ["gguf"]}


def tags(manifest: dict[str, Any]) -> list[str]:
    """Format, bit-width and engine tags, e.g. ``fp8``, ``w4a16``, ``int4``, ``gguf``, ``vllm``."""
    fmt = manifest.get("format") or {}
    scheme = str(fmt.get("scheme") or "").lower()
    backend = (manifest.get("variant_spec") or {}).get("backend")
    out = ["quantized", *(BACKEND_TAGS.get(backend, []) if backend is not None else [])]
    words = [w for w in re.split(r"[^a-z0-9]+", scheme.replace("+", "_")) if w]
    if backend == "llamacpp":
        out.append(scheme)  # q4_k_m, iq4_xs, f16 …
    else:
        out += [w for w in words if re.fullmatch(r"w\d+a\d+|fp8|nvfp4|mxfp4|int4|int8|awq|gptq|smoothquant", w)]
        if re.match(r"w\d+a\d+", scheme):
            out.append(scheme.split("_")[0])
    bits = fmt.get("weight_bits")
    if isinstance(bits, (int, float)) and bits < 16 and backend != "llamacpp":
        family = "fp" if any(w in words for w in ("fp8", "nvfp4", "mxfp4")) else "int"
        out.append(f"{family}{int(bits)}" if family == "int" else ("fp4" if bits == 4 else "fp8"))
    algorithm = (manifest.get("variant_spec") or {}).get("algorithm")
    if algorithm:
        out.append(str(algorithm).lower())
    known = [catalogue.find(e) for e in fmt.get("engines", [])]
    out += [tag for engine in known if engine is not None for tag in engine.tags]
    return list(dict.fromkeys(t for t in out if t))


def front_matter(manifest: dict[str, Any], base_model: str | None) -> str:
    from huggingface_hub import ModelCardData

    backend = (manifest.get("variant_spec") or {}).get("backend")
    fields: dict[str, Any] = dict(
        license=manifest.get("license"),
        tags=tags(manifest),
        pipeline_tag="text-generation",
        quantized_by="modelbuild",
    )
    if base_model:
        fields.update(base_model=base_model, base_model_relation="quantized")
    if backend != "llamacpp":
        fields["library_name"] = "transformers"
    return ModelCardData(**{k: v for k, v in fields.items() if v is not None}).to_yaml()


def _excerpt(spec: dict[str, Any]) -> str:
    """The variant as the recipe would spell it: settings left at their defaults dropped."""
    kept = {k: v for k, v in spec.items() if v not in (None, {}, [])}
    return yaml.safe_dump(kept, sort_keys=False).rstrip()


def _fmt(v: Any, spec: str) -> str:
    return format(v, spec) if isinstance(v, (int, float)) else "not measured"


def model_card(manifest: dict[str, Any], base_model: str | None) -> str:
    """The card's full text (front matter + Markdown)."""
    fmt = manifest.get("format") or {}
    m = manifest.get("metrics") or {}
    data = manifest.get("data") or {}
    name = f"{manifest['model']} — {manifest['variant']}"
    engines = [_long_name(e) for e in fmt.get("engines", [])]
    fmt_name = fmt.get("format")
    fmt_long = FORMAT_NAMES.get(fmt_name, fmt_name) if fmt_name is not None else None
    lines = [
        "---", front_matter(manifest, base_model).rstrip(), "---", "",
        f"# {name}", "",
        f"{fmt_long} **{fmt.get('scheme')}** ({_fmt(fmt.get('weight_bits'), 'g')}-bit weights) of "
        + (f"[{base_model}](https://huggingface.co/{base_model})" if base_model else "the source model")
        + f", for {', '.join(engines) or 'no serving engine'}. Built and gated by modelbuild; version "
        f"`{manifest.get('version')}`.", "",
        "## How it was made", "",
        f"- Source: {_source(manifest.get('source') or {})}",
        f"- Recipe: `{(manifest.get('recipe') or {}).get('name')}` (sha256 `{str((manifest.get('recipe') or {}).get('sha256'))[:12]}…`); this variant:",
        "", "```yaml", _excerpt(manifest.get("variant_spec") or {}), "```", "",
        "- Tools: " + ", ".join(f"{k} {v}" for k, v in sorted((manifest.get("tools") or {}).items())),
        f"- Calibration: {_calibration(data.get('calibration'))}",
        "",
        "## Quality against the unquantized baseline", "",
        f"Measured on {_fmt((data.get('eval') or {}).get('tokens_scored'), 'd')} tokens of "
        f"`{(data.get('eval') or {}).get('path')}` in windows of {(data.get('eval') or {}).get('seq_len')} tokens "
        f"(baseline perplexity {_fmt((manifest.get('baseline') or {}).get('ppl'), '.3f')}); "
        f"{(manifest.get('evaluation') or {}).get('method') or ''}".rstrip() + ".", "",
        "| Perplexity | PPL ratio | Mean KLD | P99 KLD | Top-1 agreement | Gate |",
        "|---|---|---|---|---|---|",
        f"| {_fmt(m.get('ppl'), '.3f')} | {_fmt(m.get('ppl_ratio'), '.4f')} | {kld(m.get('mean_kld'))} | "
        f"{kld(m.get('p99_kld'))} | {_fmt(None if m.get('top1') is None else m['top1'] * 100, '.1f')}% | "
        f"{'passed' if (manifest.get('gate') or {}).get('passed') else 'failed'} |",
        "", "## Speed", "", _speed(manifest), "",
        "## Serve it", "",
    ]
    serve = manifest.get("serve") or {}
    profiles = manifest.get("serving_profiles") or []
    min_cc = fmt.get("min_compute_capability")
    for engine, command in serve.items():
        gpus = (fmt.get("gpus") or {}).get(engine) or [min_cc, None]
        known = catalogue.find(engine)
        need = "CPU or any GPU" if known is not None and known.cpu else (
            f"NVIDIA compute capability {gpus[0]:g}+" + (f" and below {gpus[1]:g}" if gpus[1] else "")
            if gpus[0] is not None else "see the engine's docs")
        lines += [f"**{_long_name(engine)}** ({need}):", "", "```sh", command, "```", ""]
    if profiles:
        lines += ["Serving profiles published beside the weights:", ""]
        lines += [f"- `{p['name']}`: `{p['command']}`" for p in profiles]
        lines.append("")
    if not serve and not profiles:
        lines += ["No engine serves these files directly (see the manifest's format section).", ""]
    lines += ["Every file's sha256 is in `manifest.json`; `modelbuild verify` checks a copy against it.", ""]
    return "\n".join(lines)


def _long_name(engine: str) -> str:
    """The engine's name in the card (a TensorRT-LLM one says which backend)."""
    found = catalogue.find(engine)
    return engine if found is None else found.long_name


def _source(src: dict[str, Any]) -> str:
    if src.get("kind") == "hub":
        return f"Hugging Face `{src.get('repo')}` at commit `{src.get('commit')}`"
    if src.get("kind") == "gguf":
        where = f"package `{src['package']}`, " if src.get("package") else ""
        return f"GGUF {where}file `{src.get('file') or src.get('path')}` (sha256 `{str(src.get('sha256'))[:12]}…`), dequantized to the baseline"
    return f"local checkpoint `{src.get('path')}` (digest `{str(src.get('checkpoint_digest'))[:12]}…`)"


def _calibration(cal: dict[str, Any] | None) -> str:
    if not cal:
        return "none (data-free)"
    where = cal.get("path") or cal.get("dataset")
    details = ", ".join(f"{k} {cal[k]}" for k in ("samples", "seq_len", "seed") if k in cal)
    digest = f", sha256 `{str(cal['sha256'])[:12]}…`" if cal.get("sha256") else ""
    return f"`{where}` ({details}{digest})"


def _speed(manifest: dict[str, Any]) -> str:
    s = manifest.get("speed")
    if not s:
        return ("Not measured: no stage ran this variant's engine on its hardware (GPU engines need a GPU builder; "
                "`modelbuild report` estimates their speed per GPU from the files and the model's shape).")
    figures = ", ".join(f"{k[:2]}{k[2:-4]} {v:.1f} tokens/s" + (f" (min–max {r[0]:.1f}–{r[1]:.1f})" if (r := s.get(f"{k}_range")) else "")
                        for k, v in s.items() if k.endswith("_tps"))
    load = s.get("load") or {}
    quiet = ""
    if load.get("other_cores") is not None:
        quiet = (f" Other processes kept {load['other_cores']:.2f} cores busy meanwhile"
                 + (" (a busy machine: slower than its own speed)." if load.get("busy") else "."))
    return (f"{s.get('tool', 'benchmark')} on {s.get('cpu_model') or s.get('cpu')} with {s.get('threads')} threads "
            f"(median of {s.get('repetitions')}): {figures}.{quiet}")
