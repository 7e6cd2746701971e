"""The ``relaxlm`` command line: compile, generate, chat, bench, perplexity."""

from __future__ import annotations

import functools
import os
import signal
import sys

import click

# The defaults the Python API has too (relaxlm.runtime.generation.DEFAULT_MAX_TOKENS); not
# imported from there so that ``relaxlm --help`` starts without TVM.
DEFAULT_MAX_TOKENS = 256


# The exception types that carry a message meant for the user (one per boundary), by module: an
# error of one can only come from a module already imported, so checking costs no import (and
# needs no TVM compiler where only its runtime is installed).
_USER_ERRORS = {
    "relaxlm.frontends.errors": "FrontendError",
    "relaxlm.passes.errors": "PassError",
    "relaxlm.targets.errors": "TargetError",
    "relaxlm.compiler.errors": "CompileError",
    "relaxlm.runtime.artifact": "ArtifactError",
    "relaxlm.runtime.errors": "GenerationError",
    "relaxlm.runtime.bench": "BenchError",
}


def _is_user_error(err: Exception) -> bool:
    if isinstance(err, ValueError):
        return True
    return any(module in sys.modules and isinstance(err, getattr(sys.modules[module], name))
               for module, name in _USER_ERRORS.items())


def _fail(message: str, status: int = 1):
    click.echo(f"relaxlm: error: {message}", err=True)
    sys.exit(status)


def reports_errors(command):
    """Turn errors into one line on stderr and exit status 1 (RELAXLM_DEBUG=1 shows tracebacks)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from relaxlm.compiler.output import Terminated

        try:
            return command(*args, **kwargs)
        except KeyboardInterrupt:
            sys.exit(130)
        except Terminated as stop:
            click.echo(f"relaxlm: {stop}; nothing was written", err=True)
            sys.stdout.flush()
            sys.stderr.flush()
            # At once: TVM objects torn down half-built at interpreter exit would print warnings.
            os._exit(128 + stop.signum)
        except Exception as err:  # noqa: BLE001  (the CLI boundary: nothing escapes as a traceback)
            if os.environ.get("RELAXLM_DEBUG"):
                raise
            message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            if not _is_user_error(err):
                message = f"internal error ({type(err).__name__}): {message} (rerun with RELAXLM_DEBUG=1 for details)"
            _fail(message)

    return wrapper


class _OneLineUsageErrors(click.Group):
    """Usage errors (a bad option value, a missing argument) as one line, like every other error."""

    def main(self, *args, **kwargs):
        kwargs.pop("standalone_mode", None)
        try:
            status = super().main(*args, standalone_mode=False, **kwargs)
        except click.Abort:
            sys.exit(130)
        except click.ClickException as err:
            command = err.ctx.command_path if getattr(err, "ctx", None) else "relaxlm"
            _fail(f"{err.format_message()} (see '{command} --help')", err.exit_code)
        # Not standalone, click returns the status of --help / --version instead of exiting.
        if isinstance(status, int):
            sys.exit(status)


@click.group(cls=_OneLineUsageErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="relaxlm", message="relaxlm %(version)s")
def main():
    """relaxlm: compile open-weight language models ahead of time with TVM Relax and run them."""
    os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Without torch, transformers announces on import that its models are unavailable; relaxlm
    # uses only its configs and tokenizers.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


@main.command()
@click.argument("model")
@click.option("--target", default="auto", show_default=True,
              help="auto (best local device), llvm (this CPU), llvm:portable (any x86-64 CPU since 2015), "
                   "llvm:<LLVM CPU>, cuda[:sm_XX], metal[:m1|m2], vulkan or webgpu.")
@click.option("--quantization", default=None,
              help="q0f32, q0f16, q4f32_1, q4f16_1, q8f32_1, q8f16_1, or gguf (a GGUF file's own blocks, bit for bit). "
                   "Default: gguf for a GGUF whose weights it runs natively, else the target's (q4f32_1 on the CPU).")
@click.option("--output", type=click.Path(), default=None, help="Artifact directory (default: dist/<name>-<q>-<target>).")
@click.option("--force", is_flag=True,
              help="Also write into an empty directory or over an older artifact (never over other files).")
@click.option("--context-window", type=int, default=None, help="Cap the context window (tokens).")
@click.option("--prefill-chunk", type=int, default=None, help="Tokens per prefill call.")
@click.option("--debug-dump", type=click.Path(), default=None, help="Write the IR after each pass phase here.")
@click.option("--calibrate/--no-calibrate", default=None,
              help="Weigh 4-bit quantization by activation statistics of a float32 build on self-generated "
                   "text (default: on at 4 bits up to 1B parameters; adds a float32 build and a few minutes).")
@click.option("--activations", type=click.Choice(["int16", "int8", "float32"]), default=None,
              help="What the projections multiply the weights with: int16 or int8 (rounded per 32 values for integer dot "
                   "products; int16 within 3e-5 of float, int8 as llama.cpp rounds them) or float32 (exact). "
                   "Default: int16 for a GGUF's own blocks on a CPU with AVX2, else float32.")
@reports_errors
def compile(model, target, quantization, output, force, context_window, prefill_chunk,  # noqa: A001
            debug_dump, calibrate, activations):
    """Compile MODEL: a Hugging Face directory, a .gguf file or a bundled alias (smollm2-135m, gemma3-270m)."""
    from relaxlm.compiler import compile_model

    path = compile_model(model, target=target, quantization=quantization, output=output, force=force,
                         context_window=context_window, prefill_chunk=prefill_chunk,
                         debug_dump=debug_dump, calibrate=calibrate, activations=activations, verbose=True)
    click.echo(str(path))


def _sampling_options(defaults: dict, note: str = ""):
    """The sampling options, with ``defaults`` (None: decided at run time, as ``note`` says)."""

    options = [
        click.option("--max-tokens", type=click.IntRange(min=1), default=DEFAULT_MAX_TOKENS, show_default=True,
                     help="The most tokens to generate."),
        click.option("--temperature", type=click.FloatRange(min=0), default=defaults["temperature"],
                     show_default=True, help=f"0 is greedy.{note}"),
        click.option("--top-k", type=click.IntRange(min=0), default=defaults["top_k"], show_default=True,
                     help=f"Sample from the k likeliest tokens (0: all).{note}"),
        click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), default=defaults["top_p"],
                     show_default=True, help=f"Sample from the smallest set of tokens with this mass.{note}"),
        click.option("--repetition-penalty", type=click.FloatRange(min=0, min_open=True),
                     default=defaults["repetition_penalty"], show_default=True,
                     help=f"Divide the logits of recent tokens by this (1: off).{note}"),
        click.option("--seed", type=int, default=None, help="Seed of the sampler (default: random)."),
        click.option("--device", default="auto", show_default=True, help="Where to run: auto, cpu, cuda[:N] …"),
    ]

    def decorate(command):
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


GREEDY = {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0}
CHAT_NOTE = " Default: the model's generation_config, else temperature 0.8, top-k 40, top-p 0.9, penalty 1.1."


def _prompt_text(prompt_argument, prompt_option) -> str:
    if prompt_argument is not None and prompt_option is not None:
        raise click.UsageError("give the prompt once: as an argument or with --prompt")
    prompt = prompt_argument if prompt_argument is not None else prompt_option
    if prompt is None:
        if sys.stdin.isatty():
            raise click.UsageError("no prompt: give it as an argument, with --prompt, or on stdin")
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise click.UsageError("the prompt is empty")
    return prompt


EMPTY_ANSWER = {
    "eos": "the model ended its answer at once (its end-of-sequence token came first)",
    "stop": "the text reached a stop string before anything else",
    "context": "the prompt fills the context window",
}


@main.command()
@click.argument("artifact", type=click.Path())
@click.argument("prompt_argument", metavar="[PROMPT]", required=False)
@click.option("--prompt", "prompt_option", default=None, help="The prompt (also as an argument, or on stdin).")
@click.option("--chat/--raw", default=None,
              help="Wrap the prompt in the model's chat template (the default when it has one), or send it as it is.")
@click.option("--stop", multiple=True, help="End the text before this string (repeatable).")
@_sampling_options(GREEDY)
@reports_errors
def generate(artifact, prompt_argument, prompt_option, chat, stop, max_tokens, device, **sampling):
    """Generate text from a compiled ARTIFACT directory (greedy by default)."""
    from relaxlm.runtime import load

    prompt = _prompt_text(prompt_argument, prompt_option)
    model = load(artifact, device=device)
    text = model.stream(prompt, max_tokens=max_tokens, chat=chat, stop=list(stop), **sampling)
    wrote = False
    for piece in text:
        wrote = wrote or bool(piece.strip())
        click.echo(piece, nl=False)
        sys.stdout.flush()
    click.echo()
    if not wrote:
        hint = "" if chat is not False else "; an instruct model answers in its chat template (drop --raw)"
        click.echo(f"relaxlm: empty answer: {EMPTY_ANSWER.get(text.finish_reason, 'nothing was generated')}{hint}",
                   err=True)


@main.command()
@click.argument("artifact", type=click.Path())
@click.option("--system", default=None, help="A system message.")
@click.option("--verbose", is_flag=True, help="After each answer, say how many tokens were prefilled and how fast.")
@_sampling_options({k: None for k in GREEDY}, CHAT_NOTE)
@reports_errors
def chat(artifact, system, verbose, max_tokens, device, seed, **sampling):
    """Chat with a compiled ARTIFACT in its chat template. /? for help, /bye or Ctrl-D to quit."""
    from relaxlm.runtime import load
    from relaxlm.runtime.chat import check_can_chat, terminal_chat
    from relaxlm.runtime.sampling import chat_sampling

    model = load(artifact, device=device)
    check_can_chat(model)
    params = chat_sampling(model.manifest.generation, seed=seed, **sampling)
    terminal_chat(model, params, system=system, max_tokens=max_tokens, verbose=verbose)


@main.command()
@click.argument("artifact", type=click.Path())
@click.option("--prompt-len", type=click.IntRange(min=1), default=128, show_default=True, help="Prompt tokens to prefill.")
@click.option("--gen-len", type=click.IntRange(min=1), default=64, show_default=True, help="Decode steps after the prompt.")
@click.option("--depth", type=click.IntRange(min=0), default=0, show_default=True,
              help="Tokens already in the cache before the prompt (untimed; llama-bench's -d).")
@click.option("--runs", type=click.IntRange(min=1), default=5, show_default=True,
              help="Timed runs after one warm-up (median).")
@click.option("--compare", multiple=True, type=click.Choice(["llama.cpp", "transformers"]),
              help="Also time this runner on the same model (repeatable).")
@click.option("--source", default=None,
              help="What the comparisons load: the HF directory, .gguf file or bundled alias the artifact was "
                   "compiled from (default: the one its manifest records).")
@click.option("--llama-bench", "llama_bench", default=None,
              help="llama.cpp's C++ llama-bench for --compare llama.cpp (default: the one on PATH; without one, "
                   "llama-cpp-python).")
@click.option("--threads", type=int, default=None, help="CPU threads for every runner (default: TVM_NUM_THREADS).")
@click.option("--device", default="auto", show_default=True, help="Where relaxlm runs (the comparisons run on the CPU).")
@click.option("--profile", is_flag=True,
              help="Also split a decode step's time (after depth + prompt tokens) by kernel kind, attention and "
                   "the VM's overhead (CPU artifacts).")
@reports_errors
def bench(artifact, prompt_len, gen_len, depth, runs, compare, source, llama_bench, threads, device, profile):
    """Time prefill and decode of a compiled ARTIFACT (tokens/s, batch 1), optionally against other runners."""
    from relaxlm.runtime import load
    from relaxlm.runtime.bench import bench as run_bench
    from relaxlm.runtime.bench import check_comparisons, configure_threads, find_llama_bench, format_table

    llama_bench = find_llama_bench(llama_bench) if "llama.cpp" in compare else None
    check_comparisons(list(compare), llama_bench)
    configure_threads(threads)
    if source is not None:
        from relaxlm.frontends.sources import BUNDLED, resolve_bundled

        source = resolve_bundled(source) if source in BUNDLED else source
    model = load(artifact, device=device)
    if profile:
        from relaxlm.runtime.profile import check_can_profile

        check_can_profile(model, depth + prompt_len)
    result = run_bench(model, prompt_len=prompt_len, gen_len=gen_len, runs=runs, compare=compare, source=source,
                       progress=lambda line: click.echo(f"relaxlm: {line}", err=True), llama_bench=llama_bench,
                       depth=depth)
    click.echo(format_table(result))
    if profile:
        from relaxlm.runtime.profile import format_profile, profile_decode

        click.echo(format_profile(profile_decode(model, context=depth + prompt_len)))


@main.command()
@click.argument("artifact", type=click.Path())
@click.option("--text", "text_file", required=True, type=click.Path(exists=True, dir_okay=False),
              help="A UTF-8 text file.")
@click.option("--window", type=int, default=None, help="Tokens per window (default and maximum: the context window).")
@click.option("--device", default="auto", show_default=True)
@click.option("--decode", is_flag=True,
              help="Score one token per call through the decode kernels, as generation runs (slower; what integer "
                   "activations change).")
@reports_errors
def perplexity(artifact, text_file, window, device, decode):
    """Perplexity of a compiled ARTIFACT over a text file, in consecutive windows."""
    from pathlib import Path

    from tqdm import tqdm

    from relaxlm.runtime import load
    from relaxlm.runtime.perplexity import perplexity_of_ids, scored_tokens, window_size

    model = load(artifact, device=device)
    try:
        text = Path(text_file).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{text_file} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    ids = model.tokenizer(text)["input_ids"]
    total = scored_tokens(ids, window_size(model, window)) if len(ids) >= 2 else 0
    with tqdm(total=total, desc="scoring", unit="token", disable=not sys.stderr.isatty(), file=sys.stderr) as bar:
        result = perplexity_of_ids(model, ids, window=window, progress=bar.update, decode=decode)
    click.echo(f"perplexity {result.perplexity:.4f} over {result.scored_tokens} tokens "
               f"({result.windows} window(s) of up to {result.window} tokens)")


def run() -> None:
    """The console script: as ``main``, with a broken pipe (``relaxlm generate … | head``) ending quietly."""
    try:
        main()
    except BrokenPipeError:
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        os._exit(141)


if __name__ == "__main__":
    run()
