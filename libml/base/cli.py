"""The one command-line runner of every script (training, data preparation, runs/).

Two kinds of script:
- trainers and benchmarks define their flags on absl's global ``flags.FLAGS``;
  ``run(main)`` is ``absl.app.run`` (so --help/--helpfull work as usual) with one-line flag
  errors;
- data preparation and runs/ tools define their flags on their own ``flags.FlagValues`` (so
  several can be imported in one process, and ``--size`` can mean different things); their
  ``main(argv)`` calls ``parse(FLAGS, argv)`` and they end with ``run(main, FLAGS)``.

Either way a ``UserError`` becomes one line ``error: <problem>: <fix>`` on stderr and exit code
2; an int result is the exit code, any other result (None, a stats dict) exits 0.
"""
import os
import sys
from typing import List, Optional, Sequence

from absl import flags

from libml.base.errors import EXIT_USER_ERROR, UserError, first_line

HELP_ARGS = ("-h", "--help", "-help", "--helpshort", "--helpfull")


def parse(flag_values: flags.FlagValues, argv: Optional[Sequence[str]] = None) -> List[str]:
    """Parses argv (argv[0] = program) into flag_values; returns the positional arguments.

    Flags not on the command line are reset to their defaults first, so a main can be called
    several times in one process. A bad flag is a UserError; --help prints the flags and exits.
    """
    argv = list(sys.argv if argv is None else argv)
    if any(a in HELP_ARGS for a in argv[1:]):
        print(f"usage: {command_name(argv[0])} [flags]\n")
        print(flag_values.get_help(include_special_flags=False))
        sys.exit(0)
    flag_values.unparse_flags()
    try:
        rest = flag_values(argv)
    except flags.Error as e:
        raise UserError(f"{first_line(e)}: see --help for the flags") from None
    return rest[1:]


def run(main, flag_values: Optional[flags.FlagValues] = flags.FLAGS,
        argv: Optional[Sequence[str]] = None):
    """Runs main(argv) as a program and exits: see the module docstring. With flag_values other
    than flags.FLAGS (or None) main parses its own flags with `parse`."""
    if flag_values is not flags.FLAGS:
        sys.exit(_call(main, argv))
    from absl import app
    app.run(lambda args: _call(main, args, quiet=True), argv=argv, flags_parser=_parse_global)


def _call(main, argv, quiet: bool = False) -> int:
    if quiet and not flags.FLAGS["verbosity"].present:
        # TensorFlow logs every checkpoint and export at INFO: keep the console to our own lines
        # and warnings unless the user asks for more (--verbosity=0).
        from absl import logging
        import tensorflow as tf
        logging.set_verbosity(logging.WARNING)
        tf.get_logger().setLevel("WARNING")
    try:
        result = main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def _parse_global(argv):
    """absl `flags_parser` for flags.FLAGS whose parse errors are one line and exit code 2."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        print(f"error: {first_line(e)}: see --helpfull for the flags", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def child_env(**extra) -> dict:
    """os.environ plus `extra`, with this project's folder first on PYTHONPATH: a tool that
    starts `python -m <module>` children in the caller's working folder (so that the user's
    relative paths mean the same to them) finds the modules installed or not."""
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != PROJECT_ROOT]
    return dict(os.environ, **extra, PYTHONPATH=os.pathsep.join([PROJECT_ROOT] + paths))


def command_name(program: str) -> str:
    """How the user started this tool, for its usage line: `python -m runs.quickstart` for a
    module file (`python -m` puts the file's path in argv[0]: the module is the path from the
    outermost package folder), else the command itself (`realmix-quickstart`, an installed
    entry point, see pyproject.toml)."""
    path = os.path.abspath(program) if program else ""
    stem, ext = os.path.splitext(os.path.basename(path))
    if ext != ".py":
        return os.path.basename(program or "") or "python -m <module>"
    parts = [] if stem == "__main__" else [stem]
    folder = os.path.dirname(path)
    while os.path.exists(os.path.join(folder, "__init__.py")):
        parts.insert(0, os.path.basename(folder))
        folder = os.path.dirname(folder)
    return f"python -m {'.'.join(parts)}" if parts else f"python {program}"
