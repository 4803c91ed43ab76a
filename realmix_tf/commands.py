"""The installed commands (pyproject.toml [project.scripts]): each runs one tool exactly as
`python -m` runs it, from any folder, with paths relative to that folder.

    realmix ...                    = python -m realmix_tf.realmix ...     (the RealMix trainer)
    realmix-<module> ...           = python -m <package>.<module> ...     (`-` for `_`), e.g.
    realmix-mixmatch, realmix-predict, realmix-create-split, realmix-quickstart, realmix-plot

The command's name says which tool: one entry point, `main`, looks the module up in PACKAGES.
"""
import importlib.util
import os
import runpy
import sys

from libml.base.errors import EXIT_USER_ERROR

PACKAGES = ("realmix_tf", "data_prep", "runs")     # searched in this order
PREFIX = "realmix"


def module_of(command: str) -> str:
    """`realmix-create-split` -> `data_prep.create_split`; `realmix` -> `realmix_tf.realmix`.
    ValueError for a name that is not one of ours."""
    name = os.path.basename(command)
    if name.lower().endswith((".exe", ".py")):
        name = os.path.splitext(name)[0]
    if name == PREFIX:
        stem = PREFIX
    elif name.startswith(PREFIX + "-") and len(name) > len(PREFIX) + 1:
        stem = name[len(PREFIX) + 1:].replace("-", "_")
    else:
        raise ValueError(f"{name} is not a realmix command (realmix or realmix-<tool>)")
    for package in PACKAGES:
        module = f"{package}.{stem}"
        if importlib.util.find_spec(module) is not None:
            return module
    raise ValueError(f"{name}: no module {stem} in {', '.join(PACKAGES)}")


def main() -> None:
    """The entry point of every command (sys.argv[0] names it); the flags are the tool's."""
    try:
        module = module_of(sys.argv[0])
    except ValueError as e:
        print(f"error: {e}: reinstall with `pip install -e .` in the repository", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    runpy.run_module(module, run_name="__main__", alter_sys=False)
