"""Typed user errors: one line of what is wrong, one hint of what to do."""

from __future__ import annotations


class UserError(Exception):
    """An error the user can fix; the CLI prints it on one line and exits with `exit_code`."""

    exit_code = 2

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} (hint: {self.hint})" if self.hint else self.message


class InputError(UserError):
    """A seed, dataset, template or config file is unreadable or malformed."""


class ConfigError(UserError):
    """A flag, config key or environment value is wrong."""


class OutputError(UserError):
    """The output directory cannot be written or belongs to another run."""


class TeacherError(UserError):
    """The teacher refused the whole run (bad key, unknown model, no access)."""


class NoCredit(TeacherError):
    """The teacher's account has no credit left (429 insufficient_quota, 402): no retry can help, the run stops."""

    exit_code = 1


class PublishError(UserError):
    """The Hub refused or failed a push."""


class RunStopped(Exception):
    """The run stopped on purpose (budget, interrupt, collapsed yield); finished work is saved."""

    def __init__(self, reason: str, message: str, exit_code: int = 0) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.exit_code = exit_code
