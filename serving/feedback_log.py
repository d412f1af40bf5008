"""Human feedback labels (user, item, relevant | not_relevant) of one tenant, in a durable
segment log (`serving.segment_log`) under ``serving/feedback/<tenant>/``."""

from __future__ import annotations

import os
from typing import Any

from recsys.tenancy import check_tenant
from serving.segment_log import SegmentLog


class FeedbackLog:
    """The labels of one tenant, held in memory for reading back (labels are few compared with
    events); every process appends to the one log and catches up with the others."""

    def __init__(self, data_root: str, tenant: str) -> None:
        self.tenant = tenant
        self.labels: dict[str, dict[str, Any]] = {}
        self.log = SegmentLog(
            os.path.join(data_root, "serving", "feedback", check_tenant(tenant)), self._on_record
        )
        self.log.refresh()

    def _on_record(self, seg: int, offset: int, rec: dict) -> None:
        if rec.get("k") == "f":
            self.labels.setdefault(rec["id"], rec)

    def add(self, label: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Append `label` (which has an `id`) durably; (stored record, created?)."""
        outcome: dict[str, Any] = {}

        def prepare() -> list[dict]:
            existing = self.labels.get(label["id"])
            if existing is not None:
                outcome["rec"], outcome["new"] = existing, False
                return []
            rec = {"k": "f", **label}
            outcome["rec"], outcome["new"] = rec, True
            return [rec]

        self.log.append(prepare)
        return outcome["rec"], outcome["new"]

    def all(self) -> list[dict[str, Any]]:
        """Every label, in the order they were first stored."""
        self.log.refresh()
        return list(self.labels.values())

    def get(self, feedback_id: str) -> dict[str, Any] | None:
        """The stored label with this id, or None."""
        self.log.refresh()
        return self.labels.get(feedback_id)
