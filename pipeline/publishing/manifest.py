"""The manifest written beside every published variant (``manifest.json``), built from the
stages' results.

It says what the files are (every file's sha256 and size), where they came from (source repo and
commit or file digest, recipe digest, tool versions, calibration and eval data digests), the
architecture's serving shape (parameters a token multiplies through, KV heads), how good they are (metrics against the baseline, and how the CPU computed them), whether they passed their
gate, and how to serve them. ``pipeline.storage.manifest`` reads and checks it.
"""

from __future__ import annotations

import functools
import time
from typing import TYPE_CHECKING, Any, TypedDict

from pipeline import __version__

if TYPE_CHECKING:
    from pipeline.stages.base import Stage
    from pipeline.stages.context import RunContext, StageInput

MANIFEST_VERSION = 1


class _Always(TypedDict):
    checkpoint: StageInput  # the variant's files
    evaluation: StageInput
    gate: StageInput
    baseline: StageInput
    fetch: StageInput  # the source, for its provenance


class PublishInputs(_Always, total=False):
    """The publish stages' inputs by role, which the manifest is built from (declared here, the
    stages take them: the manifest is this package's). Optional roles: see
    ``pipeline.stages.gate.Inputs``."""

    speed: StageInput  # GGUF
    fidelity: StageInput  # GGUF
    kv_cache: StageInput  # GGUF with kv_cache_types


def build_manifest(ctx: RunContext, stage: Stage, inputs: PublishInputs) -> dict[str, Any]:
    """Everything but ``files``, ``version`` and ``serve`` (publish fills those in), from the
    publish stage's inputs by role (``checkpoint``, ``evaluation``, ``gate``, ``baseline``,
    ``fetch``; ``speed``, ``fidelity`` and ``kv_cache`` when planned)."""
    name = stage.params["variant"]
    recipe = ctx.recipe
    variant = ctx.variant(stage.variant)
    quant = inputs["checkpoint"]
    evaluation = inputs["evaluation"].result
    baseline = inputs["baseline"].result
    plan = ctx.plan
    stages = plan.by_id()
    quantize = stages[stage.roles["checkpoint"]]
    used_tools = sorted({t for role in ("checkpoint", "evaluation", "fetch") for t in stages[stage.roles[role]].tools})
    data: dict[str, Any] = {
        "eval": {
            "path": str(recipe.eval.corpus),
            "sha256": plan.data["eval"],
            "tokens_scored": baseline["tokens_scored"],
            "seq_len": recipe.eval.seq_len,
        },
        "calibration": None,
    }
    settings = quantize.params.get("calibration")
    for upstream in quantize.inputs:  # GGUF: calibration feeds the importance matrix
        settings = settings or stages[upstream].params.get("calibration")
    if settings is not None:
        cal = recipe.calibration
        source = {"path": str(cal.path)} if cal.path is not None else {"dataset": cal.dataset.model_dump(exclude_none=True)}
        data["calibration"] = {**source, **settings}
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "model": stage.params["model"],
        "variant": name,
        "build_key": stage.key,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": {**ctx.source.provenance, "checkpoint_digest": inputs["fetch"].stored.digest},
        "license": recipe.source.license,
        "recipe": {"name": recipe.name, "path": str(ctx.loaded.path), "sha256": ctx.loaded.digest},
        "variant_spec": variant.model_dump(mode="json"),
        "format": quant.result["format"],
        "size_bytes": quant.result["size_bytes"],
        "architecture": _serving_shape(str(inputs["fetch"].data), recipe.source.trust_remote_code),
        "tools": {"modelbuild": __version__, **{t: plan.tool_versions[t] for t in used_tools}},
        "data": data,
        "baseline": {"ppl": baseline["ppl"]},
        "metrics": evaluation["metrics"],
        "evaluation": {
            "device": evaluation["device"],
            "method": evaluation["cpu_evaluation"],
            "kld": evaluation["kld_method"],
        },
        "gate": inputs["gate"].result,
    }
    if "device" in quant.result:  # (quantize entries cached before it was recorded lack it)
        manifest["quantization"] = {k: quant.result[k] for k in ("device", "devices") if k in quant.result}
    if "speed" in inputs:
        manifest["speed"] = inputs["speed"].result
    if "fidelity" in inputs:
        fidelity = inputs["fidelity"].result
        manifest["fidelity"] = {k: fidelity[k] for k in ("tokenizer", "f16_mean_kld", "f16_max_kld", "max_kld")}
    if "kv_cache" in inputs:
        # Each cache type's metrics, and what it adds to the variant's own (16-bit cache) KLD.
        own = evaluation["metrics"]["mean_kld"]
        manifest["kv_cache"] = {kind: {**m, "added_mean_kld": m["mean_kld"] - own}
                                for kind, m in inputs["kv_cache"].result["types"].items()}
    if quant.result.get("tensor_types") is not None:
        manifest["gguf"] = {k: quant.result[k] for k in
                            ("files", "file_type", "tensor_types", "metadata", "imatrix_sha256", "conversion")}
    return manifest


@functools.lru_cache(maxsize=8)
def _serving_shape(checkpoint: str, trust_remote_code: bool) -> dict[str, int | bool]:
    """The source's ``shapes.serving_shape``: once per run and source, not once per variant."""
    from transformers import AutoConfig

    from pipeline.backends.shapes import serving_shape

    return serving_shape(AutoConfig.from_pretrained(checkpoint, trust_remote_code=trust_remote_code))
