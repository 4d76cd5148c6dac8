"""Typing option text from what the engine says about itself.

QEMU types ``key=value`` text by the schema of what it creates (``-object``,
``-netdev``, ``-blockdev``: the QAPI type) or by its option descriptions
(``-drive``, ``-chardev``, ``-boot``: ``query-command-line-options``).  Both
are in the capability cache, so the translation types text exactly where
the engine would.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from qmpvm.cli.sugar import parse_size
from qmpvm.errors import ArgumentError
from qmpvm.keyval import FALSE, TRUE

if TYPE_CHECKING:
    from qmpvm.engine.caps import Capabilities
    from qmpvm.qapi.check import Schema


class EngineTyper:
    def __init__(
        self,
        schema: Callable[[], Schema],
        groups: Mapping[str, Mapping[str, str]],
        caps: Capabilities | None = None,
    ) -> None:
        self._make_schema = schema
        self._schema: Schema | None = None
        self.groups = groups
        self.caps = caps  # where both came from, for the rest of the process to reuse

    @classmethod
    def from_caps(cls, caps: Capabilities) -> EngineTyper:
        def schema() -> Schema:
            from qmpvm.qapi.check import Schema

            return Schema(caps.schema_entries())

        return cls(schema, caps.command_line_options, caps)

    @property
    def built_schema(self) -> Schema | None:
        """The schema checker, if typing needed it (for the process to reuse)."""
        return self._schema

    def command(self, command: str, tree: dict[str, object]) -> dict[str, object]:
        if self._schema is None:
            self._schema = self._make_schema()
        arg_type = self._schema.arg_type(command)
        if arg_type is None:
            return tree
        typed = self._schema.from_keyval(arg_type, tree)
        return typed if isinstance(typed, dict) else tree

    def group(self, group: str, tree: dict[str, object]) -> dict[str, object]:
        params = self.groups.get(group) or {}
        return {key: _typed(params.get(key), value) for key, value in tree.items()}

    def params(self, group: str) -> frozenset[str]:
        return frozenset(self.groups.get(group) or ())


def _typed(kind: str | None, value: object) -> object:
    if not isinstance(value, str):
        return value
    if kind == "boolean":
        if value in TRUE or value == "":
            return True
        if value in FALSE:
            return False
    elif kind == "number":
        try:
            return int(value, 0)
        except ValueError:
            return value
    elif kind == "size":
        try:
            return parse_size(value)
        except ArgumentError:
            return value
    return value
