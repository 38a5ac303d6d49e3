"""The numbered parameters of one SQL statement, collected while its text is built.

`params(value, "bigint[]")` appends `value` and returns `$n::bigint[]` for the text; the
statement then runs with `*params.values`. Conditions and clauses built this way keep the text
to fixed fragments and the values to parameters (never interpolated).
"""

from __future__ import annotations


class Params:
    __slots__ = ("values",)

    def __init__(self, *values: object) -> None:
        self.values: list[object] = list(values)

    def __call__(self, value: object, cast: str | None = None) -> str:
        self.values.append(value)
        number = len(self.values)
        return f"${number}::{cast}" if cast else f"${number}"
