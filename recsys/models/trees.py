"""A fitted scikit-learn HistGradientBoostingClassifier as plain arrays, and a numpy predictor.

Pickled scikit-learn models break across library versions and run code on load; a boosted
tree ensemble is just node tables, so it is saved as arrays and evaluated here, vectorized
over rows (one loop over trees and depth, never over rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TreeEnsemble:
    """Binary-classification boosted trees: ``proba = sigmoid(baseline + sum(tree values))``.

    Node arrays are concatenated over trees; ``roots[t]`` is the first node of tree t, and
    ``left`` / ``right`` are global node indices.
    """

    feature: np.ndarray  # int64
    threshold: np.ndarray  # float64, go left when x <= threshold
    missing_left: np.ndarray  # bool, where NaN goes
    left: np.ndarray  # int64
    right: np.ndarray  # int64
    is_leaf: np.ndarray  # bool
    value: np.ndarray  # float64
    roots: np.ndarray  # int64
    max_depth: int
    baseline: float

    @classmethod
    def from_sklearn(cls, model) -> TreeEnsemble:
        """Export a fitted binary HistGradientBoostingClassifier (numeric features only)."""
        if len(model.classes_) != 2:
            raise ValueError("only binary classifiers are supported")
        if getattr(model, "is_categorical_", None) is not None and np.any(model.is_categorical_):
            raise ValueError("categorical features are not supported")
        parts, roots, offset = [], [], 0
        for (predictor,) in model._predictors:
            nodes = predictor.nodes
            roots.append(offset)
            parts.append((nodes, offset))
            offset += len(nodes)
        cat = lambda f, dtype: np.concatenate([f(n, o) for n, o in parts]).astype(dtype)  # noqa: E731
        return cls(
            feature=cat(lambda n, o: n["feature_idx"], np.int64),
            threshold=cat(lambda n, o: n["num_threshold"], np.float64),
            missing_left=cat(lambda n, o: n["missing_go_to_left"], bool),
            left=cat(lambda n, o: n["left"].astype(np.int64) + o, np.int64),
            right=cat(lambda n, o: n["right"].astype(np.int64) + o, np.int64),
            is_leaf=cat(lambda n, o: n["is_leaf"], bool),
            value=cat(lambda n, o: n["value"], np.float64),
            roots=np.array(roots, np.int64),
            max_depth=int(max((int(n["depth"].max()) for n, _ in parts), default=0)),
            baseline=float(np.ravel(model._baseline_prediction)[0]),
        )

    def decision_function(self, x: np.ndarray) -> np.ndarray:
        """Raw margin per row."""
        x = np.asarray(x, dtype=np.float64)
        rows = np.arange(len(x))
        out = np.full(len(x), self.baseline)
        for root in self.roots:
            node = np.full(len(x), root, dtype=np.int64)
            for _ in range(self.max_depth):
                leaf = self.is_leaf[node]
                if leaf.all():
                    break
                v = x[rows, self.feature[node]]
                go_left = np.where(np.isnan(v), self.missing_left[node], v <= self.threshold[node])
                node = np.where(leaf, node, np.where(go_left, self.left[node], self.right[node]))
            out += self.value[node]
        return out

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Probability of the positive class per row."""
        return 1.0 / (1.0 + np.exp(-self.decision_function(x)))

    def to_arrays(self, prefix: str = "tree_") -> dict[str, np.ndarray]:
        d = {
            k: getattr(self, k)
            for k in (
                "feature",
                "threshold",
                "missing_left",
                "left",
                "right",
                "is_leaf",
                "value",
                "roots",
            )
        }
        d["meta"] = np.array([self.max_depth, self.baseline], np.float64)
        return {prefix + k: v for k, v in d.items()}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], prefix: str = "tree_") -> TreeEnsemble:
        a = {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
        meta = a.pop("meta")
        return cls(**a, max_depth=int(meta[0]), baseline=float(meta[1]))
