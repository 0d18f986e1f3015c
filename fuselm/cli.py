"""The `fuselm` command line: `generate`, `chat`, `models` and `ir`.

    fuselm generate "What is the capital of France?"     # SmolLM2 on the best target
    fuselm chat --model PATH --target cpu                # an interactive conversation
"""
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


def make_llm(args):
    from .llm import LLM

    print(f"fuselm: loading {args.model} and compiling it (kernels are cached after the first run)",
          file=sys.stderr)
    return LLM(args.model, target=args.target, max_model_len=args.max_model_len, max_num_seqs=1)


def sampling_params(args):
    from .sampling_params import SamplingParams

    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                          max_tokens=args.max_tokens)


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
        print(f"fuselm: error: {output.error}", file=sys.stderr)
    return output.text


def cmd_generate(args) -> int:
    params = sampling_params(args)  # bad values fail before the model loads
    llm = make_llm(args)
    has_template = llm.tokenizer.chat_template is not None
    prompt = args.prompt if args.raw or not has_template else llm.chat_prompt([{"role": "user", "content": args.prompt}])
    stream_reply(llm, prompt, params)
    return 0


def cmd_chat(args) -> int:
    params = sampling_params(args)
    llm = make_llm(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("fuselm: chat with the model; an empty line or Ctrl-D ends it", file=sys.stderr)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if not line:
            break
        messages.append({"role": "user", "content": line})
        messages.append({"role": "assistant", "content": stream_reply(llm, llm.chat_prompt(messages), params)})
    return 0


def add_generation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="a named model or a local path (default smollm2-135m)")
    parser.add_argument("--target", default="auto", choices=["auto", "cpu", "cuda"],
                        help="where the kernels run (auto: cuda when a GPU is visible)")
    parser.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate per reply")
    parser.add_argument("--max-model-len", type=int, default=2048, help="context length (prompt + reply)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 decodes greedily")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fuselm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    generate = sub.add_parser("generate", help="answer one prompt, streaming the tokens")
    generate.add_argument("prompt")
    generate.add_argument("--raw", action="store_true", help="do not wrap the prompt in the chat template")
    add_generation_options(generate)
    generate.set_defaults(run=cmd_generate)
    chat = sub.add_parser("chat", help="an interactive conversation through the chat template")
    chat.add_argument("--system", help="a system message")
    add_generation_options(chat)
    chat.set_defaults(run=cmd_chat)
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
