"""Exceptions that the command line turns into one clear error line."""


class LesionsynthError(Exception):
    """An error the user can act on; the CLI prints its message without a traceback."""

    exit_code = 1


class InputError(LesionsynthError):
    """The user's input (files, options) is invalid: exit status 2."""

    exit_code = 2


class Interrupted(BaseException):
    """The run was stopped by a signal (SIGTERM from a cluster scheduler, SIGINT from Ctrl-C): exit status
    128 + the signal's number, as a shell reports a process ended by it. Not an Exception, as KeyboardInterrupt
    is not: an `except Exception` around the code it interrupts (a file reader turning failures into one
    line) must not take it for a failure of that code. The CLI prints its message as one line."""

    def __init__(self, signum: int, message: str | None = None):
        import signal

        self.signum = int(signum)
        self.exit_code = 128 + self.signum
        name = signal.Signals(self.signum).name
        super().__init__(message or f"stopped by {name}")


class MissingExtraError(LesionsynthError, ImportError):
    """An optional part of lesionsynth was used without the extra that installs what it needs; the message
    names the extra (e.g. "pip install 'lesionsynth[torchio]'")."""


class ConfigError(InputError):
    """A config field holds a bad value. The message names the Python field (`GenerateConfig.load: 'hgh' is
    not one of low, ...`); the command line names its flag instead (`for_flag`)."""

    def __init__(self, owner: str, field: str, value, problem: str):
        self.owner, self.field, self.value, self.problem = owner, field, value, problem
        super().__init__(f"{owner}.{field}: {_shown(value)} {problem}")

    def for_flag(self, flag: str) -> InputError:
        """The same error as the command line says it: `--load 'hgh': is not one of low, ...`."""
        return InputError(f"{flag} {_shown(self.value)}: {self.problem}")


def _shown(value) -> str:
    if isinstance(value, tuple):
        return " ".join(f"{v:g}" if isinstance(v, float) else repr(v) for v in value)
    return repr(value) if isinstance(value, str) else str(value)


def check_field(config, field: str, ok: bool, problem: str) -> None:
    """Raise a ConfigError naming `type(config).field` unless `ok`."""
    if not ok:
        raise ConfigError(type(config).__name__, field, getattr(config, field), problem)


def check_choice(config, field: str, choices) -> None:
    """Raise a ConfigError unless the field's value is one of `choices`."""
    check_field(config, field, getattr(config, field) in choices, f"is not one of {', '.join(map(str, choices))}")
