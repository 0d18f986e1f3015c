"""Kernel dumps: `kernels/<name>.<ext>` per kernel and `index.json` mapping each kernel
to the IR nodes it fused, its parameter shapes and its source file."""
from __future__ import annotations

import json
from pathlib import Path

from ..ir.text import format_node, value_names


def write_kernel_dump(dump_dir, graph, launches: list) -> None:
    """`launches` are (KernelGroup, Kernel) pairs in execution order."""
    directory = Path(dump_dir) / "kernels"
    directory.mkdir(parents=True, exist_ok=True)
    names = value_names(graph)
    index: dict = {}
    for group, kernel in launches:
        source = directory / f"{kernel.name}.{kernel.source_ext}"
        source.write_text(kernel.source)
        for ext, text in kernel.extra_sources.items():
            (directory / f"{kernel.name}.{ext}").write_text(text)
        entry = index.setdefault(kernel.name, {
            "ops": list(kernel.ops),
            "source": str(source.relative_to(dump_dir)),
            "extra_sources": sorted(f"kernels/{kernel.name}.{ext}" for ext in kernel.extra_sources),
            "params": [str(v.type) for v in group.graph.inputs],
            "launches": [],
        })
        entry["launches"].append({"nodes": [format_node(n, names) for n in group.nodes],
                                  "cache_layer": group.cache_layer})
    (Path(dump_dir) / "index.json").write_text(json.dumps(index, indent=1))
