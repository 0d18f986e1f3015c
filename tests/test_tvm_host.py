"""What this machine's CPU can run, remembered so that loading an artifact needs no LLVM.

`host.host_record()` asks LLVM (importing tvm) once per CPU and tvm version, and keeps the
answer in `<FUSELM_CACHE>/host-cpu.json` under a key of /proc/cpuinfo's description of the
CPU; these tests check that the memo is written, used without importing tvm, and not
trusted when it is corrupt or describes another CPU.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fuselm.codegen.tvm import host

pytestmark = pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="the memo is keyed by /proc/cpuinfo")


@pytest.fixture
def fresh_memo(tmp_path, monkeypatch):
    """An empty FUSELM_CACHE, and host_record forgetting what this process asked."""
    monkeypatch.setenv("FUSELM_CACHE", str(tmp_path))
    host.host_record.cache_clear()
    yield tmp_path / host.MEMO_FILE
    host.host_record.cache_clear()


def _llvm_answer() -> dict:
    import tvm

    cpu = str(tvm.target.codegen.llvm_get_system_cpu())
    return {"llvm_cpu": cpu, "features": list(host.cpu_features(cpu))}


def test_the_answer_is_llvm_s_and_is_remembered(fresh_memo):
    features = host.host_cpu_features()
    answer = _llvm_answer()
    assert list(features) == answer["features"] and host.host_cpu() == answer["llvm_cpu"]
    assert features  # LLVM lists the CPU's extensions
    remembered = json.loads(fresh_memo.read_text())
    assert remembered["features"] == answer["features"] and remembered["llvm_cpu"] == answer["llvm_cpu"]


def test_a_remembered_answer_is_used_without_importing_tvm(fresh_memo):
    host.host_cpu_features()
    record = json.loads(fresh_memo.read_text())
    fresh_memo.write_text(json.dumps({**record, "features": ["marked-feature"]}))  # proves it was read, not asked
    script = textwrap.dedent("""
        import json, sys
        from fuselm.codegen.tvm import host
        print(json.dumps([list(host.host_cpu_features()), "tvm" in sys.modules]))
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "FUSELM_CACHE": str(fresh_memo.parent)})
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == [["marked-feature"], False]


@pytest.mark.parametrize("memo", [
    lambda key: "{not json",
    lambda key: json.dumps({"key": "another-cpu", "llvm_cpu": "other", "features": ["marked-feature"]}),
    lambda key: json.dumps({"key": key, "llvm_cpu": "other", "features": "marked-feature"}),
], ids=["not-json", "another-cpu", "features-not-a-list"])
def test_a_corrupt_memo_or_one_of_another_cpu_is_not_trusted(fresh_memo, memo):
    fresh_memo.write_text(memo(host._host_key()))
    assert list(host.host_cpu_features()) == _llvm_answer()["features"]
    assert json.loads(fresh_memo.read_text())["features"] == _llvm_answer()["features"]  # rewritten


def test_a_cache_that_cannot_be_written_still_answers(fresh_memo, monkeypatch):
    fresh_memo.parent.joinpath("blocker").write_text("")
    monkeypatch.setenv("FUSELM_CACHE", str(fresh_memo.parent / "blocker" / "below-a-file"))
    assert list(host.host_cpu_features()) == _llvm_answer()["features"]
