"""What a tenant id may be: the one rule, checked where an id enters and again by storage.

A tenant id names folders (``landing/<tenant>/``, ``snapshots/<tenant>/``,
``serving/events/<tenant>/`` ...), so it must never be able to leave them: 1 to 64 ASCII
letters, digits, ``_``, ``-`` and ``.``, never ``..`` and not ``.`` alone. That excludes path
separators, NUL, spaces, ``~``, empty ids and lookalike letters of other scripts.

Where ids enter (JWT claims, API keys, ``X-Org-Id``, path parameters, the CLI) they are
checked with `is_valid_tenant` and answered there (401, refused at start, 400, exit 2); every
layer that turns an id into a path calls `check_tenant`, which raises `ValueError`, as a second
line of defence.
"""

from __future__ import annotations

import argparse
import re

#: The rule as one regular expression, for schemas (OpenAPI / msgspec `pattern`): the same
#: answers under Python's `re.search` and ECMA-262 (the final lookahead refuses the newline
#: Python's `$` lets through).
TENANT_ID_PATTERN = r"^(?!\.\.?$)(?!.*\.\.)[A-Za-z0-9._-]{1,64}$(?!\n)"
#: What a valid id looks like, in words (every refusal says it).
TENANT_ID_RULE = "1 to 64 ASCII letters, digits, '_', '-' or '.', without '..' and not '.' alone"

_SHAPE = re.compile(r"[A-Za-z0-9._-]{1,64}")


def is_valid_tenant(tenant: object) -> bool:
    """True when `tenant` is a string that is a valid tenant id (see the module docstring)."""
    return (
        type(tenant) is str
        and _SHAPE.fullmatch(tenant) is not None
        and tenant != "."
        and ".." not in tenant
    )


def check_tenant(tenant: object) -> str:
    """`tenant` itself when it is a valid tenant id; `ValueError` naming the rule otherwise."""
    if not is_valid_tenant(tenant):
        raise ValueError(f"invalid tenant id {describe(tenant)}: a tenant id is {TENANT_ID_RULE}")
    return tenant  # type: ignore[return-value]


def describe(tenant: object) -> str:
    """A short, printable rendering of a (possibly hostile) id for messages and logs."""
    text = repr(tenant)
    return text if len(text) <= 80 else f"{text[:60]}... ({len(str(tenant))} characters)"


def tenant_arg(text: str) -> str:
    """argparse `type=` for ``--tenant`` options: a bad id is a usage error (exit status 2)."""
    try:
        return check_tenant(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
