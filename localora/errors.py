"""The one exception type users see, and the exit status each kind of problem ends with.

Anything the user can fix (a path, a file, a setting) raises LocaloraError with a message that
says which file, what is wrong and what to do. The CLI prints it as a single line, without a
traceback, and exits with the error's `code`. Everything else is a bug and keeps its traceback.

    LocaloraError       2  bad input: an option, a name, a file's content, a setting
    MissingError        3  a model or file that should be here is not (fetch it, fix the path)
    RuntimeFailure      4  the input was fine but the work failed (NaN latents, out of memory)

A script can tell them apart by the exit status alone; EXIT_CODES is the table `--help` shows.
"""

USAGE, MISSING, FAILED, INTERRUPTED = 2, 3, 4, 130

# Status -> what it means, for `localora --help` and the README (1 is Python's own: a bug).
EXIT_CODES = {
    0: "success",
    1: "a bug (a traceback: please report it)",
    USAGE: "usage error or bad input (an option, a name, a file's content)",
    MISSING: "a model or file is not here (weights not downloaded, LoRA gone)",
    FAILED: "failed while running (NaN latents, out of memory, disk full)",
    INTERRUPTED: "interrupted (Ctrl-C); a compose run stays resumable",
}


class LocaloraError(Exception):
    """A problem with the user's input or environment, phrased for the user."""

    code: int = USAGE


class MissingError(LocaloraError):
    """A model or file that should be here is not: the user fetches it or fixes the path."""

    code = MISSING


class RuntimeFailure(LocaloraError):
    """The input was valid but the work failed while running (NaN latents, out of memory, disk full)."""

    code = FAILED


def check_keys(table: dict, allowed, required, where: str) -> None:
    """One line naming unknown or missing keys of a TOML table (profiles, testbeds)."""
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise LocaloraError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
    missing = [k for k in required if k not in table]
    if missing:
        raise LocaloraError(f"{where}: missing key(s) {', '.join(missing)}")
