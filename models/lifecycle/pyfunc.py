"""The MLflow model of an Encore recommender, logged as *Models From Code* (no pickled Python objects).

MLflow stores this file itself; loading it imports ``models.recommender`` and restores the weights from the
``recommender`` artifact (config.json, vocab.json, state_dict.pt loaded with ``weights_only=True``), so
``mlflow models predict`` and the online service read the same bytes.

Input: one row per user with ``item_ids`` (list of raw item ids, oldest first), optional ``event_types``
and ``timestamps_ms`` (lists of the same length) and optional ``k``. Output: ``items`` and ``scores`` lists.

A ranker of another family (``models.served_ranker.ServedRanker``: Wukong, DLRM, the HSTU ranker) ranks what it
is given instead of retrieving: each row also has ``user_id`` and ``candidates`` (raw item ids), optionally
``now_ms`` (the request time); the output's ``items`` are the candidates, ``scores`` their P(task). One that
reads user and item attributes takes them as columns of its input (``models.served_ranker.ATTRIBUTE_COLUMNS``:
``gender``, ``age``, ``occupation`` of the row's user; ``genres`` and ``album`` lists aligned with
``candidates``), so the model runs wherever MLflow loads it, with no online store; the service binds its
online reader instead (``ServedRanker.bind_attributes``).
"""

from __future__ import annotations

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


class EncoreRecommenderModel(PythonModel):
    def load_context(self, context) -> None:  # noqa: ANN001 - MLflow's signature
        from models.served_ranker import load_artifact

        self.recommender = load_artifact(context.artifacts["recommender"])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:  # noqa: ANN001
        return predict_frame(self.recommender, model_input, k=int((params or {}).get("k", 10)))


def predict_frame(recommender, model_input: pd.DataFrame, k: int = 10) -> pd.DataFrame:  # noqa: ANN001
    """The pyfunc's contract on a loaded ``Recommender`` (also used to build the logged signature)."""
    histories = []
    for row in model_input.to_dict(orient="records"):
        items = [int(i) for i in _as_list(row.get("item_ids"))]
        histories.append(
            {
                "item_ids": items,
                "event_types": [str(t) for t in _as_list(row.get("event_types"))] or ["listen"] * len(items),
                "timestamps_ms": [int(t) for t in _as_list(row.get("timestamps_ms"))] or list(range(len(items))),
            }
        )
    if not hasattr(recommender, "recommend"):  # a ranker of candidates (ServedRanker)
        from models.served_ranker import request_attributes

        rows = model_input.to_dict(orient="records")
        candidates = [[int(i) for i in _as_list(row.get("candidates"))] for row in rows]
        for h, row in zip(histories, rows):
            h["user_id"] = int(row["user_id"])
        now = int(rows[0]["now_ms"]) if rows and "now_ms" in rows[0] else None
        probs = recommender.score_candidates(histories, candidates, now_ms=now,
                                             attributes=request_attributes(rows, candidates))
        return pd.DataFrame({"items": candidates,
                             "scores": [[float(x) for x in (p if p is not None else [])] for p in probs]})
    if "k" in model_input.columns and len(model_input):
        k = int(model_input["k"].iloc[0])
    results = recommender.recommend(histories, k=k, exclude_seen=True)
    return pd.DataFrame(
        {"items": [[int(i) for i, _ in r] for r in results], "scores": [[float(s) for _, s in r] for r in results]}
    )


def _as_list(value: object) -> list:
    if value is None:
        return []
    if isinstance(value, float) and value != value:  # NaN from a missing column
        return []
    return list(value)  # type: ignore[arg-type]


mlflow.models.set_model(EncoreRecommenderModel())
