"""The compose file and the Kubernetes example, parsed (PyYAML) and checked against kiln itself:
queue names, settings, ports and probes must be ones that kiln has."""

from __future__ import annotations

import yaml
from conftest import ROOT

from worker.contract import BULK_QUEUE, ONLINE_QUEUE
from worker.settings import WorkerSettings

KUBE = ROOT / "deploy" / "kubernetes"


def load_all(path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def kiln_setting(variable: str) -> bool:
    return variable.startswith("KILN_") and variable.removeprefix("KILN_").lower() in WorkerSettings.model_fields


def test_the_deployment_probes_the_worker_endpoint():
    (deployment,) = load_all(KUBE / "worker.yaml")
    assert deployment["kind"] == "Deployment"
    pod = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert all(kiln_setting(name) for name in env), env
    port = int(env["KILN_METRICS_PORT"])
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"metrics": port}
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(port)
    probes = {kind: container[kind]["httpGet"]["path"] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert probes == {"startupProbe": "/readyz", "readinessProbe": "/readyz", "livenessProbe": "/livez"}
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True


def test_keda_scales_the_deployment_on_kilns_queues():
    scaled, auth = load_all(KUBE / "scaledobject.yaml")
    (deployment,) = load_all(KUBE / "worker.yaml")
    assert scaled["kind"] == "ScaledObject" and auth["kind"] == "TriggerAuthentication"
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    triggers = {t["metadata"]["listName"]: t for t in scaled["spec"]["triggers"]}
    assert set(triggers) == {BULK_QUEUE, ONLINE_QUEUE}
    for trigger in triggers.values():
        assert trigger["type"] == "redis" and trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
        assert int(trigger["metadata"]["listLength"]) > 0  # KEDA wants a string holding a positive number
    # Online: two full online batches waiting call for another replica.
    assert int(triggers[ONLINE_QUEUE]["metadata"]["listLength"]) == 2 * WorkerSettings().online_batch_size
    assert 1 <= scaled["spec"]["minReplicaCount"] < scaled["spec"]["maxReplicaCount"]


def test_compose_runs_redis_with_aof_and_scalable_healthchecked_workers():
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    redis = services["redis"]
    options = dict(zip(redis["command"][1::2], redis["command"][2::2], strict=True))
    assert options["--appendonly"] == "yes"
    # Workers reach Redis over the compose network: protected mode would refuse them (no password).
    assert options["--protected-mode"] == "no" and "ports" not in redis
    volume = redis["volumes"][0].split(":")
    assert volume[1] == "/data" and volume[0] in compose["volumes"]
    worker = services["worker"]
    assert "container_name" not in worker and "ports" not in worker  # --scale worker=N needs both absent
    assert worker["healthcheck"]["test"] == ["CMD", "python", "-m", "worker.health"]
    assert all(kiln_setting(name) for name in worker["environment"])
    assert services["producer"]["entrypoint"] == ["python", "-m", "producer"]
    host = yaml.safe_load((ROOT / "docker" / "compose.host.yaml").read_text())["services"]
    assert {s["network_mode"] for s in host.values()} == {"host"} and set(host) == set(services)
