"""`fuselm inspect DIR` on an artifact of `fuselm build` (a tiny Llama built once): the
kernel table, sources, the final IR, graph drawings and the profile, from the artifact's
own files (test_inspect.py covers the same on a dump directory)."""
import json
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

from fuselm.artifact import build
from fuselm.inspect import main
from test_artifact import tiny_llama_dir

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect-artifact")
    directory = root / "tiny.fuselm"
    compiled = build(tiny_llama_dir(root / "llama"), directory, cache_dir=str(root / "cache"), progress=False)
    return directory, compiled


def inspect(capsys, *argv):
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_table_lists_every_kernel_of_the_manifest(artifact, capsys):
    directory, compiled = artifact
    status, out, err = inspect(capsys, directory)
    assert status == 0, err
    listed = json.loads((directory / "manifest.json").read_text())["kernels"]
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:-1]}
    assert set(rows) == {k["name"] for k in listed} == {k.name for k in compiled.kernels}
    assert {name: int(row[1]) for name, row in rows.items()} == {k.name: k.launches for k in compiled.kernels}
    assert "llama.py:" in out  # the model lines its fused nodes came from
    assert out.splitlines()[-1] == f"{len(listed)} kernels, {sum(k.launches for k in compiled.kernels)} launches per forward"


def test_kernel_prints_the_source_that_was_built(artifact, capsys):
    directory, compiled = artifact
    for kernel in compiled.kernels:
        status, out, _ = inspect(capsys, directory, "--kernel", kernel.name)
        assert status == 0 and out == Path(kernel.source_path).read_text()
    status, out, _ = inspect(capsys, directory, "--kernel", f"{compiled.kernels[0].name}.s")  # its assembly
    assert status == 0 and ".text" in out


def test_ir_is_the_artifacts_graph_and_a_pass_name_is_refused(artifact, capsys):
    directory, compiled = artifact
    status, out, _ = inspect(capsys, directory, "--ir")
    assert status == 0 and out == (directory / "graph.ir").read_text() == str(compiled.graph)
    status, out, err = inspect(capsys, directory, "--ir", "fuse_norm")
    assert status == 2 and len(err.splitlines()) == 1 and "last pass only" in err


def test_graph_svg_and_png(artifact, capsys, tmp_path):
    directory, compiled = artifact
    svg, png = tmp_path / "fused.svg", tmp_path / "fused.png"
    assert inspect(capsys, directory, "--graph", svg, "--layout", "builtin")[0] == 0
    texts = " ".join(element.text or "" for element in ElementTree.parse(svg).getroot().iter())
    assert all(kernel.name in texts for kernel in compiled.kernels)
    assert inspect(capsys, directory, "--graph", png, "--layout", "builtin")[0] == 0
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_profile_runs_the_artifacts_kernels_a_row_each(artifact, capsys):
    directory, compiled = artifact
    status, out, err = inspect(capsys, directory, "--profile", "--tokens", 4, "--batch", 2)
    assert status == 0, err
    names = {k.name for k in compiled.kernels}
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line and line.split()[0] in names}
    assert {name: int(row[1]) for name, row in rows.items()} == {k.name: k.launches for k in compiled.kernels}
    assert "not in the kernel cache" not in err  # nothing generated: the artifact's own kernels ran


def test_a_damaged_artifact_is_not_profiled(artifact, capsys, tmp_path):
    import shutil

    directory, compiled = artifact
    copy = tmp_path / "damaged.fuselm"
    shutil.copytree(directory, copy)
    library = next((copy / "kernels").glob("*/*.so"))
    library.write_bytes(library.read_bytes()[:1000])  # truncated: loading it would crash the process
    status, out, err = inspect(capsys, copy, "--profile")
    assert status == 2 and len(err.splitlines()) == 1 and library.name in err
