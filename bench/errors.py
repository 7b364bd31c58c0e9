"""The one error the harness raises for a run that cannot go on (a server or client process failed)."""


class BenchError(RuntimeError):
    """The benchmark cannot continue; the message says what failed and where to look."""
