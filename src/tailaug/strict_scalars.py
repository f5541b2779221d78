"""Booleans and numbers kept apart in config sections.

pydantic's lax mode would read YAML's ``true`` as the number 1 (``train.epochs=true`` is a
1-epoch run) and ``1`` as true. :func:`check_scalars` runs before a section validates its
input and refuses, per field: a bool for a number, anything but a bool for a bool, a float
or string for an int. A float field still takes ints and numeric strings (PyYAML reads
``1e-3`` as the string "1e-3").
"""

from __future__ import annotations

import numbers
import types
import typing
from typing import Any, Union

from pydantic_core import PydanticCustomError

ERROR_TYPE = "strict_scalar"  # pydantic error type; ctx holds the offending field and value


def check_scalars(cls, data: Any) -> Any:
    """A ``model_validator(mode="before")`` body for a section class ``cls``."""
    if isinstance(data, dict):
        for key, value in data.items():
            field = cls.model_fields.get(key)
            problem = field is not None and scalar_problem(value, field.annotation)
            if problem:
                raise PydanticCustomError(ERROR_TYPE, problem, {"field": key, "value": value})
    return data


def scalar_problem(value: Any, tp: Any) -> str | None:
    """What is wrong with ``value`` for a field annotated ``tp``, or None."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        members = [m for m in typing.get_args(tp) if m is not type(None)]
        if value is None or len(members) != 1:  # unions of sections validate themselves
            return None
        tp = members[0]
    if typing.get_origin(tp) is list and isinstance(value, list):
        return next(filter(None, (scalar_problem(v, typing.get_args(tp)[0]) for v in value)), None)
    if tp is bool and not isinstance(value, bool):
        return f"expected true or false, not {type(value).__name__} {value!r}"
    if tp in (int, float) and isinstance(value, bool):
        return f"expected a number, not the boolean {str(value).lower()}"
    if tp is int and not isinstance(value, numbers.Integral):
        return f"expected a whole number such as 5, not {type(value).__name__} {value!r}"
    return None
