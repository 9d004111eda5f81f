"""Turn a recipe into the build DAG.

::

    fetch ──► baseline ───────────────┐
      └────► quantize/<v> ──► evaluate/<v> ──► gate/<v> ──► publish/<v>

(GGUF variants add a shared conversion, importance matrix and fidelity checks, and a speed
measurement per variant: ``pipeline.plan.gguf``; modelopt variants may add TensorRT-LLM engines:
``pipeline.plan.trtllm``. Each backend names its chain, ``Backend.chain``.) The planner alone
builds stages; backends only describe, check and quantize.

Every key is computed up front (a stage's key includes its inputs' keys), so ``plan`` can say
which stages are cached before anything runs. Plan time also does the cheap checks that would
otherwise fail late: the source is resolved (files hashed, Hub commit pinned), corpora are read
and hashed, every variant must run on one of the recipe's target GPUs, and each backend checks
its variants against the model's config (the storage root is probed before ``run`` starts).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from pipeline import sources
from pipeline.backends import get_backend
from pipeline.cache.store import CacheStore
from pipeline.errors import (
    DataError,
    ModelbuildError,
    RecipeError,
    SourceError,
    StageError,
)
from pipeline.hardware import check_parallelism, compute_capability
from pipeline.hashing import digest_json, sha256_file
from pipeline.plan.gguf import gguf_stages
from pipeline.plan.trtllm import trtllm_stages
from pipeline.plan.variant_stages import EVAL_TOOLS, Planning, standard_stages
from pipeline.quality.calibration import calibration_digest
from pipeline.quality.corpus import check_eval_tokens, read_text
from pipeline.recipe.load import LoadedRecipe
from pipeline.sources import ResolvedSource
from pipeline.stages import VERSIONS
from pipeline.stages.base import Hints, Stage
from pipeline.toolchains import tool_version

# A backend's ``chain`` -> the planner of its variants' stages (backend, variant, planning -> stages).
CHAINS = {"standard": standard_stages, "gguf": gguf_stages, "trtllm": trtllm_stages}


@dataclass(frozen=True)
class Plan:
    """The stages of one recipe in dependency order, with their keys.

    Attributes:
        stages: topologically ordered.
        source: the resolved (pinned) source.
        data: digests of the corpora (``eval``, and ``calibration`` when any variant uses it).
        tool_versions: every distribution version that entered a key.
    """

    stages: tuple[Stage, ...]
    source: ResolvedSource
    data: dict[str, str]
    tool_versions: dict[str, str] = field(default_factory=dict)

    def by_id(self) -> dict[str, Stage]:
        return {s.id: s for s in self.stages}


def build_plan(loaded: LoadedRecipe, resolved: ResolvedSource | None = None, store: CacheStore | None = None,
               *, device: str = "cpu") -> Plan:
    """Build the DAG for a validated recipe.

    Args:
        loaded: the recipe.
        device: where the stages that can use a GPU compute (``cpu``, ``cuda`` or ``cuda:N``;
            ``pipeline.quality.runner.compute_device``): a GPU's build gets keys of its own.
        resolved: a source already resolved (e.g. from the lock file); resolved here otherwise.
        store: the stage cache, if any: plan-time checks that passed before for the same source,
            variant and tool versions are remembered there, and a cached fetch supplies the
            model's config (so a no-op rerun reads no model file and imports no model library).

    Raises:
        SourceError, DataError, RecipeError, ToolError: whatever makes the recipe unbuildable.
    """
    recipe = loaded.recipe
    resolved = resolved or sources.resolve(recipe.source)
    data = corpus_digests(recipe)
    _check_targets(recipe, loaded)
    _check_variants(loaded, resolved, store)
    check_eval_tokens(recipe, _tokenizer_folder(recipe, resolved, store), identity=resolved.identity,
                      corpus_sha256=data["eval"], memo=store.root / "checks" if store is not None else None)

    stages: list[Stage] = []
    fetch = _fetch_stage(resolved)
    eval_params = {
        "corpus_sha256": data["eval"],
        "tokens": recipe.eval.tokens,
        "seq_len": recipe.eval.seq_len,
        "top_k": recipe.eval.top_k,
    }
    baseline = Stage.wired(
        id="baseline",
        kind="baseline",
        params=eval_params,
        inputs={"checkpoint": "fetch"},
        tools=EVAL_TOOLS,
        version=VERSIONS["baseline"],
        hints=Hints(uses_gpu=True, memory_model="streamed"),
    )
    stages += [fetch, baseline]

    planning = Planning(recipe=recipe, data=data, eval_params=eval_params, existing={s.id for s in stages})
    for variant in recipe.variants:
        backend = get_backend(variant.backend)
        stages += CHAINS[backend.chain](backend, variant, planning)

    stages = _on_device(stages, device)
    tools = sorted({t for s in stages for t in s.tools})
    versions = {t: tool_version(t) for t in tools}
    return Plan(stages=tuple(_with_keys(stages, versions)), source=resolved, data=data, tool_versions=versions)


def _on_device(stages: list[Stage], device: str) -> list[Stage]:
    """Stages that compute on a GPU when there is one (baseline, quantize, evaluate) carry the
    device class in their parameters, so in their keys: on a GPU they compute in bf16, on a CPU
    in fp32, and the bytes and figures differ. A GPU builder and a CPU builder sharing a cache
    then never take each other's outputs, and a variant is never scored against a baseline
    computed elsewhere. The CPU adds nothing: CPU keys stay what they were before GPUs counted.
    Only the class is keyed, not which GPU (``cuda:1``) or its kind."""
    kind = device.partition(":")[0]
    if kind == "cpu":
        return stages
    return [replace(s, params={**s.params, "compute": kind}) if s.hints.uses_gpu else s for s in stages]


def _with_keys(stages: list[Stage], versions: dict[str, str]) -> list[Stage]:
    keys: dict[str, str] = {}
    done = []
    for stage in stages:
        missing = [i for i in stage.inputs + stage.after if i not in keys]
        if missing:
            # Stages are emitted in dependency order; anything else is a planner bug or a cycle.
            raise StageError(f"stage {stage.id} depends on {missing} which come later or do not exist")
        keyed = replace(stage, key=stage.compute_key(keys, versions))
        keys[stage.id] = keyed.key
        done.append(keyed)
    return done


def _fetch_stage(resolved: ResolvedSource) -> Stage:
    return Stage(id="fetch", kind="fetch", params={"source": resolved.identity}, tools=resolved.tools,
                 version=VERSIONS["fetch"])


def corpus_digests(recipe) -> dict[str, str]:
    text = read_text(recipe.eval.corpus, what="eval.corpus")
    # Cheap plan-time bound (a token is at least one character); the exact count is checked
    # when the baseline tokenizes.
    if len(text) < recipe.eval.tokens:
        raise DataError(
            f"eval corpus too short: {len(text)} characters cannot hold {recipe.eval.tokens} tokens",
            where="eval.corpus",
            fix="lower eval.tokens or use a longer corpus",
        )
    data = {"eval": sha256_file(recipe.eval.corpus)}
    if any(v.needs_calibration() for v in recipe.variants):
        data["calibration"], _ = calibration_digest(recipe.calibration)
        if data["calibration"] == data["eval"]:
            raise DataError(
                "calibration and eval corpora have the same content",
                where="calibration.path",
                fix="calibrate and evaluate on different text",
            )
    return data


def _check_targets(recipe, loaded) -> None:
    """Every variant must run on at least one declared target GPU (in at least one engine)."""
    if not recipe.targets:
        return
    gpus: dict[str, float] = {}
    for j, target in enumerate(recipe.targets):
        cc = compute_capability(target.gpu)
        if cc is None:  # the schema takes known GPUs only
            raise loaded.error(f"unknown GPU {target.gpu!r}", ("targets", j, "gpu"))
        gpus[target.gpu] = cc
    for i, variant in enumerate(recipe.variants):
        backend = get_backend(variant.backend)
        if not any(backend.runs_on(variant, cc) for cc in gpus.values()):
            raise loaded.error(
                f"{backend.describe(variant).scheme} needs {backend.gpu_requirement(variant)}, but the "
                f"targets are {', '.join(f'{g} ({cc:g})' for g, cc in gpus.items())}",
                ("variants", i), fix="drop the variant or add a target GPU that can run it",
            )


# Bump when backends' plan-time checks change, so remembered passes are checked again.
CHECKS_VERSION = 3


def _check_variants(loaded: LoadedRecipe, resolved: ResolvedSource, store: CacheStore | None) -> None:
    """Each backend's plan-time checks of its variants against the model's config."""
    recipe = loaded.recipe
    memo = store.root / "checks" if store is not None else None
    pending = []
    for index, variant in enumerate(recipe.variants):
        backend = get_backend(variant.backend)
        token = digest_json({
            "version": CHECKS_VERSION, "source": resolved.identity,
            "variant": variant.model_dump(mode="json", exclude={"name", "gate", "calibration"}),
            "targets": [t.model_dump(mode="json") for t in recipe.targets],
            "tools": {t: tool_version(t) for t in backend.tools},
        })
        if memo is None or not (memo / token).exists():
            pending.append((index, variant, backend, token))
    if not pending:
        return
    config = _model_config(recipe, resolved, store)
    for index, target in enumerate(recipe.targets):
        reason = check_parallelism(target.tp, target.pp, config)
        if reason:
            raise loaded.error(f"target {target.gpu}: {reason}", ("targets", index, "tp"),
                               fix="choose a tp that divides the attention heads")
    for index, variant, backend, token in pending:
        try:
            backend.check_variant(variant, config)
        except RecipeError as e:
            at = tuple(int(p) if p.isdigit() else p for p in (e.field or "scheme").split("."))
            raise loaded.error(e.message, ("variants", index, *at), fix=e.fix) from None
        if memo is not None:
            memo.mkdir(parents=True, exist_ok=True)
            (memo / token).touch()


def _tokenizer_folder(recipe, resolved: ResolvedSource, store: CacheStore | None):
    """A folder with the model's tokenizer at hand without a download: a local source, else a
    cached fetch; None otherwise (the baseline counts the eval tokens then)."""
    if recipe.source.kind == "local":
        return recipe.source.path
    if store is None:
        return None
    entry = store.get(_fetch_stage(resolved).compute_key({}, {t: tool_version(t) for t in resolved.tools}))
    return entry.data if entry is not None else None


def _model_config(recipe, resolved: ResolvedSource, store: CacheStore | None = None):
    """The model's transformers config, read without loading weights (for plan-time checks):
    from the cached fetch output when there is one, else from the source."""
    from transformers import AutoConfig

    source = recipe.source
    trust = source.trust_remote_code
    if store is not None:
        fetch = _fetch_stage(resolved)
        entry = store.get(fetch.compute_key({}, {t: tool_version(t) for t in resolved.tools}))
        if entry is not None:
            return AutoConfig.from_pretrained(entry.data, trust_remote_code=trust)
    try:
        if source.kind == "local":
            return AutoConfig.from_pretrained(source.path, trust_remote_code=trust)
        if source.kind == "gguf":
            from pipeline.sources.gguf import locate

            path = locate(source)
            return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        from pipeline.sources.hub import config_path

        return AutoConfig.from_pretrained(config_path(source, resolved), trust_remote_code=trust)
    except ModelbuildError:
        raise
    except Exception as e:  # transformers and huggingface_hub raise many types here
        raise SourceError(f"cannot read the model's config: {type(e).__name__}: {e}", where="source",
                          fix="check the source; plan-time checks need its config") from None
