"""pydantic's validation errors as one 400 per request body: a sentence per wrong field, naming it.

Every route (predict, OpenAI, TGI) describes its body's errors here, so a wrong field reads the same
everywhere. pydantic names the union member that failed in an error's location ("stop.str",
"stop.list[str].0"); those are folded into one sentence for the field itself, since a client never
wrote "str".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pydantic

from starcoder_serving.errors import InvalidRequest


def _is_union_tag(part: str | int) -> bool:
    """pydantic's label for a union member in an error location ("str", "list[str]", "function-after[...]")."""
    return isinstance(part, str) and (part in {"str", "int", "float", "bool"} or "[" in part or "-" in part)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) < 80 else type(value).__name__


def describe_validation_error(
    error: pydantic.ValidationError,
    *,
    known_fields: frozenset[str] = frozenset(),
    not_accepted: Mapping[str, str] | None = None,
    shapes: Mapping[str, str] | None = None,
) -> InvalidRequest:
    """``known_fields``: listed when a top-level field is unknown. ``not_accepted``: top-level fields refused
    with a reason of their own (Python-only generate() arguments). ``shapes``: what a union field must be."""
    not_accepted = not_accepted or {}
    shapes = shapes or {}
    problems: dict[str, str] = {}
    for detail in error.errors():
        raw = tuple(detail["loc"])
        parts = tuple(part for part in raw if not _is_union_tag(part))
        if len(parts) != len(raw):
            cut = next((i for i, part in enumerate(parts) if part in shapes), None)
            if cut is not None:
                name = ".".join(str(part) for part in parts[: cut + 1])
                problems.setdefault(name, f"`{name}` must be {shapes[str(parts[cut])]}.")
                continue
        raw = parts  # a union without a described shape: reported where it failed, as any other field
        name = ".".join(str(part) for part in raw) or "body"
        kind = detail["type"]
        if kind == "extra_forbidden" and len(raw) == 1 and name in not_accepted:
            text = f"`{name}` is not accepted: {not_accepted[name]}."
        elif kind == "extra_forbidden" and len(raw) == 1:
            accepted = f"; accepted parameters are: {', '.join(sorted(known_fields))}" if known_fields else ""
            text = f"Unknown parameter `{name}`. Remove it{accepted}."
        elif kind == "extra_forbidden":
            text = f"Unknown field `{name}`; remove it."
        elif kind == "missing":
            text = f"`{name}` is required."
        elif kind == "value_error" and not raw:  # a rule across fields: its message names them
            text = str(detail["msg"]).removeprefix("Value error, ") + "."
        elif kind == "value_error":
            text = f"`{name}` {str(detail['msg']).removeprefix('Value error, ')}."
        else:
            text = f"`{name}`: {detail['msg']} (got {_shown(detail.get('input'))})."
        problems.setdefault(name, text)
    return InvalidRequest(" ".join(problems.values()), param=next(iter(problems), None))
