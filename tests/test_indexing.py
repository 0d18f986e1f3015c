"""Advanced indexing as models write it (`x[i, j]` with index tensors that broadcast):
captured as IR ops (a linear index and an index_select), never a fallback, on both
targets, with static and symbolic sizes."""
import pytest
import torch

import fuselm


class PaddingMask(torch.nn.Module):
    """transformers' padding_mask_function: padding_mask[batch_idx, kv_idx] with broadcast aranges."""

    def forward(self, x, mask):
        b = torch.arange(mask.shape[0])[:, None, None, None]
        k = torch.arange(mask.shape[1])[None, None, None, :]
        return x.masked_fill(~mask.bool()[b, k], 0.0)


class PoolAtToken(torch.nn.Module):
    """CLIP's pooled output: h[arange(B), argmax(ids == eos)]."""

    def forward(self, h, ids):
        return h[torch.arange(h.shape[0]), (ids == 2).int().argmax(-1)]


class NegativeIndex(torch.nn.Module):
    """Indexed dims in the middle, a 2-d index, negative indices (wrapped as torch does)."""

    def forward(self, h, i):
        return h[:, i, -1 - i] * 2


CASES = [
    (PaddingMask, lambda: (torch.randn(2, 1, 5, 5), torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]))),
    (PoolAtToken, lambda: (torch.randn(2, 5, 8), torch.tensor([[3, 4, 2, 5, 6], [2, 3, 3, 3, 3]]))),
    (NegativeIndex, lambda: (torch.randn(3, 5, 5, 2), torch.tensor([[0, 4], [2, 1]]))),
]


@pytest.mark.parametrize("target", ["cpu", "cuda"])
@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("model_cls, make_inputs", CASES, ids=[c[0].__name__ for c in CASES])
def test_advanced_indexing_compiles_to_kernels(model_cls, make_inputs, dynamic, target, tmp_path):
    model, inputs = model_cls(), make_inputs()
    compiled = fuselm.compile(model, target=target, dynamic=dynamic, strict=True, cache_dir=str(tmp_path))
    torch.testing.assert_close(compiled(*inputs), model(*inputs))
    assert "index_select" in compiled.graph.op_counts() and compiled.fallbacks == {}


def test_boolean_mask_indexing_falls_back(tmp_path):
    class Masked(torch.nn.Module):
        def forward(self, x, keep):
            return x[keep].sum()

    x, keep = torch.randn(6, 3), torch.tensor([True, False, True, True, False, True])
    compiled = fuselm.compile(Masked(), target="cpu", cache_dir=str(tmp_path))
    with pytest.warns(fuselm.FallbackWarning):
        torch.testing.assert_close(compiled(x, keep), Masked()(x, keep))
    assert any("index" in name for name in compiled.fallbacks)
