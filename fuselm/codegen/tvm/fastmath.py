"""Vectorizable fp32 exp, sigmoid, gelu as TIR expressions.

LLVM lowers `exp`, `erf` and `tanh` on vectors to one libm call per lane, which costs
more than the gemm it follows (silu over a 512 x 1536 tile: ~8 ms of expf calls). These
are polynomial forms that vectorize: exp is Cephes' expf (range reduction by ln 2, a
degree-6 polynomial, 2^n built in the exponent bits; ~1 ulp, as torch's), erf is Abramowitz-Stegun
7.1.26 (absolute error < 1.5e-7, used only inside gelu, where 1 + erf absorbs it).
"""
from __future__ import annotations

import math

from tvm import tirx

from .build import as_expr, const, dtype_of

_EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)
_ERF_POLY = (1.061405429, -1.453152027, 1.421413741, -0.284496736, 0.254829592)


def let(value, body, name: str = "v") -> tirx.PrimExpr:
    """`body(v)` with v bound once to `value`, so the expression tree shares it."""
    value = as_expr(value)
    var = tirx.Var(name, dtype_of(value))
    return tirx.Let(var, value, body(var))


def _horner(x, coefficients):
    result = const(coefficients[0], x)
    for c in coefficients[1:]:
        result = result * x + const(c, x)
    return result


_EXP_MAX, _EXP_MIN = 88.72283935546875, -103.97  # e^x overflows above, underflows to 0 below


def exp(x) -> tirx.PrimExpr:
    """e^x for fp32, denormals, inf and 0 included (NaN in gives inf, not NaN)."""
    if dtype_of(x) != "float32":
        return tirx.exp(as_expr(x))

    def value(x):
        finite = _exp_in_range(tirx.max(tirx.min(x, const(_EXP_MAX, x)), const(_EXP_MIN, x)))
        inf = tirx.Select(x > const(_EXP_MAX, x), const(math.inf, x), finite)
        return tirx.Select(x < const(_EXP_MIN, x), const(0.0, x), inf)

    return let(x, value, "x")


def _exp_in_range(clamped):
    return let(clamped, _exp_reduced, "x")


def _exp_reduced(x):
    def scaled(n):
        def poly(r):
            return _horner(r, _EXP_POLY) * r * r + r + const(1.0, x)

        r = x - n * const(0.693359375, x) + n * const(2.12194440e-4, x)  # ln 2 in two parts
        # 2^n as 2^(n>>1) * 2^(n - n>>1): both halves stay normal floats for n in [-150, 128]
        low = tirx.shift_right(n.astype("int32"), 1)
        return let(r, poly, "r") * _power_of_two(low) * _power_of_two(n.astype("int32") - low)

    return let(tirx.floor(x * const(math.log2(math.e), x) + const(0.5, x)), scaled, "n")


def _power_of_two(k) -> tirx.PrimExpr:
    return tirx.reinterpret("float32", tirx.shift_left(k + 127, 23))


def sigmoid(x) -> tirx.PrimExpr:
    return const(1.0, x) / (const(1.0, x) + exp(-as_expr(x)))


def silu(x) -> tirx.PrimExpr:
    return let(x, lambda v: v / (const(1.0, v) + exp(-v)), "x")


def gelu(x) -> tirx.PrimExpr:
    """x * Phi(x), erf by Abramowitz-Stegun 7.1.26."""
    return let(x, _gelu, "x")


def erf(x) -> tirx.PrimExpr:
    """erf by Abramowitz-Stegun 7.1.26 (absolute error < 1.5e-7): vectorizes, where the
    libm call it replaces runs one element at a time."""
    return let(x, _erf, "x")


def _erf(x):
    def erf_abs(z):  # erf(z) for z >= 0
        def value(t):
            return const(1.0, x) - _horner(t, _ERF_POLY) * t * exp(-z * z)

        return let(const(1.0, x) / (const(1.0, x) + const(0.3275911, x) * z), value, "t")

    return let(let(tirx.abs(x), erf_abs, "z"), lambda e: tirx.Select(x < const(0.0, x), -e, e), "e")


def _gelu(x):
    return const(0.5, x) * x * (const(1.0, x) + _erf(x * const(math.sqrt(0.5), x)))


def gelu_tanh(x) -> tirx.PrimExpr:
    """The tanh approximation of gelu: 0.5 x (1 + tanh(u)) = x * sigmoid(2u)."""
    def value(x):
        u = const(math.sqrt(2 / math.pi), x) * (x + const(0.044715, x) * x * x * x)
        return x * sigmoid(const(2.0, x) * u)

    return let(x, value, "x")
