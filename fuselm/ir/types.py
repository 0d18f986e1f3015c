"""Tensor types of the IR: a dtype name and a shape of ints and symbolic dimensions.

A symbolic dimension is a sympy expression over named positive integer symbols
("T" tokens, "N" sequences, "B" batch, "S" sequence length), so `N+1` and `9*T` are
dimensions too. Text form: `f32[T,576]`, `i32[N+1]`, `f32[]` for a scalar.
"""
from __future__ import annotations

import ast
import math
import operator
from dataclasses import dataclass
from typing import Union

import sympy
import torch

Dim = Union[int, sympy.Expr]

# IR dtype name -> torch dtype. i4 is packed two per byte, so its storage is uint8.
DTYPES: dict[str, torch.dtype] = {
    "f64": torch.float64,
    "f32": torch.float32,
    "f16": torch.float16,
    "bf16": torch.bfloat16,
    "i64": torch.int64,
    "i32": torch.int32,
    "i16": torch.int16,
    "i8": torch.int8,
    "u8": torch.uint8,
    "i4": torch.uint8,
    "bool": torch.bool,
    "c64": torch.complex64,  # complex values flow between fallback (`aten`) nodes
    "c128": torch.complex128,
}
_TORCH_TO_IR = {v: k for k, v in DTYPES.items() if k != "i4"}
FLOAT_DTYPES = ("f64", "f32", "f16", "bf16")
COMPLEX_DTYPES = ("c64", "c128")  # not floats: `is_float` is False for them


def dtype_of(torch_dtype: torch.dtype) -> str:
    """The IR dtype name of a torch dtype."""
    if torch_dtype not in _TORCH_TO_IR:
        raise TypeError(f"torch dtype {torch_dtype} has no IR equivalent")
    return _TORCH_TO_IR[torch_dtype]


def symbol(name: str) -> sympy.Symbol:
    return sympy.Symbol(name, integer=True, positive=True)


def as_dim(value) -> Dim:
    """Normalize a dimension: plain ints stay ints, constant expressions become ints."""
    if isinstance(value, (int, bool)):
        return int(value)
    if isinstance(value, str):
        return parse_dim(value)
    expr = sympy.sympify(value)
    return int(expr) if expr.is_Integer else expr


def dim_str(dim: Dim) -> str:
    return str(dim).replace(" ", "")


def floordiv(a: Dim, b: Dim) -> Dim:
    if isinstance(a, int) and isinstance(b, int):
        return a // b
    return as_dim(sympy.floor(sympy.sympify(a) / b))


_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: floordiv}


def eval_dim_ast(node: ast.AST) -> Dim:
    """Evaluate a parsed dimension expression (ints, names, + - * //, parentheses)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return node.value
    if isinstance(node, ast.Name):
        return symbol(node.id)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        return as_dim(_BINARY[type(node.op)](eval_dim_ast(node.left), eval_dim_ast(node.right)))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return as_dim(-eval_dim_ast(node.operand))
    raise ValueError(f"not a dimension expression: {ast.unparse(node)!r}")


def parse_dim(text: str) -> Dim:
    return eval_dim_ast(ast.parse(text.strip(), mode="eval").body)


def evaluate_dim(dim: Dim, bindings: dict) -> int:
    """The concrete size of a dimension given symbol values ({symbol: int})."""
    if isinstance(dim, int):
        return dim
    value = dim.subs(bindings)
    if not value.is_Integer:
        raise ValueError(f"dimension {dim_str(dim)} is not determined by the bound symbols {bindings}")
    return int(value)


def dims_equal(a: Dim, b: Dim) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return sympy.simplify(sympy.sympify(a) - sympy.sympify(b)) == 0


@dataclass(frozen=True)
class TensorType:
    shape: tuple
    dtype: str

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise TypeError(f"unknown dtype {self.dtype!r}; known: {', '.join(DTYPES)}")
        object.__setattr__(self, "shape", tuple(as_dim(d) for d in self.shape))

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES

    @property
    def is_complex(self) -> bool:
        return self.dtype in COMPLEX_DTYPES

    @property
    def symbols(self) -> set:
        out = set()
        for d in self.shape:
            if not isinstance(d, int):
                out |= d.free_symbols
        return out

    def numel(self) -> Dim:
        return as_dim(math.prod(self.shape, start=sympy.Integer(1)))

    def with_shape(self, shape) -> "TensorType":
        return TensorType(tuple(shape), self.dtype)

    def with_dtype(self, dtype: str) -> "TensorType":
        return TensorType(self.shape, dtype)

    def same_as(self, other: "TensorType") -> bool:
        return (
            self.dtype == other.dtype
            and self.rank == other.rank
            and all(dims_equal(a, b) for a, b in zip(self.shape, other.shape))
        )

    def __str__(self) -> str:
        return f"{self.dtype}[{','.join(dim_str(d) for d in self.shape)}]"

    @staticmethod
    def of(tensor: torch.Tensor) -> "TensorType":
        return TensorType(tuple(tensor.shape), dtype_of(tensor.dtype))


def parse_type(text: str) -> TensorType:
    """Parse `f32[T,576]` into a TensorType."""
    text = text.strip()
    if not text.endswith("]") or "[" not in text:
        raise ValueError(f"not a tensor type: {text!r}")
    dtype, dims = text[:-1].split("[", 1)
    shape = [parse_dim(d) for d in _split_top_level(dims)] if dims.strip() else []
    return TensorType(tuple(shape), dtype.strip())


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets or parentheses."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p for p in (p.strip() for p in parts) if p]
