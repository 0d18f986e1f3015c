"""The onnx package's backend test suite against fuselm's ONNX backend, beside ONNX
Runtime's results on the same cases. Not a test.

    python benchmarks/onnx_conformance.py [--target cpu|cuda|both] [--kinds node,simple,pytorch-converted,pytorch-operator]
                                          [--ops Add,Relu | --ops target] [--jobs 2] [--no-ort] [--json results.json]

The cases are `onnx.backend.test.BackendTest`'s: the node cases (collected from
`onnx.backend.test.case`, nothing downloaded) and the model cases shipped with onnx
(`simple`, `pytorch-converted`, `pytorch-operator`; not `real`, which downloads models).
Each case runs as BackendTest's own unittest test (`test_<case>_cpu` / `_cuda`: prepare,
run on every data set, its `assert_similar_outputs` with the case's tolerances), once for
each of:

  fuselm cpu    FuselmBackend (fuselm/onnx_backend.py), device CPU: TVM kernels
  fuselm cuda   device CUDA: the Triton kernels; without a GPU in Triton's interpreter
                (TRITON_INTERPRET=1, set here for the worker processes), node cases only,
                of the target-list ops unless `--cuda-all` (the interpreter is slow)
  ORT           ONNX Runtime's CPU provider, through a small Backend wrapper below

A result is `passed`, `unsupported` (fuselm: UnsupportedOpError from the importer or
UnsupportedKernelError from codegen; ORT: NOT_IMPLEMENTED, or a model it refuses to
load) or `failed` (a wrong value, shape or dtype, another exception, a timeout), each
failure with a reason class. The tables: per op (a node case's op is its node's; an
`_expanded` case, the op's function body, is counted as "<Op>_expanded"; a model case
is counted under its kind), per kind, then the target list's pass rate and the
failures of fuselm by op.

The target list: the single-op node cases (not `_expanded`) of TARGET_OPS whose inputs
and outputs are tensors of TARGET_DTYPES (f32, f16, bf16, f64, i8, i32, i64, bool); the
denominator is every such case, whatever happens to it.

Cases run in `--jobs` worker processes (spawned, each with its own BackendTest), each
case under a `--timeout` (the worker killed past it: a kernel build in native code cannot
be interrupted); kernels go to a kernel cache in a temporary folder (or
`--cache-dir`, kept, to rerun faster).
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import sys
import tempfile
import time
import warnings
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

KINDS = ("node", "simple", "pytorch-converted", "pytorch-operator")
# BackendTest's category of each kind: its tests are the methods of OnnxBackend<category>Test
CATEGORIES = {"node": "NodeModel", "simple": "SimpleModel", "pytorch-converted": "PyTorchConvertedModel",
              "pytorch-operator": "PyTorchOperatorModel"}
TARGET_OPS = (
    "Add Sub Mul Div Pow Sqrt Reciprocal Neg Exp Log Tanh Erf Sigmoid Relu Gelu Softmax LogSoftmax MatMul Gemm "
    "LayerNormalization ReduceMean ReduceSum ReduceMax Gather Reshape Transpose Concat Slice Split Squeeze "
    "Unsqueeze Expand Where Equal Less Greater Not Cast Shape ConstantOfShape Range Constant Identity Trilu CumSum "
    "And Or IsNaN Flatten GatherElements GreaterOrEqual LessOrEqual").split()
# TensorProto elem types: f32, f16, bf16, f64, i8, i32, i64, bool
TARGET_DTYPES = {1, 10, 16, 11, 3, 6, 7, 9}
RUNS = ("fuselm-cpu", "fuselm-cuda", "ort")
OUTCOMES = ("passed", "failed", "unsupported")


@dataclass
class Case:
    name: str  # the case's name (test_relu); BackendTest's test is name + "_cpu" / "_cuda"
    kind: str
    op: str  # the row of the per-op table
    ops: tuple  # every op type of the model
    in_target: bool


@dataclass
class Result:
    case: str
    run: str
    outcome: str  # passed | failed | unsupported | skipped
    reason: str = ""  # the failure's class (wrong values, crash: TypeError...), or the unsupported op
    message: str = ""  # the exception's first line
    seconds: float = 0.0


# ----------------------------------------------------------------------------- the cases
def _quiet_load(kind: str):
    from onnx.backend.test.loader import load_model_tests

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_model_tests(kind=kind)


def _target_dtypes(graph) -> bool:
    values = list(graph.input) + list(graph.output)
    return all(v.type.HasField("tensor_type") and v.type.tensor_type.elem_type in TARGET_DTYPES for v in values)


def collect(kinds, ops=None) -> list:
    """The cases of `kinds` (with `ops`: node cases of those ops, model cases made of them only)."""
    import onnx

    cases = []
    for kind in kinds:
        if kind == "node":
            tests = _quiet_load("node")
            single = {t.name: t.model.graph.node[0].op_type for t in tests if len(t.model.graph.node) == 1}
            for t in tests:
                graph = t.model.graph
                expanded = t.name.endswith("_expanded")
                if len(graph.node) == 1:
                    base, op = graph.node[0].op_type, graph.node[0].op_type
                elif expanded and t.name[:-len("_expanded")] in single:
                    base = single[t.name[:-len("_expanded")]]
                    op = base + "_expanded"
                else:
                    base, op = None, "(multi-node)"
                if ops is not None and base not in ops:
                    continue
                in_target = (not expanded and len(graph.node) == 1 and base in TARGET_OPS and _target_dtypes(graph))
                cases.append(Case(t.name, kind, op, tuple(sorted({n.op_type for n in graph.node})), in_target))
        else:
            for t in _quiet_load(kind):
                model = onnx.load(os.path.join(t.model_dir, "model.onnx"), load_external_data=False)
                model_ops = tuple(sorted({n.op_type for n in model.graph.node}))
                if ops is not None and not set(model_ops) <= set(ops):
                    continue
                cases.append(Case(t.name, kind, f"[{kind}]", model_ops, False))
    return sorted(cases, key=lambda c: (KINDS.index(c.kind), c.name))


# ----------------------------------------------------------------------------- ONNX Runtime, for comparison
def ort_backend():
    """A minimal onnx Backend over ONNX Runtime's CPU provider (the comparison column)."""
    import numpy as np
    import onnxruntime
    from onnx.backend.base import Backend, BackendRep

    class OrtRep(BackendRep):
        def __init__(self, model):
            options = onnxruntime.SessionOptions()
            options.log_severity_level = 3
            self.session = onnxruntime.InferenceSession(model.SerializeToString(), options,
                                                        providers=["CPUExecutionProvider"])
            self.names = [i.name for i in self.session.get_inputs()]

        def run(self, inputs, **kwargs):
            feeds = dict(inputs) if isinstance(inputs, dict) else dict(zip(self.names, inputs))
            feeds = {name: np.asarray(value) for name, value in feeds.items()}  # numpy scalars: 0-d arrays
            return tuple(np.asarray(o) for o in self.session.run(None, feeds))

    class OrtBackend(Backend):
        @classmethod
        def prepare(cls, model, device="CPU", **kwargs):
            try:
                return OrtRep(model)
            except Exception as error:  # noqa: BLE001 -- a model ORT refuses to load
                raise OrtUnsupported(f"{type(error).__name__}: {error}") from None

        @classmethod
        def supports_device(cls, device):
            return device == "CPU"

    return OrtBackend


class OrtUnsupported(Exception):
    """ONNX Runtime does not load the model (an op, type or opset it has no kernel for)."""


# ----------------------------------------------------------------------------- one worker
_SUITES: dict = {}  # backend name -> {category: BackendTest's unittest.TestCase class}


def _suite(backend: str) -> dict:
    if backend not in _SUITES:
        import onnx.backend.test

        if backend == "ort":
            cls = ort_backend()
        else:
            from fuselm.onnx_backend import FuselmBackend

            cls = FuselmBackend
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _SUITES[backend] = onnx.backend.test.BackendTest(cls, __name__).test_cases
    return _SUITES[backend]


def _collector():
    import unittest

    class Collector(unittest.TestResult):
        """Keeps the exception itself (unittest keeps only its formatted traceback)."""
        error = None
        skipped_why = None

        def addError(self, test, err):
            super().addError(test, err)
            self.error = err[1]

        def addFailure(self, test, err):
            super().addFailure(test, err)
            self.error = err[1]

        def addSkip(self, test, reason):
            super().addSkip(test, reason)
            self.skipped_why = reason

    return Collector()


def classify(run: str, error: BaseException) -> tuple:
    """(outcome, reason class) of a case that raised `error`."""
    message = " ".join(str(error).split())
    if run.startswith("fuselm"):
        from fuselm.errors import FuselmError, UnsupportedKernelError, UnsupportedOpError

        if isinstance(error, UnsupportedOpError):
            return "unsupported", f"op {error.op}"
        if isinstance(error, UnsupportedKernelError):
            return "unsupported", "no kernel"
        if isinstance(error, FuselmError):
            return "failed", "import/compile error"
    elif isinstance(error, OrtUnsupported) or type(error).__name__ == "NotImplemented":
        return "unsupported", "not loaded" if isinstance(error, OrtUnsupported) else "not implemented"
    elif "can't be converted to MLDataType" in message:  # ml_dtypes arrays (bf16, float8, int4) as inputs
        return "unsupported", "input dtype"
    if isinstance(error, AssertionError):
        if "incorrect shape" in message:
            return "failed", "wrong shape"
        if "dtype(" in message:
            return "failed", "wrong dtype"
        if "tolerance" in message or "not equal" in message.lower():
            return "failed", "wrong values"
        return "failed", "assertion"
    return "failed", f"crash: {type(error).__name__}"


def _run_case(suites: dict, run: str, name: str, kind: str, device: str) -> Result:
    """BackendTest's test of one case, run by unittest with a collecting result."""
    test_case = suites[f"OnnxBackend{CATEGORIES[kind]}Test"]
    test_name = f"{name}_{device.lower()}"
    if not hasattr(test_case, test_name):
        return Result(name, run, "skipped", "no such test")
    collector = _collector()
    start = time.perf_counter()
    test_case(test_name).run(collector)
    seconds = time.perf_counter() - start
    if collector.skipped_why is not None:
        return Result(name, run, "skipped", collector.skipped_why, seconds=seconds)
    if collector.error is None and collector.wasSuccessful():
        return Result(name, run, "passed", seconds=seconds)
    error = collector.error or RuntimeError("failed")
    outcome, reason = classify(run, error)
    message = " ".join(str(error).split())[:300] or type(error).__name__
    return Result(name, run, outcome, reason, message, seconds)


def _worker(wid: int, tasks, messages, cache_dir: str) -> None:
    """A worker process: runs the chunks it is given ((backend, device, [(name, kind)]);
    None ends it), telling the parent when each case starts and what it gave."""
    os.environ["FUSELM_CACHE"] = cache_dir
    warnings.simplefilter("ignore")
    while True:
        task = tasks.get()
        if task is None:
            return
        backend, device, cases = task
        suites = _suite(backend)
        run = "ort" if backend == "ort" else f"fuselm-{device.lower()}"
        for name, kind in cases:
            messages.put(("start", wid, name))
            try:
                result = _run_case(suites, run, name, kind, device)
            except BaseException as error:  # noqa: BLE001 -- unittest lets only a few through
                result = Result(name, run, "failed", f"crash: {type(error).__name__}", str(error)[:300])
            messages.put(("done", wid, asdict(result)))
        messages.put(("idle", wid, None))


# ----------------------------------------------------------------------------- scheduling
@dataclass
class _Worker:
    process: object
    tasks: object
    backend: str = ""
    device: str = ""
    run: str = ""
    cases: list = None  # the chunk's cases not done yet
    current: str = None
    since: float = 0.0


def run_all(jobs_by_run: dict, workers: int, timeout: float, cache_dir: str, progress: bool = True) -> list:
    """Run every (backend, device) -> [cases] of `jobs_by_run` in chunks on `workers`
    spawned processes. A case running longer than `timeout` seconds (a kernel build in
    native code does not return to Python to be interrupted) has its worker killed and
    is 'failed' (timeout); one whose worker dies is 'failed' (crash: worker died); either
    way a fresh worker takes the rest of the chunk."""
    context = get_context("spawn")
    messages = context.Queue()
    pending = []
    for (backend, device), cases in jobs_by_run.items():
        names = [(c.name, c.kind) for c in cases]
        size = max(1, min(16, len(names) // (4 * workers)))
        pending += [(backend, device, names[i:i + size]) for i in range(0, len(names), size)]
    total = sum(len(chunk[2]) for chunk in pending)
    pending.reverse()  # popped from the end: in order
    pool: dict = {}
    results: list = []
    next_id = 0

    def spawn():
        nonlocal next_id
        tasks = context.Queue()
        process = context.Process(target=_worker, args=(next_id, tasks, messages, cache_dir), daemon=True)
        process.start()
        pool[next_id] = _Worker(process, tasks)
        next_id += 1

    def lose(wid: int, reason: str, message: str):
        """A worker killed or dead: its case failed, the rest of its chunk back in line."""
        w = pool.pop(wid)
        if w.process.is_alive():
            w.process.kill()
        w.process.join()
        rest = [(n, k) for n, k in (w.cases or []) if n != w.current]
        if w.current is not None:
            results.append(Result(w.current, w.run, "failed", reason, message, time.perf_counter() - w.since))
        if rest:
            pending.append((w.backend, w.device, rest))
        spawn()

    for _ in range(workers):
        spawn()
    try:
        start, shown = time.perf_counter(), 0.0
        while pending or any(w.cases is not None for w in pool.values()):
            for wid, w in pool.items():
                if w.cases is None and pending:
                    w.backend, w.device, w.cases = pending.pop()
                    w.run = "ort" if w.backend == "ort" else f"fuselm-{w.device.lower()}"
                    w.current = None
                    w.tasks.put((w.backend, w.device, list(w.cases)))
            received = []
            try:
                received.append(messages.get(timeout=1.0))
                while True:
                    received.append(messages.get_nowait())
            except queue.Empty:
                pass
            for kind, wid, payload in received:
                if wid not in pool:
                    continue  # from a worker already lost
                w = pool[wid]
                if kind == "start":
                    w.current, w.since = payload, time.perf_counter()
                elif kind == "done":
                    results.append(Result(**payload))
                    w.cases = [(n, k) for n, k in w.cases if n != payload["case"]]
                    w.current = None
                elif kind == "idle":
                    w.cases = None
            now = time.perf_counter()
            for wid, w in list(pool.items()):
                if w.current is not None and now - w.since > timeout:
                    lose(wid, "timeout", f"no result within {timeout:.0f} s (the worker was killed)")
                elif not w.process.is_alive() and w.cases is not None:
                    lose(wid, "crash: worker died", f"the worker process died (exit code {w.process.exitcode})")
            if progress and now - shown > 10:
                shown = now
                print(f"  {len(results)}/{total} case runs, {now - start:.0f} s", file=sys.stderr, flush=True)
    except BaseException:  # interrupted: no worker left behind
        for w in pool.values():
            w.process.kill()
        raise
    for w in pool.values():
        w.tasks.put(None)
    for w in pool.values():
        w.process.join(timeout=30)
        if w.process.is_alive():
            w.process.kill()
    return results


# ----------------------------------------------------------------------------- the report
def _cell(counter: Counter) -> str:
    if not sum(counter.values()):
        return f"{'-':>13}"
    return f"{counter['passed']:>4}/{counter['failed']:>3}/{counter['unsupported']:>4}"


def report(cases: list, results: list, runs: list) -> dict:
    by = {(r.case, r.run): r for r in results if r.outcome != "skipped"}
    header = "".join(f"  {run:>13}" for run in runs)
    print(f"\npassed/failed/unsupported per op ({', '.join(runs)}; '-': not run)\n")
    print(f"{'op':<34}{header}")
    rows = defaultdict(list)
    for case in cases:
        rows[case.op].append(case)
    for op in sorted(rows, key=lambda o: (o.startswith("["), o.startswith("("), o.lower())):
        cells = []
        for run in runs:
            cells.append(_cell(Counter(by[(c.name, run)].outcome for c in rows[op] if (c.name, run) in by)))
        print(f"{op:<34}" + "".join(f"  {cell}" for cell in cells))

    print(f"\ntotals per kind\n\n{'kind':<34}{header}")
    totals = {}
    for kind in KINDS + ("all",):
        selected = [c for c in cases if kind in ("all", c.kind)]
        if not selected:
            continue
        cells = []
        for run in runs:
            counter = Counter(by[(c.name, run)].outcome for c in selected if (c.name, run) in by)
            totals[f"{kind}/{run}"] = dict(counter)
            cells.append(_cell(counter))
        print(f"{kind:<34}" + "".join(f"  {cell}" for cell in cells))

    target = [c for c in cases if c.in_target]
    summary = {"totals": totals}
    if target:
        print(f"\ntarget list: {len(target)} single-op node cases of {len(TARGET_OPS)} ops at f32/f16/bf16/f64/i8/"
              f"i32/i64/bool (the denominator, whatever was run)")
        for run in runs:
            ran = [c for c in target if (c.name, run) in by]
            if not ran:
                continue
            passed = sum(by[(c.name, run)].outcome == "passed" for c in target if (c.name, run) in by)
            share = 100.0 * passed / len(target)
            summary[f"target/{run}"] = {"passed": passed, "cases": len(target), "percent": round(share, 2)}
            print(f"  {run:<12} {passed}/{len(target)} passed = {share:.1f}%"
                  + (f"  (ran {len(ran)} of them)" if len(ran) != len(target) else ""))

    for run in (r for r in runs if r.startswith("fuselm")):
        failures = [(c, by[(c.name, run)]) for c in cases if (c.name, run) in by and by[(c.name, run)].outcome != "passed"]
        target_failures = [(c, r) for c, r in failures if c.in_target]
        if target_failures:
            print(f"\n{run}: target-list cases not passed, by op ({len(target_failures)})")
            _print_failures(target_failures)
        reasons = Counter((r.outcome, r.reason if r.outcome == "failed" or not r.reason.startswith("op ") else "op")
                          for _, r in failures)
        print(f"\n{run}: all cases not passed, by class: " +
              ", ".join(f"{outcome} {reason}: {n}" for (outcome, reason), n in reasons.most_common()))
        other = [(c, r) for c, r in failures if not c.in_target and r.outcome == "failed"]
        if other:
            print(f"{run}: failed (not unsupported) cases outside the target list ({len(other)})")
            _print_failures(other)
    return summary


def _print_failures(failures: list) -> None:
    by_op = defaultdict(list)
    for case, result in failures:
        by_op[case.op].append((case, result))
    for op in sorted(by_op):
        print(f"  {op}:")
        for case, result in by_op[op]:
            print(f"    {case.name:<52} {result.outcome:<12} {result.reason:<22} {result.message[:150]}")


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", choices=("cpu", "cuda", "both"), default="both")
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma-separated: " + ", ".join(KINDS))
    parser.add_argument("--ops", default=None, help="comma-separated ONNX op types, or 'target' (the target list)")
    parser.add_argument("--cuda-all", action="store_true",
                        help="cuda: every node case of --ops, not only the target-list ops")
    parser.add_argument("--no-ort", action="store_true", help="leave out ONNX Runtime's column")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes")
    parser.add_argument("--timeout", type=float, default=90.0, help="seconds per case")
    parser.add_argument("--cache-dir", default=None, help="the kernel cache (default: a temporary folder)")
    parser.add_argument("--json", default=None, help="write every result and the totals here")
    args = parser.parse_args(argv)

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = set(kinds) - set(KINDS)
    if unknown:
        parser.error(f"unknown kinds {sorted(unknown)}; the kinds are {', '.join(KINDS)} ('real' downloads models)")
    ops = None if args.ops is None else (list(TARGET_OPS) if args.ops == "target" else
                                         [o.strip() for o in args.ops.split(",") if o.strip()])
    targets = ["cpu", "cuda"] if args.target == "both" else [args.target]
    if "cuda" in targets:
        import torch

        if not torch.cuda.is_available():
            # the workers are spawned: they import triton after reading this
            if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
                print("warning: triton was imported before TRITON_INTERPRET=1 could be set", file=sys.stderr)
            os.environ["TRITON_INTERPRET"] = "1"

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # killed: the workers are killed too
    start = time.perf_counter()
    cases = collect(kinds, ops)
    print(f"{len(cases)} cases ({', '.join(f'{k} {n}' for k, n in Counter(c.kind for c in cases).items())}), "
          f"{sum(c.in_target for c in cases)} of the target list; {args.jobs} workers", file=sys.stderr)
    jobs, runs = {}, []
    if "cpu" in targets:
        jobs[("fuselm", "CPU")] = cases
        runs.append("fuselm-cpu")
    if "cuda" in targets:
        cuda_cases = [c for c in cases if c.kind == "node" and (args.cuda_all or c.op.split("_")[0] in TARGET_OPS)]
        jobs[("fuselm", "CUDA")] = cuda_cases
        runs.append("fuselm-cuda")
    if not args.no_ort:
        jobs[("ort", "CPU")] = cases
        runs.append("ort")
    with tempfile.TemporaryDirectory(prefix="fuselm-onnx-conformance-") as temp:
        cache_dir = args.cache_dir or temp
        results = run_all(jobs, args.jobs, args.timeout, cache_dir)
    summary = report(cases, results, runs)
    seconds = time.perf_counter() - start
    slowest = sorted((r for r in results if r.run.startswith("fuselm")), key=lambda r: -r.seconds)[:5]
    print(f"\n{seconds:.0f} s in all; slowest fuselm cases: " +
          ", ".join(f"{r.case} ({r.run}) {r.seconds:.1f} s" for r in slowest))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cases": [asdict(c) for c in cases], "results": [asdict(r) for r in results], **summary}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
