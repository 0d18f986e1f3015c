"""The fused graph as a picture wants it: IR nodes, the edges between them, and which
kernel launch each node belongs to.

Nodes come from the final graph (the last pass's IR); kernel membership from each
launch's `%N` ids. Constants (weights) are left out: every gemm reads one and they
would double the picture without saying anything about fusion. A node in no kernel is a
graph input or a view the runtime applies for free.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from ..ir.graph import Input, Node
from ..ir.text import format_node, value_names


@dataclass
class DrawNode:
    key: str  # unique and safe as an identifier: "in_<name>" or "n<N>"
    label: str  # "%8 gemm"
    title: str  # the whole IR line, shown on hover
    cluster: Optional[int] = None  # index into FusedGraph.clusters
    is_output: bool = False


@dataclass
class Cluster:
    label: str  # the kernel's name, "#2" for its second launch
    kernel: str
    ops: tuple


@dataclass
class FusedGraph:
    nodes: list = field(default_factory=list)  # DrawNode, graph order: inputs, then nodes
    edges: list = field(default_factory=list)  # (from key, to key)
    clusters: list = field(default_factory=list)


def fused_graph(source) -> FusedGraph:
    """The picture's data for an InspectSource."""
    graph = source.graph(lambda name, type: torch.empty(type.shape, dtype=type.torch_dtype, device="meta"))
    cluster_of, clusters = _launch_clusters(source.kernels())
    names = value_names(graph)
    keys = {value: f"in_{i}" for i, value in enumerate(graph.inputs)}
    keys.update({node: f"n{i}" for i, node in enumerate(graph.nodes)})
    outputs = set(graph.outputs)
    drawn = FusedGraph(clusters=clusters)
    for value in graph.inputs:
        drawn.nodes.append(DrawNode(keys[value], names[value], f"{names[value]}: {value.type}",
                                    is_output=value in outputs))
    for index, node in enumerate(graph.nodes):
        drawn.nodes.append(DrawNode(keys[node], f"{names[node]} {node.op}", format_node(node, names),
                                    cluster_of.get(index), node in outputs))
        drawn.edges += [(keys[v], keys[node]) for v in dict.fromkeys(node.inputs) if isinstance(v, (Input, Node))]
    return drawn


def _launch_clusters(kernels: list) -> tuple:
    """{node position: cluster index} and the clusters, one per kernel launch."""
    cluster_of, clusters = {}, []
    for entry in kernels:
        for number, launch in enumerate(entry.launches, start=1):
            label = entry.name if len(entry.launches) == 1 else f"{entry.name} #{number}"
            for node_id in launch.node_ids:
                cluster_of[node_id] = len(clusters)
            clusters.append(Cluster(label, entry.name, entry.ops))
    return cluster_of, clusters
