"""User-facing errors: one line that names the problem and the fix, then a non-zero exit."""
import re

EXIT_USER_ERROR = 2

# TensorFlow wraps the cause of an op error in its own internals: a `{{function_node ...}}`
# prefix, an `[Op:...]` suffix, "Graph execution error: Detected at node ... File ..." stacks,
# tf.data's "Error in user-defined function passed to ...:" prefix and `[[{{node ...}}]]`.
_TF_NOISE = [
    re.compile(r"\{\{function_node [^}]*\}\}\s*"),
    re.compile(r"\s*\[Op:[^\]]*\](\s*name:\s*\S*)?"),
    re.compile(r"Error in user-defined function passed to \S+ transformation with iterator: "
               r"[\w:]+: "),
    re.compile(r"\[\[\{\{node [^}]*\}\}\]\]"),
]


class UserError(Exception):
    """Bad input from the user (flag, dataset name, file). The message is shown as-is."""


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first readable line of an exception's message (at most `limit` characters), for
    one-line errors; TensorFlow's internals around the cause are trimmed."""
    text = getattr(e, "message", None) or str(e)
    skipping_stack = False
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(("Graph execution error", "Detected at node")):
            skipping_stack = True
            continue
        if skipping_stack and (not line or line.startswith("File ")):
            continue
        skipping_stack = False
        for pattern in _TF_NOISE:
            line = pattern.sub("", line)
        line = line.strip(" ;:\t")
        if line:
            return line[:limit]
    return type(e).__name__
