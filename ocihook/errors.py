"""The one base of every safedeploy failure. The CLI and the hook catch it once and print
``safedeploy: <message>``; anything else that escapes is a bug (an internal error)."""


class SafedeployError(Exception):
    """A failure with a message for people: str() is one line."""

    def lines(self) -> list[str]:
        """Every problem, one line each (most errors have one)."""
        return [str(self)]
