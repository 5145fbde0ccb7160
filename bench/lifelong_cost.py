"""The cost of lifelong histories with VISTA's cached summaries (issue #36, the cost bar): ``encore bench
lifelong-cost``.

Three groups of synthetic users, with 200, 10,000 and 100,000 events each (uniform random items, types and
times over 0.1 to 10 years: the cost does not depend on what the events are). A small VISTA model with its
initial weights (cost, not quality) is registered in a real MLflow registry; every user's state is refreshed
from scratch with ``models.summaries.refresh_summaries`` (single thread: the summarisation throughput), the
backfill recorded, the model promoted through ``promote`` (the gate's tie), and a real ``encore serve``
started on it (embedded Kafka and MLflow, no experiment: every request on the VISTA champion). Then, per
group, the online store is loaded with that group's rows (``user_history``: the last 200 events;
``user_summary``: the cached state) under the same user ids, and ``bench.serve``'s open-loop driver sends
``--rate`` requests/s from a separate process.

Figures: per group p50/p99 latency (medians over ``--rounds`` rounds, in which the groups alternate, so that
the box's drift hits each alike; each round's figures too), the answers' ``summary`` marks (sampled after the
load), stored bytes per user (the state record and the whole online row); the summarisation throughput (events folded per second, one
thread) beside ``--ingest-rate`` (ingest's measured ~30,000 events/s on the 2-core box) and the time of an
incremental refresh that folds a few new events per user. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

GROUPS = (200, 10_000, 100_000)  # events per user
YEAR_MS = 365 * 86_400_000
T_END = 1_767_225_600_000  # 2026-01-01: every history ends here (recent events for every group alike)
TYPES = np.array(["listen", "listen", "listen", "like", "skip"])


def synthetic_events(users: int, events: int, *, first_user: int, items: int, seed: int) -> pd.DataFrame:
    """``users`` users of ``events`` events each (ids first_user..), over events / 10,000 years (0.1 to 10)."""
    rng = np.random.default_rng(seed)
    span = int(min(max(events / 10_000, 0.1), 10.0) * YEAR_MS)
    n = users * events
    ts = T_END - rng.integers(0, span, n)
    return pd.DataFrame({"user_id": np.repeat(np.arange(first_user, first_user + users), events).astype(np.int64),
                         "item_id": rng.integers(1, items + 1, n).astype(np.int64),
                         "event_type": TYPES[rng.integers(0, len(TYPES), n)],
                         "timestamp_ms": ts.astype(np.int64)})


def history_rows(events: pd.DataFrame, length: int, user_ids: np.ndarray) -> list[dict]:
    """The online ``user_history`` rows of ``events``' users, stored under ``user_ids`` (one per user, in
    order): the last ``length`` events in the online order, as ingest writes them."""
    from datetime import datetime, timezone

    ev = events.sort_values(["user_id", "timestamp_ms", "item_id", "event_type"]).groupby("user_id").tail(length)
    rows = []
    for uid, (_, g) in zip(user_ids, ev.groupby("user_id", sort=True)):
        ts = g["timestamp_ms"].tolist()
        rows.append({"user_id": int(uid), "item_ids": g["item_id"].tolist(), "event_types": g["event_type"].tolist(),
                     "timestamps_ms": ts, "played_ratios": [-1.0] * len(ts), "length": len(ts),
                     "event_timestamp": datetime.fromtimestamp(ts[-1] / 1000, timezone.utc)})
    return rows


def online_row_bytes(row: pd.Series) -> int:
    """Bytes of one user's ``user_summary`` values: the state record, the version string and the numbers."""
    return (len(row["state"]) + len(row["summariser_version"]) + 3 * 8 + len(row["summarised_until_type"]))


def vista_recommender(items: int, *, dim: int, tokens: int, max_len: int, seed: int = 0,
                      target_attention: bool = False):  # noqa: ANN201
    """A small VISTA model with its initial weights (a cost benchmark needs no training). ``target_attention``:
    every item also attends to the tokens (its prior is computed over the whole catalogue per request, even
    while its untrained value weights make it 0)."""
    import torch

    from models.data import ItemVocab
    from models.recipe import resolve_recipe
    from models.recommender import Recommender, build_model

    torch.manual_seed(seed)
    cfg = resolve_recipe("vista", dim=dim, vista_tokens=tokens, max_len=max_len, blocks=2, heads=1,
                         vista_target_attention=target_attention)
    vocab = ItemVocab.build(np.arange(1, items + 1))
    return Recommender(build_model(cfg.model_config(len(vocab))), vocab)


def summary_marks(url: str, users: int, n: int = 40) -> dict[str, int]:
    """The ``summary`` field of ``n`` answers (one request at a time, after the load)."""
    import httpx

    marks: dict[str, int] = {}
    with httpx.Client(timeout=10) as http:
        for i in range(n):
            doc = http.post(f"{url}/v1/recommendations", json={"user_id": i % users, "k": 10}).json()
            key = str(doc.get("summary", doc.get("source")))
            marks[key] = marks.get(key, 0) + 1
    return marks


def run(*, users: tuple[int, int, int], items: int, dim: int, tokens: int, max_len: int, rate: float,
        duration_s: float, warmup_s: float, rounds: int, ingest_rate: float, data_dir: Path | None = None,
        target_attention: bool = False, log=print) -> dict:  # noqa: ANN001
    import torch

    torch.set_num_threads(1)  # the summarisation throughput is one thread's
    from bench.serve import driver_result, spawn_driver
    from features.feature_repo import feature_store, write_online
    from infra.services import EmbeddedServices
    from infra.settings import EncoreSettings
    from models.lifecycle.promotion import promote
    from models.lifecycle.registry import Registry
    from models.lifecycle.tracking import training_run
    from models.summaries import refresh_summaries, write_online_summaries
    from serving.launch import start_server

    root = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="encore-lifelong-cost-"))
    settings = EncoreSettings(data_dir=root)
    t_all = time.perf_counter()
    groups = []
    first = 0
    for g, (n_events, n_users) in enumerate(zip(GROUPS, users)):
        groups.append(synthetic_events(n_users, n_events, first_user=first, items=items, seed=g))
        first += n_users
    events = pd.concat(groups, ignore_index=True)
    log(f"{len(events):,} synthetic events of {first} users in {time.perf_counter() - t_all:.1f} s")

    rec = vista_recommender(items, dim=dim, tokens=tokens, max_len=max_len, target_attention=target_attention)
    version = rec.summariser_version
    t0 = time.perf_counter()
    table = refresh_summaries(rec, events, None, recent=max_len)
    scratch_s = time.perf_counter() - t0
    folded = table.attrs["events_folded"]
    log(f"backfill: {folded:,} events folded in {scratch_s:.1f} s ({folded / scratch_s:,.0f} events/s, one thread)")
    # incremental: 20 new events per user, a day after the histories end
    rng = np.random.default_rng(9)
    new = pd.DataFrame({"user_id": np.repeat(table["user_id"].to_numpy(), 20),
                        "item_id": rng.integers(1, items + 1, 20 * len(table)),
                        "event_type": "listen",
                        "timestamp_ms": T_END + 86_400_000 + rng.integers(0, 3_600_000, 20 * len(table))})
    t0 = time.perf_counter()
    later = refresh_summaries(rec, pd.concat([events, new], ignore_index=True), table, recent=max_len)
    incremental_s = time.perf_counter() - t0

    with EmbeddedServices(settings) as svc:
        registry = Registry(svc.mlflow_uri, settings.registry)
        with training_run(svc.mlflow_uri, "lifelong-cost", run_name="vista-cost", params={"dim": dim},
                          tags={}, system_metrics=False, artifact_root=settings.mlflow_dir / "artifacts") as mrun:
            pass
        example = pd.DataFrame({"item_ids": [[1, 2]], "event_types": [["listen", "like"]],
                                "timestamps_ms": [[T_END - 1000, T_END]]})
        reg = registry.register(rec, run_id=mrun.info.run_id, metrics={}, tags={"model": "vista"},
                                input_example=example)
        registry.record_summaries(version, {"users": len(later), "bench": True})
        promote(registry, reg.version, reason="lifelong-cost bench", actor="bench")
        store = feature_store(settings)  # applies the views, user_summary included
        server = start_server(settings, svc.kafka_bootstrap, svc.mlflow_uri, experiment="none")
        runs: dict[str, list[dict]] = {str(n): [] for n in GROUPS}
        try:
            for round_ in range(rounds):  # the groups alternate: a drift of the box hits every group alike
                for n_events, n_users, g in zip(GROUPS, users, groups):
                    # the group's users under ids 0..n_users-1 (the ids the load driver asks for)
                    ids = np.arange(n_users)
                    mine = later[later["user_id"].isin(g["user_id"].unique())].sort_values("user_id")
                    write_online(store, "user_history", "user_id",
                                 history_rows(pd.concat([g, new[new.user_id.isin(g.user_id.unique())]]),
                                              settings.ingest.history_length, ids), "event_timestamp")
                    write_online_summaries(store, mine.assign(user_id=ids))
                    log(f"round {round_ + 1}, {n_events:,} events/user: driving {rate:g} req/s for "
                        f"{warmup_s:g}+{duration_s:g} s")
                    result = driver_result(spawn_driver(server.endpoint, rate=rate, duration_s=duration_s,
                                                        warmup_s=warmup_s, users=n_users, cold_share=0.0, k=10,
                                                        inspect=True))
                    runs[str(n_events)].append({
                        **{k: result[k] for k in ("p50_ms", "p99_ms", "qps", "errors")},
                        "sources": result.get("sources"), "summary": summary_marks(server.endpoint, n_users),
                        "state_bytes_per_user": sorted(set(mine["state"].map(len))),
                        "online_bytes_per_user": float(mine.apply(online_row_bytes, axis=1).mean())})
        finally:
            server.stop()
    out_groups = {}
    for (key, rs), n_users in zip(runs.items(), users):
        out_groups[key] = {
            "users": n_users, "p50_ms": round(float(np.median([r["p50_ms"] for r in rs])), 2),
            "p99_ms": round(float(np.median([r["p99_ms"] for r in rs])), 2), "p99_ms_rounds": [r["p99_ms"] for r in rs],
            "p50_ms_rounds": [r["p50_ms"] for r in rs], "errors": sum(r["errors"] for r in rs),
            "summary": {k: sum(r["summary"].get(k, 0) for r in rs) for k in {k for r in rs for k in r["summary"]}},
            "sources": {k: sum((r["sources"] or {}).get(k, 0) for r in rs)
                        for k in {k for r in rs for k in (r["sources"] or {})}},
            "state_bytes_per_user": rs[0]["state_bytes_per_user"],
            "online_bytes_per_user": rs[0]["online_bytes_per_user"]}
    p99 = [v["p99_ms"] for v in out_groups.values()]
    return {
        "bench": "lifelong-cost", "summariser_version": version, "dim": dim, "tokens": tokens, "max_len": max_len,
        "target_attention": target_attention,
        "items": items, "rate": rate, "duration_s": duration_s, "rounds": rounds,
        "groups": out_groups,
        "p99_spread": round((max(p99) - min(p99)) / min(p99), 3) if p99 and min(p99) > 0 else None,
        "summarise_events_per_s": round(folded / scratch_s, 1), "events_folded": int(folded),
        "incremental_refresh_s": round(incremental_s, 2),
        "incremental_events_folded": int(later.attrs["events_folded"]),
        "ingest_events_per_s": ingest_rate, "keeps_up": folded / scratch_s >= ingest_rate,
        "wall_s": round(time.perf_counter() - t_all, 1), "data_dir": str(root),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, nargs=3, default=[50, 20, 5], metavar=("U200", "U10K", "U100K"),
                   help="users per group (200, 10,000 and 100,000 events each)")
    p.add_argument("--items", type=int, default=5_000)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--max-len", type=int, default=50, help="the recent window read raw")
    p.add_argument("--rate", type=float, default=200.0)
    p.add_argument("--duration", type=float, default=8.0, help="measured seconds per group and round")
    p.add_argument("--rounds", type=int, default=2, help="rounds over the three groups (figures: medians)")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--ingest-rate", type=float, default=30_000.0, help="ingest's measured events/s, to compare")
    p.add_argument("--data-dir", type=Path, default=None, help="a fresh directory for the bench's platform")
    p.add_argument("--target-attention", action="store_true",
                   help="a model whose candidates also attend to the tokens (vista_target_attention)")
    a = p.parse_args(argv)
    result = run(users=tuple(a.users), items=a.items, dim=a.dim, tokens=a.tokens, max_len=a.max_len, rate=a.rate,
                 duration_s=a.duration, warmup_s=a.warmup, rounds=a.rounds, ingest_rate=a.ingest_rate,
                 data_dir=a.data_dir, target_attention=a.target_attention,
                 log=lambda m: print(m, flush=True))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
