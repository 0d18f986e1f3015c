"""Text form of the IR: one line per node, numbered by position, so dumps diff cleanly.

    graph(%input_ids: i64[T], %positions: i64[T]) {
      @model.embed_tokens.weight : f32[49152,576]
      %0 = embedding(@model.embed_tokens.weight, %input_ids) : f32[T,576]  # llama.py:41
      %1 = rms_norm(%0, @model.layers.0.input_layernorm.weight) {eps=1e-05} : f32[T,576]
      return %1
    }

`parse(print_graph(g), constants=g.constants)` rebuilds the same graph, so printing it
again gives the same text. Attribute values are ints, floats, strings, true/false/none,
lists, and dimension expressions over symbols (`[T,9,64]`).
"""
from __future__ import annotations

import ast
import json
import math
import re

import sympy

from .graph import Constant, Graph, Input, Node
from .types import TensorType, _split_top_level, dim_str, eval_dim_ast, parse_type


# ----------------------------------------------------------------------------- printing
def format_attr(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_attr(v) for v in value) + "]"
    if isinstance(value, sympy.Expr):
        return dim_str(value)
    raise TypeError(f"attribute value {value!r} of type {type(value).__name__} has no text form")


def format_attrs(attrs: dict) -> str:
    return "{" + ", ".join(f"{k}={format_attr(v)}" for k, v in attrs.items()) + "}" if attrs else ""


def value_names(graph: Graph) -> dict:
    """Name of every value: %input, @constant, %N for the Nth node."""
    names = {v: f"%{v.name}" for v in graph.inputs}
    names.update({node: f"%{i}" for i, node in enumerate(graph.nodes)})
    return names


def _operand(value, names) -> str:
    return f"@{value.name}" if isinstance(value, Constant) else names.get(value, "%<undefined>")


def format_node(node: Node, names: dict) -> str:
    operands = ", ".join(_operand(v, names) for v in node.inputs)
    attrs = format_attrs(node.attrs)
    line = f"{names.get(node, '%?')} = {node.op}({operands}){' ' + attrs if attrs else ''} : {node.type}"
    return f"{line}  # {node.source}" if node.source else line


def print_graph(graph: Graph) -> str:
    names = value_names(graph)
    header = ", ".join(f"%{v.name}: {v.type}" for v in graph.inputs)
    lines = [f"graph({header}) {{"]
    lines += [f"  @{name} : {TensorType.of(t)}" for name, t in graph.constants.items()]
    lines += [f"  {format_node(node, names)}" for node in graph.nodes]
    lines.append("  return " + ", ".join(_operand(v, names) for v in graph.outputs))
    lines.append("}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- parsing
class IRParseError(ValueError):
    """The text is not a valid IR graph; the message names the line."""


_NAMED_LITERALS = {"true": True, "false": False, "none": None, "inf": math.inf, "nan": math.nan}


def _eval_attr(node: ast.AST):
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name) and node.id in _NAMED_LITERALS:
        return _NAMED_LITERALS[node.id]
    if isinstance(node, (ast.List, ast.Tuple)):
        return tuple(_eval_attr(e) for e in node.elts)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        inner = _eval_attr(node.operand)
        if isinstance(inner, (int, float)):
            return -inner
    return eval_dim_ast(node)


def parse_attrs(text: str) -> dict:
    if not text.strip():
        return {}
    call = ast.parse(f"f({text})", mode="eval").body
    return {kw.arg: _eval_attr(kw.value) for kw in call.keywords}


_NODE_LINE = re.compile(r"^%(\w+) = (\w+)\((.*?)\)(?: \{(.*)\})? : (\S+)(?:  # (.*))?$")
_CONST_LINE = re.compile(r"^@(\S+) : (\S+)$")
_HEADER = re.compile(r"^graph\((.*)\) \{$")


def parse(text: str, constants: dict) -> Graph:
    """Read a graph printed by `print_graph`; `constants` supplies the tensors by name."""
    from .graph import GraphBuilder

    lines = [ln.strip() for ln in text.strip().splitlines()]
    header = _HEADER.match(lines[0]) if lines else None
    if not header or lines[-1] != "}":
        raise IRParseError("expected 'graph(...) {' ... '}'")
    builder = GraphBuilder(constants)
    env: dict = {}
    for item in _split_top_level(header.group(1)):
        name, type_text = item.split(":", 1)
        env[name.strip()] = builder.input(name.strip()[1:], parse_type(type_text))
    for lineno, line in enumerate(lines[1:-1], start=2):
        try:
            if line.startswith("return"):
                outputs = [_lookup(op, env, builder) for op in _split_top_level(line[len("return"):])]
                return builder.build(outputs)
            _parse_line(line, env, builder, constants)
        except (KeyError, ValueError, SyntaxError, TypeError) as err:
            raise IRParseError(f"line {lineno}: {line!r}: {err}") from err
    raise IRParseError("missing 'return' line")


def _parse_line(line: str, env: dict, builder, constants: dict) -> None:
    const = _CONST_LINE.match(line)
    if const:
        name = const.group(1)
        if name not in constants:
            raise KeyError(f"constant @{name} was not supplied")
        value = builder.constant(name, constants[name])
        if str(value.type) != const.group(2):
            raise TypeError(f"constant @{name} is {value.type}, the text says {const.group(2)}")
        return
    match = _NODE_LINE.match(line)
    if not match:
        raise ValueError("not a node line")
    result, op, operands, attrs, type_text, source = match.groups()
    inputs = tuple(_lookup(o, env, builder) for o in _split_top_level(operands))
    node = Node(op, inputs, parse_attrs(attrs or ""), parse_type(type_text), source)
    env[f"%{result}"] = builder.add(node)


def _lookup(operand: str, env: dict, builder):
    operand = operand.strip()
    if operand.startswith("@"):
        return builder.constant_values[operand[1:]]
    if operand not in env:
        raise KeyError(f"{operand} is not defined before its use")
    return env[operand]
