"""User-facing errors: one line that names the problem and the fix, then a non-zero exit."""
import sys

EXIT_USER_ERROR = 2


class UserError(Exception):
    """Bad input from the user (flag, dataset name, file). The message is shown as-is."""


def fail(message: str) -> None:
    raise UserError(message)


def run_cli(main, argv=None):
    """Runs main(argv); a UserError becomes one line on stderr and exit code 2."""
    try:
        result = main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    return result


def absl_run(main):
    """absl.app.run with UserError turned into a one-line message and exit code 2."""
    from absl import app

    def wrapped(argv):
        try:
            result = main(argv)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)
        return result if isinstance(result, int) else 0  # app.run exits with this value

    app.run(wrapped)
