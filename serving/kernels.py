"""Compiled per-request kernels of the rules engine (Numba, compiled once and cached on disk).

A request filters and caps a few hundred candidates. Done with NumPy that was ~25 array calls of
1-2 us each, mostly dispatch; here each pass is one call that visits every candidate once. The
engine (`serving.rules`) keeps the decisions that are not per candidate (which filters and caps a
request has, rule attribution, back-fill, pins) and calls these for the per-candidate work.

Inputs are the snapshot's item -> tags CSR (`tag_off` int64[n_items + 1], `tag_ids` int32[]) and
small per-request arrays; nothing here allocates per item of the catalogue. Two scratch arrays
per live snapshot (`marks` uint8[n_items], `roles` uint8[n_tags]) are set for the request's few
items and tags and cleared again before returning; the kernels hold the GIL, so threads of one
worker never see each other's marks.

Item indices come from the snapshot (structurally verified at load) or from id lookups in it, so
they are in range; Numba does not bounds-check.
"""

from __future__ import annotations

import numpy as np
from numba import njit, types

# Argument types: the snapshot's arrays are read-only memory maps, request arrays are writable;
# both pass as read-only (a safe conversion), so each kernel has exactly one compiled version,
# built eagerly at import (or loaded from the cache): no request ever waits for a compilation.
_I32 = types.Array(types.int32, 1, "C", readonly=True)
_I64 = types.Array(types.int64, 1, "C", readonly=True)
_INTP = types.Array(types.intp, 1, "C", readonly=True)
_BOOL = types.Array(types.boolean, 1, "C", readonly=True)
_U8 = types.Array(types.uint8, 1, "C", readonly=True)
_U8_RW = types.Array(types.uint8, 1, "C")
_I64_RW = types.Array(types.int64, 1, "C")
_b, _i = types.boolean, types.int64

# Outcome codes, in the order filters take precedence (serving.rules.OUTCOMES names them).
KEPT, UNAVAILABLE, EXCLUDED, NOT_INCLUDED, SEEN, BLOCKED, FORBIDDEN_TAG, MISSING_TAG = range(8)

# Bits in `marks` (per item) and `roles` (per tag).
_M_EXCLUDED, _M_SEEN, _M_BLOCKED, _M_INCLUDED, _M_MEMBER = 1, 2, 4, 8, 16
_R_FORBIDDEN, _R_BLOCKED, _R_REQUIRED = 1, 2, 4

# Kinds of a `max_per_tag` group.
GROUP_TAG, GROUP_BRAND, GROUP_CATEGORY = 0, 1, 2


# Helpers (compiled into the kernels that call them).
@njit(cache=True)
def _tag_outcome(item, tag_off, tag_ids, roles, n_required, required_missing):
    blocked = forbidden = False
    have = 0
    for j in range(tag_off[item], tag_off[item + 1]):
        role = roles[tag_ids[j]]
        if role:
            blocked |= (role & _R_BLOCKED) != 0
            forbidden |= (role & _R_FORBIDDEN) != 0
            have += (role & _R_REQUIRED) != 0
    if blocked:
        return BLOCKED
    if forbidden:
        return FORBIDDEN_TAG
    if required_missing or have < n_required:
        return MISSING_TAG
    return KEPT


@njit(cache=True)
def _in_group(item, kind, value, tag_off, tag_ids, brand_id, category_id):
    if kind == GROUP_TAG:
        for j in range(tag_off[item], tag_off[item + 1]):  # noqa: SIM110 (a loop compiles)
            if tag_ids[j] == value:
                return True
        return False
    if kind == GROUP_BRAND:
        return brand_id[item] == value
    return category_id[item] == value


@njit(
    [(_I32, _I64, _I32, _BOOL, _U8_RW, _U8_RW, _I32, _I32, _b, _I32, _I32, _I32, _I32, _I32, _b)],
    cache=True,
)
def outcomes(
    items,
    tag_off,
    tag_ids,
    unavailable,
    marks,
    roles,
    exclude,
    include,
    has_include,
    seen,
    blocked_items,
    forbidden_tags,
    blocked_tags,
    required_tags,
    required_missing,
):
    """(uint8 per candidate: KEPT, or the first filter it fails in the order of the codes,
    unavailable > exclude_ids > not in include_ids > seen > blocked > forbidden tag > missing
    required tag; int64[8]: how many candidates got each code).

    `unavailable` is bool[n_items], or empty when every item is available; `required_missing`:
    a required tag the catalogue does not know, so nothing can qualify."""
    for i in exclude:
        marks[i] |= _M_EXCLUDED
    for i in seen:
        marks[i] |= _M_SEEN
    for i in blocked_items:
        marks[i] |= _M_BLOCKED
    for i in include:
        marks[i] |= _M_INCLUDED
    for t in forbidden_tags:
        roles[t] |= _R_FORBIDDEN
    for t in blocked_tags:
        roles[t] |= _R_BLOCKED
    n_required = 0
    for t in required_tags:
        if not roles[t] & _R_REQUIRED:
            n_required += 1
        roles[t] |= _R_REQUIRED
    check_tags = forbidden_tags.shape[0] + blocked_tags.shape[0] + n_required > 0
    any_unavailable = unavailable.shape[0] > 0

    n = items.shape[0]
    code = np.zeros(n, dtype=np.uint8)
    tally = np.zeros(8, dtype=np.int64)
    for r in range(n):
        item = items[r]
        if any_unavailable and unavailable[item]:
            code[r] = UNAVAILABLE
            continue
        m = marks[item]
        if m & _M_EXCLUDED:
            code[r] = EXCLUDED
        elif has_include and not m & _M_INCLUDED:
            code[r] = NOT_INCLUDED
        elif m & _M_SEEN:
            code[r] = SEEN
        elif m & _M_BLOCKED:
            code[r] = BLOCKED
        elif check_tags or required_missing:
            code[r] = _tag_outcome(item, tag_off, tag_ids, roles, n_required, required_missing)

    for r in range(n):
        tally[code[r]] += 1

    for i in exclude:
        marks[i] = 0
    for i in seen:
        marks[i] = 0
    for i in blocked_items:
        marks[i] = 0
    for i in include:
        marks[i] = 0
    for t in forbidden_tags:
        roles[t] = 0
    for t in blocked_tags:
        roles[t] = 0
    for t in required_tags:
        roles[t] = 0
    return code, tally


@njit([(_I32, _I64, _I32, _i)], cache=True)
def tag_hits(items, tag_off, tag_ids, tag):
    """bool per entry of `items`: does the item carry tag id `tag`?"""
    out = np.zeros(items.shape[0], dtype=np.bool_)
    for r in range(items.shape[0]):
        item = items[r]
        for j in range(tag_off[item], tag_off[item + 1]):
            if tag_ids[j] == tag:
                out[r] = True
                break
    return out


@njit([(_I32, _I32, _U8_RW)], cache=True)
def is_member(items, of, marks):
    """bool per entry of `items`: is it one of the item indices `of`?"""
    for i in of:
        marks[i] |= _M_MEMBER
    out = np.zeros(items.shape[0], dtype=np.bool_)
    for r in range(items.shape[0]):
        out[r] = (marks[items[r]] & _M_MEMBER) != 0
    for i in of:
        marks[i] = 0
    return out


@njit([(_I32, _I64, _I32, _I32, _I32, _I32, _I32)], cache=True)
def group_members(items, tag_off, tag_ids, brand_id, category_id, kinds, values):
    """bool[len(items), groups]: which `max_per_tag` groups ((kind, id) pairs) hold each item."""
    out = np.zeros((items.shape[0], kinds.shape[0]), dtype=np.bool_)
    for r in range(items.shape[0]):
        for g in range(kinds.shape[0]):
            out[r, g] = _in_group(items[r], kinds[g], values[g], tag_off, tag_ids, brand_id,
                                  category_id)  # fmt: skip
    return out


@njit(
    [(_U8, _INTP, _b, _I32, _I64, _I32, _I32, _I32, _I32, _I32, _I64, _I64_RW, _i)],
    cache=True,
)
def select(
    code,
    order,
    stored_order,
    items,
    tag_off,
    tag_ids,
    brand_id,
    category_id,
    kinds,
    values,
    caps,
    counts,
    n,
):
    """Greedy top-`n` rows under the caps: the rows of `order` (rank order), or with
    `stored_order` the KEPT rows (per `code`) in stored order.

    An item counts toward every group it belongs to; it is refused when one of its groups is
    full (the lowest-numbered full group is reported). Stops at the n-th chosen row: refusals
    past it do not matter. Returns (chosen rows, refused rows, the refusing group of each);
    `counts` is updated in place unless n == 0 (a scan that only reports)."""
    n_groups = kinds.shape[0]
    n_rows = code.shape[0] if stored_order else order.shape[0]
    now = counts.copy()
    chosen = np.empty(min(n, n_rows), dtype=np.intp)
    refused = np.empty(n_rows, dtype=np.intp)
    refused_by = np.empty(n_rows, dtype=np.intp)
    member = np.empty(n_groups, dtype=np.bool_)
    n_chosen = n_refused = 0
    for pos in range(n_rows):
        if stored_order:
            if code[pos] != KEPT:
                continue
            row = pos
        else:
            row = order[pos]
        item = items[row]
        full = -1
        for g in range(n_groups):
            member[g] = _in_group(item, kinds[g], values[g], tag_off, tag_ids, brand_id,
                                  category_id)  # fmt: skip
            if member[g] and full < 0 and now[g] >= caps[g]:
                full = g
        if full >= 0:
            refused[n_refused] = row
            refused_by[n_refused] = full
            n_refused += 1
            continue
        for g in range(n_groups):
            if member[g]:
                now[g] += 1
        if n_chosen < n:
            chosen[n_chosen] = row
            n_chosen += 1
            if n_chosen == n:
                break
    if n > 0:
        counts[:] = now
    return chosen[:n_chosen], refused[:n_refused], refused_by[:n_refused]
