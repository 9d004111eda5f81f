"""Nothing silently wrong at fetch: a source's tokenizer is checked before anything is built on it.

A tiny SentencePiece-tokenizer Llama is written to GGUF by llama.cpp's converter and imported
back as a ``kind: gguf`` source: the import carries ``tokenizer.model``, tokenizes like llama.cpp,
and its GGUF variants build. Broken tokenizers (character-level, a GGUF vocabulary listing a
piece twice, corruption warnings) and an absurd baseline are refused with one line.
"""

from __future__ import annotations

import io
import json
import logging
import math
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipeline.errors import SourceError
from pipeline.sources import tokenizer_check
from tests.backends.test_llamacpp import toolchain  # noqa: F401 - the fixture, shared
from tests.conftest import WIKITEXT, write_recipe


def _error_line(err: str) -> str:
    [line] = [ln for ln in err.splitlines() if ln.startswith("error:")]
    return line


@pytest.fixture(scope="module")
def tiny_sp(tmp_path_factory) -> Path:
    """A 2-layer, hidden-64 Llama with random weights and a 1,000-piece SentencePiece BPE model
    (byte fallback, no normalization, as Llama's) trained on WikiText-2 valid text."""
    import sentencepiece as spm
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    out = tmp_path_factory.mktemp("tiny-sp")
    text = (WIKITEXT / "valid.txt").read_text(encoding="utf-8")[:200_000]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([line for line in text.splitlines() if line.strip()]), model_writer=model,
        vocab_size=1000, model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1, minloglevel=2,
    )
    (out / "tokenizer.model").write_bytes(model.getvalue())
    tokenizer = LlamaTokenizer.from_pretrained(out)
    tokenizer.save_pretrained(out)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_sp_gguf(tiny_sp, tmp_path_factory, toolchain) -> Path:  # noqa: F811
    """``tiny_sp`` written to GGUF (F16) by llama.cpp's converter; ``tokenizer.ggml.model: llama``."""
    from pipeline.toolchains import llamacpp_tools

    out = tmp_path_factory.mktemp("tiny-sp-gguf") / "tiny-sp.gguf"
    llamacpp_tools.convert(tiny_sp, out, "f16", {"general.name": "Tiny SP"})
    return out


def _gguf_source(path: Path):
    return SimpleNamespace(kind="gguf", path=path, package=None, file=None, dtype="bfloat16",
                           allow_pickle=False, trust_remote_code=False)


def test_sentencepiece_gguf_imports_faithfully(tmp_path, tiny_sp, tiny_sp_gguf, wikitext):
    from transformers import AutoTokenizer

    from pipeline.sources import gguf
    from pipeline.sources.tokenizer_check import AWKWARD_STRINGS
    from pipeline.stages.fetch import check_tokenizer

    source = _gguf_source(tiny_sp_gguf)
    out = tmp_path / "checkpoint"
    out.mkdir()
    facts = gguf.materialize(source, gguf.resolve(source), out)
    # The SentencePiece model is carried, piece for piece what the original one holds.
    assert (out / "tokenizer.model").is_file() and facts["tokenizer"]["sentencepiece_model"]
    from sentencepiece import SentencePieceProcessor

    rebuilt = SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    original = SentencePieceProcessor(model_file=str(tiny_sp / "tokenizer.model"))
    assert [rebuilt.id_to_piece(i) for i in range(rebuilt.get_piece_size())] == \
        [original.id_to_piece(i) for i in range(original.get_piece_size())]
    assert facts["tokenizer"]["matches_llama_cpp"]["mismatches"] == 0
    # The checkpoint's tokenizer (as later stages load it) is llama.cpp's, on the eval text too.
    imported = AutoTokenizer.from_pretrained(out)
    texts = [(wikitext / "test.txt").read_text(encoding="utf-8")[:20_000], *AWKWARD_STRINGS]
    same = tokenizer_check.compare_tokenizers(tiny_sp_gguf, imported, texts)
    assert same["mismatches"] == 0 and same["tokens"] > 5000, same["first"]
    # ... and SentencePiece's own, running the original model (on text without special tokens,
    # which SentencePiece does not parse).
    for text in tokenizer_check.fixed_texts():
        assert imported(text, add_special_tokens=False)["input_ids"] == original.encode(text), text
    # A real subword split: well above the character-level bound.
    assert check_tokenizer(out, trust_remote_code=False, where="fetch")["bytes_per_token"] > 2.0


def test_fetch_refuses_a_tokenizer_unlike_the_gguf(tiny_sp, tiny_sp_gguf, tiny_model):
    """Near misses are caught: LlamaTokenizer built from the very same tokenizer.model (its
    Metaspace adds no ``▁`` before a text that starts with a space, SentencePiece and llama.cpp
    do) differs on two of the fixed texts; another vocabulary differs id by id."""
    from transformers import AutoTokenizer

    from pipeline.sources.gguf import _fields, _value

    tokens = _value(_fields(tiny_sp_gguf, "t"), "tokenizer.ggml.tokens")
    with pytest.raises(SourceError) as e:
        tokenizer_check.match_gguf(tiny_sp_gguf, AutoTokenizer.from_pretrained(tiny_sp), tokens,
                                   where="source tiny-sp.gguf")
    line = str(e.value)
    assert "\n" not in line and line.startswith("source tiny-sp.gguf: the imported tokenizer splits 2 of 14")
    assert "differently from llama.cpp" in line and "leading spaces" in line
    with pytest.raises(SourceError, match="vocabulary differs from the GGUF's at .* ids"):
        tokenizer_check.match_gguf(tiny_sp_gguf, AutoTokenizer.from_pretrained(tiny_model), tokens, where="s")


def test_sentencepiece_gguf_source_builds_gguf_variants(cli, dirs, tmp_path, tiny_sp_gguf, wikitext):
    """The whole run on the imported checkpoint: fetch, baseline, and a Q8_0 variant through
    llama.cpp's converter (which needs the carried tokenizer.model), fidelity checks and gate."""
    source = f"source:\n  kind: gguf\n  path: {tiny_sp_gguf}\n  license: apache-2.0\n"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"name: tiny-sp\n{source}"
        f"eval:\n  corpus: {wikitext / 'test.txt'}\n  tokens: 512\n  seq_len: 128\n  gate:\n    max_kld: 5.0\n"
        "gguf:\n  metadata:\n    name: Tiny SP\n"
        "  speed:\n    prompt_tokens: 16\n    gen_tokens: 4\n    repetitions: 1\n"
        "variants:\n  - name: gguf-q8\n    backend: llamacpp\n    type: Q8_0\n",
        encoding="utf-8",
    )
    code, _out, err = cli("run", recipe)
    assert code == 0, err[-3000:]
    assert "gguf/fidelity: done" in err  # llama.cpp's tokenizer of the conversion matched the checkpoint's
    [manifest] = list((dirs["storage"] / "tiny-sp" / "gguf-q8").rglob("manifest.json"))
    m = json.loads(manifest.read_text())
    assert m["format"]["format"] == "gguf"
    from pipeline.toolchains.gguf_reader import read_metadata

    meta = read_metadata(manifest.parent / m["gguf"]["files"][0])
    assert meta["tokenizer.ggml.model"] == "llama"  # a SentencePiece vocabulary again


def test_character_level_tokenizer_is_refused_at_fetch(cli, dirs, tmp_path, tiny_model, wikitext):
    """A tokenizer.json whose BPE merges are gone splits text into single characters although
    its vocabulary holds hundreds of merged pieces: refused at fetch with one line, nothing built
    on it (no baseline, no variant)."""
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    spec = json.loads((broken / "tokenizer.json").read_text(encoding="utf-8"))
    assert len(spec["model"]["merges"]) > 200
    spec["model"]["merges"] = []
    (broken / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    recipe = write_recipe(tmp_path, broken, wikitext)
    code, _out, err = cli("run", recipe)
    assert code == 2, err[-2000:]
    line = _error_line(err)
    assert "fetch:" in line and "character-level" in line and "1.00 characters" in line, line
    assert "baseline: done" not in err
    assert not dirs["storage"].exists() or not any(dirs["storage"].rglob("manifest.json"))
    # The same files behind the intact tokenizer pass (the tiny BPE makes ~2.3 bytes per token).
    from pipeline.stages.fetch import check_tokenizer

    assert check_tokenizer(tiny_model, trust_remote_code=False, where="fetch")["bytes_per_token"] > 2.0


def test_absurd_baseline_perplexity_is_refused(cli, dirs, tmp_path, tiny_model, wikitext):
    """Random weights score about the vocabulary size, a uniform guess, and pass (the tiny model:
    1.01 x 512, every run in test_run.py); weights that are confidently wrong (embeddings scaled up
    40x) score far above it: refused with one line."""
    import torch
    from safetensors.torch import load_file, save_file

    loud = tmp_path / "loud"
    shutil.copytree(tiny_model, loud)
    [weights] = list(loud.glob("*.safetensors"))
    state = load_file(str(weights))
    state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"].float().mul(40).to(torch.bfloat16)
    save_file(state, str(weights), metadata={"format": "pt"})
    recipe = write_recipe(tmp_path, loud, wikitext)
    code, _out, err = cli("run", recipe)
    assert code == 2, err[-2000:]
    line = _error_line(err)
    assert "baseline: baseline perplexity" in line and "2 x the vocabulary size (512)" in line, line
    assert not dirs["storage"].exists() or not any(dirs["storage"].rglob("manifest.json"))


def test_perplexity_bound():
    check = tokenizer_check.check_baseline_perplexity
    check(1.02 * 512, 512, where="baseline")  # random weights: a uniform guess, just above
    check(12.5, 49152, where="baseline")
    for ppl in (2.5 * 512, math.inf, math.nan):
        with pytest.raises(SourceError, match="far worse than guessing uniformly"):
            check(ppl, 512, where="baseline")


def test_granularity_bound_spares_byte_level_vocabularies():
    """A vocabulary of single units is character-level by design: not refused; CJK text, a few
    characters but many bytes per token, is not refused either."""

    class Chars:
        all_special_tokens: list[str] = []

        def __init__(self, vocab):
            self.vocab = vocab

        def get_vocab(self):
            return {t: i for i, t in enumerate(self.vocab)}

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [0] * len(text)}

    singles = Chars([chr(i) for i in range(256)])
    assert tokenizer_check.check_granularity("hello world", singles, what="t", where="w")["bytes_per_token"] == 1.0
    pieces = Chars([chr(i) for i in range(256)] + [f"p{i}" for i in range(300)])
    with pytest.raises(SourceError, match="300 multi-character pieces"):
        tokenizer_check.check_granularity("hello world", pieces, what="t", where="w")
    cjk = tokenizer_check.check_granularity("日本語の文章", pieces, what="t", where="w")
    assert cjk["bytes_per_token"] == 3.0


def test_corruption_warnings_are_errors():
    from transformers.utils import logging as hf_logging

    with pytest.raises(SourceError, match="reported a corrupted tokenizer: .*could be corrupted"):
        with tokenizer_check.corruption_is_an_error("fetch"):
            hf_logging.get_logger("transformers.tokenization_utils_base").warning(
                "The OrderedVocab you are attempting to save contains holes for indices [5], your vocabulary "
                "could be corrupted!")
    with pytest.raises(SourceError, match="Falling back to TikToken"):
        with tokenizer_check.corruption_is_an_error("fetch"):
            warnings.warn("Could not extract SentencePiece model from x.model. Falling back to TikToken extractor.",
                          stacklevel=1)
    # Other warnings are not ours to judge: shown, not raised.
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        with tokenizer_check.corruption_is_an_error("fetch"):
            logging.getLogger("transformers").warning("Merges were not in checkpoint, building merges on the fly.")
            warnings.warn("something else", UserWarning, stacklevel=1)
    assert [str(w.message) for w in shown] == ["something else"]


def test_duplicate_piece_in_gguf_vocabulary_is_refused():
    from pipeline.sources.gguf import _sentencepiece_model

    def fields(**values):
        return {f"tokenizer.ggml.{k}": SimpleNamespace(contents=lambda v=v: v) for k, v in values.items()}

    good = fields(tokens=["<unk>", "<s>", "</s>", "▁a", "b"], scores=[0.0, 0.0, 0.0, -1.0, -2.0],
                  token_type=[2, 3, 3, 1, 1], unknown_token_id=0, bos_token_id=1, eos_token_id=2)
    assert _sentencepiece_model(good, "source m.gguf")
    bad = fields(tokens=["<unk>", "<s>", "</s>", "▁a", "▁a"], scores=[0.0, 0.0, 0.0, -1.0, -2.0],
                 token_type=[2, 3, 3, 1, 1], unknown_token_id=0, bos_token_id=1, eos_token_id=2)
    with pytest.raises(SourceError, match=r"lists '▁a' twice \(ids 3 and 4\)"):
        _sentencepiece_model(bad, "source m.gguf")
    short = fields(tokens=["<unk>", "a"], scores=[0.0], token_type=[2, 1], unknown_token_id=0)
    with pytest.raises(SourceError, match="incomplete"):
        _sentencepiece_model(short, "source m.gguf")

