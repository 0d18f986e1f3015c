"""Triton source of the small @triton.jit helpers that generated kernels call.

An emitter pastes the helpers its kernel uses into the generated module, so every
kernel file stands alone and the same helper text lives in one place.
"""
from __future__ import annotations

from .module import dot_precision

# Epilogue activations on fp32 tiles; tanh is spelled through sigmoid because
# tl has no tanh that both the GPU compiler and the interpreter accept.
ACTIVATIONS = {
    "relu": '''@triton.jit
def relu(y):
    return tl.maximum(y, 0.0)
''',
    "gelu": '''@triton.jit
def gelu(y):
    """GELU, erf form (torch's approximate="none")."""
    return 0.5 * y * (1.0 + tl.erf(y * 0.7071067811865476))
''',
    "gelu_tanh": '''@triton.jit
def gelu_tanh(y):
    """GELU, tanh approximation: 0.5 * y * (1 + tanh(a)) = y * sigmoid(2a)."""
    inner = 0.7978845608028654 * (y + 0.044715 * y * y * y)
    return y * tl.sigmoid(2.0 * inner)
''',
    "silu": '''@triton.jit
def silu(y):
    return y * tl.sigmoid(y)
''',
}


def mma_source(dtype: str) -> str:
    """`mma(a, b, acc, UPCAST)`: acc + a @ b in fp32, for tiles of `dtype`."""
    return f'''@triton.jit
def mma(a, b, acc, UPCAST: tl.constexpr):
    """acc + a @ b with fp32 accumulation; UPCAST (interpreter only) multiplies fp32 copies."""
    if UPCAST:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        acc = tl.dot(a, b, acc{dot_precision(dtype)})
    return acc
'''


ROPE = '''@triton.jit
def rope_partner(offs_d, head_dim):
    """Rotate-half rope pairs column d with d + D/2 (first half) or d - D/2 (second half)."""
    half = head_dim // 2
    return tl.where(offs_d < half, offs_d + half, offs_d - half)


@triton.jit
def apply_rope(x, x_partner, cos, sin, offs_d, head_dim):
    """x * cos + rotate_half(x) * sin, on fp32 tiles whose last axis is the head dim."""
    sign = tl.where(offs_d < head_dim // 2, -1.0, 1.0)
    return x * cos + sign[None, :] * x_partner * sin
'''


ONLINE_SOFTMAX = '''@triton.jit
def online_softmax_step(scores, v, m_i, l_i, acc, UPCAST: tl.constexpr):
    """One key block of flash attention.

    scores are base-2 logits [BLOCK_M, BLOCK_N] (-inf where a key is hidden), v the
    block's values [BLOCK_N, BLOCK_DV]; m_i, l_i, acc the running row max, row sum and
    unnormalized output. A row with no visible key so far keeps m_i = -inf and adds 0.
    """
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(scores - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = mma(p.to(v.dtype), v, acc * alpha[:, None], UPCAST)
    return m_new, l_i, acc


@triton.jit
def finish_softmax(acc, l_i):
    """acc / l_i; rows that saw no visible key give 0."""
    return acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
'''


QUERY_BLOCK = '''@triton.jit
def query_block(cu_seqlens_ptr, num_seqs, pid, BLOCK_M: tl.constexpr):
    """Query block `pid` of packed sequences (sequence n owns rows cu_seqlens[n]:cu_seqlens[n+1])
    whose blocks are numbered from cu_seqlens[n] // BLOCK_M + n, so that T // BLOCK_M + N
    programs cover every sequence without the host reading the lengths: (the sequence, its
    first row, its length, the block's first row within it; past its length when the program
    has no block).
    """
    # the sequence: the last n with cu_seqlens[n] // BLOCK_M + n <= pid (binary search)
    lo: tl.int32 = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(cu_seqlens_ptr + mid) // BLOCK_M + mid <= pid:
            lo = mid + 1
        else:
            hi = mid
    seq = lo - 1
    start = tl.load(cu_seqlens_ptr + seq)
    length = tl.load(cu_seqlens_ptr + seq + 1) - start
    return seq, start, length, (pid - start // BLOCK_M - seq) * BLOCK_M
'''
