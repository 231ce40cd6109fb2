"""The one exception type users see.

Anything the user can fix (a path, a file, a setting) raises LocaloraError with a message that
says which file, what is wrong and what to do. The CLI prints it as a single line, without a
traceback, and exits non-zero. Everything else is a bug and keeps its traceback.
"""


class LocaloraError(Exception):
    """A problem with the user's input or environment, phrased for the user."""


def check_keys(table: dict, allowed, required, where: str) -> None:
    """One line naming unknown or missing keys of a TOML table (profiles, testbeds)."""
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise LocaloraError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
    missing = [k for k in required if k not in table]
    if missing:
        raise LocaloraError(f"{where}: missing key(s) {', '.join(missing)}")
