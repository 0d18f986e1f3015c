"""fuselm's graph IR: types, graph, op registry, interpreter, text form, verifier."""
from .graph import Constant, Graph, GraphBuilder, Input, Node, transform
from .interpreter import interpret
from .registry import OPS, IRTypeError, get_op, infer_type, register
from .text import IRParseError, parse, print_graph
from .types import DTYPES, TensorType, dtype_of, parse_type, symbol
from .verify import IRVerificationError, verify

__all__ = [
    "Constant", "Graph", "GraphBuilder", "Input", "Node", "transform", "interpret", "OPS",
    "IRTypeError", "get_op", "infer_type", "register", "IRParseError", "parse", "print_graph",
    "DTYPES", "TensorType", "dtype_of", "parse_type", "symbol", "IRVerificationError", "verify",
]
