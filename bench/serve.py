"""Load benchmark of the live recommendation service: ``encore bench serve``.

Two halves:

* ``drive`` — an **open-loop** load generator: request *i* is scheduled at ``start + i / rate`` whatever the
  earlier responses did, so a slow server cannot slow the load down and hide its own latency (the
  "coordinated omission" trap of closed-loop clients). Latency is measured from the *scheduled* send time.
  It speaks plain HTTP/1.1 over keep-alive asyncio connections: a full HTTP client library costs more CPU
  per request than the service under test on a 2-core box, and would measure itself.
* ``run_bench`` — builds (or reuses) a platform state in a data dir, starts the embedded services and a real
  ``encore serve`` process on it, then runs ``drive`` in a *separate* process (``python -m bench.serve``) so
  the load generator never shares an interpreter with the server.

The last line printed is one JSON object: ``qps``, ``p50_ms``, ``p99_ms``, ``errors`` and more.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

# --------------------------------------------------------------------------------------------- the driver


@dataclass
class _Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter


@dataclass
class DriveResult:
    scheduled: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    error_samples: list[str] = field(default_factory=list)
    sources: dict[str, int] = field(default_factory=dict)
    model_versions: dict[str, int] = field(default_factory=dict)
    ranker_versions: dict[str, int] = field(default_factory=dict)


async def _request(conn: _Conn, raw: bytes, timeout_s: float) -> tuple[int, bytes]:
    conn.writer.write(raw)
    head = await asyncio.wait_for(conn.reader.readuntil(b"\r\n\r\n"), timeout_s)
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length = 0
    chunked = False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        lname = name.strip().lower()
        if lname == b"content-length":
            length = int(value.strip())
        elif lname == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if chunked:
        body = b""
        while True:
            size = int((await asyncio.wait_for(conn.reader.readuntil(b"\r\n"), timeout_s)).strip(), 16)
            chunk = await asyncio.wait_for(conn.reader.readexactly(size + 2), timeout_s)
            if size == 0:
                break
            body += chunk[:-2]
    else:
        body = await asyncio.wait_for(conn.reader.readexactly(length), timeout_s) if length else b""
    return status, body


async def _drive(url: str, rate: float, duration_s: float, warmup_s: float, bodies: list[bytes],
                 timeout_s: float, max_connections: int, inspect: bool) -> DriveResult:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    prefix = (f"POST /v1/recommendations HTTP/1.1\r\nhost: {host}:{port}\r\n"
              "content-type: application/json\r\n").encode()
    idle: list[_Conn] = []
    open_count = 0
    slots = asyncio.Semaphore(max_connections)
    result = DriveResult()
    loop = asyncio.get_running_loop()
    total = int(rate * (warmup_s + duration_s))
    measure_from = int(rate * warmup_s)

    async def one(i: int, scheduled: float) -> None:
        nonlocal open_count
        body = bodies[i % len(bodies)]
        raw = prefix + f"content-length: {len(body)}\r\n\r\n".encode() + body
        async with slots:
            conn = idle.pop() if idle else None
            try:
                if conn is not None:
                    try:
                        status, payload = await _request(conn, raw, timeout_s)
                    except (asyncio.IncompleteReadError, ConnectionError):
                        # the server closed this idle keep-alive connection before reading the request (the
                        # close raced our write; nothing was processed): resend on a fresh connection, as
                        # HTTP clients do
                        conn.writer.close()
                        open_count -= 1
                        conn = None
                if conn is None:
                    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
                    conn = _Conn(reader, writer)
                    open_count += 1
                    status, payload = await _request(conn, raw, timeout_s)
            except Exception as exc:  # noqa: BLE001 - every failure is a counted error
                result.errors += 1
                result.statuses[type(exc).__name__] = result.statuses.get(type(exc).__name__, 0) + 1
                if len(result.error_samples) < 5:
                    result.error_samples.append(f"{type(exc).__name__}: {exc}")
                if conn is not None:
                    conn.writer.close()
                    open_count -= 1
                return
            idle.append(conn)
        elapsed_ms = (loop.time() - scheduled) * 1000
        result.statuses[str(status)] = result.statuses.get(str(status), 0) + 1
        if status != 200:
            result.errors += 1
            if len(result.error_samples) < 5:
                result.error_samples.append(f"{status}: {payload[:200]!r}")
        elif inspect:
            doc = json.loads(payload)
            result.sources[doc["source"]] = result.sources.get(doc["source"], 0) + 1
            mv = str(doc.get("model_version"))
            result.model_versions[mv] = result.model_versions.get(mv, 0) + 1
            rv = str(doc.get("ranker_version"))
            result.ranker_versions[rv] = result.ranker_versions.get(rv, 0) + 1
        if i >= measure_from:
            result.latencies_ms.append(elapsed_ms)

    tasks = []
    start = loop.time() + 0.05
    for i in range(total):
        scheduled = start + i / rate
        delay = scheduled - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i, scheduled)))
    result.scheduled = total
    await asyncio.gather(*tasks)
    for conn in idle:
        conn.writer.close()
    return result


def request_bodies(users: int, cold_share: float, k: int, seed: int = 0, n: int = 5000) -> list[bytes]:
    """A fixed, reproducible mix of known users (ids 0..users-1) and cold-start users (unknown ids)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        cold = rng.random() < cold_share
        uid = 10_000_000 + rng.randrange(1_000_000) if cold else rng.randrange(users)
        out.append(json.dumps({"user_id": uid, "k": k, "exclude_seen": True,
                               "context": {"device": "bench"}}).encode())
    return out


def drive(url: str, *, rate: float = 200.0, duration_s: float = 20.0, warmup_s: float = 3.0, users: int = 600,
          cold_share: float = 0.05, k: int = 10, timeout_s: float = 5.0, max_connections: int = 256,
          seed: int = 0, inspect: bool = False) -> dict:
    """Drive ``url`` open-loop at ``rate`` requests/s; the summary dict (latencies over the measured part)."""
    bodies = request_bodies(users, cold_share, k, seed)
    t0 = time.monotonic()
    res = asyncio.run(_drive(url, rate, duration_s, warmup_s, bodies, timeout_s, max_connections, inspect))
    wall = time.monotonic() - t0
    lat = np.asarray(res.latencies_ms) if res.latencies_ms else np.asarray([np.nan])
    measured = len(res.latencies_ms)
    out = {
        "target_qps": rate,
        "qps": round(measured / duration_s, 1) if duration_s else None,
        "requests": res.scheduled,
        "measured": measured,
        "p50_ms": round(float(np.nanpercentile(lat, 50)), 2),
        "p90_ms": round(float(np.nanpercentile(lat, 90)), 2),
        "p99_ms": round(float(np.nanpercentile(lat, 99)), 2),
        "max_ms": round(float(np.nanmax(lat)), 2),
        "errors": res.errors,
        "statuses": res.statuses,
        "duration_s": duration_s,
        "warmup_s": warmup_s,
        "wall_s": round(wall, 1),
    }
    if res.error_samples:
        out["error_samples"] = res.error_samples
    if inspect:
        out["sources"] = res.sources
        out["model_versions"] = res.model_versions
        out["ranker_versions"] = res.ranker_versions
    return out


def spawn_driver(url: str, **kwargs: object) -> subprocess.Popen:
    """``drive`` in a separate Python process (its JSON summary is the last line of its stdout)."""
    cmd = [sys.executable, "-m", "bench.serve", "--url", url]
    for key, value in kwargs.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            cmd.append(flag)
        elif value is not None and value is not False:
            cmd += [flag, str(value)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])


def driver_result(proc: subprocess.Popen, timeout_s: float = 600) -> dict:
    out, _ = proc.communicate(timeout=timeout_s)
    lines = [line for line in (out or "").splitlines() if line.strip()]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"load driver failed (exit {proc.returncode}): {out[-2000:] if out else ''}")
    return json.loads(lines[-1])


# --------------------------------------------------------------------------------------------- the bench


def has_champion(settings, *, rankers: bool = False) -> bool:  # noqa: ANN001 - infra.settings.EncoreSettings
    if not (settings.feast_dir / "online.db").is_file():
        return False
    from models.lifecycle.registry import Registry
    from models.lifecycle.tracking import tracking_uri

    names = settings.registry.for_rankers() if rankers else settings.registry
    try:
        return Registry(tracking_uri(settings), names).champion_version() is not None
    except Exception:  # noqa: BLE001 - no registry, no model, no alias: all mean "build it"
        return False


def build_platform(settings) -> None:  # noqa: ANN001 - infra.settings.EncoreSettings
    """``encore run`` on ``settings``' data dir, in a child process with exactly these settings (the benchmark
    sits below the command-line tool and runs it as a user would)."""
    from infra.settings import child_env

    env = child_env(settings, settings.run_dir / "bench-run-settings.yaml")
    subprocess.run([sys.executable, "-m", "cli", "run", "--no-progress"], env=env, check=True)


def run_bench(settings, *, url: str | None = None, rate: float = 200.0, duration_s: float = 20.0,  # noqa: ANN001
              warmup_s: float = 3.0, cold_share: float = 0.05, k: int = 10, cascade: bool = False,
              no_experiment: bool = False, log=print) -> dict:  # noqa: ANN001
    """Serve the champion of ``settings``' data dir (building the platform first if needed) and drive it.

    ``cascade``: every request goes through the cascade (no experiment; ``serve.ranker`` = the champion ranker:
    the retriever's top ``serve.retrieval_k`` reranked, top k answered); ``no_experiment``: every request on the
    champion retriever alone (the cascade's baseline); neither: the settings' default experiment runs as
    ``encore serve`` starts it (half the requests on the popularity baseline)."""
    users = settings.simulator.users
    kwargs = dict(rate=rate, duration_s=duration_s, warmup_s=warmup_s, users=users, cold_share=cold_share, k=k,
                  inspect=cascade or no_experiment)
    if url:
        return driver_result(spawn_driver(url, **kwargs))
    from infra.services import EmbeddedServices
    from serving.launch import start_server

    if not has_champion(settings):
        log(f"no champion model in {settings.root}: building the platform (encore run) first")
        build_platform(settings)
    experiment = "none" if no_experiment else "default"
    if cascade:
        if not has_champion(settings, rankers=True):
            raise RuntimeError(f"no champion ranker in {settings.root}: `encore run` trains one (its ranking_job); "
                               "see its summary for the ranker gate's verdict")
        settings = settings.model_copy(update={"serve": settings.serve.model_copy(
            update={"ranker": f"alias:{settings.registry.champion_alias}"})})
        experiment = "none"
    with EmbeddedServices(settings) as svc:
        server = start_server(settings, svc.kafka_bootstrap, svc.mlflow_uri, experiment=experiment)
        try:
            log(f"service on {server.endpoint}; driving {rate:g} req/s for {warmup_s:g}+{duration_s:g}s "
                "from a separate process")
            result = driver_result(spawn_driver(server.endpoint, **kwargs))
        finally:
            server.stop()
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="open-loop load driver for POST /v1/recommendations")
    p.add_argument("--url", required=True)
    p.add_argument("--rate", type=float, default=200.0)
    p.add_argument("--duration-s", type=float, default=20.0)
    p.add_argument("--warmup-s", type=float, default=3.0)
    p.add_argument("--users", type=int, default=600)
    p.add_argument("--cold-share", type=float, default=0.05)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--timeout-s", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--inspect", action="store_true", help="count sources and model versions in responses")
    a = p.parse_args(argv)
    print(json.dumps(drive(a.url, rate=a.rate, duration_s=a.duration_s, warmup_s=a.warmup_s, users=a.users,
                           cold_share=a.cold_share, k=a.k, timeout_s=a.timeout_s, seed=a.seed,
                           inspect=a.inspect)), flush=True)


if __name__ == "__main__":
    main()
