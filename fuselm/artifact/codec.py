"""The JSON forms of how a model is called and what it returns, as an artifact's manifest
records them: no pickle. The argument and result trees are torch pytree TreeSpecs
(`treespec_dumps` / `treespec_loads`); leaves are tensors (by graph input name), sizes of
symbolic dims ("T+1"), or plain constants (None, bool, int, float, str).
"""
from __future__ import annotations

import inspect

from torch.utils import _pytree as pytree

from ..errors import ArtifactError
from ..frontend.signature import TENSOR, CallSignature, OutputRecord, SizeLeaf
from ..ir.types import dim_str, parse_dim


# -- the call signature ----------------------------------------------------------------

def encode_signature(signature: CallSignature, graph_inputs: list) -> dict:
    """The forward's call signature as JSON: its parameters, the argument tree, each leaf
    (a tensor by its graph input name, or a constant the call is guarded on), and the
    graph inputs' types with their symbolic dims ("T", "N+1")."""
    parameters = []
    for parameter in signature.parameters.parameters.values():
        entry = {"name": parameter.name, "kind": parameter.kind.name}
        if parameter.default is not inspect.Parameter.empty:
            entry["default"] = _plain(parameter.default, f"the default of parameter {parameter.name!r}")
        parameters.append(entry)
    names = iter(signature.names)
    leaves = [{"name": leaf_name, "tensor": next(names)} if constant is TENSOR else
              {"name": leaf_name, "value": _plain(constant, f"argument {leaf_name!r}")}
              for leaf_name, constant in zip(signature.leaf_names, signature.constants)]
    inputs = [{"name": value.name, "dtype": value.type.dtype, "shape": [dim_str(d) for d in value.type.shape]}
              for value in graph_inputs]
    return {"parameters": parameters, "tree": _dumps(signature.spec, "the arguments"), "leaves": leaves,
            "inputs": inputs}


def decode_signature(data: dict) -> CallSignature:
    """The CallSignature `encode_signature` recorded."""
    parameters = inspect.Signature([
        inspect.Parameter(p["name"], getattr(inspect.Parameter, p["kind"]),
                          **({"default": p["default"]} if "default" in p else {}))
        for p in data["parameters"]])
    leaves = data["leaves"]
    slots = tuple(i for i, leaf in enumerate(leaves) if "tensor" in leaf)
    return CallSignature(names=tuple(leaves[i]["tensor"] for i in slots), spec=_loads(data["tree"]),
                         constants=tuple(TENSOR if "tensor" in leaf else leaf["value"] for leaf in leaves),
                         tensor_slots=slots, parameters=parameters,
                         leaf_names=tuple(leaf["name"] for leaf in leaves))


# -- the result's structure ------------------------------------------------------------

def encode_output(output: OutputRecord) -> dict:
    """The result's tree and leaves: tensors, sizes of symbolic dims, plain constants."""
    leaves = [{"tensor": True} if leaf is TENSOR else
              {"size": dim_str(leaf.expr)} if isinstance(leaf, SizeLeaf) else
              {"value": _plain(leaf, "a constant the model returns")} for leaf in output.constants]
    return {"tree": _dumps(output.spec, "the result"), "leaves": leaves}


def decode_output(data: dict) -> OutputRecord:
    leaves = tuple(TENSOR if "tensor" in leaf else SizeLeaf(parse_dim(leaf["size"])) if "size" in leaf
                   else leaf["value"] for leaf in data["leaves"])
    return OutputRecord(_loads(data["tree"]), leaves)


def _plain(value, what: str):
    """A constant as JSON holds it (None, bool, int, float, str); others are refused."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ArtifactError(f"{what} is a {type(value).__name__}; an artifact records non-tensor arguments and results "
                        "only as None, bool, int, float or str")


def _dumps(spec, what: str) -> str:
    try:
        return pytree.treespec_dumps(spec)
    except Exception as error:  # an unregistered container type
        raise ArtifactError(f"the structure of {what} cannot be written as JSON: {error}") from None


def _loads(text: str):
    return pytree.treespec_loads(text)
