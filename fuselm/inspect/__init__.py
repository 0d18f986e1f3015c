"""`fuselm inspect DIR`: what a compile produced, read back from its dump directory.

    fuselm inspect DIR                      # a table of the kernels: ops, model lines, params, launches
    fuselm inspect DIR --kernel NAME        # one kernel's source, as written (NAME.ll, NAME.s: LLVM IR, asm)
    fuselm inspect DIR --ir [PASS]          # the IR after a pass (name or number; default the last)
    fuselm inspect DIR --graph fused.svg    # the fused graph, a box per kernel launch (.svg or .png)
    fuselm inspect DIR --profile --tokens 1 --batch 8 --context 512 [--plot roofline.png]

DIR is what `fuselm.compile(..., dump_dir=DIR)` (or FUSELM_DUMP=DIR) wrote. A mistake
(no such directory, kernel or pass) is one line on stderr and exit status 2.
`main(argv)` is the command on its own; `add_arguments` and `run` let the `fuselm`
CLI embed it as a subcommand. `profile(compiled, ...)` profiles a module compiled in
this process.
"""
from __future__ import annotations

import argparse
import sys

from ..errors import FuselmError
from .profiling import Profile, ProfileRow, format_profile, profile, profile_source
from .source import InspectError, open_source

__all__ = ["main", "add_arguments", "run", "profile", "profile_source", "format_profile", "Profile", "ProfileRow",
           "open_source", "InspectError"]

EXIT_USAGE = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..cli import int_in_range  # here, not at the top: the CLI imports this package
    from ..target import TARGETS
    from .graph_draw import LAYOUTS

    positive = int_in_range(1)
    parser.add_argument("directory", metavar="DIR", help="a dump directory written by fuselm.compile(dump_dir=DIR)")
    view = parser.add_mutually_exclusive_group()
    view.add_argument("--kernel", metavar="NAME", help="print a kernel's source exactly as written")
    view.add_argument("--ir", metavar="PASS", nargs="?", const="", default=None,
                      help="print the IR after a pass (name or number, as in NN_<pass>.ir; default the last)")
    view.add_argument("--graph", metavar="FILE", help="draw the fused graph into FILE.svg or FILE.png")
    view.add_argument("--profile", action="store_true", help="time each kernel against this machine's ceilings")
    parser.add_argument("--layout", choices=LAYOUTS, default="auto",
                        help="--graph layout: Graphviz dot when on PATH (auto), or the builtin layered one")
    sizes = parser.add_argument_group("--profile sizes and options")
    sizes.add_argument("--tokens", type=positive, default=1, help="new tokens per sequence (default 1)")
    sizes.add_argument("--batch", type=positive, default=1, help="sequences (default 1)")
    sizes.add_argument("--context", type=positive, default=None,
                       help="tokens in each sequence's KV cache, the new ones included (default --tokens)")
    sizes.add_argument("--dim", metavar="NAME=SIZE", type=_dim, action="append", default=[],
                       help="the size of another symbolic dim (repeatable)")
    sizes.add_argument("--plot", metavar="FILE.png", help="also draw the kernels on a roofline (implies --profile)")
    sizes.add_argument("--cache-dir", default=None, help="the kernel cache the model was compiled with "
                       "(default $FUSELM_CACHE or ~/.cache/fuselm)")
    sizes.add_argument("--target", choices=sorted(TARGETS), default=None,
                       help="the target the kernels were built for (default: read off their sources)")


def run(args: argparse.Namespace) -> int:
    try:
        source = open_source(args.directory)
        if args.kernel is not None:
            return _print_kernel(source, args.kernel)
        if args.ir is not None:
            sys.stdout.write(source.ir_after(args.ir or None))
            return 0
        if args.graph is not None:
            return _draw(source, args.graph, args.layout)
        if args.profile or args.plot:
            return _profile(source, args)
        from .table import kernel_table

        sys.stdout.write(kernel_table(source.kernels()))
        return 0
    except FuselmError as error:  # InspectError and what loading or running kernels refuses
        print(f"fuselm inspect: error: {error}", file=sys.stderr)
        return EXIT_USAGE


def main(argv: list | None = None) -> int:
    summary, examples = __doc__.split("\n\n")[:2]
    parser = argparse.ArgumentParser(prog="fuselm inspect", description=summary, epilog=examples,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


def _print_kernel(source, name: str) -> int:
    from .highlight import write_source

    write_source(source.kernel_source(name), source.kernel_file(name))
    return 0


def _draw(source, path: str, layout: str) -> int:
    from .graph_draw import draw_graph

    how = draw_graph(source, path, layout)
    print(f"fuselm inspect: wrote {path} ({how})", file=sys.stderr)
    return 0


def _profile(source, args) -> int:
    if args.plot and not args.plot.lower().endswith(".png"):
        raise InspectError(f"--plot writes a .png file, not {args.plot!r}")
    result = profile_source(source, args.tokens, args.batch, args.context, dict(args.dim), args.target, args.cache_dir)
    sys.stdout.write(format_profile(result))
    if args.plot:
        from .roofline import plot_roofline

        plot_roofline(result, args.plot)
        print(f"fuselm inspect: wrote {args.plot}", file=sys.stderr)
    return 0


def _dim(text: str) -> tuple:
    name, _, size = text.partition("=")
    if not name.strip() or not size.strip().isdigit() or int(size) < 1:
        raise argparse.ArgumentTypeError(f"expected NAME=SIZE with a positive SIZE, got {text!r}")
    return name.strip(), int(size)
