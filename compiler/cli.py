"""The ``relaxlm`` command line: compile, generate, chat, bench, perplexity."""

from __future__ import annotations

import functools
import os
import sys

import click


def _user_errors() -> tuple[type[Exception], ...]:
    """The exception types that carry a message meant for the user (one per boundary)."""
    from relaxlm.compiler import CompileError
    from relaxlm.frontends import FrontendError
    from relaxlm.passes import PassError
    from relaxlm.runtime import ArtifactError, GenerationError
    from relaxlm.runtime.bench import BenchError
    from relaxlm.targets import TargetError

    return (FrontendError, PassError, TargetError, CompileError, ArtifactError, GenerationError, BenchError,
            ValueError)


def reports_errors(command):
    """Turn errors into one line on stderr and exit status 1 (RELAXLM_DEBUG=1 shows tracebacks)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except KeyboardInterrupt:
            sys.exit(130)
        except Exception as err:  # noqa: BLE001  (the CLI boundary: nothing escapes as a traceback)
            if os.environ.get("RELAXLM_DEBUG"):
                raise
            message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            if not isinstance(err, _user_errors()):
                message = f"internal error ({type(err).__name__}): {message} (rerun with RELAXLM_DEBUG=1 for details)"
            click.echo(f"relaxlm: error: {message}", err=True)
            sys.exit(1)

    return wrapper


@click.group()
def main():
    """relaxlm: compile open-weight language models ahead of time with TVM Relax and run them."""
    os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


@main.command()
@click.argument("model")
@click.option("--target", default="auto", show_default=True, help="auto (best local device), llvm, cuda[:sm_XX], metal[:m1|m2], vulkan or webgpu.")
@click.option("--quantization", default=None, help="q0f32, q0f16 … (default: the target's).")
@click.option("--output", type=click.Path(), default=None, help="Artifact directory (default: dist/<name>-<q>-<target>).")
@click.option("--context-window", type=int, default=None, help="Cap the context window (tokens).")
@click.option("--prefill-chunk", type=int, default=None, help="Tokens per prefill call.")
@click.option("--debug-dump", type=click.Path(), default=None, help="Write the IR after each pass phase here.")
@click.option("--calibrate/--no-calibrate", default=None,
              help="Weigh 4-bit quantization by activation statistics of a float32 build on self-generated "
                   "text (default: on at 4 bits up to 1B parameters; adds a float32 build and a few minutes).")
@reports_errors
def compile(model, target, quantization, output, context_window, prefill_chunk, debug_dump, calibrate):  # noqa: A001
    """Compile MODEL: a Hugging Face directory, a .gguf file or a bundled alias (smollm2-135m, gemma3-270m)."""
    from relaxlm.compiler import compile_model

    path = compile_model(model, target=target, quantization=quantization, output=output,
                         context_window=context_window, prefill_chunk=prefill_chunk,
                         debug_dump=debug_dump, calibrate=calibrate, verbose=True)
    click.echo(str(path))


def _sampling_options(command):
    for option in reversed([
        click.option("--max-tokens", type=int, default=256, show_default=True),
        click.option("--temperature", type=float, default=0.0, show_default=True, help="0 is greedy."),
        click.option("--top-p", type=float, default=1.0, show_default=True),
        click.option("--top-k", type=int, default=0, show_default=True),
        click.option("--repetition-penalty", type=float, default=1.0, show_default=True),
        click.option("--seed", type=int, default=None),
        click.option("--device", default="auto", show_default=True),
    ]):
        command = option(command)
    return command


def _stream_to_stdout(pieces) -> None:
    for piece in pieces:
        click.echo(piece, nl=False)
        sys.stdout.flush()
    click.echo()


@main.command()
@click.argument("artifact", type=click.Path())
@click.option("--prompt", required=True, help="The text to continue (or the user message with --chat).")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the model's chat template.")
@_sampling_options
@reports_errors
def generate(artifact, prompt, chat, max_tokens, device, **sampling):
    """Generate text from a compiled ARTIFACT directory."""
    from relaxlm.runtime import load

    model = load(artifact, device=device)
    _stream_to_stdout(model.stream(prompt, max_tokens=max_tokens, chat=chat, **sampling))


@main.command()
@click.argument("artifact", type=click.Path())
@click.option("--system", default=None, help="A system message.")
@_sampling_options
@reports_errors
def chat(artifact, system, max_tokens, device, **sampling):
    """Chat with a compiled ARTIFACT (its chat template); an empty line or Ctrl-D ends."""
    from relaxlm.runtime import load

    model = load(artifact, device=device)
    messages = [{"role": "system", "content": system}] if system else []
    while True:
        try:
            user = click.prompt(">>>", prompt_suffix=" ", default="", show_default=False)
        except (EOFError, click.Abort):
            break
        if not user.strip():
            break
        messages.append({"role": "user", "content": user})
        pieces = []
        for piece in model.stream(messages, max_tokens=max_tokens, chat=True, **sampling):
            pieces.append(piece)
            click.echo(piece, nl=False)
        click.echo()
        messages.append({"role": "assistant", "content": "".join(pieces)})


@main.command()
@click.argument("artifact", type=click.Path())
@click.option("--prompt-len", type=int, default=128, show_default=True, help="Prompt tokens to prefill.")
@click.option("--gen-len", type=int, default=64, show_default=True, help="Decode steps after the prompt.")
@click.option("--runs", type=int, default=5, show_default=True, help="Timed runs after one warm-up (median).")
@click.option("--compare", multiple=True, type=click.Choice(["llama.cpp", "transformers"]),
              help="Also time this engine on the same model (repeatable).")
@click.option("--source", default=None,
              help="What the comparisons load: the HF directory, .gguf file or bundled alias the artifact was "
                   "compiled from (default: found from the artifact's config).")
@click.option("--threads", type=int, default=None, help="CPU threads for every engine (default: TVM_NUM_THREADS).")
@click.option("--device", default="auto", show_default=True, help="Where relaxlm runs (the comparisons run on the CPU).")
@reports_errors
def bench(artifact, prompt_len, gen_len, runs, compare, source, threads, device):
    """Time prefill and decode of a compiled ARTIFACT (tokens/s, batch 1), optionally against other engines."""
    from relaxlm.runtime import load
    from relaxlm.runtime.bench import bench as run_bench
    from relaxlm.runtime.bench import check_comparisons, configure_threads, format_table

    check_comparisons(list(compare))
    configure_threads(threads)
    if source is not None:
        from relaxlm.frontends.sources import BUNDLED, resolve_bundled

        source = resolve_bundled(source) if source in BUNDLED else source
    model = load(artifact, device=device)
    result = run_bench(model, prompt_len=prompt_len, gen_len=gen_len, runs=runs, compare=compare, source=source,
                       progress=lambda line: click.echo(f"relaxlm: {line}", err=True))
    click.echo(format_table(result))


@main.command()
@click.argument("artifact", type=click.Path())
@click.option("--text", "text_file", required=True, type=click.Path(exists=True, dir_okay=False),
              help="A UTF-8 text file.")
@click.option("--window", type=int, default=None, help="Tokens per window (default and maximum: the context window).")
@click.option("--device", default="auto", show_default=True)
@reports_errors
def perplexity(artifact, text_file, window, device):
    """Perplexity of a compiled ARTIFACT over a text file, in consecutive windows."""
    from pathlib import Path

    from relaxlm.runtime import load
    from relaxlm.runtime.perplexity import perplexity as run_perplexity

    model = load(artifact, device=device)
    result = run_perplexity(model, Path(text_file).read_text(encoding="utf-8"), window=window)
    click.echo(f"perplexity {result.perplexity:.4f} over {result.scored_tokens} tokens "
               f"({result.windows} window(s) of up to {result.window} tokens)")


if __name__ == "__main__":
    main()
