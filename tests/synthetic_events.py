"""Synthetic events with a known answer: two taste clusters that never mix."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl

from recsys.contract import EVENT_SCHEMA, ITEM_SCHEMA

START = datetime(2024, 1, 1, tzinfo=UTC)

#: A `HybridConfig` small enough for tests: few factors and epochs, a small ranker, no grids,
#: and the ranked list served whatever validation says (tests of the ranker).
FAST_HYBRID = dict(
    lightfm={"no_components": 8, "epochs": 6, "seed": 1, "num_threads": 1},
    lightfm_early_stopping={"eval_every": 2, "patience": 1, "max_users": 50},
    ranker={"max_iter": 20, "max_leaf_nodes": 7, "min_samples_leaf": 5},
    tune={},
    candidates_per_generator=8,
    min_ranker_positives=5,
    served="hybrid",
)


def cluster_events(
    rng: np.random.Generator, n_users: int = 40, n_items: int = 20, per_user: int = 6
) -> pl.DataFrame:
    """User u belongs to cluster u % 2 and only touches items of its cluster (item i is in
    cluster i < n_items // 2 ? 0 : 1). Lower item ids are more popular inside each cluster."""
    rows = []
    half = n_items // 2
    p = np.linspace(2.0, 1.0, half)
    p /= p.sum()
    k = 0
    for u in range(n_users):
        base = 0 if u % 2 == 0 else half
        picks = rng.choice(half, size=per_user, replace=False, p=p) + base
        for i in picks:
            rows.append(
                {
                    "event_id": f"e{k}",
                    "tenant": "t",
                    "user_id": f"u{u}",
                    "item_id": f"i{int(i)}",
                    "event_type": "purchase" if k % 5 == 0 else "view",
                    "timestamp": START + timedelta(minutes=k),
                    "value": None,
                    "session_id": None,
                    "context": None,
                }
            )
            k += 1
    # spread every user's events over the whole period, so later windows hold known users
    minutes = rng.permutation(len(rows))
    for row, minute in zip(rows, minutes, strict=True):
        row["timestamp"] = START + timedelta(minutes=int(minute))
    return pl.DataFrame(rows, schema=EVENT_SCHEMA)


def cluster_items(n_items: int = 20) -> pl.DataFrame:
    half = n_items // 2
    return pl.DataFrame(
        [
            {
                "item_id": f"i{i}",
                "title": None,
                "category": "a" if i < half else "b",
                "brand": None,
                "price": float(i),
                "tags": ["x" if i < half else "y"],
                "available": True,
                "created_at": START,
                "attributes": None,
            }
            for i in range(n_items)
        ],
        schema=ITEM_SCHEMA,
    )


def make_events(rows: list[tuple[str, str, str, int]]) -> pl.DataFrame:
    """(user, item, type, minute) tuples as contract events."""
    return pl.DataFrame(
        [
            {
                "event_id": f"e{n}",
                "tenant": "t",
                "user_id": u,
                "item_id": i,
                "event_type": t,
                "timestamp": START + timedelta(minutes=m),
                "value": None,
                "session_id": None,
                "context": None,
            }
            for n, (u, i, t, m) in enumerate(rows)
        ],
        schema=EVENT_SCHEMA,
    )


#: Online-retail item titles (titles only, upper case): a catalogue of a kind the demo never
#: produces, for the content-embedding tests.
RETAIL = [
    "WHITE HANGING HEART T-LIGHT HOLDER",
    "GLASS STAR FROSTED T-LIGHT HOLDER",
    "RED WOOLLY HOTTIE WHITE HEART",
    "KNITTED UNION FLAG HOT WATER BOTTLE",
    "HAND WARMER UNION JACK",
    "HAND WARMER RED POLKA DOT",
    "SET 7 BABUSHKA NESTING BOXES",
    "ASSORTED COLOUR BIRD ORNAMENT",
    "POPPY'S PLAYHOUSE BEDROOM",
    "POPPY'S PLAYHOUSE KITCHEN",
    "FELTCRAFT PRINCESS CHARLOTTE DOLL",
    "IVORY KNITTED MUG COSY",
    "BOX OF 6 ASSORTED COLOUR TEASPOONS",
    "BOX OF VINTAGE JIGSAW BLOCKS",
    "BOX OF VINTAGE ALPHABET BLOCKS",
    "HOME BUILDING BLOCK WORD",
    "LOVE BUILDING BLOCK WORD",
    "RECIPE BOX WITH METAL HEART",
    "DOORMAT NEW ENGLAND",
    "JAM MAKING SET WITH JARS",
    "RED COAT RACK PARIS FASHION",
    "YELLOW COAT RACK PARIS FASHION",
    "BLUE COAT RACK PARIS FASHION",
    "ALARM CLOCK BAKELIKE PINK",
    "ALARM CLOCK BAKELIKE RED",
    "ALARM CLOCK BAKELIKE GREEN",
    "PANDA AND BUNNIES STICKER SHEET",
    "STARS GIFT TAPE",
    "INFLATABLE POLITICAL GLOBE",
    "VINTAGE HEADS AND TAILS CARD GAME",
]


def saved_files(folder) -> dict[str, object]:
    """Every file of a saved model's `folder`, by its path in it: the bytes, and a JSON file's
    content without its timings (any key naming seconds), to compare two fits file for file."""

    def untimed(x):
        if isinstance(x, dict):
            return {k: untimed(v) for k, v in x.items() if "seconds" not in k}
        return [untimed(v) for v in x] if isinstance(x, list) else x

    out: dict[str, object] = {}
    for path, _, names in os.walk(folder):
        for name in names:
            full = os.path.join(path, name)
            with open(full, "rb") as f:
                data = f.read()
            out[os.path.relpath(full, folder)] = (
                untimed(json.loads(data)) if name.endswith(".json") else data
            )
    return out
