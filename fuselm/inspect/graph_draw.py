"""`fuselm inspect DIR --graph FILE.svg|FILE.png`: the fused graph, each kernel launch a box.

With Graphviz's `dot` on PATH it lays the graph out (DOT written here, clusters for the
launches). Without it the layout is graph_layout.py's, drawn as SVG text directly or as
PNG through matplotlib, so pip packages alone are enough. Launches of the same kernel
(identical layers) share a colour; hovering a node shows its IR line.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from xml.sax.saxutils import escape

from .fused_graph import fused_graph
from .graph_layout import NODE_HEIGHT, layered_layout
from .plotting import new_figure
from .source import InspectError

FORMATS = ("svg", "png")
LAYOUTS = ("auto", "dot", "builtin")
PALETTE = ("#dbeafe", "#dcfce7", "#fef3c7", "#fce7f3", "#ede9fe", "#ccfbf1", "#ffedd5", "#e0e7ff",
           "#f5f5f4", "#fee2e2")
MAX_PNG_PIXELS = 30000  # along the longer side: matplotlib refuses images past 2**16


def draw_graph(source, path, layout: str = "auto") -> str:
    """Draw `source`'s fused graph into `path` (.svg or .png); returns how it was laid out."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower()
    if fmt not in FORMATS:
        raise InspectError(f"--graph writes .svg or .png files, not {path.name!r}")
    if layout not in LAYOUTS:
        raise InspectError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    dot = shutil.which("dot") if layout != "builtin" else None
    if layout == "dot" and dot is None:
        raise InspectError("--layout dot needs Graphviz's `dot` on PATH")
    drawn = fused_graph(source)
    if dot:
        _run_dot(dot, to_dot(drawn), fmt, path)
        return "graphviz dot"
    if fmt == "svg":
        path.write_text(to_svg(drawn))
    else:
        _write_png(drawn, path)
    return "builtin layered layout"


def _colours(drawn) -> list:
    """A fill per cluster, the same for every launch of one kernel."""
    kernels = list(dict.fromkeys(c.kernel for c in drawn.clusters))
    return [PALETTE[kernels.index(c.kernel) % len(PALETTE)] for c in drawn.clusters]


def _edge_curve(layout, src: str, dst: str) -> list:
    """A cubic Bezier from the bottom of `src` to the top of `dst`, leaving and arriving
    vertically (its four control points)."""
    a, b = layout.nodes[src], layout.nodes[dst]
    x1, y1, x2, y2 = a.center_x, a.y + a.height, b.center_x, b.y
    bend = max((y2 - y1) / 2, 10.0)
    return [(x1, y1), (x1, y1 + bend), (x2, y2 - bend), (x2, y2)]


# ----------------------------------------------------------------------------- svg
def to_svg(drawn) -> str:
    layout = layered_layout(drawn)
    fills = _colours(drawn)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{layout.width:.0f}" height="{layout.height:.0f}" '
             f'viewBox="0 0 {layout.width:.0f} {layout.height:.0f}" font-family="monospace" font-size="12">',
             '<defs><marker id="arrow" viewBox="0 0 8 8" refX="8" refY="4" markerWidth="7" markerHeight="7" '
             'orient="auto"><path d="M0,0 L8,4 L0,8 z" fill="#555"/></marker></defs>',
             '<rect width="100%" height="100%" fill="white"/>']
    for index, box in sorted(layout.clusters.items()):
        cluster = drawn.clusters[index]
        parts.append(f'<g class="kernel"><title>{escape(cluster.kernel)}: {escape(" ".join(cluster.ops))}</title>'
                     f'<rect x="{box.x:.1f}" y="{box.y:.1f}" width="{box.width:.1f}" height="{box.height:.1f}" '
                     f'rx="6" fill="{fills[index]}" stroke="#666"/>'
                     f'<text x="{box.x + 6:.1f}" y="{box.y + 14:.1f}" font-weight="bold">'
                     f'{escape(cluster.label)}</text></g>')
    for src, dst in drawn.edges:
        start, *rest = (f"{x:.1f},{y:.1f}" for x, y in _edge_curve(layout, src, dst))
        parts.append(f'<path d="M{start} C{" ".join(rest)}" fill="none" stroke="#555" marker-end="url(#arrow)"/>')
    for node in drawn.nodes:
        box = layout.nodes[node.key]
        shape = 'rx="11"' if node.cluster is None else 'rx="3"'
        stroke = ' stroke-width="2.5"' if node.is_output else ""
        parts.append(f'<g class="node"><title>{escape(node.title)}</title>'
                     f'<rect x="{box.x:.1f}" y="{box.y:.1f}" width="{box.width:.1f}" height="{box.height:.1f}" '
                     f'{shape} fill="white" stroke="#333"{stroke}/>'
                     f'<text x="{box.center_x:.1f}" y="{box.y + NODE_HEIGHT / 2 + 4:.1f}" '
                     f'text-anchor="middle">{escape(node.label)}</text></g>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


# ----------------------------------------------------------------------------- png
def _write_png(drawn, path: Path) -> None:
    layout = layered_layout(drawn)
    dpi = min(100.0, MAX_PNG_PIXELS / max(layout.width, layout.height) * 100)
    figure = new_figure("--graph FILE.png", "or write FILE.svg, which needs nothing",
                        figsize=(layout.width / 100, layout.height / 100), dpi=dpi)
    axes = figure.add_axes((0, 0, 1, 1))
    axes.set_xlim(0, layout.width)
    axes.set_ylim(layout.height, 0)
    axes.axis("off")
    _draw_layout(axes, drawn, layout)
    figure.savefig(path, dpi=dpi, format="png")


def _draw_layout(axes, drawn, layout) -> None:
    from matplotlib.patches import FancyBboxPatch, PathPatch
    from matplotlib.path import Path as CurvePath

    fills = _colours(drawn)
    points = 72 / 100  # one layout pixel in points at 100 dpi: text scales with the figure
    for index, box in layout.clusters.items():
        axes.add_patch(FancyBboxPatch((box.x, box.y), box.width, box.height, boxstyle="round,pad=0,rounding_size=6",
                                      facecolor=fills[index], edgecolor="#666"))
        axes.text(box.x + 6, box.y + 14, drawn.clusters[index].label, fontsize=12 * points, family="monospace",
                  weight="bold")
    for src, dst in drawn.edges:
        curve = CurvePath(_edge_curve(layout, src, dst), [CurvePath.MOVETO] + [CurvePath.CURVE4] * 3)
        axes.add_patch(PathPatch(curve, facecolor="none", edgecolor="#555", linewidth=0.8))
    for node in drawn.nodes:
        box = layout.nodes[node.key]
        axes.add_patch(FancyBboxPatch((box.x, box.y), box.width, box.height, boxstyle="round,pad=0,rounding_size=3",
                                      facecolor="white", edgecolor="#333", linewidth=2.0 if node.is_output else 0.8))
        axes.text(box.center_x, box.y + box.height / 2, node.label, fontsize=12 * points, family="monospace",
                  ha="center", va="center")


# ----------------------------------------------------------------------------- graphviz
def to_dot(drawn) -> str:
    fills = _colours(drawn)
    lines = ["digraph fused {",
             '  node [shape=box, style="rounded,filled", fillcolor=white, fontname=monospace, fontsize=10];',
             '  graph [fontname=monospace, fontsize=11];']
    members: dict = {}
    for node in drawn.nodes:
        members.setdefault(node.cluster, []).append(node)
    for node in members.get(None, []):
        lines.append(f"  {_dot_node(node)}")
    for index, cluster in enumerate(drawn.clusters):
        lines.append(f"  subgraph cluster_{index} {{")
        lines.append(f'    label={_dot_string(cluster.label)}; style="rounded,filled"; fillcolor="{fills[index]}";')
        lines += [f"    {_dot_node(node)}" for node in members.get(index, [])]
        lines.append("  }")
    lines += [f"  {src} -> {dst};" for src, dst in drawn.edges]
    lines.append("}")
    return "\n".join(lines) + "\n"


def _dot_node(node) -> str:
    width = ", penwidth=2.5" if node.is_output else ""
    return f"{node.key} [label={_dot_string(node.label)}, tooltip={_dot_string(node.title)}{width}];"


def _dot_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _run_dot(dot: str, text: str, fmt: str, path: Path) -> None:
    done = subprocess.run([dot, f"-T{fmt}", "-o", str(path)], input=text, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise InspectError(f"dot failed (exit {done.returncode}): {last}")
