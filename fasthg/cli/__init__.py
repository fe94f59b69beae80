"""The `fasthg` command (also `python -m fasthg`): a module per subcommand (fasthg.cli.info,
.bench, .eval, .predict, .train), each adding itself with add_command; fasthg.cli.args holds
the argument types they share."""
import argparse
import importlib
import sys

COMMANDS = ("info", "bench", "eval", "predict", "train")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fasthg", description="The `fasthg` command (also `python -m fasthg`).")
    sub = p.add_subparsers(dest="cmd")
    for name in COMMANDS:
        importlib.import_module(f"fasthg.cli.{name}").add_command(sub)
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if not getattr(args, "fn", None):
        p.print_help()
        return 2
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
