"""Compiled per-request kernels of the rules engine (Numba, compiled once and cached on disk).

A request filters and caps a few hundred candidates. Done with NumPy that was ~25 array calls of
1-2 us each, mostly dispatch; here each pass is one call that visits every candidate once. The
engine (`serving.rules`) keeps the decisions that are not per candidate (which filters and caps a
request has, rule attribution, back-fill, pins) and calls these for the per-candidate work.

Inputs are the snapshot's item -> tags CSR (`tag_off` int64[n_items + 1], `tag_ids` int32[]),
the candidates, and one int64 `plan` per request holding its parameters and small lists (layout:
`P_N`; each array argument costs the call's dispatch ~1.5k instructions to type-check and
unbox); nothing here allocates per item of the catalogue. Two scratch arrays
per live snapshot (`marks` uint8[n_items], `roles` uint8[n_tags]) are set for the request's few
items and tags and cleared again before returning; the kernels hold the GIL, so threads of one
worker never see each other's marks.

Item indices come from the snapshot (structurally verified at load) or from id lookups in it;
every access is still bounds-checked (`_JIT`), so a damaged snapshot fails a request with
IndexError instead of touching stray memory (`LiveSnapshot.call_kernel` then clears the
scratch the failed call left marked).
"""

from __future__ import annotations

import numpy as np
from numba import carray, njit, types
from numba.extending import intrinsic

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
_F32 = types.Array(types.float32, 1, "C", readonly=True)
_INTP_RW = types.Array(types.intp, 1, "C")
_b, _i = types.boolean, types.int64

# Cached on disk; bounds-checked, so an index out of range (a damaged snapshot) raises
# IndexError - a 500 Problem for that request - instead of reading or writing stray memory.
_JIT = {"cache": True, "boundscheck": True}

# Outcome codes, in the order filters take precedence (serving.rules.OUTCOMES names them).
KEPT, UNAVAILABLE, EXCLUDED, NOT_INCLUDED, SEEN, BLOCKED, FORBIDDEN_TAG, MISSING_TAG = range(8)

# Bits in `marks` (per item) and `roles` (per tag).
_M_EXCLUDED, _M_SEEN, _M_BLOCKED, _M_INCLUDED, _M_MEMBER = 1, 2, 4, 8, 16
_R_FORBIDDEN, _R_BLOCKED, _R_REQUIRED = 1, 2, 4

# Kinds of a `max_per_tag` group.
GROUP_TAG, GROUP_BRAND, GROUP_CATEGORY = 0, 1, 2


# Helpers, inlined into the kernels that call them (Numba IR inlining: ~8 % fewer instructions
# in the fused kernel than LLVM's own choice).
@njit(inline="always", **_JIT)
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


@njit(["float64(float64)"], **_JIT)
def round6(x):
    """`x` to six decimals exactly as np.round(x, 6) does it (x * 1e6 to the nearest integer,
    ties to even, / 1e6): the scores the API returns."""
    return np.rint(x * 1e6) / 1e6


@njit(inline="always", **_JIT)
def _in_group(item, kind, value, tag_off, tag_ids, brand_id, category_id):
    if kind == GROUP_TAG:
        for j in range(tag_off[item], tag_off[item + 1]):  # noqa: SIM110 (a loop compiles)
            if tag_ids[j] == value:
                return True
        return False
    if kind == GROUP_BRAND:
        return brand_id[item] == value
    return category_id[item] == value


#: Layout of the int64 `plan` of a request (`serving.rules.plan`): its parameters and small
#: lists, so that a kernel call unboxes one array instead of a dozen. [n (rows to choose),
#: flags (PLAN_HAS_INCLUDE | PLAN_REQUIRED_MISSING), groups G, then the lengths of the
#: exclude, include, forbidden-tag and required-tag lists; the four lists; then the
#: `max_per_tag` groups as four runs of G: kind, value (tag, brand or category id), cap, count
#: (updated in place by the selection)].
P_N, P_FLAGS, P_GROUPS, P_EXCLUDE, P_INCLUDE, P_FORBIDDEN, P_REQUIRED = range(7)
PLAN_HEAD = 7
PLAN_HAS_INCLUDE, PLAN_REQUIRED_MISSING = 1, 2


def counts_at(plan_head: list[int]) -> int:
    """Where the group counts start in a plan, from its first PLAN_HEAD entries."""
    lists = sum(plan_head[P_EXCLUDE : P_REQUIRED + 1])
    return PLAN_HEAD + lists + 3 * plan_head[P_GROUPS]


@njit(**_JIT)
def _lists(plan):
    """(exclude, include, forbidden tags, required tags): views of the plan."""
    a = PLAN_HEAD
    b = a + plan[P_EXCLUDE]
    c = b + plan[P_INCLUDE]
    d = c + plan[P_FORBIDDEN]
    e = d + plan[P_REQUIRED]
    return plan[a:b], plan[b:c], plan[c:d], plan[d:e]


@njit(**_JIT)
def _groups(plan):
    """(kinds, values, caps, counts) of the `max_per_tag` groups: views of the plan."""
    g = plan[P_GROUPS]
    at = PLAN_HEAD + plan[P_EXCLUDE] + plan[P_INCLUDE] + plan[P_FORBIDDEN] + plan[P_REQUIRED]
    return (
        plan[at : at + g],
        plan[at + g : at + 2 * g],
        plan[at + 2 * g : at + 3 * g],
        plan[at + 3 * g : at + 4 * g],
    )


@njit(inline="always", **_JIT)
def _mark_items(marks, exclude, seen, blocked_items, include):
    """Flag the request's item lists in `marks` (one byte per catalogue item)."""
    for i in exclude:
        marks[i] |= _M_EXCLUDED
    for i in seen:
        marks[i] |= _M_SEEN
    for i in blocked_items:
        marks[i] |= _M_BLOCKED
    for i in include:
        marks[i] |= _M_INCLUDED


@njit(inline="always", **_JIT)
def _clear_marks(
    marks, roles, exclude, seen, blocked_items, include, forbidden_tags, blocked_tags,
    required_tags,
):  # fmt: skip
    """Reset what a request flagged in `marks` and `roles` (zero again for the next one)."""
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


@njit(**_JIT)
def _outcomes_into(
    items, tag_off, tag_ids, unavailable, marks, roles, seen, blocked_items, blocked_tags, plan,
    code, tally,
):  # fmt: skip
    exclude, include, forbidden_tags, required_tags = _lists(plan)
    has_include = (plan[P_FLAGS] & PLAN_HAS_INCLUDE) != 0
    required_missing = (plan[P_FLAGS] & PLAN_REQUIRED_MISSING) != 0
    _mark_items(marks, exclude, seen, blocked_items, include)
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

    tally[:] = 0
    for r in range(items.shape[0]):
        item = items[r]
        c = KEPT
        if any_unavailable and unavailable[item]:
            c = UNAVAILABLE
        else:
            m = marks[item]
            if m & _M_EXCLUDED:
                c = EXCLUDED
            elif has_include and not m & _M_INCLUDED:
                c = NOT_INCLUDED
            elif m & _M_SEEN:
                c = SEEN
            elif m & _M_BLOCKED:
                c = BLOCKED
            elif check_tags or required_missing:
                c = _tag_outcome(item, tag_off, tag_ids, roles, n_required, required_missing)
        code[r] = c
        tally[c] += 1

    _clear_marks(
        marks, roles, exclude, seen, blocked_items, include, forbidden_tags, blocked_tags,
        required_tags,
    )  # fmt: skip


@njit(inline="always", **_JIT)
def _full_member(item, g, kinds, values, caps, counts, tag_off, tag_ids, brand_id, category_id):
    """Does `item` belong to group `g`, and is the group full?"""
    return counts[g] >= caps[g] and _in_group(
        item, kinds[g], values[g], tag_off, tag_ids, brand_id, category_id
    )


#: Layout of the int64 answer buffer the selection writes (`answer_size`, for n rows to choose
#: among n_candidates): [n_chosen, n_refused, tally of the 8 outcome codes, then n chosen
#: rows, n chosen items, n chosen reasons, n chosen scores (float64 bits, `round6`), then the
#: refused rows and the refusing group of each (room for every candidate), then (the fused
#: kernel) the outcome code of each candidate as bytes].
HEAD = 10


def answer_size(n: int, n_candidates: int) -> int:
    return HEAD + 4 * n + 2 * n_candidates + (n_candidates + 7) // 8


def chosen(answer: np.ndarray, n: int) -> tuple[list[int], list[int], list[float]]:
    """(head: [n_chosen, n_refused, tally...], items, scores of the chosen rows) of an answer
    buffer."""
    head = answer[: HEAD + 2 * n].tolist()
    n_chosen = head[0]
    scores = answer[HEAD + 3 * n : HEAD + 3 * n + n_chosen].view(np.float64).tolist()
    return head[:HEAD], head[HEAD + n : HEAD + n + n_chosen], scores


def chosen_rows(answer: np.ndarray, n: int, n_chosen: int) -> tuple[list[int], list[int]]:
    """(pool rows, reason codes) of the chosen rows of an answer buffer."""
    return answer[HEAD : HEAD + n_chosen].tolist(), answer[
        HEAD + 2 * n : HEAD + 2 * n + n_chosen
    ].tolist()


def refused(answer: np.ndarray, n: int, n_candidates: int, n_refused: int):
    """(refused rows, the refusing group of each) of an answer buffer."""
    at = HEAD + 4 * n
    return answer[at : at + n_refused].tolist(), answer[
        at + n_candidates : at + n_candidates + n_refused
    ].tolist()


def codes(answer: np.ndarray, n: int, n_candidates: int) -> np.ndarray:
    """The outcome codes (uint8 per candidate) the fused kernel wrote into an answer buffer."""
    return answer[HEAD + 4 * n + 2 * n_candidates :].view(np.uint8)[:n_candidates]


@njit(**_JIT)
def _select_into(
    code, order, stored_order, items, scores, reasons, tag_off, tag_ids, brand_id, category_id,
    plan, out,
):  # fmt: skip
    kinds, values, caps, counts = _groups(plan)
    n = plan[P_N]
    n_groups = kinds.shape[0]
    n_rows = code.shape[0] if stored_order else order.shape[0]
    before = counts.copy() if n == 0 else counts  # (n == 0: report only, count nothing)
    at_items, at_reasons, at_refused = HEAD + n, HEAD + 2 * n, HEAD + 4 * n
    out_scores = out[HEAD + 3 * n : HEAD + 4 * n].view(np.float64)
    at_groups = at_refused + code.shape[0]
    n_chosen = n_refused = 0
    for pos in range(n_rows):
        if n_chosen >= n and n > 0:
            break  # refusals past the n-th chosen row do not matter
        if stored_order:
            if code[pos] != KEPT:
                continue
            row = pos
        else:
            row = order[pos]
        item = items[row]
        full = -1
        for g in range(n_groups):
            if _full_member(item, g, kinds, values, caps, counts, tag_off, tag_ids, brand_id,
                            category_id):  # fmt: skip
                full = g
                break
        if full >= 0:
            out[at_refused + n_refused] = row
            out[at_groups + n_refused] = full
            n_refused += 1
            continue
        for g in range(n_groups):
            if _in_group(item, kinds[g], values[g], tag_off, tag_ids, brand_id, category_id):
                counts[g] += 1
        if n_chosen < n:
            out[HEAD + n_chosen] = row
            out[at_items + n_chosen] = item
            out[at_reasons + n_chosen] = reasons[row]
            out_scores[n_chosen] = round6(scores[row])
            n_chosen += 1
    if n == 0:
        counts[:] = before
    out[0] = n_chosen
    out[1] = n_refused


# (items, tag_off, tag_ids, unavailable, marks, roles, seen, blocked_items, blocked_tags, plan)
_FILTER_ARGS = (_I32, _I64, _I32, _BOOL, _U8_RW, _U8_RW, _I32, _I32, _I32, _I64_RW)
# (scores, reasons, brand_id, category_id)
_SELECT_ARGS = (_F32, _U8, _I32, _I32)


@njit([_FILTER_ARGS + (_U8_RW, _I64_RW)], **_JIT)
def outcomes(
    items, tag_off, tag_ids, unavailable, marks, roles, seen, blocked_items, blocked_tags, plan,
    code, tally,
):  # fmt: skip
    """Writes into `code` (uint8 per candidate) KEPT, or the first filter the candidate fails
    in the order of the codes: unavailable > exclude_ids (plan) > not in include_ids (plan) >
    seen > blocked (items or tags) > forbidden tag (plan) > missing required tag (plan); and
    into `tally` (int64[8]) how many got each.

    `unavailable` is bool[n_items], or empty when every item is available; the plan's
    PLAN_REQUIRED_MISSING: a required tag the catalogue does not know, so nothing qualifies."""
    _outcomes_into(items, tag_off, tag_ids, unavailable, marks, roles, seen, blocked_items,
                   blocked_tags, plan, code, tally)  # fmt: skip


@njit([(_U8, _INTP, _b, _I32, _I64, _I32) + _SELECT_ARGS + (_I64_RW, _I64_RW)], **_JIT)
def select(
    code, order, stored_order, items, tag_off, tag_ids, scores, reasons, brand_id, category_id,
    plan, out,
):  # fmt: skip
    """Greedy top-n rows (n: the plan's) under the plan's caps: the rows of `order` (rank
    order), or with `stored_order` the KEPT rows (per `code`) in stored order.

    An item counts toward every group it belongs to; it is refused when one of its groups is
    full (the lowest-numbered full group is reported). Stops at the n-th chosen row: refusals
    past it do not matter. Writes the answer into `out` (layout: `HEAD`; scores `round6`); the
    plan's group counts are updated in place unless n == 0 (a scan that only reports)."""
    _select_into(code, order, stored_order, items, scores, reasons, tag_off, tag_ids, brand_id,
                 category_id, plan, out)  # fmt: skip


@njit([_FILTER_ARGS + _SELECT_ARGS + (_I64_RW,)], **_JIT)
def outcomes_select(
    items, tag_off, tag_ids, unavailable, marks, roles, seen, blocked_items, blocked_tags, plan,
    scores, reasons, brand_id, category_id, out,
):  # fmt: skip
    """`outcomes` (the codes into the end of the answer, the tally into its head), then
    `select` over the kept candidates in stored order, in one call (the common request: stored
    scores, candidates stored best first, no boost, seed or pin)."""
    n = plan[P_N]
    code = out[HEAD + 4 * n + 2 * items.shape[0] :].view(np.uint8)[: items.shape[0]]
    _outcomes_into(items, tag_off, tag_ids, unavailable, marks, roles, seen, blocked_items,
                   blocked_tags, plan, code, out[2:HEAD])  # fmt: skip
    no_order = np.empty(0, dtype=np.intp)
    _select_into(code, no_order, True, items, scores, reasons, tag_off, tag_ids, brand_id,
                 category_id, plan, out)  # fmt: skip


@njit([(_I32, _I64, _I32, _i)], **_JIT)
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


@njit([(_I32, _I32, _U8_RW)], **_JIT)
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


@njit([(_I32, _I64, _I32, _I32, _I32, _I32, _I32)], **_JIT)
def group_members(items, tag_off, tag_ids, brand_id, category_id, kinds, values):
    """bool[len(items), groups]: which `max_per_tag` groups ((kind, id) pairs) hold each item."""
    out = np.zeros((items.shape[0], kinds.shape[0]), dtype=np.bool_)
    for r in range(items.shape[0]):
        for g in range(kinds.shape[0]):
            out[r, g] = _in_group(items[r], kinds[g], values[g], tag_off, tag_ids, brand_id,
                                  category_id)  # fmt: skip
    return out


# --- the fused kernel reading a known user's rows itself ----------------------------------------
# Dispatch type-checks and unboxes every array argument of a call, ~1.5k instructions for a
# read-only memory map; `outcomes_select_user` takes three writable int64 arrays (the cheap case)
# and finds the snapshot's arrays through `ctx`: the address and length of each, captured once
# per live snapshot (`LiveSnapshot.kernel_ctx`, which also keeps the arrays alive).
(
    C_CAND_OFF, C_CAND_ITEM, C_CAND_SCORE, C_CAND_REASON, C_SEEN_OFF, C_SEEN_ITEM, C_TAG_OFF,
    C_TAG_IDS, C_ITEM_BITS, C_MARKS, C_ROLES, C_BRAND, C_CATEGORY,
) = range(0, 26, 2)  # fmt: skip
#: (address of the array, its length) pairs; the dtypes `kernel_ctx` checks.
CTX_SIZE = 26
CTX_DTYPES = (
    np.int64, np.int32, np.float32, np.uint8, np.int64, np.int32, np.int64, np.int32, np.int64,
    np.uint8, np.uint8, np.int32, np.int32,
)  # fmt: skip


def _pointer(ty):
    ptr = types.CPointer(ty)

    def typer(typingctx, address):
        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], context.get_value_type(ptr))

        return ptr(types.int64), codegen

    return typer


_ptr_i64 = intrinsic(_pointer(types.int64))
_ptr_i32 = intrinsic(_pointer(types.int32))
_ptr_f32 = intrinsic(_pointer(types.float32))
_ptr_u8 = intrinsic(_pointer(types.uint8))


#: Bits of a per-item word (`item_bits_into`): one per tag id below TAG_BITS, BIT_UNAVAILABLE,
#: and BIT_SLOW for an item whose tags those bits cannot stand for (a tag id >= TAG_BITS or out
#: of range, or a tag listed twice): such items are checked through the tag table as before.
TAG_BITS = 61
BIT_UNAVAILABLE, BIT_SLOW = 61, 62


@njit([(_I64, _I32, _BOOL, types.int64, _I64_RW)], **_JIT)
def item_bits_into(tag_off, tag_ids, unavailable, n_tags, out):
    """out[item]: the item's word (bits: `TAG_BITS`), for every item of `out`."""
    any_unavailable = unavailable.shape[0] > 0
    for item in range(out.shape[0]):
        word = 0
        for j in range(tag_off[item], tag_off[item + 1]):
            t = tag_ids[j]
            if t < 0 or t >= TAG_BITS or t >= n_tags or (word >> t) & 1:
                word |= 1 << BIT_SLOW
            else:
                word |= 1 << t
        if any_unavailable and unavailable[item]:
            word |= 1 << BIT_UNAVAILABLE
        out[item] = word


@njit(inline="always", **_JIT)
def _popcount(x):
    n = 0
    while x:
        x &= x - 1
        n += 1
    return n


@njit(**_JIT)
def _outcomes_bits_into(
    items, bits, tag_off, tag_ids, marks, roles, seen, blocked_items, blocked_tags, plan, code,
    tally,
):  # fmt: skip
    """`_outcomes_into` with unavailability and tags read from the items' words (`bits`) when
    the request's tags have bits, else from the tag table (an item's BIT_SLOW: always)."""
    exclude, include, forbidden_tags, required_tags = _lists(plan)
    has_include = (plan[P_FLAGS] & PLAN_HAS_INCLUDE) != 0
    required_missing = (plan[P_FLAGS] & PLAN_REQUIRED_MISSING) != 0
    _mark_items(marks, exclude, seen, blocked_items, include)
    fmask = bmask = rmask = 0
    word_tags = True  # (every tag of the request has a bit)
    for t in forbidden_tags:
        roles[t] |= _R_FORBIDDEN
        if 0 <= t < TAG_BITS:
            fmask |= 1 << t
        else:
            word_tags = False
    for t in blocked_tags:
        roles[t] |= _R_BLOCKED
        if 0 <= t < TAG_BITS:
            bmask |= 1 << t
        else:
            word_tags = False
    n_required = 0
    for t in required_tags:
        if not roles[t] & _R_REQUIRED:
            n_required += 1
        roles[t] |= _R_REQUIRED
        if 0 <= t < TAG_BITS:
            rmask |= 1 << t
        else:
            word_tags = False
    check_tags = forbidden_tags.shape[0] + blocked_tags.shape[0] + n_required > 0
    tag_step = check_tags or required_missing

    tally[:] = 0
    for r in range(items.shape[0]):
        item = items[r]
        word = bits[item]
        c = KEPT
        if (word >> BIT_UNAVAILABLE) & 1:
            c = UNAVAILABLE
        else:
            m = marks[item]
            if m & _M_EXCLUDED:
                c = EXCLUDED
            elif has_include and not m & _M_INCLUDED:
                c = NOT_INCLUDED
            elif m & _M_SEEN:
                c = SEEN
            elif m & _M_BLOCKED:
                c = BLOCKED
            elif tag_step:
                if word_tags and not (word >> BIT_SLOW) & 1:
                    if word & bmask:
                        c = BLOCKED
                    elif word & fmask:
                        c = FORBIDDEN_TAG
                    elif required_missing or _popcount(word & rmask) < n_required:
                        c = MISSING_TAG
                else:
                    c = _tag_outcome(item, tag_off, tag_ids, roles, n_required, required_missing)
        code[r] = c
        tally[c] += 1

    _clear_marks(
        marks, roles, exclude, seen, blocked_items, include, forbidden_tags, blocked_tags,
        required_tags,
    )  # fmt: skip


@njit(inline="always", **_JIT)
def _in_group_bits(item, word, kind, value, tag_off, tag_ids, brand_id, category_id):
    if kind == GROUP_TAG and 0 <= value < TAG_BITS and not (word >> BIT_SLOW) & 1:
        return (word >> value) & 1 == 1
    return _in_group(item, kind, value, tag_off, tag_ids, brand_id, category_id)


@njit(**_JIT)
def _select_bits_into(
    code, items, bits, scores, reasons, tag_off, tag_ids, brand_id, category_id, plan, out
):
    """`_select_into` over the kept rows in stored order, a tag group's membership read from
    the items' words where they tell it."""
    kinds, values, caps, counts = _groups(plan)
    n = plan[P_N]
    n_groups = kinds.shape[0]
    before = counts.copy() if n == 0 else counts  # (n == 0: report only, count nothing)
    at_items, at_reasons, at_refused = HEAD + n, HEAD + 2 * n, HEAD + 4 * n
    out_scores = out[HEAD + 3 * n : HEAD + 4 * n].view(np.float64)
    at_groups = at_refused + code.shape[0]
    n_chosen = n_refused = 0
    for row in range(code.shape[0]):
        if n_chosen >= n and n > 0:
            break  # refusals past the n-th chosen row do not matter
        if code[row] != KEPT:
            continue
        item = items[row]
        word = bits[item] if n_groups else 0
        full = -1
        for g in range(n_groups):
            if counts[g] >= caps[g] and _in_group_bits(
                item, word, kinds[g], values[g], tag_off, tag_ids, brand_id, category_id
            ):
                full = g
                break
        if full >= 0:
            out[at_refused + n_refused] = row
            out[at_groups + n_refused] = full
            n_refused += 1
            continue
        for g in range(n_groups):
            if _in_group_bits(item, word, kinds[g], values[g], tag_off, tag_ids, brand_id,
                              category_id):  # fmt: skip
                counts[g] += 1
        if n_chosen < n:
            out[HEAD + n_chosen] = row
            out[at_items + n_chosen] = item
            out[at_reasons + n_chosen] = reasons[row]
            out_scores[n_chosen] = round6(scores[row])
            n_chosen += 1
    if n == 0:
        counts[:] = before
    out[0] = n_chosen
    out[1] = n_refused


@njit([(_I64_RW, _I64_RW, _I64_RW)], **_JIT)
def outcomes_select_user(ctx, plan, out):
    """`outcomes_select` over the candidates of the plan's user (and with the user's seen
    items), read from the snapshot arrays of `ctx`; the plan's tail (`user_tail`) names the
    user and the rules' blocked items and tags. Same answer buffer as `outcomes_select`."""
    tail = PLAN_HEAD + plan[P_EXCLUDE] + plan[P_INCLUDE] + plan[P_FORBIDDEN] + plan[P_REQUIRED]
    tail += 4 * plan[P_GROUPS]
    user = plan[tail]
    n_bi = plan[tail + 1]
    n_bt = plan[tail + 2]
    blocked_items = plan[tail + 3 : tail + 3 + n_bi]
    blocked_tags = plan[tail + 3 + n_bi : tail + 3 + n_bi + n_bt]
    cand_off = carray(_ptr_i64(ctx[C_CAND_OFF]), ctx[C_CAND_OFF + 1])
    seen_off = carray(_ptr_i64(ctx[C_SEEN_OFF]), ctx[C_SEEN_OFF + 1])
    a, b = cand_off[user], cand_off[user + 1]
    sa, sb = seen_off[user], seen_off[user + 1]
    if not (0 <= a <= b <= ctx[C_CAND_ITEM + 1] and 0 <= sa <= sb <= ctx[C_SEEN_ITEM + 1]):
        raise IndexError("candidate offsets out of range")
    items = carray(_ptr_i32(ctx[C_CAND_ITEM]), ctx[C_CAND_ITEM + 1])[a:b]
    scores = carray(_ptr_f32(ctx[C_CAND_SCORE]), ctx[C_CAND_SCORE + 1])[a:b]
    reasons = carray(_ptr_u8(ctx[C_CAND_REASON]), ctx[C_CAND_REASON + 1])[a:b]
    seen = carray(_ptr_i32(ctx[C_SEEN_ITEM]), ctx[C_SEEN_ITEM + 1])[sa:sb]
    tag_off = carray(_ptr_i64(ctx[C_TAG_OFF]), ctx[C_TAG_OFF + 1])
    tag_ids = carray(_ptr_i32(ctx[C_TAG_IDS]), ctx[C_TAG_IDS + 1])
    bits = carray(_ptr_i64(ctx[C_ITEM_BITS]), ctx[C_ITEM_BITS + 1])
    marks = carray(_ptr_u8(ctx[C_MARKS]), ctx[C_MARKS + 1])
    roles = carray(_ptr_u8(ctx[C_ROLES]), ctx[C_ROLES + 1])
    brand_id = carray(_ptr_i32(ctx[C_BRAND]), ctx[C_BRAND + 1])
    category_id = carray(_ptr_i32(ctx[C_CATEGORY]), ctx[C_CATEGORY + 1])
    n = plan[P_N]
    n_cand = b - a
    code = out[HEAD + 4 * n + 2 * n_cand :].view(np.uint8)[:n_cand]
    _outcomes_bits_into(items, bits, tag_off, tag_ids, marks, roles, seen, blocked_items,
                        blocked_tags, plan, code, out[2:HEAD])  # fmt: skip
    _select_bits_into(code, items, bits, scores, reasons, tag_off, tag_ids, brand_id,
                      category_id, plan, out)  # fmt: skip
