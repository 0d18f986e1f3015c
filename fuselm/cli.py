"""The `fuselm` command line: `generate`, `chat`, `embed`, `serve`, `build`, `models`, `ir` and `inspect`.

    fuselm generate "What is the capital of France?"     # SmolLM2 on the best target
    fuselm build smollm2-135m -o smollm2.fuselm          # compile once: an artifact directory
    fuselm generate --model smollm2.fuselm "Hello"       # served from it, nothing compiled
    fuselm chat --model PATH --target cpu                # an interactive conversation
    fuselm embed "a sentence" "another" [--json]         # sentence embeddings (all-MiniLM-L6-v2)
    fuselm serve --port 8000                             # an OpenAI-compatible server
    fuselm inspect DUMP_DIR [--kernel NAME | --graph g.svg | --profile]  # the kernels

generate and chat wrap the prompt in the model's chat template and decode greedily, up
to 256 tokens: what a question typed at a terminal wants. The Python API keeps vLLM's
defaults instead (`LLM.generate` takes the prompt as given; SamplingParams() samples at
temperature 1.0, up to 16 tokens).

A mistake (a bad value, a target this machine cannot run, a missing or broken model) is
one line `fuselm: error: ...` and exit status 2; Ctrl-C exits with status 130.
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import sys
import time

from .errors import FuselmError, one_line


class UsageError(Exception):
    """A command line argparse refused (an unknown option, a value out of range)."""


# What a user's input can raise: reported as one line, not as a traceback.
class ReplyError(FuselmError):
    """The request failed while it was generated (its finish_reason is "error")."""


USER_ERRORS = (UsageError, FuselmError, ValueError, TypeError, OSError)
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a Ctrl-C
SERVE_EXTRA = ("fastapi", "uvicorn", "starlette", "pydantic")  # what `fuselm serve` imports beyond fuselm


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
    from .artifact.format import is_onnx_file
    from .passes import run_passes

    started = time.perf_counter()
    if is_onnx_file(args.model):  # an ONNX graph: imported, not captured
        from .frontend.onnx import import_onnx

        model, example, dynamic, captured = args.model, None, None, lambda: import_onnx(args.model).graph
    else:
        from .frontend import capture
        from .models import load
        from .models.contract import capture_example

        loaded = load(args.model)
        example, dynamic = capture_example(loaded.config)
        model, captured = loaded.model, lambda: capture(loaded.model, example, dynamic)
    if args.target:
        from .api import compile

        compiled = compile(model, example, target=args.target, dynamic=dynamic, dump_dir=args.dump_dir)
        graph = compiled.graph
        for kernel in compiled.kernels:
            print(f"# kernel {kernel.name}: {' '.join(kernel.ops)} x{kernel.launches}  {kernel.source_path}", file=sys.stderr)
    else:
        graph = captured()
        if not args.no_passes:
            graph = run_passes(graph, dump_dir=args.dump_dir)
    print(graph, end="")
    ops = ", ".join(f"{op} {n}" for op, n in sorted(graph.op_counts().items(), key=lambda kv: -kv[1]))
    print(f"# {len(graph.nodes)} nodes, {len(graph.constants)} constants, done in "
          f"{time.perf_counter() - started:.1f} s: {ops}", file=sys.stderr)
    return 0


def announce_loading(model: str) -> None:
    from .artifact.format import is_artifact

    doing = "loading the artifact" if is_artifact(model) else "loading"
    after = "" if is_artifact(model) else " and compiling it (kernels are cached after the first run)"
    print(f"fuselm: {doing} {model}{after}", file=sys.stderr, flush=True)


def make_llm(args):
    announce_loading(args.model)
    from .llm import LLM

    llm = LLM(args.model, target=args.target, max_model_len=args.max_model_len, max_num_seqs=1,
              quantize=getattr(args, "quantize", None))
    if args.max_model_len is None:  # the model's (or artifact's) context: checked now that it is known
        check_room(args.max_tokens, llm.engine.max_model_len, "the model's context of")
    return llm


def sampling_params(args):
    from .sampling_params import SamplingParams

    if args.max_model_len is not None:
        check_room(args.max_tokens, args.max_model_len, "--max-model-len")
    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                          max_tokens=args.max_tokens)


def check_room(max_tokens: int, max_model_len: int, spelled: str) -> None:
    if max_tokens >= max_model_len:
        raise ValueError(f"--max-tokens {max_tokens} leaves no room for the prompt in {spelled} {max_model_len}")


def stream_reply(llm, prompt, params) -> str:
    """Print the reply as it is generated; then its speed on stderr."""
    started = time.perf_counter()
    stream = llm.stream(prompt, params)
    for piece in stream:
        print(piece, end="", flush=True)
    print()
    output = stream.output
    elapsed = time.perf_counter() - started
    print(f"fuselm: {len(output.token_ids)} tokens in {elapsed:.2f} s, {len(output.token_ids) / elapsed:.1f} tokens/s "
          f"({output.finish_reason}, target {llm.target})", file=sys.stderr)
    if output.error:
        raise ReplyError(output.error)
    return output.text


def cmd_generate(args) -> int:
    params = sampling_params(args)  # bad values fail before the model loads
    llm = make_llm(args)
    has_template = llm.tokenizer.chat_template is not None
    prompt = args.prompt if args.raw or not has_template else llm.chat_prompt([{"role": "user", "content": args.prompt}])
    stream_reply(llm, prompt, params)
    return 0


def cmd_embed(args) -> int:
    """One embedding per text (one line each: the values, or a JSON list with --json)."""
    from .encoder import Encoder

    announce_loading(args.model)
    encoder = Encoder(args.model, target=args.target, quantize=None if args.quantize == "none" else args.quantize)
    vectors = encoder.encode(list(args.texts), normalize=args.normalize, truncate=not args.no_truncate)
    if args.json:
        print(json.dumps({"model": args.model, "dimension": encoder.dimension,
                          "embeddings": [[round(x, 7) for x in v.tolist()] for v in vectors]}))
    else:
        for vector in vectors:
            print(" ".join(f"{x:.6f}" for x in vector.tolist()))
    return 0


def cmd_chat(args) -> int:
    params = sampling_params(args)
    llm = make_llm(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("fuselm: chat with the model; an empty line or Ctrl-D ends it", file=sys.stderr, flush=True)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if not line:
            break
        messages.append({"role": "user", "content": line})
        try:
            messages.append({"role": "assistant", "content": stream_reply(llm, llm.chat_prompt(messages), params)})
        except ReplyError as error:  # the conversation goes on without that turn
            print(f"fuselm: error: {one_line(error)}", file=sys.stderr)
            messages.pop()
    return 0


def cmd_serve(args) -> int:
    try:
        from .serve import run  # FastAPI and uvicorn: the `serve` extra, imported only here
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] not in SERVE_EXTRA:
            raise
        raise FuselmError(f"fuselm serve needs {error.name}, which is not installed: "
                          "pip install 'fuselm[serve]' (in a checkout: pip install -e '.[serve]')") from None
    announce_loading(args.model)
    run(model=args.model, target=args.target, host=args.host, port=args.port,
        served_model_name=args.served_model_name or args.model, api_key=args.api_key,
        max_waiting=args.max_waiting, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs)
    return 0


def cmd_build(args) -> int:
    from .artifact.builder import build, check_options

    replacing = check_options(args.output, args.build_target, args.mcpu, args.quantize)
    print(f"fuselm: building {args.model} for {args.build_target} into {args.output}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    compiled = build(args.model, args.output, target=args.build_target, max_model_len=args.max_model_len,
                     mcpu=args.mcpu, quantize=args.quantize)
    kernels = compiled.kernels
    print(f"fuselm: wrote {args.output}{' (replacing the artifact that was there)' if replacing else ''}: "
          f"{len(kernels)} kernels, {sum(k.launches for k in kernels)} launches, in "
          f"{time.perf_counter() - started:.1f} s", file=sys.stderr)
    return 0


def refuse_unavailable_target(args) -> None:
    """A --target this machine cannot run fails now, not after the model has loaded."""
    if getattr(args, "target", None):
        from .target import get_target

        get_target(args.target).check_available(spelling="--target {}")


def int_in_range(minimum: int, maximum: int | None = None):
    """An argparse type for a whole number in [minimum, maximum], refused before anything loads."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value

    return parse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every option's default in --help, and descriptions printed with their own line breaks."""


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are reported as fuselm's other errors are: one line."""

    def error(self, message: str):
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m",
                        help="a named model (see `fuselm models`), a local path, or an artifact of `fuselm build`")
    parser.add_argument("--target", default="auto", choices=["auto", "cpu", "cuda"],
                        help="where the kernels run (auto: cuda when a GPU is visible; an artifact's own target)")
    parser.add_argument("--max-model-len", type=int_in_range(1), default=None,
                        help="context length in tokens (prompt + reply); unset: an artifact's, else the "
                        "model's up to 2048")


def add_quantize_option(parser: argparse.ArgumentParser) -> None:
    from .quant.config import PACKED, SCHEMES

    parser.add_argument("--quantize", default="none", choices=["none", *SCHEMES, PACKED], metavar="SCHEME",
                        help=f"quantize the weights: none or one of {', '.join(SCHEMES)}; {PACKED}: serve a "
                             ".gguf file's own Q4_0/Q4_1/Q8_0 tensors as they are")


def add_generation_options(parser: argparse.ArgumentParser) -> None:
    add_model_options(parser)
    add_quantize_option(parser)
    parser.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate per reply")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 decodes greedily")
    parser.add_argument("--top-p", type=float, default=1.0, help="sample from the smallest set of tokens "
                        "whose probabilities add up to this")
    parser.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: all)")
    parser.add_argument("--seed", type=int, default=None, help="a seed for reproducible sampling")


def add_serve_options(parser: argparse.ArgumentParser) -> None:
    add_model_options(parser)
    parser.add_argument("--host", default="127.0.0.1", help="the address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int_in_range(1, 65535), default=8000, help="the TCP port to listen on")
    parser.add_argument("--served-model-name", metavar="NAME",
                        help="the model name clients send and /v1/models lists; unset: the --model value")
    parser.add_argument("--api-key", metavar="KEY", help="require `Authorization: Bearer KEY` on every /v1 request")
    parser.add_argument("--max-waiting", type=int_in_range(1), default=256,
                        help="requests that may wait for the engine; more are refused with status 503")
    parser.add_argument("--max-num-seqs", type=int_in_range(1), default=16, help="sequences batched in one step")


def add_build_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a named model (see `fuselm models`), a Hugging Face directory, a .gguf "
                        "file or an .onnx file")
    parser.add_argument("-o", "--output", required=True, metavar="DIR",
                        help="the artifact directory to write (an artifact there is replaced)")
    # dest differs from the other commands' `target`: building cuda kernels needs no GPU
    parser.add_argument("--target", dest="build_target", default="cpu", choices=["cpu", "cuda"],
                        help="where the artifact's kernels will run")
    parser.add_argument("--max-model-len", type=int_in_range(1), default=None,
                        help="context length served by default; unset: the model's, up to 2048")
    parser.add_argument("--mcpu", default="native", choices=["native", "generic"],
                        help="cpu kernels for this machine's CPU, or for any x86-64 with AVX2")
    add_quantize_option(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="fuselm", description=__doc__, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, run, summary: str) -> argparse.ArgumentParser:
        subparser = sub.add_parser(name, help=summary, description=summary, formatter_class=HelpFormatter)
        subparser.set_defaults(run=run)
        return subparser

    generate = command("generate", cmd_generate, "answer one prompt, streaming the tokens")
    generate.add_argument("prompt", help="the question or text to continue")
    generate.add_argument("--raw", action="store_true", help="do not wrap the prompt in the chat template")
    add_generation_options(generate)
    chat = command("chat", cmd_chat, "an interactive conversation through the chat template")
    chat.add_argument("--system", help="a system message")
    add_generation_options(chat)
    embed = command("embed", cmd_embed, "embed texts with an encoder (sentence embeddings, packed batches)")
    embed.add_argument("texts", nargs="+", metavar="TEXT", help="the texts to embed")
    embed.add_argument("--model", default="minilm-l6", help="a named encoder (see `fuselm models`) or a local "
                       "Hugging Face BERT directory")
    embed.add_argument("--target", default="auto", choices=["auto", "cpu", "cuda"], help="where the kernels run")
    embed.add_argument("--json", action="store_true", help="print one JSON object with every embedding")
    embed.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                       help="L2-normalize (default: as the model's sentence-transformers files say)")
    embed.add_argument("--no-truncate", action="store_true", help="refuse a text longer than the model takes "
                       "instead of cutting it")
    add_quantize_option(embed)
    serve = command("serve", cmd_serve, "an OpenAI-compatible HTTP server (needs `pip install 'fuselm[serve]'`)")
    add_serve_options(serve)
    build = command("build", cmd_build, "compile a model once into an artifact directory, which "
                    "`fuselm.load`, `fuselm.LLM(model=DIR)` and `--model DIR` load with no compiling")
    add_build_options(build)
    models = command("models", cmd_models, "list the named models, or fetch one")
    models.add_argument("--fetch", metavar="NAME", help="download a named model into the cache")
    ir = command("ir", cmd_ir, "capture a named or local model and print its IR")
    ir.add_argument("model", help="a named model (see `fuselm models`), a local path or an .onnx file")
    ir.add_argument("--dump-dir", help="write the IR after every pass (and, with --target, the kernels) here")
    ir.add_argument("--target", choices=["cpu", "cuda"], help="also generate the kernels for this target")
    ir.add_argument("--no-passes", action="store_true", help="print the graph as captured")
    inspect = command("inspect", cmd_inspect, "list, print, draw or profile the kernels of a dump directory")
    from . import inspect as inspect_command

    inspect_command.add_arguments(inspect)
    return parser


def cmd_inspect(args) -> int:
    from . import inspect as inspect_command

    return inspect_command.run(args)


def imported_torch_holding_interrupts() -> None:
    """Import torch with a Ctrl-C held until the import ends, then raised: one that strikes
    Python code torch's C++ initialization calls (pybind11) ends the process in
    std::terminate (status -6, no exit handlers) instead of a KeyboardInterrupt."""
    import importlib
    import signal
    import threading

    if "torch" in sys.modules or threading.current_thread() is not threading.main_thread():
        return
    held: list = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        importlib.import_module("torch")
    finally:
        signal.signal(signal.SIGINT, previous)
    if held:
        raise KeyboardInterrupt


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.command not in ("models", "inspect"):  # the others import torch first thing
            imported_torch_holding_interrupts()
        refuse_unavailable_target(args)
        return args.run(args)
    except USER_ERRORS as error:
        print(f"fuselm: error: {one_line(error)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("\nfuselm: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def run(argv=None):
    """The process entry point (the `fuselm` script, `python -m fuselm[.cli|.serve|.build]`):
    `main` and exit with its status.

    After a Ctrl-C the status is 130 whatever the interrupt struck: CPython marks a
    KeyboardInterrupt "unhandled" when it passes through an `exec` of a string (dataclasses
    build their methods that way while torch imports) even if `main` caught it, and then ends
    the process by re-raising SIGINT after `sys.exit(130)` (exit status -2 for a parent
    process). So an interrupted run calls the exit handlers, flushes and leaves directly."""
    status = main(argv)
    if status == EXIT_INTERRUPTED:
        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe or stream: nothing more can be said
                pass
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    run()
