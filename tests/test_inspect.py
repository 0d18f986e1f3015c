"""`fuselm inspect`: the kernel table, sources, IR, graph drawings and the profile,
read back from the dump of a tiny model compiled once for cpu."""
import io
import json
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest
import torch
from torch import nn

import fuselm
from fuselm.inspect import main, open_source, profile
from fuselm.inspect.cost import launch_cost
from fuselm.inspect.fused_graph import fused_graph
from fuselm.inspect.graph_draw import to_dot
from fuselm.inspect.highlight import write_source
from fuselm.inspect.source import InspectError
from fuselm.inspect.workload import lm_contract_values, symbol_sizes
from fuselm.models.contract import pack_prompts
from tiny_models import tiny_llama

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
WIDTH, HIDDEN = 32, 64


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(WIDTH)
        self.up = nn.Linear(WIDTH, HIDDEN)
        self.down = nn.Linear(HIDDEN, WIDTH)

    def forward(self, x):
        return x + self.down(nn.functional.gelu(self.up(self.norm(x))))


class TwoBlocks(nn.Module):
    """Two identical blocks: their kernels are shared, so each runs twice per forward."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.norm = nn.LayerNorm(WIDTH)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


@pytest.fixture(scope="module")
def compiled_dump(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    torch.manual_seed(0)
    compiled = fuselm.compile(TwoBlocks().eval(), (torch.randn(5, WIDTH),), target="cpu", dynamic={"x": {0: "T"}},
                              dump_dir=str(root / "dump"), cache_dir=str(root / "cache"))
    return compiled, root / "dump", root / "cache"


def inspect(capsys, *argv):
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_table_lists_every_kernel_with_its_launches_and_model_lines(compiled_dump, capsys):
    compiled, dump, _ = compiled_dump
    status, out, _ = inspect(capsys, dump)
    assert status == 0
    index = json.loads((dump / "index.json").read_text())
    rows = {line.split()[0]: line for line in out.splitlines()[1:-1]}
    assert set(rows) == set(index)
    for kernel in compiled.kernels:
        assert rows[kernel.name].split()[1] == str(kernel.launches)
    assert "test_inspect.py:" in out  # the model's source lines the fused nodes came from
    launches = sum(k.launches for k in compiled.kernels)
    assert out.splitlines()[-1] == f"{len(index)} kernels, {launches} launches per forward"


def test_kernel_prints_the_source_the_cache_built(compiled_dump, capsys):
    compiled, dump, _ = compiled_dump
    for kernel in compiled.kernels:
        status, out, _ = inspect(capsys, dump, "--kernel", kernel.name)
        assert status == 0 and out == Path(kernel.source_path).read_text()
    name = compiled.kernels[0].name
    status, out, _ = inspect(capsys, dump, "--kernel", f"{name}.ll")  # the kernel's LLVM IR
    assert status == 0 and out == (dump / "kernels" / f"{name}.ll").read_text()


def test_unknown_kernel_is_one_line_with_close_matches(compiled_dump, capsys):
    compiled, dump, _ = compiled_dump
    gemm = next(k.name for k in compiled.kernels if k.name.startswith("gemm"))
    status, out, err = inspect(capsys, dump, "--kernel", gemm[:-2])
    assert status == 2 and out == ""
    assert len(err.splitlines()) == 1 and "close matches" in err and gemm in err


@pytest.mark.parametrize("make", [lambda tmp: tmp / "missing", lambda tmp: tmp])
def test_a_directory_that_is_not_a_dump_is_one_line(tmp_path, capsys, make):
    status, out, err = inspect(capsys, make(tmp_path))
    assert status == 2 and out == "" and len(err.splitlines()) == 1 and err.startswith("fuselm inspect: error:")


def test_ir_after_the_last_pass_and_a_named_one(compiled_dump, capsys):
    compiled, dump, _ = compiled_dump
    status, out, _ = inspect(capsys, dump, "--ir")
    assert status == 0 and out == str(compiled.graph)
    epilogue = next(dump.glob("*_fuse_epilogue.ir"))
    for spelling in ("fuse_epilogue", epilogue.stem, epilogue.stem.split("_")[0]):
        assert inspect(capsys, dump, "--ir", spelling)[1] == epilogue.read_text()
    status, out, err = inspect(capsys, dump, "--ir", "fuse_everything")
    assert status == 2 and len(err.splitlines()) == 1 and "00_captured" in err and epilogue.stem in err


def test_graph_svg_is_valid_and_names_every_kernel(compiled_dump, capsys, tmp_path):
    compiled, dump, _ = compiled_dump
    svg = tmp_path / "fused.svg"
    status, _, err = inspect(capsys, dump, "--graph", svg, "--layout", "builtin")
    assert status == 0 and "wrote" in err
    root = ElementTree.parse(svg).getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    texts = " ".join(element.text or "" for element in root.iter())
    assert all(kernel.name in texts for kernel in compiled.kernels)


def test_graph_png(compiled_dump, capsys, tmp_path):
    _, dump, _ = compiled_dump
    png = tmp_path / "fused.png"
    assert inspect(capsys, dump, "--graph", png, "--layout", "builtin")[0] == 0
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_graph_puts_each_launch_in_a_cluster(compiled_dump):
    compiled, dump, _ = compiled_dump
    drawn = fused_graph(open_source(dump))
    assert len(drawn.clusters) == sum(k.launches for k in compiled.kernels)
    kernel_nodes = [n for n in drawn.nodes if n.cluster is not None]
    assert {drawn.clusters[n.cluster].kernel for n in kernel_nodes} == {k.name for k in compiled.kernels}
    dot = to_dot(drawn)  # what Graphviz lays out when `dot` is on PATH
    assert dot.count("subgraph cluster_") == len(drawn.clusters) and dot.count(" -> ") == len(drawn.edges)


def test_profile_prints_a_row_per_kernel_and_a_roofline(compiled_dump, capsys, tmp_path):
    compiled, dump, cache = compiled_dump
    plot = tmp_path / "roofline.png"
    status, out, err = inspect(capsys, dump, "--profile", "--tokens", 3, "--batch", 2, "--cache-dir", cache,
                               "--plot", plot)
    assert status == 0, err
    assert "ceilings:" in out and "T=6" in out
    names = {k.name for k in compiled.kernels}
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[0] in names}
    assert {name: int(row[1]) for name, row in rows.items()} == {k.name: k.launches for k in compiled.kernels}
    assert plot.read_bytes()[:8] == PNG_MAGIC


def test_profile_in_process_counts_gemm_work_exactly(compiled_dump):
    compiled, _, _ = compiled_dump
    result = profile(compiled, tokens=4)
    assert {row.kernel: row.launches for row in result.rows} == {k.name: k.launches for k in compiled.kernels}
    assert [row.seconds for row in result.rows] == sorted((row.seconds for row in result.rows), reverse=True)
    up = next(row for row in result.rows if row.kernel.startswith("gemm") and f"k{WIDTH}_n{HIDDEN}" in row.kernel)
    per_launch = 2 * 4 * HIDDEN * WIDTH + 4 * HIDDEN * 2  # the gemm, then bias and gelu on each output
    assert up.flops == per_launch * up.launches


def test_unknown_symbolic_dims_need_a_size(compiled_dump):
    compiled, _, _ = compiled_dump
    with pytest.raises(InspectError, match="--dim"):
        symbol_sizes([fuselm.ir.Input("x", fuselm.ir.parse_type("f32[s0,4]"))], tokens=1, batch=1)
    with pytest.raises(InspectError, match="set by --tokens"):
        symbol_sizes(compiled.graph.inputs, tokens=1, batch=1, dims={"T": 3})


def test_lm_contract_inputs_are_a_packed_prefill():
    config, _ = tiny_llama(num_layers=1)
    expected = pack_prompts(config, [[0, 0, 0], [0, 0, 0]], block_size=2)
    made = lm_contract_values(tokens=3, batch=2, context=3, block_size=2)
    for name in ("positions", "slot_mapping", "block_tables", "context_lens", "cu_seqlens_q", "logits_indices"):
        assert made[name].tolist() == getattr(expected, name).tolist(), name


def test_paged_attention_reads_the_context_and_attends_causally():
    decode = lm_contract_values(tokens=1, batch=2, context=40, block_size=16)
    graph = fuselm.ir.parse("""\
graph(%q: f32[T,4,8], %cache: f32[1,2,NB,16,2,8], %tables: i32[N,MB], %lens: i32[N], %cu: i32[N+1]) {
  %0 = paged_attention(%q, %cache, %tables, %lens, %cu) {layer=0, scale=0.35} : f32[T,4,8]
  return %0
}""", {})
    args = (torch.zeros(2, 4, 8), torch.zeros(1, 2, 6, 16, 2, 8), decode["block_tables"].int(),
            decode["context_lens"].int(), decode["cu_seqlens_q"].int())
    cost = launch_cost(graph, args)
    assert cost.flops == 4 * 4 * 8 * (40 + 40)  # heads x dim x (one query x 40 keys, per sequence)
    kv_read = 2 * 2 * 40 * 2 * 8 * 4  # K and V, 2 sequences x 40 tokens x 2 kv heads x 8 dims, f32
    queries_and_output = 2 * args[0].nbytes
    assert cost.bytes == kv_read + queries_and_output + sum(a.nbytes for a in args[2:])


def test_png_without_matplotlib_is_one_line(compiled_dump, capsys, tmp_path, monkeypatch):
    _, dump, _ = compiled_dump
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # what an uninstalled package raises
    status, _, err = inspect(capsys, dump, "--graph", tmp_path / "fused.png", "--layout", "builtin")
    assert status == 2 and len(err.splitlines()) == 1 and "pip install matplotlib" in err


def test_sources_are_coloured_only_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    source = "def kernel(x):\n    return x\n"
    plain, terminal = io.StringIO(), Terminal()
    write_source(source, "kernels/k.tir", plain)
    write_source(source, "kernels/k.tir", terminal)
    assert plain.getvalue() == source
    assert "\x1b[" in terminal.getvalue() and "kernel" in terminal.getvalue()
