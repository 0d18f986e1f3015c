"""Ahead-of-time artifacts: `fuselm build` writes a compiled model once, `fuselm.load` and
`fuselm.LLM(model=DIR)` load it in a fresh process with no capture and no code generation,
and every way an artifact can be wrong here is refused before anything of it is loaded.

Each model is built once per session (kernels in a session cache); the real models are
loaded back in fresh subprocesses, whose outputs must equal the in-process compile's bit
for bit. Refusals are checked on copies of a tiny random Llama's artifact.
"""
import importlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import fuselm
from fuselm.artifact import build, is_artifact
from fuselm.artifact.weights import map_weights
from fuselm.cli import main
from fuselm.errors import ArtifactError
from fuselm.codegen.tvm import host
from fuselm.llm import LLM
from fuselm.models import LoadedModel
from fuselm.models.config import LlamaConfig
from fuselm.models.contract import pack_prompts
from fuselm.models.llama import LlamaForCausalLM
from fuselm.models.tokenizer import Tokenizer
from fuselm.runtime.engine import LLMEngine
from fuselm.sampling_params import SamplingParams

TINY = {"model_type": "llama", "vocab_size": 64, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True,
        "max_position_embeddings": 256}
# Run in a fresh Python: load the artifact (argv[1]), call it by name on the saved inputs
# (argv[2]), and report whether its outputs equal the saved ones, what was captured, generated
# or built, and which modules that a load must not need were imported.
LOAD_AND_COMPARE = """
    import json, sys
    import torch
    from safetensors.torch import load_file
    import fuselm

    model = fuselm.load(sys.argv[1])
    saved = load_file(sys.argv[2])
    inputs = {name[3:]: t.clone() for name, t in saved.items() if name.startswith("in.")}
    output = model(**inputs)
    equal = torch.equal(output, saved["expected"])
    if "expected_cache" in saved:  # the LM's KV cache, written in place
        equal = equal and torch.equal(inputs["kv_cache"], saved["expected_cache"])
    imported = [m for m in ("torch._dynamo", "transformers", "fuselm.frontend.capture", "tvm") if m in sys.modules]
    from fuselm.codegen import cache
    from fuselm.codegen.tvm import build_count
    api = sys.modules.get("fuselm.api")
    print(json.dumps({"equal": equal, "captures": api.stats["captures"] if api else 0,
                      "codegen_runs": cache.stats["codegen_runs"], "builds": build_count(),
                      "kernels": len(model.kernels),
                      "program_calls": model._compiled.program.calls,  # the forward ran as one program call
                      "program_builds": cache.program_stats["codegen_runs"],
                      "imported": imported}))
"""


def tiny_llama_dir(directory: Path) -> Path:
    """A Hugging Face directory of a random tiny Llama, with a tokenizer (token i is `t<i>`)."""
    torch.manual_seed(0)
    fields = {k: v for k, v in TINY.items() if k != "model_type"}
    state_dict = {name: t.contiguous() for name, t in LlamaForCausalLM(LlamaConfig(**fields)).state_dict().items()
                  if name != "lm_head.weight"}  # tied to the embedding, as save_pretrained writes it
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(TINY))
    save_file(state_dict, str(directory / "model.safetensors"))
    Tokenizer.of_numbered_words(TINY["vocab_size"]).save(directory)
    return directory


def build_unverified(model, directory: Path, cache_dir: str):
    """`build(...)` without verifying the IR after every pass (conftest's FUSELM_VERIFY=1):
    the pass tests do that, and here it would double SmolLM2's build time."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FUSELM_VERIFY", "0")
        return build(model, directory, cache_dir=cache_dir, progress=False)


@pytest.fixture(scope="session")
def kernel_cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("artifact-kernels"))


@pytest.fixture(scope="session")
def tiny_source(tmp_path_factory) -> Path:
    return tiny_llama_dir(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, tiny_source, kernel_cache):
    """(artifact directory, the compiled model it holds) of the tiny Llama, for cpu."""
    directory = tmp_path_factory.mktemp("tiny-artifact") / "tiny.fuselm"
    return directory, build_unverified(tiny_source, directory, kernel_cache)


@pytest.fixture(scope="session")
def tiny_cuda(tmp_path_factory, tiny_source, kernel_cache) -> Path:
    """The tiny Llama built for cuda by `python -m fuselm.build` with no GPU and no Triton
    interpreter (a fresh process: its Triton modules must not meet this one's)."""
    directory = tmp_path_factory.mktemp("tiny-cuda") / "tiny-cuda.fuselm"
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "fuselm.build", str(tiny_source), "-o", str(directory),
                          "--target", "cuda"], capture_output=True, text=True, timeout=600,
                         env={**env, "FUSELM_CACHE": kernel_cache, "FUSELM_VERIFY": "0", "CUDA_VISIBLE_DEVICES": ""})
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"wrote {directory}" in run.stderr
    return directory


@pytest.fixture(scope="session")
def smollm2_artifact(tmp_path_factory, kernel_cache):
    directory = tmp_path_factory.mktemp("smollm2") / "smollm2.fuselm"
    return directory, build_unverified("smollm2-135m", directory, kernel_cache)


@pytest.fixture(scope="session")
def minilm_artifact(tmp_path_factory, kernel_cache):
    directory = tmp_path_factory.mktemp("minilm") / "minilm.fuselm"
    return directory, build_unverified("minilm-l6", directory, kernel_cache)


@pytest.fixture
def as_test_builds(monkeypatch):
    """The settings of build_unverified, for builds a test runs itself."""
    monkeypatch.setenv("FUSELM_VERIFY", "0")


@pytest.fixture
def tiny_copy(tiny, tmp_path) -> Path:
    """A copy of the tiny artifact to damage."""
    return Path(shutil.copytree(tiny[0], tmp_path / "copy.fuselm"))


@pytest.fixture
def nothing_loaded(monkeypatch):
    """Fail a test in which fuselm.load reads the graph, weights or kernels of an artifact
    it should have refused first."""
    def refuse(*args, **kwargs):
        raise AssertionError("fuselm.load started loading an artifact it should have refused")

    monkeypatch.setattr(importlib.import_module("fuselm.artifact.reader"), "_compiled_graph", refuse)


def edit_manifest(directory: Path, change) -> None:
    manifest = json.loads((directory / "manifest.json").read_text())
    change(manifest)
    (directory / "manifest.json").write_text(json.dumps(manifest))


def one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fuselm: error: "), err
    return lines[0]


def manifest_config(directory: Path):
    from fuselm.models.config import config_from_dict

    model = json.loads((directory / "manifest.json").read_text())["model"]
    return config_from_dict({**model["config"], "model_type": model["model_type"]})


def lm_inputs(config, block_size: int, prompts: list) -> tuple:
    return pack_prompts(config, prompts, block_size=block_size, all_logits=True).as_tuple()


def load_in_fresh_process(directory: Path, inputs: dict, expected: dict, tmp_path: Path) -> dict:
    """Run LOAD_AND_COMPARE on `directory`, with an empty kernel cache that must stay empty."""
    data = tmp_path / "io.safetensors"
    save_file({**{f"in.{name}": t for name, t in inputs.items()}, **expected}, str(data))
    empty_cache = tmp_path / "empty-cache"
    empty_cache.mkdir()
    host_memo = empty_cache / host.MEMO_FILE  # what this machine's CPU can run, as loads on it find it
    host_memo.write_text(json.dumps(host.host_record()))
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(LOAD_AND_COMPARE), str(directory), str(data)],
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "FUSELM_CACHE": str(empty_cache)})
    assert run.returncode == 0, run.stderr[-3000:]
    assert list(empty_cache.iterdir()) == [host_memo]  # the artifact needs no kernel cache, and writes none
    return json.loads(run.stdout.strip().splitlines()[-1])


def assert_loaded_as_built(result: dict, kernels: int) -> None:
    assert result["equal"], "the loaded artifact's outputs differ from the in-process compile's"
    assert (result["captures"], result["codegen_runs"], result["builds"], result["program_builds"]) == (0, 0, 0, 0), result
    assert result["program_calls"] == 1, result
    assert result["kernels"] == kernels and result["imported"] == [], result


# -- the real models, loaded in fresh processes ---------------------------------------


@pytest.mark.slow
def test_smollm2_artifact_loads_in_a_fresh_process_and_computes_what_the_compile_did(smollm2_artifact, tmp_path):
    directory, compiled = smollm2_artifact
    model_inputs = lm_inputs(manifest_config(directory), 16, [list(range(1, 22)), [5, 8, 13, 21, 34, 55, 89]])
    names = compiled.entries[-1].signature.names
    inputs = dict(zip(names, (t.clone() for t in model_inputs)))
    logits = compiled(*model_inputs)
    result = load_in_fresh_process(directory, inputs, {"expected": logits, "expected_cache": model_inputs[2]},
                                   tmp_path)
    assert_loaded_as_built(result, len(compiled.kernels))
    assert_weights_aligned(directory / "weights.safetensors")


def test_generate_from_an_artifact_imports_neither_tvm_nor_the_capture(smollm2_artifact, tmp_path):
    """`fuselm generate --model DIR` in a new process: its program runs through TVM's runtime
    library alone (`import tvm` would cost seconds of the start), nothing is captured."""
    directory, _ = smollm2_artifact
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / host.MEMO_FILE).write_text(json.dumps(host.host_record()))
    script = textwrap.dedent("""
        import json, sys
        from fuselm.cli import main
        status = main(sys.argv[1:])
        modules = ("tvm", "torch._dynamo", "transformers", "fuselm.frontend.capture", "fuselm.codegen.tvm.build")
        print(json.dumps({"status": status, "imported": [m for m in modules if m in sys.modules]}), file=sys.stderr)
    """)
    run = subprocess.run([sys.executable, "-c", script, "generate", "--model", str(directory), "--max-tokens", "3",
                          "What is the capital of France?"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "FUSELM_CACHE": str(cache)})
    assert json.loads(run.stderr.strip().splitlines()[-1]) == {"status": 0, "imported": []}, run.stderr[-3000:]
    assert run.stdout.strip(), "no tokens were printed"


@pytest.mark.slow
def test_minilm_artifact_loads_in_a_fresh_process_and_computes_what_the_compile_did(minilm_artifact, tmp_path):
    directory, compiled = minilm_artifact
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 30522, (3, 11), generator=generator)
    attention_mask = torch.ones(3, 11, dtype=torch.int64)
    attention_mask[1, 7:] = 0
    attention_mask[2, 4:] = 0
    hidden = compiled(input_ids, attention_mask)
    assert hidden.shape == (3, 11, 384)
    result = load_in_fresh_process(directory, {"input_ids": input_ids, "attention_mask": attention_mask},
                                   {"expected": hidden}, tmp_path)
    assert_loaded_as_built(result, len(compiled.kernels))
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["block_size"] is None and manifest["model"]["model_type"] == "bert"
    inputs = manifest["signature"]["inputs"]  # the model's two, then the packing inputs it derives from the mask
    assert [i["shape"] for i in inputs[:2]] == [["B", "S"], ["B", "S"]]
    assert [i["name"] for i in inputs[2:]] == [f"attention_mask__varlen_{n}" for n in ("tokens", "positions", "cu_seqlens")]
    assert manifest["sentence"] == {"pooling": ["mean_tokens"], "normalize": True, "max_seq_length": 256}
    with pytest.raises(ArtifactError, match="not a causal language model: .* call fuselm.load on it instead"):
        LLM(model=str(directory))


@pytest.mark.slow
def test_an_encoder_serves_sentence_embeddings_from_the_minilm_artifact(minilm_artifact):
    from fuselm.encoder import pool

    directory, compiled = minilm_artifact
    encoder = fuselm.Encoder(str(directory))
    assert encoder.sentence.normalize and encoder.max_length == 256 and encoder.target.name == "cpu"
    texts = ["a sentence to embed", "", "another, somewhat longer sentence to embed with the artifact"]
    got = encoder.encode(texts, normalize=False)
    for text, row in zip(texts, got):
        ids = torch.tensor([encoder.tokenizer.encode(text)])
        mask = torch.ones_like(ids)
        torch.testing.assert_close(row, pool(compiled(ids, mask), mask, ("mean_tokens",))[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ArtifactError, match="its quantization was chosen when it was built"):
        fuselm.Encoder(str(directory), quantize="int8")


@pytest.mark.slow
def test_llm_serves_the_smollm2_artifact_as_the_compiled_model_is_served(smollm2_artifact, smollm2_gguf):
    from fuselm.models.gguf_loader import open_gguf, read_config

    directory, compiled = smollm2_artifact
    reader = open_gguf(smollm2_gguf)  # the tokenizer as the GGUF file gives it, not as the artifact wrote it
    source = LoadedModel(None, Tokenizer.from_gguf(reader), read_config(reader), smollm2_gguf)
    reference = LLM.from_engine(LLMEngine(source, "cpu", forward=compiled, dtype=torch.float32, max_model_len=2048,
                                          max_num_seqs=2))
    served = LLM(model=str(directory), max_num_seqs=2)
    try:
        assert served.engine.max_model_len == 2048 and served.target.name == "cpu"
        greedy = SamplingParams(temperature=0, max_tokens=8)
        prompts = ["The capital of France is", "def fibonacci(n):"]
        expected = reference.generate(prompts, greedy)
        got = served.generate(prompts, greedy)
        assert [o.token_ids for o in got] == [o.token_ids for o in expected]
        assert [o.text for o in got] == [o.text for o in expected]
        question = [{"role": "user", "content": "What is the capital of France?"}]
        assert served.chat_prompt(question) == reference.chat_prompt(question)
        assert "Paris" in served.chat(question, greedy).text
    finally:
        served.close()
        reference.close()


# -- the artifact and what fuselm.load returns ----------------------------------------


def assert_weights_aligned(path: Path) -> None:
    """Every tensor's data starts 64-byte aligned in the file, padding is explicit, and the
    standard reader reads every tensor as fuselm's memory map does."""
    with open(path, "rb") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(length))
    start = 8 + length
    assert start % 64 == 0
    entries = sorted((entry["data_offsets"], name) for name, entry in header.items() if name != "__metadata__")
    assert all((start + begin) % 64 == 0 for (begin, _), name in entries if not name.startswith("__padding__."))
    assert all(a[0][1] == b[0][0] for a, b in zip(entries, entries[1:]))  # no holes: the standard reader's rule


def test_weights_are_64_byte_aligned_and_readable_by_safetensors(tiny):
    directory, compiled = tiny
    path = directory / "weights.safetensors"
    assert_weights_aligned(path)
    mapped = map_weights(path)
    assert mapped.keys() == compiled.graph.constants.keys()
    with safe_open(str(path), "pt") as file:
        for name, tensor in compiled.graph.constants.items():
            assert torch.equal(file.get_tensor(name), tensor) and torch.equal(mapped[name], tensor), name
            assert mapped[name].data_ptr() % 64 == 0, name


def test_the_artifact_holds_the_graph_kernels_tokenizer_and_a_manifest_of_them(tiny):
    directory, compiled = tiny
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["artifact_format"] == 1 and manifest["target"] == "cpu" and manifest["dtype"] == "float32"
    assert set(manifest["versions"]) == {"fuselm", "torch", "apache-tvm", "emitters"}
    assert manifest["machine"]["mcpu"] == "native" and "avx2" in manifest["machine"]["cpu_features"]
    assert not any(f.startswith(("fast-", "slow-")) for f in manifest["machine"]["cpu_features"])  # tuning flags
    assert (manifest["max_model_len"], manifest["block_size"]) == (256, 16)
    inputs = {i["name"]: i["shape"] for i in manifest["signature"]["inputs"]}
    assert inputs["input_ids"] == ["T"] and inputs["cu_seqlens_q"] == ["N+1"] and inputs["kv_cache"][2] == "NB"
    assert (directory / "graph.ir").read_text() == str(compiled.graph)
    kernels = manifest["kernels"]
    assert [(k["name"], k["launches"]) for k in kernels] == [(k.name, k.launches) for k in compiled.kernels]
    for kernel in kernels:
        assert (directory / kernel["source"]).is_file() and (directory / kernel["source"]).suffix == ".tir"
        assert len(list((directory / "kernels" / kernel["key"]).glob("*.so"))) == 1
    assert set(manifest["files"]) == {str(p.relative_to(directory)) for p in directory.rglob("*")
                                      if p.is_file() and p.name != "manifest.json"}
    assert not any(p.suffix in (".pkl", ".pt", ".pickle") for p in directory.rglob("*"))
    assert Tokenizer.from_file(directory / "tokenizer").encode("t5 t7 t63") == [5, 7, 63]


def test_load_returns_what_compile_returns(tiny):
    directory, compiled = tiny
    artifact = fuselm.load(directory)
    config = manifest_config(directory)
    positional = lm_inputs(config, 16, [list(range(1, 20)), [3, 4, 5]])
    by_name = dict(zip(compiled.entries[-1].signature.names, (t.clone() for t in positional)))
    expected = compiled(*(t.clone() for t in positional))
    assert torch.equal(artifact(*positional), expected) and torch.equal(artifact(**by_name), expected)
    assert torch.equal(positional[2], by_name["kv_cache"])  # the cache written in place by both calls
    assert str(artifact.graph) == str(compiled.graph) and len(artifact.steps) == len(compiled.steps)
    assert [(k.name, k.ops, k.launches) for k in artifact.kernels] == \
           [(k.name, k.ops, k.launches) for k in compiled.kernels]
    assert all(k.source_path.startswith(str(directory)) for k in artifact.kernels)
    assert artifact.fallbacks == {} and artifact.config == config and artifact.tokenizer.vocab_size == 64
    decode = lm_inputs(config, 16, [[9]])  # another token count: the same kernels
    assert torch.equal(artifact(*decode), compiled(*(t.clone() for t in decode)))
    wrong = list(positional)
    wrong[0] = wrong[0].to(torch.int32)
    with pytest.raises(TypeError, match=r"input %input_ids expects i64\[T\], got torch.int32"):
        artifact(*wrong)


def test_llm_and_the_command_line_serve_an_artifact(tiny, capsys):
    directory, _ = tiny
    llm = LLM(model=str(directory))
    try:
        assert llm.engine.max_model_len == 256  # what the artifact was built with
        [output] = llm.generate(["t1 t2 t3"], SamplingParams(temperature=0, max_tokens=5))
    finally:
        llm.close()
    assert main(["generate", "--model", str(directory), "t1 t2 t3", "--max-tokens", "5", "--target", "cpu"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == output.text.strip()
    assert f"loading the artifact {directory}" in captured.err and "compiling" not in captured.err
    with pytest.raises(ArtifactError, match="built with block_size=16, which an artifact cannot change"):
        LLM(model=str(directory), block_size=32)


# -- building ---------------------------------------------------------------------------


def test_command_line_builds_for_a_generic_cpu_and_replaces_only_artifacts(tiny, tiny_source, kernel_cache, tmp_path,
                                                                           capsys, monkeypatch, as_test_builds):
    monkeypatch.setenv("FUSELM_CACHE", kernel_cache)
    output = tmp_path / "generic.fuselm"
    argv = ["build", str(tiny_source), "-o", str(output), "--mcpu", "generic", "--max-model-len", "128"]
    assert main(argv) == 0
    assert f"wrote {output}: 14 kernels" in capsys.readouterr().err
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["machine"]["mcpu"] == "generic" and manifest["machine"]["llvm_cpu"] == "x86-64-v3"
    assert manifest["max_model_len"] == 128
    native = json.loads((tiny[0] / "manifest.json").read_text())
    assert not {k["key"] for k in manifest["kernels"]} & {k["key"] for k in native["kernels"]}  # never shared
    assert set(manifest["machine"]["cpu_features"]) < set(native["machine"]["cpu_features"])
    generic, native = (fuselm.load(output), tiny[1])
    logits = [model(*lm_inputs(manifest_config(output), 16, [[1, 2, 3, 4]])) for model in (generic, native)]
    assert torch.allclose(*logits, atol=1e-5)
    assert main(argv) == 0  # an artifact there is replaced
    assert "replacing the artifact that was there" in capsys.readouterr().err
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert main(["build", str(tiny_source), "-o", str(other)]) == 2
    assert "is not a fuselm artifact" in one_error_line(capsys.readouterr().err)
    assert (other / "keep.txt").read_text() == "mine"
    assert main(["build", str(tiny_source), "-o", str(tmp_path / "q"), "--quantize", "int3"]) == 2
    assert "--quantize: invalid choice: 'int3'" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "q").exists()


def test_a_cuda_artifact_is_built_without_a_gpu_and_refused_where_none_is(tiny_cuda, nothing_loaded, monkeypatch):
    manifest = json.loads((tiny_cuda / "manifest.json").read_text())
    assert manifest["target"] == "cuda" and manifest["machine"] == {"gpu_arch": "any"}
    assert manifest["dtype"] == "bfloat16" and "triton" in manifest["versions"]
    assert all(kernel["source"].endswith(".py") for kernel in manifest["kernels"])
    assert not list(tiny_cuda.rglob("*.so"))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ArtifactError, match=r"holds cuda kernels, which need a CUDA GPU, and none is visible.*"
                                            r"`fuselm build .* --target cpu`"):
        fuselm.load(tiny_cuda)


def test_an_interrupted_build_leaves_nothing_at_its_directory(tiny, tiny_source, kernel_cache, tmp_path,
                                                            monkeypatch, as_test_builds):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fuselm.artifact.builder, "write_constants", interrupted)
    output = tmp_path / "new.fuselm"
    with pytest.raises(KeyboardInterrupt):
        build(tiny_source, output, cache_dir=kernel_cache, progress=False)
    assert list(tmp_path.iterdir()) == []  # no artifact, no staging directory
    existing = Path(shutil.copytree(tiny[0], tmp_path / "existing.fuselm"))
    manifest = (existing / "manifest.json").read_text()
    monkeypatch.setattr(fuselm.models, "load", interrupted)  # a rebuild that fails early this time
    with pytest.raises(KeyboardInterrupt):
        build(tiny_source, existing, cache_dir=kernel_cache, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["existing.fuselm"]
    assert (existing / "manifest.json").read_text() == manifest and fuselm.load(existing) is not None


# -- refusals: nothing is loaded ----------------------------------------------------


def test_a_missing_file_is_refused(tiny_copy, nothing_loaded):
    library = next(tiny_copy.glob("kernels/*/*.so"))
    library.unlink()
    with pytest.raises(ArtifactError, match=f"{library}: missing.*rebuild it: `fuselm build .* -o {tiny_copy}"):
        fuselm.load(tiny_copy)


def test_a_changed_or_truncated_file_is_refused(tiny_copy, nothing_loaded, capsys):
    weights = tiny_copy / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ArtifactError, match=f"{weights}: sha256 .* differs from the manifest's .*changed after it "
                                            "was built"):
        fuselm.load(tiny_copy)
    assert main(["generate", "--model", str(tiny_copy), "hi", "--target", "cpu"]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after the "loading" line
    assert last.startswith("fuselm: error: ") and "weights.safetensors: sha256" in last and "Traceback" not in err


def test_an_unknown_format_version_is_refused(tiny_copy, nothing_loaded):
    edit_manifest(tiny_copy, lambda manifest: manifest.update(artifact_format=2))
    with pytest.raises(ArtifactError, match="artifact format 2, but this fuselm reads format 1; rebuild it: "
                                            "`fuselm build .* --target cpu`"):
        fuselm.load(tiny_copy)


@pytest.mark.parametrize("package", ["fuselm", "torch", "apache-tvm"])
def test_other_versions_are_refused(tiny_copy, nothing_loaded, package):
    edit_manifest(tiny_copy, lambda manifest: manifest["versions"].update({package: "0.0.1"}))
    with pytest.raises(ArtifactError, match=f"was built with {package}=0.0.1; this is {package}=.*Rebuild it: "
                                            f"`fuselm build .* -o {tiny_copy} --target cpu`"):
        fuselm.load(tiny_copy)


def test_another_target_than_the_one_asked_for_is_refused(tiny, nothing_loaded, capsys):
    directory, _ = tiny
    with pytest.raises(ArtifactError, match="was built for target cpu, not cuda; build one for cuda: "
                                            "`fuselm build .* --target cuda`"):
        fuselm.load(directory, target="cuda")
    with pytest.raises(ArtifactError, match="was built for target cpu, not cuda"):
        LLM(model=str(directory), target="cuda")


def test_a_cpu_lacking_a_feature_the_kernels_use_is_refused(tiny_copy, nothing_loaded, monkeypatch):
    edit_manifest(tiny_copy, lambda manifest: manifest["machine"]["cpu_features"].append("fake-feature"))
    with pytest.raises(ArtifactError, match=r"built for the CPU \w+ \(--mcpu native\), which use fake-feature: this "
                                            r"CPU \(\w+\) lacks it. Rebuild it on this machine: `fuselm build"):
        fuselm.load(tiny_copy)
    edit_manifest(tiny_copy, lambda manifest: manifest["machine"]["cpu_features"].remove("fake-feature"))
    host_module = importlib.import_module("fuselm.codegen.tvm.host")
    host = host_module.host_cpu_features()
    monkeypatch.setattr(host_module, "host_cpu_features", lambda: tuple(f for f in host if f not in ("avx2", "fma")))
    with pytest.raises(ArtifactError, match="which use avx2, fma: this CPU .* lacks them"):
        fuselm.load(tiny_copy)


def test_a_directory_that_is_not_an_artifact_is_refused(tmp_path):
    assert not is_artifact(tmp_path)
    with pytest.raises(ArtifactError, match=f"{tmp_path} is not a fuselm artifact .*no manifest.json"):
        fuselm.load(tmp_path)


def test_build_shows_its_phases_on_a_terminal(tiny_source, kernel_cache, tmp_path, monkeypatch, as_test_builds):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    build(tiny_source, tmp_path / "tiny.fuselm", cache_dir=kernel_cache)
    shown = terminal.getvalue()
    for phase in ("load", "capture+passes+kernels", "copy kernels", "write weights", "manifest"):
        assert f"fuselm build: {phase} [" in shown, shown


# -- found by a hostile probe ------------------------------------------------------------


@pytest.mark.parametrize("field, value", [("kernels", 5), ("dtype", "nonsense"), ("max_model_len", "big"),
                                          ("max_model_len", -5), ("signature", "x"), ("program", 3),
                                          ("target", ["cpu"]), ("block_size", "x")])
def test_a_manifest_field_of_the_wrong_kind_is_refused_by_name(tiny_copy, nothing_loaded, capsys, field, value):
    edit_manifest(tiny_copy, lambda manifest: manifest.update({field: value}))
    with pytest.raises(ArtifactError, match=f"an invalid manifest .*{field}="):
        fuselm.load(tiny_copy)
    assert main(["generate", "--model", str(tiny_copy), "hi"]) == 2
    assert f"{field}=" in capsys.readouterr().err.strip().splitlines()[-1]


def test_a_reply_that_fails_makes_generate_exit_with_an_error(tiny_copy, capsys):
    edit_manifest(tiny_copy, lambda manifest: manifest.update(dtype="float16"))  # not what its graph takes
    assert main(["generate", "--model", str(tiny_copy), "hi", "--max-tokens", "2"]) == 2
    assert "forward pass failed" in capsys.readouterr().err.strip().splitlines()[-1]


def test_a_build_inside_an_artifact_or_under_a_file_is_one_line(tiny, tmp_path, capsys):
    directory, _ = tiny
    assert main(["build", str(directory), "-o", str(directory / "sub")]) == 2
    assert "is inside the artifact" in one_error_line(capsys.readouterr().err)
    (tmp_path / "afile").write_text("x")
    assert main(["build", "smollm2-135m", "-o", str(tmp_path / "afile" / "inside")]) == 2
    assert "afile" in capsys.readouterr().err.strip().splitlines()[-1]


def test_llm_refuses_a_max_model_len_of_zero_for_an_artifact(tiny):
    directory, _ = tiny
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(model=str(directory), max_model_len=0)


def test_inspect_names_a_list_manifest_and_an_artifact_of_other_code(tiny_copy, capsys):
    from fuselm.inspect import main as inspect_main

    edit_manifest(tiny_copy, lambda manifest: manifest["versions"].update(fuselm="0.0.1"))
    assert inspect_main([str(tiny_copy)]) == 2
    assert "built by other fuselm code" in capsys.readouterr().err
    (tiny_copy / "manifest.json").write_text("[1, 2]")
    assert inspect_main([str(tiny_copy)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "manifest" in err
