"""Vectorizable fp32 exp, sigmoid, gelu, sin, cos, tan, atan, tanh, log, log1p as TIR expressions.

LLVM lowers `exp`, `erf` and `tanh` on vectors to one libm call per lane, which costs
more than the gemm it follows (silu over a 512 x 1536 tile: ~8 ms of expf calls). These
are polynomial forms that vectorize: exp is Cephes' expf (range reduction by ln 2, a
degree-6 polynomial, 2^n built in the exponent bits; ~1 ulp, as torch's), erf is Abramowitz-Stegun
7.1.26 (absolute error < 1.5e-7, used only inside gelu, where 1 + erf absorbs it). The
others are Cephes' fp32 forms (sinf, cosf, tanf, atanf, tanhf, logf; log1p from logf),
branch-free (Selects), special values as torch's; within ~3 ulp (tests/test_tvm_fastmath.py).
Other dtypes keep TVM's (libm) forms.
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
    """e^x for fp32, denormals, inf, 0 and NaN included."""
    if dtype_of(x) != "float32":
        return tirx.exp(as_expr(x))

    def value(x):
        finite = _exp_in_range(_clamp(x, _EXP_MIN, _EXP_MAX))
        inf = tirx.Select(x > const(_EXP_MAX, x), const(math.inf, x), finite)
        return tirx.Select(x < const(_EXP_MIN, x), const(0.0, x), inf)

    return let(x, value, "x")


def _clamp(x, low: float, high: float):
    """x within [low, high], NaN kept (tirx.min / max would drop it): compares whose
    NaN case picks x, which x86's minps / maxps (one instruction each) compute."""
    x = tirx.Select(x > const(high, x), const(high, x), x)
    return tirx.Select(x < const(low, x), const(low, x), x)


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


# ----------------------------------------------------------------------------- helpers
def fma(a, b, c) -> tirx.PrimExpr:
    """a * b + c rounded once (LLVM's fma: vfmadd), which range reductions rely on."""
    return tirx.call_llvm_pure_intrin(dtype_of(a), "llvm.fma", as_expr(a), as_expr(b), as_expr(c))


def round_even(x) -> tirx.PrimExpr:
    """To the nearest integer, ties to even: LLVM's roundeven, which vectorizes (TVM's
    nearbyint is a libm call per element)."""
    return tirx.call_llvm_pure_intrin(dtype_of(x), "llvm.roundeven", as_expr(x))


def _bits(x):
    return tirx.reinterpret("int32", as_expr(x))


def _float(bits):
    return tirx.reinterpret("float32", bits)


def _libm(name: str, x) -> tirx.PrimExpr:
    return tirx.call_pure_extern("float32", f"{name}f", as_expr(x))


# ----------------------------------------------------------------------------- sin, cos, tan
# pi/2 in three fp32 parts: q * P1 is exact inside an fma, so x - q pi/2 keeps ~70 bits
_PIO2 = (1.5707963705062866, -4.371138828673793e-08, -1.7151245100058819e-15)
_SIN_POLY = (-1.9515295891e-4, 8.3321608736e-3, -1.6666654611e-1)  # Cephes sinf, |r| <= pi/4
_COS_POLY = (2.443315711809948e-5, -1.388731625493765e-3, 4.166664568298827e-2)  # Cephes cosf
_TAN_POLY = (9.38540185543e-3, 3.11992232697e-3, 2.44301354525e-2, 5.34112807005e-2, 1.33387994085e-1,
             3.33331568548e-1)  # Cephes tanf
_TWO_OVER_PI = (0.6366197466850281, 2.5682552973194106e-08)  # 2/pi in two fp32 parts
# Below this |x|, q < 2^23 and x - q P1 (< 2 in magnitude, on the 2^-23 grid) is exact
# in one fma: r is exact to ~1e-7 absolute. Beyond, libm's (Payne-Hanek).
TRIG_MAX = float(1 << 23)


def sin(x, beyond=None) -> tirx.PrimExpr:
    """sin for fp32 (libm for other dtypes): Cody-Waite reduction by pi/2 (fma, a 3-part
    pi/2, as Cephes' sinf but exact to TRIG_MAX), Cephes' sinf / cosf polynomials by
    quadrant. `beyond`: see `_trig`."""
    return _trig(x, "sin", _by_quadrant, beyond, odd=True)


def cos(x, beyond=None) -> tirx.PrimExpr:
    """cos(x) = sin(x + pi/2): the quadrant one further."""
    return _trig(x, "cos", lambda r, j: _by_quadrant(r, j + 1), beyond)


def tan(x, beyond=None) -> tirx.PrimExpr:
    """tan by Cephes' tanf polynomial of r, -1 / tan(r) in odd quadrants."""
    def value(r, j):
        def odd_or_not(t):
            return tirx.Select(tirx.bitwise_and(j, 1) != 0, const(-1.0, r) / t, t)

        return let(let(r * r, lambda z: r + r * z * _horner(z, _TAN_POLY), "z"), odd_or_not, "t")

    return _trig(x, "tan", value, beyond, odd=True)


def _trig(x, name: str, body, beyond, odd: bool = False) -> tirx.PrimExpr:
    """body(r, j) of the reduction, libm's where |x| > TRIG_MAX. That libm call, in a
    Select, runs for every lane: `beyond`, a condition that holds for the loop's whole
    vector (a row's flag: any |x| of it above TRIG_MAX), keeps it out of the way (an
    if_then_else of it branches around the call). None: every element pays the call."""
    if dtype_of(x) != "float32":
        return getattr(tirx, name)(as_expr(x))

    def value(x):
        def fast():  # of an odd function, x itself at +-0 (the reduction loses the sign of -0)
            value = _reduce_by_pio2(x, body)
            return tirx.Select(x == const(0.0, x), x, value) if odd else value

        exact = tirx.Select(tirx.abs(x) > const(TRIG_MAX, x), _libm(name, x), fast())
        return exact if beyond is None else tirx.if_then_else(beyond, exact, fast())

    return let(x, value, "x")


def _reduce_by_pio2(x, body):
    """body(r, j) with x = j pi/2 + r (j an int32), |r| <= pi/4 (+ a rounding)."""
    def reduced(q):
        r = fma(q, const(-_PIO2[0], x), x)
        r = fma(q, const(-_PIO2[1], x), r)
        r = fma(q, const(-_PIO2[2], x), r)
        return let(r, lambda r: body(r, q.astype("int32")), "r")

    return let(_nearest_quadrant(x), reduced, "q")


def _nearest_quadrant(x):
    """round(x 2/pi), right where x 2/pi in fp32 is not (its ulp is 1/16 at 1e6, which
    would leave |r| up to 0.85): x 2/pi as a sum hi + lo (fma), rounded in two steps."""
    def value(hi):
        lo = fma(x, const(_TWO_OVER_PI[0], x), -hi) + x * const(_TWO_OVER_PI[1], x)
        return let(round_even(hi), lambda q: q + round_even(hi - q + lo), "q")

    return let(x * const(_TWO_OVER_PI[0], x), value, "hi")


def _by_quadrant(r, j):
    """sin(r + j pi/2): +-sin(r) or +-cos(r) by j mod 4."""
    def value(z):
        sine = r + r * z * _horner(z, _SIN_POLY)
        cosine = const(1.0, r) - const(0.5, r) * z + z * z * _horner(z, _COS_POLY)
        v = tirx.Select(tirx.bitwise_and(j, 1) != 0, cosine, sine)
        return tirx.Select(tirx.bitwise_and(j, 2) != 0, -v, v)

    return let(r * r, value, "z")


# ----------------------------------------------------------------------------- atan, tanh
_ATAN_POLY = (8.05374449538e-2, -1.38776856032e-1, 1.99777106478e-1, -3.33329491539e-1)  # Cephes atanf
_TANH_POLY = (-5.70498872745e-3, 2.06390887954e-2, -5.37397155531e-2, 1.33314422036e-1,
              -3.33332819422e-1)  # Cephes tanhf, |x| < 0.625


def atan(x) -> tirx.PrimExpr:
    """Cephes' atanf: |x| reduced to |t| <= tan(pi/8) by atan(x) = pi/2 + atan(-1/x) or
    pi/4 + atan((x-1)/(x+1)), one division for both, the sign of x restored (-0, NaN kept)."""
    if dtype_of(x) != "float32":
        return tirx.atan(as_expr(x))

    def value(a):  # a = |x|
        big, mid = a > const(2.414213562373095, a), a > const(0.4142135623730950, a)
        one = const(1.0, a)
        numerator = tirx.Select(big, const(-1.0, a), tirx.Select(mid, a - one, a))
        denominator = tirx.Select(big, a, tirx.Select(mid, a + one, one))
        base = tirx.Select(big, const(math.pi / 2, a), tirx.Select(mid, const(math.pi / 4, a), const(0.0, a)))
        return let(numerator / denominator, lambda t: base + (t + t * (t * t) * _horner(t * t, _ATAN_POLY)), "t")

    return let(x, lambda x: tirx.copysign(let(tirx.abs(x), value, "a"), x), "x")


def tanh(x) -> tirx.PrimExpr:
    """Cephes' tanhf: an odd polynomial below |x| = 0.625, 1 - 2 / (e^2|x| + 1) above
    (1 for large |x|: e^2|x| is inf), the sign of x restored."""
    if dtype_of(x) != "float32":
        return tirx.tanh(as_expr(x))

    def value(a):  # a = |x|
        small = let(a * a, lambda z: a + a * z * _horner(z, _TANH_POLY), "z")
        large = const(1.0, a) - const(2.0, a) / (exp(a + a) + const(1.0, a))
        return tirx.Select(a < const(0.625, a), small, large)

    return let(x, lambda x: tirx.copysign(let(tirx.abs(x), value, "a"), x), "x")


# ----------------------------------------------------------------------------- log, log1p
_LOG_POLY = (7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1,
             -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1)  # Cephes logf
_FLT_MIN = 1.1754943508222875e-38  # the smallest normal fp32


def log(x) -> tirx.PrimExpr:
    """Cephes' logf: x = 2^e m, m in [sqrt(1/2), sqrt(2)) from the exponent bits (denormals
    scaled by 2^23 first), log(m) by a polynomial of m - 1; 0 -> -inf, < 0 -> NaN, inf, NaN."""
    if dtype_of(x) != "float32":
        return tirx.log(as_expr(x))

    def value(x):
        special = tirx.Select(x == const(0.0, x), const(-math.inf, x),
                              tirx.Select(x < const(0.0, x), const(math.nan, x), x))  # inf, NaN: x
        finite = tirx.all(x > const(0.0, x), x < const(math.inf, x))
        return tirx.Select(finite, _log_positive(x), special)

    return let(x, value, "x")


def _log_positive(x):
    return _split_exponent(x, _log_reduced)


def _split_exponent(x, body):
    """body(f, e) for x = 2^e (1 + f), x > 0 finite: f (|f| < 0.42) exact in fp32, e an
    integer in fp32. From the exponent bits, denormals scaled by 2^23 first."""
    denormal = x < const(_FLT_MIN, x)
    scaled = tirx.Select(denormal, x * const(float(1 << 23), x), x)

    def value(bits):
        # m in [0.5, 1) (the exponent bits of 0.5), then in [sqrt(1/2), sqrt(2)) as 2m - 1 + 1
        m = _float(tirx.bitwise_or(tirx.bitwise_and(bits, 0x007FFFFF), 0x3F000000))
        e = tirx.shift_right(bits, 23) - tirx.Select(denormal, tirx.const(149, "int32"), tirx.const(126, "int32"))
        low = m < const(0.7071067811865476, x)
        f = tirx.Select(low, m + m, m) - const(1.0, x)
        return body(f, (e - tirx.Select(low, 1, 0)).astype("float32"))

    return let(_bits(scaled), value, "bits")


def _log_reduced(f, e):
    """log(2^e (1 + f)), |f| < 0.42: ln 2 in two parts (Cephes)."""
    def value(f):
        z = f * f
        y = _horner(f, _LOG_POLY) * f * z + e * const(-2.12194440e-4, f) - const(0.5, f) * z
        return f + y + e * const(0.693359375, f)

    return let(f, value, "f")


def log1p(x) -> tirx.PrimExpr:
    """log(1 + x) accurate near 0: log(u) x / (u - 1) for u = 1 + x rounded (Goldberg's
    trick: u's rounding error cancels), x itself where u = 1 (-0 and tiny x) or x = inf."""
    if dtype_of(x) != "float32":
        return tirx.log1p(as_expr(x))

    def value(x):
        def from_u(u):
            exact = tirx.any(u == const(1.0, u), x == const(math.inf, u))
            return tirx.Select(exact, x, log(u) * (x / (u - const(1.0, u))))

        return let(x + const(1.0, x), from_u, "u")

    return let(x, value, "x")


# ----------------------------------------------------------------------------- pow
# 2 atanh(s) = log((1 + s) / (1 - s)): s + s^3/3 + ... (|s| < 0.172: the rest below 2e-12 s)
_ATANH_SERIES = tuple(1.0 / k for k in range(13, 0, -2))
_EXP2_POLY = tuple(math.log(2) ** k / math.factorial(k) for k in range(10, -1, -1))  # 2^f, |f| <= 1/2: 1e-13
_EXP2_LIMIT = 200.0  # |log2 x^y| beyond: inf or 0 in fp32 (and 2^200 still a normal fp64)
_EXACT_INTEGER = float(1 << 24)  # fp32 values from here up are even integers


def pow(x, y) -> tirx.PrimExpr:
    """x^y for fp32 as 2^(y log2|x|), both in fp64 (relative error ~1e-12 before the one
    rounding to fp32: ~0.5 ulp, where fp32 forms of log2 lose digits to y's magnitude),
    vectorized; the sign and C99's special values (as torch's) by Selects. libm's for
    other dtypes."""
    if dtype_of(x) != "float32":
        return tirx.power(as_expr(x), as_expr(y))
    return let(x, lambda x: let(y, lambda y: _pow(x, y), "y"), "x")


def _pow(x, y):
    """|x|^y carries inf, 0 and NaN through log2 and exp2 (0^-y = inf, inf^-y = 0, ...); then
    the sign of x for an odd integer y, NaN for x < 0 finite and y finite not an integer,
    1 for y = 0, x = 1 and (-1)^+-inf. The exponent y log2|x| and |x|^y are bound through
    `_opaque` (see there), the lets above the Selects."""
    def value(t):
        def selected(m):
            zero, one = const(0.0, x), const(1.0, x)
            integral = tirx.floor(y) == y  # (inf too; false for NaN)
            odd = tirx.all(integral, tirx.abs(y) < const(_EXACT_INTEGER, y),
                           tirx.floor(y * const(0.5, y)) * const(2.0, y) != y)
            signed = tirx.Select(odd, tirx.copysign(m, x), m)
            finite = tirx.all(x < zero, x > const(-math.inf, x), tirx.abs(y) < const(math.inf, y))
            nan = tirx.Select(tirx.all(finite, tirx.Not(integral)), const(math.nan, x), signed)
            unit = tirx.any(y == zero, x == one, tirx.all(x == const(-1.0, x), tirx.abs(y) == const(math.inf, y)))
            return tirx.Select(unit, one, nan)

        return let(_opaque(_exp2_wide(t)), selected, "m")

    return let(_opaque(y.astype("float64") * _log2_wide(tirx.abs(x))), value, "t")


def _opaque(x) -> tirx.PrimExpr:
    """x as x * 1 + -0 through TVM's impure call of LLVM's fmuladd: the same value (LLVM
    folds it away, vectorizes around it), but no pure expression to TVM. Passes that
    carry an analyzer (FlattenBuffer, LowerIntrin, ...) bind each let's pure value,
    substituting the values of the lets before it: a chain of lets whose variables are used
    several times each (polynomials) grows to the product of those counts (pow's log2 into
    exp2: ~1e6 nodes, minutes of build per kernel). A let of an opaque value stays a
    variable to them. Only at the top of an expression's lets: a Select with it in a branch
    is no longer safe to TVM (an if_then_else then)."""
    return tirx.call_llvm_intrin(dtype_of(x), "llvm.fmuladd", as_expr(x), const(1.0, x), const(-0.0, x))


def _log2_wide(a):
    """log2 a in fp64 of fp32 a >= 0 (relative error < 1e-12): e + 2 atanh(f / (2 + f)) / ln 2
    for a = 2^e (1 + f); 0 -> -inf, inf and NaN as they are."""
    def reduced(f, e):
        f = f.astype("float64")

        def series(s):
            return let(s * s, lambda z: s * _horner(z, _ATANH_SERIES), "z")

        return e.astype("float64") + let(f / (f + const(2.0, f)), series, "s") * const(2 / math.log(2), f)

    special = tirx.Select(a == const(0.0, a), tirx.const(-math.inf, "float64"), a.astype("float64"))
    return tirx.Select(tirx.all(a > const(0.0, a), a < const(math.inf, a)), _split_exponent(a, reduced), special)


def _exp2_wide(t):
    """2^t of fp64 t, rounded once to fp32 (overflow to inf, underflow to denormals and 0):
    2^n (n = round(t)) times a polynomial of t - n, in fp64."""
    def value(t):
        def scaled(n):
            two_n = tirx.reinterpret("float64", tirx.shift_left(n.astype("int64") + 1023, 52))
            return (_horner(t - n, _EXP2_POLY) * two_n).astype("float32")

        return let(round_even(t), scaled, "n")

    return let(t, lambda t: let(_clamp(t, -_EXP2_LIMIT, _EXP2_LIMIT), value, "t"), "t")
