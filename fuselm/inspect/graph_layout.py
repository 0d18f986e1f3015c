"""A small layered layout of the fused graph, for when Graphviz is not installed.

The units placed are kernel launches (a box holding its nodes) and the nodes in no
kernel (graph inputs, free views). Units are taken in the order the executor runs
them (a unit's last node), which is a topological order, and ranked by their longest
path from the inputs (an input then moves down to just above its first reader); a rank
is a row, top to bottom. In a row each unit goes under
the mean x of the units it reads (pushed right past its left neighbour), which keeps a
layer's chain of kernels roughly in a column. Inside a box nodes are ranked the same
way by their dependencies within the kernel. Coordinates are pixels, y downwards.
"""
from __future__ import annotations

from dataclasses import dataclass, field

CHAR_WIDTH = 7.2  # a 12px monospace glyph
NODE_HEIGHT = 22.0
NODE_PADDING = 7.0  # text to node border, left and right
NODE_GAP = 12.0  # between nodes of a row inside a box
BOX_PADDING = 10.0
BOX_TITLE = 18.0  # the kernel name's band at the top of its box
UNIT_GAP = 24.0  # between units of a row
RANK_GAP = 34.0  # between rows: room for the edges
MARGIN = 16.0


@dataclass
class Box:
    x: float
    y: float
    width: float
    height: float

    @property
    def center_x(self) -> float:
        return self.x + self.width / 2


@dataclass
class Layout:
    width: float
    height: float
    nodes: dict = field(default_factory=dict)  # node key -> Box
    clusters: dict = field(default_factory=dict)  # cluster index -> Box


def node_width(label: str) -> float:
    return len(label) * CHAR_WIDTH + 2 * NODE_PADDING


def layered_layout(drawn) -> Layout:
    units, unit_of = _units(drawn)
    preds = _unit_predecessors(drawn, unit_of, len(units))
    rank = _ranks(units, preds)
    rows: dict = {}
    for u in _execution_order(units):
        rows.setdefault(rank[u], []).append(u)
    inner = [_inner_layout(members, drawn) for members in units]
    layout, origin, y = Layout(0.0, 0.0), [None] * len(units), MARGIN
    for r in sorted(rows):
        for u, x in _place_row(rows[r], inner, preds, origin):
            origin[u] = (x, y)
        y += max(inner[u][1] for u in rows[r]) + RANK_GAP
    for u, members in enumerate(units):
        _place_unit(layout, drawn, members, inner[u], origin[u])
    boxes = list(layout.nodes.values()) + list(layout.clusters.values())
    layout.width = max(b.x + b.width for b in boxes) + MARGIN
    layout.height = max(b.y + b.height for b in boxes) + MARGIN
    return layout


def _ranks(units: list, preds: list) -> list:
    """Longest path from the sources; a source (a graph input) then moves down to just
    above its first reader, so an input read late does not cross the whole picture."""
    rank = [0] * len(units)
    for u in _execution_order(units):
        rank[u] = 1 + max((rank[p] for p in preds[u]), default=-1)
    readers: dict = {}
    for u, sources in enumerate(preds):
        for p in sources:
            readers.setdefault(p, []).append(u)
    for u in range(len(units)):
        if not preds[u] and u in readers:
            rank[u] = min(rank[r] for r in readers[u]) - 1
    return rank


def _units(drawn) -> tuple:
    """Lists of node indices, one per kernel launch and one per node in no kernel."""
    units, of_cluster, unit_of = [], {}, {}
    for index, node in enumerate(drawn.nodes):
        if node.cluster in of_cluster:
            unit = of_cluster[node.cluster]
            units[unit].append(index)
        else:
            unit = len(units)
            units.append([index])
            if node.cluster is not None:
                of_cluster[node.cluster] = unit
        unit_of[node.key] = unit
    return units, unit_of


def _unit_predecessors(drawn, unit_of: dict, count: int) -> list:
    preds = [[] for _ in range(count)]
    for src, dst in drawn.edges:
        a, b = unit_of[src], unit_of[dst]
        if a != b and a not in preds[b]:
            preds[b].append(a)
    return preds


def _execution_order(units: list) -> list:
    """Units by their last node: a launch runs when its root (its last node) does."""
    return sorted(range(len(units)), key=lambda u: max(units[u]))


def _inner_layout(members: list, drawn) -> tuple:
    """(width, height, [(member, dx, dy)]) of a unit: its nodes ranked inside it."""
    keys = {drawn.nodes[i].key: i for i in members}
    level: dict = {}
    for src, dst in drawn.edges:  # edges come in graph order, so sources are levelled first
        if src in keys and dst in keys:
            level[keys[dst]] = max(level.get(keys[dst], 0), level.get(keys[src], 0) + 1)
    rows: dict = {}
    for i in members:
        rows.setdefault(level.get(i, 0), []).append(i)
    row_widths = {r: sum(node_width(drawn.nodes[i].label) for i in row) + NODE_GAP * (len(row) - 1)
                  for r, row in rows.items()}
    boxed = drawn.nodes[members[0]].cluster is not None
    pad, top = (BOX_PADDING, BOX_TITLE + BOX_PADDING) if boxed else (0.0, 0.0)
    width = max(row_widths.values()) + 2 * pad
    if boxed:
        width = max(width, node_width(_cluster_title(drawn, members)) + BOX_PADDING)  # bold runs wider
    placed = []
    for r, row in sorted(rows.items()):
        dx = (width - row_widths[r]) / 2
        for i in row:
            placed.append((i, dx, top + r * (NODE_HEIGHT + NODE_GAP)))
            dx += node_width(drawn.nodes[i].label) + NODE_GAP
    height = top + len(rows) * (NODE_HEIGHT + NODE_GAP) - NODE_GAP + pad
    return width, height, placed


def _cluster_title(drawn, members: list) -> str:
    return drawn.clusters[drawn.nodes[members[0]].cluster].label


def _place_row(row: list, inner: list, preds: list, origin: list) -> list:
    """[(unit, x)]: each unit under the mean center of the kernels and views it reads,
    without overlaps; sources (graph inputs) go to the right end of the row."""
    def wanted(u):
        placed = [p for p in preds[u] if origin[p] is not None]
        inner_preds = [p for p in placed if preds[p]] or placed  # inputs sit aside: do not follow them
        centers = [origin[p][0] + inner[p][0] / 2 for p in inner_preds]
        return sum(centers) / len(centers) - inner[u][0] / 2

    readers = sorted((u for u in row if preds[u]), key=wanted)
    placed, right = [], MARGIN - UNIT_GAP
    for u in readers + [u for u in row if not preds[u]]:
        x = max(wanted(u) if preds[u] else right + UNIT_GAP, right + UNIT_GAP, MARGIN)
        placed.append((u, x))
        right = x + inner[u][0]
    return placed


def _place_unit(layout: Layout, drawn, members: list, inner: tuple, origin: tuple) -> None:
    width, height, placed = inner
    x, y = origin
    cluster = drawn.nodes[members[0]].cluster
    if cluster is not None:
        layout.clusters[cluster] = Box(x, y, width, height)
    for i, dx, dy in placed:
        layout.nodes[drawn.nodes[i].key] = Box(x + dx, y + dy, node_width(drawn.nodes[i].label), NODE_HEIGHT)
