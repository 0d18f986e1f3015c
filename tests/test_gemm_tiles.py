"""The gemm's tile candidates, on the device the cuda target runs on.

On a GPU the gemm picks its tile for small token counts by timing candidates (tensor-core
tiles and GEMV tiles, codegen/triton/tuning.py), so every candidate must compute the same
function: each is launched directly here against torch. Without a GPU the kernels run in
Triton's interpreter on the cpu; on a GPU this runs them natively, and also checks what
the timed choice computes.
"""
import pytest
import torch

from fuselm.target import get_target
from fuselm.codegen import triton as triton_codegen
from fuselm.codegen.triton import tuning
from tiny_models import gemm_group

DEVICE = get_target("cuda").device
TOLERANCE = {"f32": dict(atol=1e-3, rtol=1e-3), "bf16": dict(atol=0.1, rtol=2e-2)}


def reference(x, w, extras: list, steps: tuple) -> torch.Tensor:
    out = x.double() @ w.double().T
    extras = iter(extras)
    for step in steps:
        if step in ("bias", "residual"):
            out = out + next(extras).double()
        elif step == "gated_silu":
            gate, up = out.chunk(2, dim=-1)
            out = torch.nn.functional.silu(gate) * up
    return out


def random_case(group, tokens: int, dtype: torch.dtype, seed: int):
    """x, w and the epilogue's inputs for `tokens` rows (w scaled to keep outputs near 1)."""
    generator = torch.Generator().manual_seed(seed)
    k = group.inputs[1].type.shape[1]
    shapes = [[d if isinstance(d, int) else tokens for d in v.type.shape] for v in group.inputs]
    x, w, *extras = [torch.randn(shape, generator=generator) for shape in shapes]
    return [t.to(DEVICE, dtype) for t in (x, w / k ** 0.5, *extras)]


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
@pytest.mark.parametrize("steps", [("residual",), ("bias", "gated_silu", "residual")])
def test_every_tile_candidate_computes_the_gemm(steps, dtype, tmp_path):
    group = gemm_group(200, 144, steps, dtype)
    kernel = triton_codegen.emit(group, tmp_path)
    module = kernel.run.__globals__  # the generated module: CONFIGS, launch_tile
    torch_dtype = group.inputs[0].type.torch_dtype
    checked = 0
    for limit, candidates in module["CONFIGS"]:
        for tokens in ((1, 3) if limit == 16 else (limit or 70,)):
            x, w, *extras = random_case(group, tokens, torch_dtype, seed=tokens)
            expected = reference(x, w, extras, steps)
            for cfg in candidates:
                out = torch.full(expected.shape, float("nan"), dtype=torch_dtype, device=DEVICE)
                module["launch_tile"](cfg, x, w, out, *extras)
                torch.testing.assert_close(out.double(), expected, **TOLERANCE[dtype], msg=str(cfg))
                checked += 1
            chosen = kernel.run(x, w, *extras)  # through the timed choice on a GPU
            torch.testing.assert_close(chosen.double(), expected, **TOLERANCE[dtype])
    assert checked >= 5 and any(not cfg["DOT"] for _, row in module["CONFIGS"] for cfg in row)
    if DEVICE.type == "cuda":  # the small-M rows were timed, once per power-of-two M
        assert {key[1] for key in tuning._chosen if key[0] == kernel.name} >= {1, 4}


def test_power_of_two_buckets():
    assert [tuning.power_of_two_bucket(m) for m in (1, 2, 3, 4, 5, 16, 17, 24, 33)] == [1, 2, 4, 4, 8, 16, 32, 32, 64]
