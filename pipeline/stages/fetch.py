"""fetch: materialize the source as a safetensors checkpoint folder in the cache, and refuse a
tokenizer that is plausibly broken before anything is built on it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict, cast

from pipeline import sources
from pipeline.errors import SourceError
from pipeline.sources import tokenizer_check
from pipeline.sources.checkpoint import inspect_checkpoint

if TYPE_CHECKING:
    from pipeline.stages.base import Stage
    from pipeline.stages.context import RunContext


class Inputs(TypedDict):
    pass  # the source itself is in the context


class Result(TypedDict):
    """The source's provenance and what materializing it found (``tokenizer`` among them; other
    facts depend on the source's kind)."""

    provenance: dict[str, Any]
    tokenizer: dict[str, Any]


def run(ctx: RunContext, stage: Stage, inputs: Inputs, out: Path) -> Result:
    source = ctx.recipe.source
    facts = sources.materialize(source, ctx.source, out)
    # Whatever the kind, the cached checkpoint must pass the same checks as a local folder.
    inspect_checkpoint(out, allow_pickle=source.allow_pickle, trust_remote_code=source.trust_remote_code, where="fetch")
    granularity = check_tokenizer(out, trust_remote_code=source.trust_remote_code, where="fetch")
    tokenizer = {**facts.get("tokenizer", {}), "fixed_text": granularity}
    return cast("Result", {"provenance": ctx.source.provenance, **facts, "tokenizer": tokenizer})


def check_tokenizer(checkpoint: Path, *, trust_remote_code: bool, where: str) -> dict:
    """Load the checkpoint's tokenizer as every later stage will and refuse it if the library
    reports it corrupt or it cuts plain prose into single characters (GGUF sources were also
    compared with llama.cpp when materialized).

    Raises:
        SourceError: no loadable tokenizer, a corruption warning, or character-level granularity.
    """
    from transformers import AutoTokenizer

    try:
        with tokenizer_check.corruption_is_an_error(where):
            tokenizer = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SourceError(
            f"the checkpoint's tokenizer cannot be loaded: {type(e).__name__}: {str(e)[:200]}", where=where,
            fix="the source needs its tokenizer files (tokenizer.json or tokenizer.model, tokenizer_config.json)",
        ) from None
    return tokenizer_check.check_granularity(tokenizer_check.PROSE, tokenizer, what="a fixed English text",
                                             where=where)
