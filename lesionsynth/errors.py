"""Exceptions that the command line turns into one clear error line."""


class LesionsynthError(Exception):
    """An error the user can act on; the CLI prints its message without a traceback."""

    exit_code = 1


class InputError(LesionsynthError):
    """The user's input (files, options) is invalid: exit status 2."""

    exit_code = 2


class Interrupted(LesionsynthError):
    """The run was stopped by a signal (SIGTERM from a cluster scheduler, SIGINT from Ctrl-C): exit status
    128 + the signal's number, as a shell reports a process ended by it."""

    def __init__(self, signum: int, message: str | None = None):
        import signal

        self.signum = int(signum)
        self.exit_code = 128 + self.signum
        name = signal.Signals(self.signum).name
        super().__init__(message or f"stopped by {name}")


class MissingExtraError(LesionsynthError, ImportError):
    """An optional part of lesionsynth was used without the extra that installs what it needs; the message
    names the extra (e.g. "pip install 'lesionsynth[torchio]'")."""
