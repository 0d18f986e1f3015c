"""Model-zoo conformance, the CI subset: Hugging Face architectures nobody here wrote,
built from tiny configs with random weights (benchmarks/zoo.py's table), compiled for cpu
with `strict=True` (no fallback of any kind) and compared with eager transformers.

The full zoo (24 architectures, fallbacks allowed and counted, timings) is
`python benchmarks/zoo.py`."""
import sys
from pathlib import Path

import pytest
import torch

import fuselm

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root: benchmarks/zoo.py's table
from benchmarks.zoo import ARCHS, TINY, build, max_relative_error, natural_inputs  # noqa: E402

# a causal LM with learned positions, one with rotary and GQA, two padded encoders, and
# T5's encoder (relative position buckets, unscaled attention, RMS-style norm)
CI_ARCHS = ["gpt2", "llama", "bert", "distilbert", "t5_encoder"]


@pytest.fixture(scope="module")
def zoo_cache(tmp_path_factory):
    """One kernel cache for the module: the tiny models share most of their kernels."""
    return str(tmp_path_factory.mktemp("zoo-kernels"))


@pytest.mark.parametrize("name", CI_ARCHS)
def test_hugging_face_model_compiles_strict_and_matches_eager(name, zoo_cache):
    arch = ARCHS[name]
    model, _ = build(arch, TINY)
    inputs = natural_inputs(arch, model, TINY)
    with torch.no_grad():
        expected = model(**inputs)
    compiled = fuselm.compile(model, target="cpu", strict=True, cache_dir=zoo_cache)
    got = compiled(**inputs)
    assert compiled.fallbacks == {}
    assert compiled.kernels
    assert max_relative_error(got, expected) <= 1e-4
