"""``encore bench ...``: benchmarks of the platform's parts (each prints one JSON object as its last line)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from cli.common import data_dir_option, settings_for

# bench/ sits next to the installed packages in the repository but is not one of them: make it importable
# when `encore` runs from another directory.
_REPO = str(Path(__file__).resolve().parents[1])
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)


@click.group()
def bench() -> None:
    """Benchmarks; each prints its figures as one JSON object on its last line."""


@bench.command("serve")
@data_dir_option
@click.option("--url", default=None, help="drive an already running service instead of starting one")
@click.option("--rate", type=float, default=200.0, show_default=True, help="requests per second (open loop)")
@click.option("--duration", "duration_s", type=float, default=20.0, show_default=True, help="measured seconds")
@click.option("--warmup", "warmup_s", type=float, default=3.0, show_default=True, help="unmeasured seconds first")
@click.option("--cold-share", type=float, default=0.05, show_default=True, help="share of unknown (cold) users")
@click.option("-k", "k", type=int, default=10, show_default=True)
@click.option("--cascade", is_flag=True, help="every request through the cascade: the retriever's top "
              "serve.retrieval_k reranked by the champion ranker (no experiment)")
@click.option("--no-experiment", is_flag=True, help="every request on the champion retriever alone (no experiment, "
              "no ranker): the cascade's baseline")
def bench_serve(data_dir: str | None, url: str | None, rate: float, duration_s: float, warmup_s: float,
                cold_share: float, k: int, cascade: bool, no_experiment: bool) -> None:
    """Load-test POST /v1/recommendations from a separate process: qps, p50/p99 latency, errors."""
    from bench.serve import run_bench

    if rate <= 0 or duration_s <= 0 or warmup_s < 0:
        raise click.BadParameter("--rate and --duration must be positive, --warmup non-negative")
    settings = settings_for(data_dir)
    if settings.profile == "production" and not url:
        raise click.ClickException("in the production profile `bench serve` only drives a running service: "
                                   "pass --url (it never builds a platform against production stores)")
    result = run_bench(settings, url=url, rate=rate, duration_s=duration_s, warmup_s=warmup_s,
                       cold_share=cold_share, k=k, cascade=cascade, no_experiment=no_experiment,
                       log=lambda m: click.echo(m, err=True))
    click.echo(json.dumps(result))


@bench.command("lifelong-cost", context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench_lifelong_cost(args: tuple[str, ...]) -> None:
    """VISTA's cost bar: serving p50/p99 for users of 200, 10,000 and 100,000 events from cached summaries, bytes
    per user, summarisation events/s (see `python -m bench.lifelong_cost -h`)."""
    from bench.lifelong_cost import main as run

    run(list(args))


@bench.command("ingest", context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench_ingest(args: tuple[str, ...]) -> None:
    """Kafka → offline + online stores: events/s, freshness, lost/duplicated (see `python -m bench.ingest -h`)."""
    from bench.ingest import main as run

    run(list(args))


@bench.command("quality", context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench_quality(args: tuple[str, ...]) -> None:
    """Train one config on one dataset: HR@K, NDCG@K, MRR, tokens/s (see `python -m bench.quality -h`)."""
    from bench.quality import main as run

    run(list(args))


@bench.command("transfer", context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench_transfer(args: tuple[str, ...]) -> None:
    """Pre-train on three Amazon domains, fine-tune on Beauty, against Beauty from scratch: paired HR@10/NDCG@10
    gains per model size with 95% intervals (see `python -m bench.transfer -h`)."""
    from bench.transfer import main as run

    run(list(args))


@bench.command("ranking", context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench_ranking(args: tuple[str, ...]) -> None:
    """Rankers (Wukong, DLRM, ARGUS fine-tuned) on held-out later requests: per task AUC/GAUC/logloss vs popularity
    and random, shown items only and with sampled negatives; ARGUS adds the retrieval -> rerank cascade's HR@10 and
    NDCG@10 (see `python -m bench.ranking -h`)."""
    from bench.ranking import main as run

    run(list(args))


@bench.command("mfalcon", context_settings={"ignore_unknown_options": True, "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench_mfalcon(args: tuple[str, ...]) -> None:
    """HSTU ranker: one request's candidates scored with M-FALCON (history K/V once, candidates in one batch) vs one
    forward per candidate, on one thread: time, speedup, max score difference (`encore bench mfalcon --help`)."""
    from bench.mfalcon import main as run

    run(list(args))


@bench.command("train-speed", context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench_train_speed(args: tuple[str, ...]) -> None:
    """DMP training on 1 vs 2 processes (torchrun): tokens/s and time-to-quality (`python -m bench.train_speed -h`)."""
    from bench.train_speed import main as run

    run(list(args))


@bench.command("faults", context_settings={"ignore_unknown_options": True, "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench_faults(args: tuple[str, ...]) -> None:
    """Fault drill: poison messages, SIGKILLed ingest, bad neighbours, MLflow and online-store outages; exits 1
    when the bar is missed (`encore bench faults --help`)."""
    from bench.faults import main as run

    run(list(args))


@bench.command("experiments", context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench_experiments(args: tuple[str, ...]) -> None:
    """Sequential A/B readout by simulation: A/A error under peeking, any-time coverage, power vs fixed-horizon
    (see `python -m bench.experiments -h`)."""
    from bench.experiments import main as run

    run(list(args))


@bench.command("rollouts", context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench_rollouts(args: tuple[str, ...]) -> None:
    """Guarded rollouts by simulation: A/A false rollback/promotion rates against alpha, planted harm rolled back
    before the ramp passes 5%, a good model decided (see `python -m bench.rollouts -h`)."""
    from bench.rollouts import main as run

    run(list(args))


@bench.command("rollout-loop", context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench_rollout_loop(args: tuple[str, ...]) -> None:
    """Closed-loop rollout drill through the real platform: a good model ramps to 50% and becomes champion, a
    planted harmful one is rolled back, each look a Dagster rollout_job run (see `encore bench rollout-loop -h`)."""
    from cli.rollout_drill import main as run

    run(list(args))


@bench.command("cascade-loop", context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench_cascade_loop(args: tuple[str, ...]) -> None:
    """Closed loop for the ranking stage through the real platform: an A/B of the cascade (retrieval → the
    ARGUS ranker trained by ranking_job) against retrieval alone (see `encore bench cascade-loop -h`)."""
    from cli.cascade_drill import main as run

    raise SystemExit(run(list(args)))


@bench.command("lifelong-loop", context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench_lifelong_loop(args: tuple[str, ...]) -> None:
    """Closed-loop A/B on the lifelong world: a VISTA arm against an HSTU arm, each serving every user from its own
    growing history; a paired replay (common random numbers) and a split A/B (see `python -m bench.lifelong_loop -h`)."""
    from bench.lifelong_loop import main as run

    run(list(args))


@bench.command("lifelong", context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench_lifelong(args: tuple[str, ...]) -> None:
    """Lifelong world (users with 10k+ events): the full-history oracle's lead over a 200-event window, then
    recipes (hstu, vista, ...) trained on it, paired by seed and user against hstu (see `python -m bench.lifelong -h`)."""
    from bench.lifelong import main as run

    run(list(args))
