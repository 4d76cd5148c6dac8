"""The error hierarchy, and the one place errors become QMP error classes.

    QmpvmError                      anything qmpvm refuses; carries a QMP class
     ├── CommandNotFoundError       CommandNotFound: no such command (or not now)
     ├── ArgumentError              GenericError: arguments fail the schema
     ├── PhaseError                 GenericError: command not allowed in this phase
     ├── ConfigError                GenericError: the configuration would break
     │    └── NotFoundError         DeviceNotFound: a named object does not exist
     └── EngineError                GenericError: the engine failed or refused
          └── EngineCommandError    the engine's own class and words, relayed

Errors that are the client's fault all derive from QmpvmError and are turned
into ``{"error": {"class", "desc"}}`` by ``error_reply``. Anything else that
escapes a command is our bug: the dispatcher logs it and answers GenericError,
and the process keeps serving.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorClass(StrEnum):
    """QMP error classes (qapi/error.json: QapiErrorClass)."""

    GENERIC = "GenericError"
    COMMAND_NOT_FOUND = "CommandNotFound"
    DEVICE_NOT_ACTIVE = "DeviceNotActive"
    DEVICE_NOT_FOUND = "DeviceNotFound"
    KVM_MISSING_CAP = "KVMMissingCap"


class QmpvmError(Exception):
    """Root of every error a client may see."""

    error_class: ErrorClass = ErrorClass.GENERIC

    def __init__(self, desc: str) -> None:
        super().__init__(desc)
        self.desc = desc


class CommandNotFoundError(QmpvmError):
    error_class = ErrorClass.COMMAND_NOT_FOUND


class ArgumentError(QmpvmError):
    """Arguments that do not match the command's declared schema."""


class PhaseError(QmpvmError):
    """A command that is not allowed in the current machine phase."""


class ConfigError(QmpvmError):
    """A change that would leave the configuration inconsistent."""


class NotFoundError(ConfigError):
    error_class = ErrorClass.DEVICE_NOT_FOUND


class EngineError(QmpvmError):
    """The engine could not be started, died, or failed a command."""


class EngineCommandError(EngineError):
    """The engine refused a command; its class and words are passed through."""

    def __init__(self, desc: str, error_class: str = "GenericError") -> None:
        super().__init__(desc)
        try:
            self.error_class = ErrorClass(error_class)
        except ValueError:
            self.error_class = ErrorClass.GENERIC


def error_reply(err: QmpvmError) -> dict[str, object]:
    """The QMP ``error`` member for ``err`` (the only such conversion)."""
    return {"class": str(err.error_class), "desc": err.desc}


class StoreError(Exception):
    """The state directory cannot be used: one line for stderr."""
