"""The `fasthg` command (also `python -m fasthg`): a module per subcommand (fasthg.cli.info,
.bench, .eval, .predict, .train, .ablate, .export), each adding itself with add_command; fasthg.cli.args holds
the argument types they share.

Errors end as one short line on stderr, `fasthg CMD: error: MESSAGE`, without a traceback:
exit status 2 for usage errors (argparse's own, bad argument values, fasthg.cli.args.UsageError),
1 for failures (a missing or unreadable file, bad data, a diverged run), 130 for Ctrl-C.
`fasthg --debug ...` (or FASTHG_DEBUG=1) prints the traceback as well."""
import argparse
import importlib
import os
import sys
import traceback

from fasthg.cli.args import UsageError

COMMANDS = ("info", "bench", "eval", "predict", "train", "ablate", "export")
# What a command's failure may raise: reported as one line, exit status 1.
# (Other exceptions are fasthg's bugs: they keep their traceback.)
FAILURES = (ValueError, OSError, RuntimeError, FloatingPointError, LookupError, ImportError, MemoryError)
DEBUG_HELP = "on an error, print Python's traceback too (also: FASTHG_DEBUG=1)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fasthg", description="The `fasthg` command (also `python -m fasthg`).")
    p.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = p.add_subparsers(dest="cmd")
    for name in COMMANDS:
        importlib.import_module(f"fasthg.cli.{name}").add_command(sub)
    for parser in sub.choices.values():  # also after the subcommand; SUPPRESS keeps one given before it
        parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    return p


def message(e: BaseException) -> str:
    """An exception as the line a person reads: its message, or for an OSError without one of
    fasthg's own, "FILE: what went wrong"."""
    if isinstance(e, OSError) and e.strerror and e.filename is not None:
        return f"{e.filename}: {e.strerror}"
    text = str(e).strip() or type(e).__name__
    if isinstance(e, (LookupError, ImportError, MemoryError)):
        text = f"{type(e).__name__}: {text}"  # their messages do not say what they are
    return text


def main(argv=None) -> int:
    """Run the command line `argv` (default: sys.argv[1:]); the exit status."""
    p = build_parser()
    args = p.parse_args(argv)
    if not getattr(args, "fn", None):
        p.print_help()
        return 2
    debug = args.debug or os.environ.get("FASTHG_DEBUG", "").strip() not in ("", "0")
    prog = f"fasthg {args.cmd}"
    try:
        return args.fn(args)
    except KeyboardInterrupt as e:
        if debug:
            traceback.print_exc()
        print(f"\n{prog}: interrupted" + (f": {e}" if str(e) else ""), file=sys.stderr)
        return 130
    except UsageError as e:
        if debug:
            traceback.print_exc()
        sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction)).choices[args.cmd]
        sub.print_usage(sys.stderr)
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except FAILURES as e:
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {message(e)}", file=sys.stderr)
        if not debug:
            print(f"{prog}: (for the traceback: fasthg --debug {args.cmd} ..., or FASTHG_DEBUG=1)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
