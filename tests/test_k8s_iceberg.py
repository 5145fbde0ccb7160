"""The Iceberg overlay of the Kubernetes manifests (infra/k8s-iceberg): ingest scaled out without node
affinity, the settings it sets, and the partition split of its replicas, as kustomize renders them."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from infra.settings import EncoreSettings

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None,
                                reason="kubectl not installed (it renders kustomize offline)")


def render(where: str) -> list[dict]:
    out = subprocess.run(["kubectl", "kustomize", str(ROOT / where)], capture_output=True, text=True, timeout=60,
                         check=False)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def find(objects: list[dict], kind: str, name: str) -> dict:
    (obj,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return obj


def test_the_iceberg_overlay_scales_ingest_out_without_node_affinity():
    base, iceberg = render("infra/k8s"), render("infra/k8s-iceberg")
    writer = "encore.io/offline-index-writer"
    for kind, name in (("StatefulSet", "ingest"), ("Deployment", "dagster-code")):
        # the Parquet profile keeps its SQLite writers on one node; the Iceberg one lets them spread
        assert find(base, kind, name)["spec"]["template"]["spec"].get("affinity")
        pod = find(iceberg, kind, name)["spec"]["template"]
        assert "affinity" not in pod["spec"] and writer not in pod["metadata"]["labels"], name

    ingest = find(iceberg, "StatefulSet", "ingest")
    (config,) = [o for o in iceberg if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("encore-config")]
    env = config["data"]
    assert env["ENCORE_OFFLINE__BACKEND"] == "iceberg" and env["ENCORE_OFFLINE__WAREHOUSE"].startswith("s3://")
    settings = EncoreSettings(**{"offline": {k.removeprefix("ENCORE_OFFLINE__").lower(): v
                                             for k, v in env.items() if k.startswith("ENCORE_OFFLINE__")}})
    assert settings.offline.backend == "iceberg"  # every value is a valid setting

    (c,) = ingest["spec"]["template"]["spec"]["containers"]
    workers = int(next(e["value"] for e in c["env"] if e["name"] == "INGEST_WORKERS"))
    partitions = int(env["ENCORE_TOPICS__PARTITIONS"])
    assert workers == ingest["spec"]["replicas"] > find(base, "StatefulSet", "ingest")["spec"]["replicas"]
    assert workers <= partitions
    owned: list[int] = []
    for ordinal in range(workers):
        out = subprocess.run(["sh", "-c", c["args"][2].replace("exec encore", "echo encore")],
                             env={**os.environ, "HOSTNAME": f"ingest-{ordinal}", "INGEST_WORKERS": str(workers),
                                  "ENCORE_TOPICS__PARTITIONS": str(partitions)},
                             capture_output=True, text=True, check=True).stdout
        owned += [int(p) for p in re.search(r"--partitions (\S+)", out).group(1).split(",")]
    assert sorted(owned) == list(range(partitions))
