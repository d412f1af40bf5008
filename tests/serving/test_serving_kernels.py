"""`kernels.outcomes_select_user` (reads a user's rows through the addresses of `ctx`) answers
exactly as `kernels.outcomes_select` over the same rows passed as arrays, on random snapshots
and random plans (filters, blocked items and tags, caps, any n); and fails with IndexError on
offsets that point past the arrays."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from serving import kernels as K
from serving.snapshot import _kernel_ctx


def random_snapshot(rng, n_users=40, n_items=300, n_tags=12, unavailable=True, duplicates=False):
    def csr(n_rows, max_len, pool, sort=False):
        lens = rng.integers(0, max_len + 1, n_rows)
        rows = [rng.choice(pool, size=m, replace=False) for m in lens]
        if sort:
            rows = [np.sort(r) for r in rows]
        off = np.zeros(n_rows + 1, dtype=np.int64)
        off[1:] = np.cumsum(lens)
        flat = np.concatenate(rows) if rows else np.zeros(0)
        return off, flat.astype(np.int32)

    cand_off, cand_item = csr(n_users, 40, n_items)
    seen_off, seen_item = csr(n_users, 6, n_items, sort=True)
    tag_off, tag_ids = csr(n_items, 4, n_tags)
    if duplicates:  # (some items list a tag twice: they take the tag table's path)
        twice = rng.random(tag_ids.shape[0]) < 0.1
        tag_ids[1:][twice[1:]] = tag_ids[:-1][twice[1:]]
    snap = SimpleNamespace(
        candidate_offsets=cand_off,
        candidate_items=cand_item,
        candidate_scores=np.sort(rng.random(cand_item.shape[0]).astype(np.float32))[::-1].copy(),
        candidate_reasons=rng.integers(0, 5, cand_item.shape[0]).astype(np.uint8),
        seen_offsets=seen_off,
        seen_items=seen_item,
    )
    live = SimpleNamespace(
        tag_offsets=tag_off,
        tag_ids=tag_ids,
        unavailable_or_empty=(rng.random(n_items) < 0.1) if unavailable else np.zeros(0, bool),
        marks=np.zeros(n_items, np.uint8),
        roles=np.zeros(n_tags, np.uint8),
        brand_id=rng.integers(-1, 6, n_items).astype(np.int32),
        category_id=rng.integers(-1, 4, n_items).astype(np.int32),
        item_bits=np.zeros(n_items, np.int64),
    )
    K.item_bits_into(tag_off, tag_ids, live.unavailable_or_empty, n_tags, live.item_bits)
    return snap, live


def random_plan(rng, n_items, n_tags):
    def some(n, hi):
        return rng.choice(hi, size=rng.integers(0, n + 1), replace=False).tolist()

    exclude, include = some(8, n_items), some(60, n_items)
    forbidden = some(2, n_tags)
    required = [t for t in some(2, n_tags) if t not in forbidden]
    flags = (K.PLAN_HAS_INCLUDE if include and rng.random() < 0.5 else 0) | (
        K.PLAN_REQUIRED_MISSING if rng.random() < 0.05 else 0
    )
    if not flags & K.PLAN_HAS_INCLUDE:
        include = []
    n_groups = int(rng.integers(0, 4))
    kinds = rng.integers(0, 3, n_groups).tolist()
    values = [int(rng.integers(0, (n_tags, 6, 4)[k])) for k in kinds]
    caps = rng.integers(1, 4, n_groups).tolist()
    n = int(rng.integers(0, 25))
    head = [n, flags, n_groups, len(exclude), len(include), len(forbidden), len(required)]
    plan = head + exclude + include + forbidden + required + kinds + values + caps
    plan += [0] * n_groups
    blocked_items, blocked_tags = some(5, n_items), some(2, n_tags)
    return plan, blocked_items, blocked_tags


def answer_parts(out, n, n_cand):
    n_chosen, n_refused = int(out[0]), int(out[1])
    at = K.HEAD + 4 * n
    return (
        out[: K.HEAD].tolist(),
        [out[K.HEAD + j * n : K.HEAD + j * n + n_chosen].tolist() for j in range(4)],
        out[at : at + n_refused].tolist(),
        out[at + n_cand : at + n_cand + n_refused].tolist(),
        K.codes(out, n, n_cand).tolist(),
    )


@pytest.mark.parametrize("seed", range(8))
def test_user_kernel_answers_as_the_array_kernel(seed):
    rng = np.random.default_rng(seed)
    # tag ids below and above kernels.TAG_BITS (the items' words and the tag table)
    n_tags = (12, 90)[seed % 4 // 2]
    snap, live = random_snapshot(
        rng, n_tags=n_tags, unavailable=seed % 2 == 0, duplicates=seed % 3 == 0
    )
    ctx, arrays = _kernel_ctx(snap, live)
    assert ctx is not None and len(arrays) == K.CTX_SIZE // 2
    n_items, n_tags = live.marks.shape[0], live.roles.shape[0]
    for _ in range(300):
        user = int(rng.integers(0, snap.candidate_offsets.shape[0] - 1))
        plan, blocked_items, blocked_tags = random_plan(rng, n_items, n_tags)
        a, b = snap.candidate_offsets[user : user + 2]
        sa, sb = snap.seen_offsets[user : user + 2]
        n, n_cand = plan[0], int(b - a)
        expected = np.full(K.answer_size(n, n_cand), -7, dtype=np.int64)
        old_plan = np.array(plan, np.int64)
        K.outcomes_select(
            snap.candidate_items[a:b], live.tag_offsets, live.tag_ids, live.unavailable_or_empty,
            live.marks, live.roles, snap.seen_items[sa:sb],
            np.array(blocked_items, np.int32), np.array(blocked_tags, np.int32), old_plan,
            snap.candidate_scores[a:b], snap.candidate_reasons[a:b], live.brand_id,
            live.category_id,
            expected,
        )  # fmt: skip
        got = np.full_like(expected, -7)
        tail = [user, len(blocked_items), len(blocked_tags), *blocked_items, *blocked_tags]
        new_plan = np.array(plan + tail, np.int64)
        K.outcomes_select_user(ctx, new_plan, got)
        assert answer_parts(got, n, n_cand) == answer_parts(expected, n, n_cand)
        assert new_plan[: old_plan.shape[0]].tolist() == old_plan.tolist()  # (the counts)
        assert not live.marks.any() and not live.roles.any()


def test_user_kernel_refuses_offsets_past_the_arrays():
    rng = np.random.default_rng(1)
    snap, live = random_snapshot(rng)
    snap.candidate_offsets = snap.candidate_offsets.copy()
    snap.candidate_offsets[3] = snap.candidate_items.shape[0] + 5
    ctx, _ = _kernel_ctx(snap, live)
    plan = np.array([5, 0, 0, 0, 0, 0, 0, 2, 0, 0], np.int64)  # user 2: rows past the end
    with pytest.raises(IndexError):
        K.outcomes_select_user(ctx, plan, np.zeros(K.answer_size(5, 100), np.int64))
    plan[-3] = len(snap.candidate_offsets)  # a user row past the offsets
    with pytest.raises(IndexError):
        K.outcomes_select_user(ctx, plan, np.zeros(K.answer_size(5, 100), np.int64))


def test_no_ctx_for_arrays_the_kernel_cannot_read():
    rng = np.random.default_rng(2)
    snap, live = random_snapshot(rng)
    live.tag_ids = live.tag_ids.astype(np.int64)
    assert _kernel_ctx(snap, live) == (None, ())


def test_all_item_ids_decode_as_one_by_one():
    """`_decoded_ids` of a snapshot's id bytes and offsets (`Snapshot.item_id_bytes`) gives
    each id as decoding it alone does; bytes that do not decode give None."""
    from serving.snapshot import _decoded_ids

    for ids in (["a0", "a1", "b"], ["a", "é", "x", "日本", "", "z"]):
        data = b"".join(i.encode() for i in ids)
        offsets = np.cumsum([0] + [len(i.encode()) for i in ids]).tolist()
        assert _decoded_ids(data, offsets) == ids
    assert _decoded_ids(b"\xff", [0, 1]) is None
