"""The `fuselm` command line: `models` and `ir` (more commands as they work)."""
from __future__ import annotations

import argparse
import sys
import time


def cmd_models(args) -> int:
    from .models.hub import fetch, list_models

    if args.fetch:
        print(fetch(args.fetch))
        return 0
    print(f"{'name':<16}{'package':<24}{'architecture':<14}fetched")
    for info in list_models():
        print(f"{info.name:<16}{info.package:<24}{info.architecture:<14}{'yes' if info.fetched else 'no'}")
    return 0


def cmd_ir(args) -> int:
    from .models import load
    from .models.contract import capture_example

    loaded = load(args.model)
    example, dynamic = capture_example(loaded.config)
    started = time.perf_counter()
    if args.target:
        from .api import compile

        compiled = compile(loaded.model, example, target=args.target, dynamic=dynamic, dump_dir=args.dump_dir)
        graph = compiled.graph
        for kernel in compiled.kernels:
            print(f"# kernel {kernel.name}: {' '.join(kernel.ops)} x{kernel.launches}  {kernel.source_path}", file=sys.stderr)
    else:
        from .frontend import capture
        from .passes import run_passes

        graph = capture(loaded.model, example, dynamic)
        if not args.no_passes:
            graph = run_passes(graph, dump_dir=args.dump_dir)
    print(graph, end="")
    ops = ", ".join(f"{op} {n}" for op, n in sorted(graph.op_counts().items(), key=lambda kv: -kv[1]))
    print(f"# {len(graph.nodes)} nodes, {len(graph.constants)} constants, done in "
          f"{time.perf_counter() - started:.1f} s: {ops}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fuselm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    models = sub.add_parser("models", help="list the named models, or fetch one")
    models.add_argument("--fetch", metavar="NAME", help="download a named model into the cache")
    models.set_defaults(run=cmd_models)
    ir = sub.add_parser("ir", help="capture a named or local model and print its IR")
    ir.add_argument("model", help="a named model (see `fuselm models`) or a local path")
    ir.add_argument("--dump-dir", help="write the IR after every pass (and, with --target, the kernels) here")
    ir.add_argument("--target", choices=["cpu", "cuda"], help="also generate the kernels for this target")
    ir.add_argument("--no-passes", action="store_true", help="print the graph as captured")
    ir.set_defaults(run=cmd_ir)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"fuselm: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
