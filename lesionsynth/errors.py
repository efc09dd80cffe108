"""Exceptions that the command line turns into one clear error line."""


class LesionsynthError(Exception):
    """An error the user can act on; the CLI prints its message without a traceback."""

    exit_code = 1


class InputError(LesionsynthError):
    """The user's input (files, options) is invalid: exit status 2."""

    exit_code = 2
