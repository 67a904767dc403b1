"""The deployment files (deploy/docker, deploy/docker-compose.yml, deploy/k8s) checked against the code.

Nothing here builds an image or talks to a cluster: the manifests are parsed with
PyYAML and every value that Earshot reads is pushed through the code that reads it
(``gateway.config.load_settings`` for settings files and ``EARSHOT_*`` variables,
earshot's own argparse parser for container commands, ``PoolNames`` for the job
streams KEDA watches, ``RtpPortAllocator`` for the RTP range). So a renamed setting,
a changed default port, a new stream name or a dropped CLI flag fails here instead
of in a cluster.
"""

from __future__ import annotations

import argparse
import re
import shlex
import tomllib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any
from unittest import mock
from urllib.parse import urlsplit

import pytest
import yaml

from gateway import cli
from gateway.config import ENV_PREFIX, ConfigError, Settings, _flatten, load_settings
from gateway.yamlfile import compose_file
from gateway.rtp.transport import RtpPortAllocator

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKER = DEPLOY / "docker"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "docker-compose.yml"
DOCS = ROOT / "docs" / "deploy.md"

# Objects the manifests refer to but do not define: the operator creates them, as
# docs/deploy.md says (with the keys each Secret must hold).
OPERATOR_CREATED: dict[tuple[str, str], set[str]] = {
    ("Secret", "earshot-secrets"): {"redis-password", "database-url", "web-secret-key"},
    ("PersistentVolumeClaim", "earshot-models"): set(),
}

# Trigger metadata of KEDA's redis-streams scaler, as its documentation lists it
# (keda.sh/docs/latest/scalers/redis-streams). username/password are left out on
# purpose: credentials go through a TriggerAuthentication, never into metadata.
KEDA_REDIS_STREAMS_METADATA = {
    "address", "addressFromEnv", "host", "hostFromEnv", "port", "portFromEnv",
    "usernameFromEnv", "passwordFromEnv", "stream", "consumerGroup",
    "pendingEntriesCount", "streamLength", "lagCount", "activationLagCount",
    "enableTLS", "unsafeSsl", "databaseIndex",
}
# TriggerAuthentication parameters the Redis scalers read.
KEDA_REDIS_AUTH_PARAMETERS = {"username", "password", "tls", "ca", "cert", "key", "keyPassword"}
# Fields of a ScaledObject trigger (keda.sh/v1alpha1 ScaleTriggers).
KEDA_TRIGGER_FIELDS = {"type", "name", "metadata", "authenticationRef", "metricType", "useCachedMetrics"}

SUBCOMMANDS = {"run", "worker", "status", "tail", "config", "db", "persist", "users"}

# Image names used by the manifests, and the Dockerfile each one is built from.
IMAGES = {"earshot": DOCKER / "Dockerfile", "earshot-cuda": DOCKER / "Dockerfile.cuda"}

POD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


# ---------------------------------------------------------------------------
# loading


def _k8s_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*") if p.suffix in (".yaml", ".yml"))


def _load_all(path: Path) -> list[Any]:
    with path.open(encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def _kustomization() -> dict[str, Any]:
    (doc,) = _load_all(K8S / "kustomization.yaml")
    return doc


def _k8s_objects() -> list[dict[str, Any]]:
    objects = []
    for path in _k8s_files():
        if path.name == "kustomization.yaml":
            continue
        for doc in _load_all(path):
            assert isinstance(doc, dict), f"{path.name}: a document that is not a mapping"
            objects.append(doc)
    return objects


def _objects(kind: str) -> list[dict[str, Any]]:
    return [o for o in _k8s_objects() if o.get("kind") == kind]


def _one(kind: str, name: str) -> dict[str, Any]:
    found = [o for o in _objects(kind) if o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name!r}, found {len(found)}"
    return found[0]


def _compose() -> dict[str, Any]:
    (doc,) = _load_all(COMPOSE)
    return doc


def _walk(node: Any) -> Iterator[tuple[str, Any]]:
    """Every (key, value) pair in a nested structure."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield key, value
            yield from _walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item)


# ---------------------------------------------------------------------------
# Dockerfiles


def _dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        instructions.append((word.upper(), rest.strip()))
    assert not pending, f"{path.name}: ends inside a continued line"
    return instructions


def _docker_args(path: Path, instruction: str) -> list[str]:
    return [args for word, args in _dockerfile(path) if word == instruction]


def _docker_env(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in _docker_args(path, "ENV"):
        for item in shlex.split(args):
            assert "=" in item, f"{path.name}: ENV {item!r}: use the KEY=VALUE form"
            key, _, value = item.partition("=")
            env[key] = value
    return env


def _docker_cmd(path: Path) -> list[str]:
    (cmd,) = _docker_args(path, "CMD")
    value = yaml.safe_load(cmd)  # exec form is a JSON array (and JSON is YAML)
    assert isinstance(value, list), f"{path.name}: CMD must use the exec form, so earshot is PID 1 and gets SIGTERM"
    return value


def _earshot_env(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith(ENV_PREFIX)}


def _check_env_names(env: dict[str, Any], where: str) -> None:
    fields = set(Settings.__dataclass_fields__)
    for key in env:
        if key.startswith(ENV_PREFIX) and key != f"{ENV_PREFIX}CONFIG":
            assert key[len(ENV_PREFIX):].lower() in fields, f"{where}: {key} is not a setting (no Settings field)"


# ---------------------------------------------------------------------------
# earshot's command line


class _Parsed(Exception):
    pass


def _parse_command(argv: list[str], where: str) -> argparse.Namespace:
    """Parse a container command with earshot's own parser (gateway.cli.main), without running it."""
    assert argv and argv[0] == "earshot", f"{where}: command {argv!r} does not run earshot"
    captured: dict[str, argparse.Namespace] = {}
    original = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, args=None, namespace=None):  # noqa: ANN001, ANN202
        captured["ns"] = original(self, args, namespace)
        raise _Parsed

    with mock.patch.object(argparse.ArgumentParser, "parse_args", parse_and_stop):
        try:
            cli.main(list(argv[1:]))
        except _Parsed:
            pass
        except SystemExit as exc:
            pytest.fail(f"{where}: earshot's parser rejects {argv!r} (exit {exc.code})")
    ns = captured["ns"]
    assert ns.command in SUBCOMMANDS, f"{where}: {ns.command!r} is not an earshot subcommand"
    return ns


def _cli_overrides(ns: argparse.Namespace) -> dict[str, Any]:
    """The settings a command line sets (as gateway/cli.py maps them)."""
    if ns.command == "run":
        return {"sip_port": ns.sip_port, "http_port": ns.http_port, "asr_backend": ns.asr}
    if ns.command == "worker":
        return {"worker_http_port": ns.http_port, "asr_model": ns.model, "asr_device": ns.device,
                "asr_compute_type": ns.compute_type, "asr_max_batch": ns.batch,
                "asr_batch_wait_ms": ns.batch_wait_ms, "asr_workers": ns.threads, "worker_id": ns.id}
    return {}


def _settings(where: str, path: Path | None, environ: dict[str, str], ns: argparse.Namespace | None = None
              ) -> Settings:
    _check_env_names(environ, where)
    try:
        return load_settings(path, environ=environ, **(_cli_overrides(ns) if ns else {}))
    except ConfigError as exc:
        pytest.fail(f"{where}: invalid settings: {exc}")


def _http_port(settings: Settings, ns: argparse.Namespace) -> int:
    return settings.http_port if ns.command == "run" else settings.worker_http_port


def _http_host(settings: Settings, ns: argparse.Namespace) -> str:
    return settings.http_host if ns.command == "run" else settings.worker_http_host


# ---------------------------------------------------------------------------
# Kubernetes pods


def _image_dockerfile(image: str, where: str) -> Path:
    name = PurePosixPath(image.split("@", 1)[0]).name.split(":", 1)[0]
    assert name in IMAGES, f"{where}: image {image!r} is not one of this repository's ({sorted(IMAGES)})"
    return IMAGES[name]


def _pod_templates() -> list[tuple[str, dict[str, Any]]]:
    return [(o["metadata"]["name"], o["spec"]["template"]["spec"]) for o in _k8s_objects() if o["kind"] in POD_KINDS]


class K8sContainer:
    """One container of a pod template, with the settings it would run with."""

    def __init__(self, workload: str, pod: dict[str, Any], container: dict[str, Any], tmp: Path) -> None:
        self.workload, self.pod, self.spec = workload, pod, container
        self.where = f"k8s {workload}/{container['name']}"
        self.ns = _parse_command(list(container.get("command", [])) + list(container.get("args", [])), self.where)
        image_env = _docker_env(_image_dockerfile(container["image"], self.where))
        self.env_from: dict[str, dict[str, Any]] = {}  # valueFrom sources by variable name
        env = dict(image_env)
        for item in container.get("env", []):
            name = item["name"]
            if "value" in item:
                assert isinstance(item["value"], str), f"{self.where}: env {name} must be a string"
                env[name] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), "x"), item["value"])
            else:
                self.env_from[name] = item["valueFrom"]
                env.pop(name, None)
        names = [*image_env, *(e["name"] for e in container.get("env", []))]
        self.set_by_env = {k[len(ENV_PREFIX):].lower() for k in names
                           if k.startswith(ENV_PREFIX) and k != f"{ENV_PREFIX}CONFIG"}
        self.literal_env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
        _check_env_names({e["name"]: None for e in container.get("env", [])}, self.where)
        self.config_path: Path | None = None
        self.config_text: str | None = None
        config = self.ns.config or env.get(f"{ENV_PREFIX}CONFIG")
        if config:
            self.config_text = self._mounted_file(config)
            self.config_path = tmp / f"{workload}-{container['name']}.yaml"
            self.config_path.write_text(self.config_text, encoding="utf-8")
        self.settings = _settings(self.where, self.config_path, _earshot_env(env), self.ns)

    def _mounted_file(self, path: str) -> str:
        """The text of ``path`` as mounted from a ConfigMap volume."""
        target = PurePosixPath(path)
        for mount in self.spec.get("volumeMounts", []):
            mount_path = PurePosixPath(mount["mountPath"])
            if mount_path not in target.parents:
                continue
            (volume,) = [v for v in self.pod.get("volumes", []) if v["name"] == mount["name"]]
            assert "configMap" in volume, f"{self.where}: {path} is not on a ConfigMap volume"
            data = _one("ConfigMap", volume["configMap"]["name"]).get("data", {})
            key = str(target.relative_to(mount_path))
            for item in volume["configMap"].get("items", []):
                if item["path"] == key:
                    key = item["key"]
            assert key in data, f"{self.where}: ConfigMap {volume['configMap']['name']} has no key {key!r}"
            return data[key]
        pytest.fail(f"{self.where}: EARSHOT_CONFIG {path} is not on any mounted volume")


def _containers(tmp: Path) -> list[K8sContainer]:
    return [K8sContainer(name, pod, c, tmp) for name, pod in _pod_templates() for c in pod["containers"]]


def _by_command(tmp: Path, command: str) -> list[K8sContainer]:
    found = [c for c in _containers(tmp) if c.ns.command == command]
    assert found, f"no k8s container runs `earshot {command}`"
    return found


def _probe_port(container: dict[str, Any], probe: dict[str, Any]) -> int:
    port = probe["httpGet"]["port"]
    if isinstance(port, str):
        (port,) = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == port]
    return port


# ---------------------------------------------------------------------------
# Kubernetes: objects and references


def test_every_k8s_file_parses_and_is_listed_in_the_kustomization():
    files = _k8s_files()
    assert files, "deploy/k8s holds no YAML"
    for path in files:
        _load_all(path)
    kustomization = _kustomization()
    assert kustomization["kind"] == "Kustomization"
    listed = set(kustomization["resources"])
    present = {p.relative_to(K8S).as_posix() for p in files if p.name != "kustomization.yaml"}
    assert listed == present, f"kustomization.yaml resources {sorted(listed)} != files {sorted(present)}"
    assert {i["name"] for i in kustomization.get("images", [])} <= set(IMAGES)


def test_k8s_objects_have_api_version_kind_and_unique_names():
    seen = set()
    for obj in _k8s_objects():
        assert obj.get("apiVersion") and obj.get("kind"), f"object without apiVersion/kind: {obj}"
        name = (obj.get("metadata") or {}).get("name")
        assert name, f"{obj['kind']} without metadata.name"
        assert (obj["kind"], name) not in seen, f"{obj['kind']} {name} defined twice"
        seen.add((obj["kind"], name))
    kinds = {kind for kind, _ in seen}
    assert {"ConfigMap", "Deployment", "Service", "ScaledObject", "TriggerAuthentication"} <= kinds
    assert "Secret" not in kinds, "no Secret with values in the manifests: the operator creates it"


def test_workload_selectors_match_their_pod_labels():
    for obj in _k8s_objects():
        if obj["kind"] not in POD_KINDS:
            continue
        labels = obj["spec"]["template"]["metadata"]["labels"]
        selector = obj["spec"]["selector"]["matchLabels"]
        assert selector.items() <= labels.items(), f"{obj['metadata']['name']}: selector does not match its pods"
    for svc in _objects("Service"):
        selected = [o for o in _objects("Deployment")
                    if svc["spec"]["selector"].items() <= o["spec"]["template"]["metadata"]["labels"].items()]
        assert selected, f"Service {svc['metadata']['name']} selects no Deployment"


def test_references_name_defined_objects():
    defined: dict[tuple[str, str], dict[str, Any]] = {(o["kind"], o["metadata"]["name"]): o for o in _k8s_objects()}

    def check(kind: str, name: str, key: str | None, where: str) -> None:
        if (kind, name) in OPERATOR_CREATED:
            if key is not None:
                assert key in OPERATOR_CREATED[(kind, name)], \
                    f"{where}: key {key!r} of {kind} {name} is not one docs/deploy.md tells the operator to create"
            return
        assert (kind, name) in defined, f"{where}: {kind} {name!r} is neither defined nor operator-created"
        if key is not None and kind == "ConfigMap":
            assert key in defined[(kind, name)].get("data", {}), f"{where}: ConfigMap {name} has no key {key!r}"

    count = 0
    for obj in _k8s_objects():
        where = f"{obj['kind']} {obj['metadata']['name']}"
        for key, value in _walk(obj):
            if not isinstance(value, dict):
                continue
            count += 1
            if key == "configMapKeyRef":
                check("ConfigMap", value["name"], value["key"], where)
            elif key == "secretKeyRef":
                check("Secret", value["name"], value["key"], where)
            elif key == "configMapRef":
                check("ConfigMap", value["name"], None, where)
            elif key == "secretRef":
                check("Secret", value["name"], None, where)
            elif key == "configMap" and "name" in value:
                check("ConfigMap", value["name"], None, where)
            elif key == "secret" and "secretName" in value:
                check("Secret", value["secretName"], None, where)
            elif key == "persistentVolumeClaim":
                check("PersistentVolumeClaim", value["claimName"], None, where)
        if obj["kind"] == "TriggerAuthentication":
            for ref in obj["spec"].get("secretTargetRef", []):
                check("Secret", ref["name"], ref["key"], where)
    assert count


def test_operator_created_objects_are_documented():
    text = DOCS.read_text(encoding="utf-8")
    for (kind, name), keys in OPERATOR_CREATED.items():
        assert name in text, f"docs/deploy.md does not tell the operator to create {kind} {name}"
        for key in keys:
            assert key in text, f"docs/deploy.md does not name key {key!r} of {kind} {name}"


# ---------------------------------------------------------------------------
# Kubernetes: settings, commands, probes


def test_configmap_is_a_valid_settings_file(tmp_path):
    for cm in _objects("ConfigMap"):
        for key, text in cm.get("data", {}).items():
            if key.endswith((".yaml", ".yml")):
                path = tmp_path / key
                path.write_text(text, encoding="utf-8")
                try:
                    load_settings(path, environ={})
                except ConfigError as exc:
                    pytest.fail(f"ConfigMap {cm['metadata']['name']} {key}: {exc}")


def test_k8s_containers_run_earshot_with_valid_settings(tmp_path):
    containers = _containers(tmp_path)
    assert {c.ns.command for c in containers} >= {"run", "worker"}
    for c in containers:
        assert c.config_text is not None, f"{c.where}: EARSHOT_CONFIG does not point at the ConfigMap's settings"
        # environment beats the file: a key the environment also sets would be dead in the file
        in_file: dict[str, tuple[Any, str]] = {}
        _flatten(compose_file(c.config_path, ConfigError, "configuration file"), str(c.config_path), "", in_file)
        dead = sorted(set(in_file) & c.set_by_env)
        assert not dead, f"{c.where}: {dead} set in the settings file but overridden by the environment"
        host = _http_host(c.settings, c.ns)
        assert host not in LOOPBACK, f"{c.where}: HTTP on {host}: probes could not reach /healthz"


def test_k8s_gateway_uses_the_pool_and_drains_within_its_grace_period(tmp_path):
    for c in _by_command(tmp_path, "run"):
        assert c.settings.asr_backend == "pool", f"{c.where}: not `earshot run --asr pool`"
        assert c.ns.asr == "pool"
        grace = c.pod.get("terminationGracePeriodSeconds")
        assert grace is not None, f"{c.where}: the default 30 s grace cuts a {c.settings.drain_timeout_s} s drain"
        assert grace >= c.settings.drain_timeout_s + 15, f"{c.where}: grace {grace} s vs drain_timeout_s"
        capacity = RtpPortAllocator(c.settings.rtp_port_min, c.settings.rtp_port_max).capacity
        assert c.settings.max_calls <= capacity, f"{c.where}: max_calls above the {capacity} RTP port pairs"
        if c.pod.get("hostNetwork"):
            assert c.pod.get("dnsPolicy") == "ClusterFirstWithHostNet", \
                f"{c.where}: a hostNetwork pod needs dnsPolicy ClusterFirstWithHostNet to resolve Services"
        ports = {(p["containerPort"], p.get("protocol", "TCP")) for p in c.spec["ports"]}
        assert {(c.settings.sip_port, "UDP"), (c.settings.sip_port, "TCP"), (c.settings.http_port, "TCP")} <= ports


def test_k8s_gateway_service_forwards_sip_and_http(tmp_path):
    (gateway,) = _by_command(tmp_path, "run")
    labels = _one("Deployment", gateway.workload)["spec"]["template"]["metadata"]["labels"]
    (svc,) = [s for s in _objects("Service") if s["spec"]["selector"].items() <= labels.items()]
    forwarded = {(p.get("targetPort", p["port"]), p.get("protocol", "TCP")) for p in svc["spec"]["ports"]}
    s = gateway.settings
    assert {(s.sip_port, "UDP"), (s.sip_port, "TCP"), (s.http_port, "TCP")} <= forwarded


def test_k8s_workers_request_a_gpu_and_drain_within_their_grace_period(tmp_path):
    for c in _by_command(tmp_path, "worker"):
        limits = c.spec.get("resources", {}).get("limits", {})
        assert int(limits.get("nvidia.com/gpu", 0)) >= 1, f"{c.where}: no nvidia.com/gpu in resources.limits"
        assert c.settings.asr_device.startswith("cuda"), f"{c.where}: asr_device {c.settings.asr_device}"
        grace = c.pod.get("terminationGracePeriodSeconds")
        assert grace is not None and grace >= c.settings.asr_final_timeout_s + 15, f"{c.where}: grace {grace}"
        model = c.settings.asr_model
        if model.startswith("/"):
            mounts = [m["mountPath"] for m in c.spec.get("volumeMounts", [])]
            assert any(PurePosixPath(m) in PurePosixPath(model).parents for m in mounts), \
                f"{c.where}: asr_model {model} is on no mounted volume"
            assert c.settings.asr_local_files_only, f"{c.where}: a mounted model should not fall back to downloading"


def test_k8s_probes_hit_healthz_on_the_configured_port(tmp_path):
    for c in _containers(tmp_path):
        expected = _http_port(c.settings, c.ns)
        for kind in ("readinessProbe", "livenessProbe"):
            assert kind in c.spec, f"{c.where}: no {kind}"
        for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
            probe = c.spec.get(kind)
            if probe is None:
                continue
            assert probe["httpGet"]["path"] == "/healthz", f"{c.where}: {kind} path"
            assert _probe_port(c.spec, probe) == expected, f"{c.where}: {kind} port, settings say {expected}"


# ---------------------------------------------------------------------------
# KEDA


def test_scaled_object_targets_the_worker_deployment(tmp_path):
    workers = {c.workload for c in _by_command(tmp_path, "worker")}
    (so,) = _objects("ScaledObject")
    target = so["spec"]["scaleTargetRef"]
    assert target.get("kind", "Deployment") == "Deployment"
    assert target["name"] in workers, f"ScaledObject scales {target['name']}, workers are {workers}"
    assert "replicas" not in _one("Deployment", target["name"])["spec"], "KEDA's HPA owns the worker count"
    assert so["spec"]["minReplicaCount"] >= 1, "finals must not wait for a worker's cold start"
    assert so["spec"]["maxReplicaCount"] >= so["spec"]["minReplicaCount"]


def test_redis_streams_triggers_watch_the_pool_job_streams(tmp_path):
    (worker,) = _by_command(tmp_path, "worker")
    names = worker.settings.asr_pool_names
    for gateway in _by_command(tmp_path, "run"):  # both sides must agree on the names
        assert gateway.settings.asr_pool_names == names, f"{gateway.where} and {worker.where} use other job streams"
    configmap_only = None
    for cm in _objects("ConfigMap"):
        if "earshot.yaml" in cm.get("data", {}):
            path = tmp_path / "configmap.yaml"
            path.write_text(cm["data"]["earshot.yaml"], encoding="utf-8")
            configmap_only = load_settings(path, environ={})
    assert configmap_only is not None and configmap_only.asr_pool_names == names

    redis = urlsplit(worker.settings.redis_url)
    (so,) = _objects("ScaledObject")
    triggers = so["spec"]["triggers"]
    assert all(t["type"] == "redis-streams" for t in triggers)
    lag = [t for t in triggers if "lagCount" in t["metadata"]]
    assert sorted(t["metadata"]["stream"] for t in lag) == sorted(names.jobs(k) for k in ("final", "partial")), \
        "one lagCount trigger on each job stream"
    busy = [t for t in triggers if "pendingEntriesCount" in t["metadata"]]
    assert [t["metadata"]["stream"] for t in busy] == [names.jobs("final")], "one pending trigger, on finals"
    per_worker = worker.settings.asr_max_batch * worker.settings.asr_workers
    assert busy[0]["metadata"]["pendingEntriesCount"] == str(per_worker), \
        f"pendingEntriesCount should be one batch per worker (asr_max_batch x asr_workers = {per_worker})"
    auths = {a["metadata"]["name"]: a for a in _objects("TriggerAuthentication")}
    for t in triggers:
        where = f"trigger {t['metadata']['stream']}"
        assert set(t) <= KEDA_TRIGGER_FIELDS, f"{where}: unknown fields {set(t) - KEDA_TRIGGER_FIELDS}"
        meta = t["metadata"]
        assert set(meta) <= KEDA_REDIS_STREAMS_METADATA, \
            f"{where}: {sorted(set(meta) - KEDA_REDIS_STREAMS_METADATA)} are not redis-streams metadata"
        assert all(isinstance(v, str) for v in meta.values()), f"{where}: KEDA metadata values must be strings"
        assert meta["consumerGroup"] == names.group
        for key in ("lagCount", "pendingEntriesCount", "streamLength"):
            if key in meta:
                assert re.fullmatch(r"[1-9][0-9]*", meta[key]), f"{where}: {key} {meta[key]!r}"
        if "activationLagCount" in meta:
            assert re.fullmatch(r"[0-9]+", meta["activationLagCount"]), where
        if "lagCount" in meta:  # KEDA would silently ignore these next to lagCount
            assert not {"pendingEntriesCount", "streamLength"} & set(meta), f"{where}: lagCount and another target"
        if "address" in meta:
            assert meta["address"] == f"{redis.hostname}:{redis.port or 6379}", \
                f"{where}: address {meta['address']} is not the workers' Redis ({redis.hostname}:{redis.port})"
        else:
            assert "addressFromEnv" in meta or "host" in meta, f"{where}: no Redis address"
        assert meta.get("databaseIndex", "0") == (redis.path.strip("/") or "0"), f"{where}: databaseIndex"
        if redis.password:
            ref = (t.get("authenticationRef") or {}).get("name")
            assert ref in auths, f"{where}: authenticationRef {ref!r} names no TriggerAuthentication"


def test_trigger_authentication_uses_the_workers_redis_password(tmp_path):
    (worker,) = _by_command(tmp_path, "worker")
    url_value = worker.literal_env[f"{ENV_PREFIX}REDIS_URL"]
    secret_refs = {(src["secretKeyRef"]["name"], src["secretKeyRef"]["key"])
                   for var in re.findall(r"\$\((\w+)\)", url_value)
                   for src in [worker.env_from.get(var, {})] if "secretKeyRef" in src}
    for auth in _objects("TriggerAuthentication"):
        refs = auth["spec"]["secretTargetRef"]
        assert {r["parameter"] for r in refs} <= KEDA_REDIS_AUTH_PARAMETERS
        password = [(r["name"], r["key"]) for r in refs if r["parameter"] == "password"]
        assert password and set(password) <= secret_refs, \
            f"TriggerAuthentication {auth['metadata']['name']}: not the password in the workers' redis_url"


# ---------------------------------------------------------------------------
# Dockerfiles


def _setup_sh_silero_pin() -> str:
    (pin,) = set(re.findall(r"silero-vad==([0-9.]+)", (DEPLOY / "setup.sh").read_text(encoding="utf-8")))
    return pin


def _setup_sh_pipecat_pin() -> str:
    (pin,) = set(re.findall(r"pipecat-ai==([0-9.]+)", (DEPLOY / "setup.sh").read_text(encoding="utf-8")))
    return pin


def _python_floor() -> tuple[int, int]:
    spec = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["requires-python"]
    major, minor = re.fullmatch(r">=\s*(\d+)\.(\d+)", spec).groups()
    return int(major), int(minor)


@pytest.mark.parametrize("path", sorted(IMAGES.values()), ids=lambda p: p.name)
def test_dockerfile_installs_earshot_and_sets_valid_settings(path):
    instructions = " ".join(args for _, args in _dockerfile(path))
    runs = " ".join(_docker_args(path, "RUN"))
    # editable: gateway/store/migrate.py looks for migrations/ beside the package, which a
    # plain `pip install .` into site-packages would leave behind
    assert re.search(r"pip install -e \.(\s|$)", runs), f"{path.name}: no `pip install -e .` (migrations/)"
    assert f"silero-vad=={_setup_sh_silero_pin()}" in runs and "--no-deps" in runs, \
        f"{path.name}: silero-vad must be installed --no-deps at deploy/setup.sh's version"
    assert re.search(rf"--no-deps '?pipecat-ai=={re.escape(_setup_sh_pipecat_pin())}", runs), \
        f"{path.name}: pipecat-ai (the Smart Turn model file) must be installed --no-deps at deploy/setup.sh's version"
    versions = {(3, int(minor)) for minor in re.findall(r"python:?3\.(\d+)", instructions)}
    assert versions and all(v >= _python_floor() for v in versions), f"{path.name}: Python {versions}"
    env = _docker_env(path)
    assert env.get("HF_HUB_OFFLINE") == "1", f"{path.name}: a starting container must not download models"
    settings = _settings(path.name, None, _earshot_env(env))
    (user,) = _docker_args(path, "USER")
    assert user.split(":")[0] not in ("root", "0"), f"{path.name}: runs as root"
    ns = _parse_command(_docker_cmd(path), path.name)
    exposed = set(" ".join(_docker_args(path, "EXPOSE")).split())
    port = _http_port(settings, ns)
    assert str(port) in exposed or f"{port}/tcp" in exposed, f"{path.name}: EXPOSE lacks the HTTP port {port}"
    assert _http_host(settings, ns) not in LOOPBACK, f"{path.name}: HTTP on loopback is unreachable from outside"


def test_cpu_image_runs_the_gateway_and_exposes_its_ports():
    path = IMAGES["earshot"]
    (base,) = _docker_args(path, "FROM")
    assert base == "python:3.11-slim-bookworm"
    ns = _parse_command(_docker_cmd(path), path.name)
    assert ns.command == "run"
    s = _settings(path.name, None, _earshot_env(_docker_env(path)))
    exposed = set(" ".join(_docker_args(path, "EXPOSE")).split())
    assert {f"{s.sip_port}/udp", f"{s.sip_port}/tcp", str(s.http_port), str(s.worker_http_port)} <= exposed


def test_cuda_image_runs_a_gpu_worker():
    path = IMAGES["earshot-cuda"]
    (base,) = _docker_args(path, "FROM")
    assert re.fullmatch(r"nvidia/cuda:12\.[0-9.]+-cudnn[0-9]*-runtime-ubuntu[0-9.]+", base), base
    assert _parse_command(_docker_cmd(path), path.name).command == "worker"
    env = _docker_env(path)
    assert env.get(f"{ENV_PREFIX}ASR_DEVICE") == "cuda"
    assert env.get(f"{ENV_PREFIX}WORKER_HTTP_HOST") == "0.0.0.0"


def test_dockerignore_keeps_local_state_out_of_the_build_context():
    patterns = {line.strip() for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
                if line.strip() and not line.startswith("#")}
    for needed in (".git", ".venv", "artifacts", "earshot.db", "*.web-secret"):
        assert needed in patterns, f".dockerignore does not exclude {needed}"
    for kept in ("pyproject.toml", "README.md", "gateway", "migrations", "dialplans"):
        assert kept not in patterns, f".dockerignore excludes {kept}, which the image needs"


# ---------------------------------------------------------------------------
# docker compose


def _interpolate(value: Any) -> Any:
    """Compose's ${VAR:-default} / ${VAR-default} / ${VAR} with nothing set in the environment."""
    if not isinstance(value, str):
        return value
    return re.sub(r"\$\{(\w+)(?::?[-?]([^}]*))?\}", lambda m: m.group(2) or "", value)


def _compose_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    for key, value in env.items():
        assert isinstance(value, str), f"compose: {key}={value!r}: quote it (Compose wants strings)"
    return {k: _interpolate(v) for k, v in env.items()}


def _compose_dockerfile(name: str, service: dict[str, Any]) -> Path:
    build = service.get("build")
    assert isinstance(build, dict), f"compose {name}: build it from this repository's Dockerfiles"
    context = (COMPOSE.parent / build.get("context", ".")).resolve()
    assert context == ROOT, f"compose {name}: build context {context} is not the repository root"
    path = context / build.get("dockerfile", "Dockerfile")
    assert path in IMAGES.values(), f"compose {name}: {path} is not one of the images"
    return path


class ComposeService:
    def __init__(self, name: str, service: dict[str, Any]) -> None:
        self.name, self.spec = name, service
        self.where = f"compose {name}"
        command = service.get("command")
        dockerfile = _compose_dockerfile(name, service)
        self.ns = _parse_command(command if command is not None else _docker_cmd(dockerfile), self.where)
        env = {**_docker_env(dockerfile), **_compose_env(service)}
        self.env = env
        self.settings = _settings(self.where, None, _earshot_env(env), self.ns)


def _compose_earshot() -> dict[str, ComposeService]:
    services = _compose()["services"]
    return {name: ComposeService(name, svc) for name, svc in services.items() if "build" in svc}


def _seconds(value: str) -> float:
    total = 0.0
    for number, unit in re.findall(r"([0-9.]+)(ms|s|m|h)", value):
        total += float(number) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    return total


def _published(ports: list[Any]) -> set[tuple[int, str]]:
    """(container port, protocol) for every port a service publishes, ranges expanded."""
    out: set[tuple[int, str]] = set()
    for item in ports:
        if isinstance(item, dict):
            out.add((int(item["target"]), item.get("protocol", "tcp")))
            continue
        spec, _, proto = str(item).partition("/")
        container = spec.rsplit(":", 1)[-1]
        first, _, last = container.partition("-")
        out.update((p, proto or "tcp") for p in range(int(first), int(last or first) + 1))
    return out


def test_compose_services_and_images():
    services = _compose()["services"]
    assert {"redis", "postgres", "gateway", "worker", "worker-gpu"} <= set(services)
    tag = services["redis"]["image"].partition(":")[2]
    assert tag and int(re.match(r"\d+", tag).group()) >= 7, "consumer-group lag needs Redis 7+"
    assert services["postgres"]["image"].startswith("postgres:16")
    assert "healthcheck" in services["postgres"]


def test_compose_earshot_services_have_valid_settings_and_healthchecks():
    services = _compose_earshot()
    assert {"gateway", "worker", "worker-gpu"} <= set(services)
    names = set(_compose()["services"])
    for svc in services.values():
        assert svc.ns.command in ("run", "worker"), svc.where
        host = urlsplit(svc.settings.redis_url).hostname
        assert host in names, f"{svc.where}: redis_url host {host} is no compose service"
        assert "redis" in svc.spec.get("depends_on", {}), f"{svc.where}: does not wait for Redis"
        port = _http_port(svc.settings, svc.ns)
        assert _http_host(svc.settings, svc.ns) not in LOOPBACK, f"{svc.where}: /healthz on loopback"
        test = " ".join(svc.spec["healthcheck"]["test"])
        assert f":{port}/healthz" in test, f"{svc.where}: healthcheck does not hit /healthz on {port}"
        grace = _seconds(svc.spec.get("stop_grace_period", "10s"))
        needed = svc.settings.drain_timeout_s if svc.ns.command == "run" else svc.settings.asr_final_timeout_s
        assert grace >= needed + 15, f"{svc.where}: stop_grace_period {grace} s cuts the drain"


def test_compose_gateway_uses_the_pool_and_publishes_sip_and_rtp():
    gateway = _compose_earshot()["gateway"]
    assert gateway.ns.asr == "pool" and gateway.settings.asr_backend == "pool"
    s = gateway.settings
    published = _published(gateway.spec["ports"])
    assert {(s.sip_port, "udp"), (s.sip_port, "tcp"), (s.http_port, "tcp")} <= published
    rtp = {(p, "udp") for p in range(s.rtp_port_min, s.rtp_port_max + 1)}
    assert rtp <= published, "the published UDP range must cover rtp_port_min..rtp_port_max"
    assert s.max_calls <= RtpPortAllocator(s.rtp_port_min, s.rtp_port_max).capacity
    db = urlsplit(s.database_url)
    assert db.scheme == "postgresql+psycopg" and db.hostname == "postgres"
    assert gateway.spec["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_compose_gpu_worker_reserves_an_nvidia_gpu():
    gpu = _compose_earshot()["worker-gpu"]
    assert gpu.spec.get("profiles") == ["gpu"]
    assert _compose_dockerfile("worker-gpu", gpu.spec) == IMAGES["earshot-cuda"]
    devices = gpu.spec["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) and int(d.get("count", 0)) >= 1
               for d in devices)
    s = gpu.settings
    assert s.asr_device.startswith("cuda") and s.asr_local_files_only
    targets = [_interpolate(v).split(":")[1] for v in gpu.spec.get("volumes", [])]
    assert any(PurePosixPath(t) in PurePosixPath(s.asr_model).parents for t in targets), \
        f"asr_model {s.asr_model} is on no mounted volume"
    cpu = _compose_earshot()["worker"]
    assert "profiles" not in cpu.spec and not cpu.settings.asr_device.startswith("cuda")


# ---------------------------------------------------------------------------
# the subcommands the manifests may use exist


@pytest.mark.parametrize("sub", sorted(SUBCOMMANDS))
def test_subcommand_exists(sub, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([sub, "--help"])
    assert exc.value.code == 0
    assert f"earshot {sub}" in capsys.readouterr().out


# -- the systemd unit -------------------------------------------------------------------------------

def _systemd_unit(path: Path) -> dict[str, list[str]]:
    """``Key=value`` lines of a unit file, every value of a repeated key kept in order."""
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def _systemd_environment(unit: dict[str, list[str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for value in unit.get("Environment", []):
        for assignment in shlex.split(value):
            name, _, val = assignment.partition("=")
            env[name] = val
    return env


def test_systemd_unit_gives_the_default_store_and_secrets_a_writable_state_directory():
    """ProtectSystem=strict makes the file system read-only for the service: everything the
    gateway writes by default (SQLite store, dashboard secret, publisher spool, model cache)
    must be under the StateDirectory/CacheDirectory systemd creates for it."""
    from gateway.asr.models import default_cache_dir
    from gateway.spool import spool_file_for
    from gateway.web.auth import secret_file_for

    unit = _systemd_unit(DEPLOY / "earshot.service")
    assert unit["ProtectSystem"] == ["strict"] and unit["ProtectHome"] == ["true"]
    assert unit["StateDirectory"] == ["earshot"] and unit["CacheDirectory"] == ["earshot"]
    state, cache = PurePosixPath("/var/lib/earshot"), PurePosixPath("/var/cache/earshot")
    env = _systemd_environment(unit)
    assert env["EARSHOT_CONFIG"] == "/etc/earshot/earshot.yaml"
    # the unit's settings with the example file installed as /etc/earshot/earshot.yaml
    settings = load_settings(DEPLOY / "earshot.example.yaml",
                             environ={k: v for k, v in env.items() if k.startswith(ENV_PREFIX) and k != "EARSHOT_CONFIG"})
    assert settings.database_url.startswith("sqlite:////")
    database = PurePosixPath(settings.database_url[len("sqlite:///"):])
    assert database.parent == state
    assert PurePosixPath(secret_file_for(settings.database_url, settings.web_secret_file)).parent == state
    assert PurePosixPath(spool_file_for(settings.database_url, settings.publish_spool_file)).parent == state
    with mock.patch.dict("os.environ", {"EARSHOT_CACHE_DIR": env["EARSHOT_CACHE_DIR"]}):
        assert PurePosixPath(default_cache_dir()) == cache
    assert PurePosixPath(env["HF_HOME"]).is_relative_to(cache)
    # a PostgreSQL URL (with its password) goes in an optional environment file read after the defaults
    assert unit["EnvironmentFile"] == ["-/etc/earshot/earshot.env"]


def test_systemd_unit_state_is_not_world_readable():
    unit = _systemd_unit(DEPLOY / "earshot.service")
    assert unit["StateDirectoryMode"] == ["0750"] and unit["UMask"] == ["0027"]
