"""Checks deploy/k8s and the image without a cluster: rendering, schema, policy and cross-checks."""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.metadata
import json
import os
import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlparse

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from payments.approval.v1 import approval_service_pb2 as approval_pb2
from payments.history.v1 import history_service_pb2 as history_pb2
from payments_common import tracing
from payments_common.keys import DEFAULT_NAMESPACE, DEFAULT_SLOT_NAME, namespace_problem, slot_problem
from payments_common.settings import SettingsError
from stack.auth import APPROVAL_METHODS, HISTORY_METHODS, ROLES, LocalAuthority, default_policy
from tests.support import ROOT, k8s
from tests.support.k8s import OVERLAYS, SERVICES, Endpoint, Obj

# Schemas of the oldest Kubernetes the manifests support (native sleep in preStop needs 1.30,
# on by default) and of the newest that kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.32.0", "1.37.0")


@pytest.fixture(scope="session", params=sorted(OVERLAYS))
def overlay(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="session")
def rendered_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("k8s-rendered")


def _missing(reason: str) -> NoReturn:
    # make test installs the tools, so in CI a missing one is a broken setup, not a reason to skip.
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def _objects(overlay: str) -> tuple[Obj, ...]:
    try:
        return k8s.objects(overlay)
    except k8s.ToolMissing as missing:
        _missing(str(missing))


def _rendered_file(overlay: str, directory: Path) -> Path:
    _objects(overlay)  # skips with the reason when a tool is missing
    path = directory / f"{overlay}.yaml"
    if not path.exists():
        path.write_text(k8s.render(overlay))
    return path


@pytest.fixture(scope="session")
def objs(overlay: str) -> tuple[Obj, ...]:
    return _objects(overlay)


@pytest.fixture(scope="session")
def namespace(overlay: str) -> str:
    return OVERLAYS[overlay]


def _tool(name: str) -> Path:
    try:
        return k8s.venv_tool(name)
    except k8s.ToolMissing as missing:
        _missing(str(missing))


# ----- rendering and schema -------------------------------------------------------------------


def test_overlay_renders_into_its_namespace(objs: tuple[Obj, ...], namespace: str) -> None:
    kinds = {o["kind"] for o in objs}
    assert {"Deployment", "Service", "Job", "NetworkPolicy", "HorizontalPodAutoscaler"} <= kinds
    assert k8s.named(objs, "Namespace", namespace)
    for obj in objs:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == namespace, obj["metadata"]["name"]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_object_validates_strictly(overlay: str, rendered_dir: Path, version: str) -> None:
    _validate_strictly(_rendered_file(overlay, rendered_dir), version)


def _validate_strictly(path: Path, version: str) -> None:
    validate = _tool("kubernetes-validate")
    result = subprocess.run(
        [str(validate), "--strict", "--quiet", "-k", version, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


_checkov_results: dict[str, dict[str, Any]] = {}


def _run_checkov(path: Path, directory: Path) -> dict[str, Any]:
    """checkov's report on one rendered file, without skips (they are applied by the tests)."""
    checkov = _tool("checkov")
    result = subprocess.run(
        [str(checkov), "-f", str(path), "--framework", "kubernetes", "--skip-download", "-o", "json"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=directory,
    )
    assert result.stdout.strip(), result.stderr
    report = json.loads(result.stdout)
    found: dict[str, Any] = report[0] if isinstance(report, list) else report
    return found


def _checkov(overlay: str, directory: Path) -> dict[str, Any]:
    """One checkov run per overlay per session."""
    if overlay not in _checkov_results:
        _checkov_results[overlay] = _run_checkov(_rendered_file(overlay, directory), directory)
    return _checkov_results[overlay]


def _checkov_failures_not_skipped(report: dict[str, Any], overlay: str) -> list[str]:
    assert report["summary"]["parsing_errors"] == 0
    assert report["summary"]["passed"] > 300, "checkov ran too few checks: did it parse the objects?"
    allowed = {s.check_id for s in k8s.checkov_skips() if overlay in s.overlays}
    return sorted(
        f"{f['check_id']} {f['resource']}: {f['check_name']}"
        for f in report["results"]["failed_checks"]
        if f["check_id"] not in allowed
    )


def test_checkov_passes_but_for_documented_skips(overlay: str, rendered_dir: Path) -> None:
    assert _checkov_failures_not_skipped(_checkov(overlay, rendered_dir), overlay) == []


def test_checkov_skips_have_reasons_and_are_needed(rendered_dir: Path) -> None:
    skips = k8s.checkov_skips()
    failing: dict[str, set[str]] = {}
    for overlay in OVERLAYS:
        report = _checkov(overlay, rendered_dir)
        failing[overlay] = {f["check_id"] for f in report["results"]["failed_checks"]}
    for skip in skips:
        assert re.fullmatch(r"CKV2?_K8S_\d+", skip.check_id), skip
        assert skip.overlays <= set(OVERLAYS), skip
        assert len(skip.reason) > 40, f"{skip.check_id} needs a real reason"
        stale = [o for o in skip.overlays if skip.check_id not in failing[o]]
        assert stale == [], f"{skip.check_id} no longer fails in {stale}: remove it from the list"


# ----- ports, probes, shutdown ------------------------------------------------------------------


def _service_container(objs: tuple[Obj, ...], service: str) -> tuple[Obj, Obj]:
    workload = k8s.service_workload(objs, service)
    pod = k8s.pod_template(workload)
    matches = [c for c in pod["spec"]["containers"] if c.get("command") == SERVICES[service]["command"]]
    assert len(matches) == 1
    return workload, matches[0]


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_container_ports_match_the_env_the_service_reads(
    objs: tuple[Obj, ...], namespace: str, service: str
) -> None:
    _, container = _service_container(objs, service)
    env = k8s.container_env(container, objs, namespace)
    prefix = SERVICES[service]["prefix"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    grpc_port = int(env[SERVICES[service]["port_env"]])
    metrics_port = int(env[f"{prefix}_METRICS_PORT"])
    assert grpc_port in ports.values()
    assert ports["metrics"] == metrics_port
    assert len(set(ports.values())) == len(ports)


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_probes_use_grpc_health_on_the_grpc_port(objs: tuple[Obj, ...], namespace: str, service: str) -> None:
    _, container = _service_container(objs, service)
    grpc_port = int(k8s.container_env(container, objs, namespace)[SERVICES[service]["port_env"]])
    expected = {"livenessProbe": "liveness", "startupProbe": "liveness", "readinessProbe": "readiness"}
    for probe_name, health_service in expected.items():
        probe = container.get(probe_name)
        assert probe is not None, f"{service} has no {probe_name}"
        assert probe.get("grpc") == {"port": grpc_port, "service": health_service}, (service, probe_name)


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_termination_grace_outlasts_prestop_and_server_grace(
    objs: tuple[Obj, ...], namespace: str, service: str
) -> None:
    workload, container = _service_container(objs, service)
    env = k8s.container_env(container, objs, namespace)
    grace = float(env.get(f"{SERVICES[service]['prefix']}_GRACE_SECONDS", k8s.DEFAULT_GRACE_SECONDS))
    pre_stop = container.get("lifecycle", {}).get("preStop", {})
    pre_stop_seconds = pre_stop.get("sleep", {}).get("seconds", 0)
    assert "exec" not in pre_stop, "preStop uses the native sleep action; the image has no shell to rely on"
    period = k8s.pod_template(workload)["spec"].get("terminationGracePeriodSeconds", 30)
    assert period >= pre_stop_seconds + grace + 5, (service, period, pre_stop_seconds, grace)
    if service in ("approval", "history"):
        assert pre_stop_seconds > 0, f"{service} is behind a Service: it needs a preStop delay"


def test_every_service_port_reaches_a_container_port(objs: tuple[Obj, ...]) -> None:
    pods = [k8s.pod_template(w) for w in k8s.workloads(objs)]
    for service in k8s.of_kind(objs, "Service"):
        selected = [
            p
            for p in pods
            if k8s.simple_selector_matches(service["spec"]["selector"], p["metadata"]["labels"])
        ]
        assert selected, f"Service {service['metadata']['name']} selects no pods"
        for pod in selected:
            ports = [p for c in k8s.containers(pod) for p in c.get("ports", [])]
            for service_port in service["spec"]["ports"]:
                target = service_port.get("targetPort", service_port["port"])
                assert any(target in (p["containerPort"], p.get("name")) for p in ports), (
                    service["metadata"]["name"],
                    target,
                )


def test_workload_selectors_match_their_pod_labels(objs: tuple[Obj, ...]) -> None:
    for workload in k8s.workloads(objs):
        if workload["kind"] in ("Job", "CronJob", "Pod"):
            continue
        labels = k8s.pod_template(workload)["metadata"]["labels"]
        assert k8s.selector_matches(workload["spec"]["selector"], labels), workload["metadata"]["name"]
    owners = {w["metadata"]["name"]: k8s.pod_template(w)["metadata"]["labels"] for w in k8s.workloads(objs)}
    for pdb in k8s.of_kind(objs, "PodDisruptionBudget"):
        matched = [n for n, labels in owners.items() if k8s.selector_matches(pdb["spec"]["selector"], labels)]
        assert len(matched) == 1, (pdb["metadata"]["name"], matched)
    deployments = {d["metadata"]["name"] for d in k8s.of_kind(objs, "Deployment")}
    for hpa in k8s.of_kind(objs, "HorizontalPodAutoscaler"):
        target = hpa["spec"]["scaleTargetRef"]
        assert target["kind"] == "Deployment"
        assert target["name"] in deployments


def test_history_and_replicator_agree_on_the_slot(objs: tuple[Obj, ...], namespace: str) -> None:
    # history finds the replicator's checkpoint (for consistency waits) by the slot name.
    _, history = _service_container(objs, "history")
    _, replicator = _service_container(objs, "replicator")
    history_slot = k8s.container_env(history, objs, namespace)["HISTORY_SLOT_NAME"]
    assert history_slot == k8s.container_env(replicator, objs, namespace)["REPLICATOR_SLOT_NAME"]


def test_history_reads_the_key_namespace_the_replicator_writes(objs: tuple[Obj, ...], namespace: str) -> None:
    # Unset on both sides, each takes DEFAULT_NAMESPACE; set on one, it must be set alike on the other.
    _, history = _service_container(objs, "history")
    _, replicator = _service_container(objs, "replicator")
    history_env = k8s.container_env(history, objs, namespace)
    replicator_env = k8s.container_env(replicator, objs, namespace)
    assert history_env.get("HISTORY_KEY_NAMESPACE", DEFAULT_NAMESPACE) == replicator_env.get(
        "REPLICATOR_KEY_NAMESPACE", DEFAULT_NAMESPACE
    )


# ----- replicas, scaling, disruption ------------------------------------------------------------


def _pdbs_for(objs: tuple[Obj, ...], workload: Obj) -> list[Obj]:
    labels = k8s.pod_template(workload)["metadata"]["labels"]
    return [
        p
        for p in k8s.of_kind(objs, "PodDisruptionBudget")
        if k8s.selector_matches(p["spec"]["selector"], labels)
    ]


def _disruptions_allowed(pdb: Obj, replicas: int) -> int:
    spec = pdb["spec"]
    if "maxUnavailable" in spec:
        value = spec["maxUnavailable"]
        return int(replicas * int(value[:-1]) / 100) if isinstance(value, str) else int(value)
    value = spec["minAvailable"]
    minimum = -(-replicas * int(value[:-1]) // 100) if isinstance(value, str) else int(value)
    return replicas - minimum


def test_replicator_cannot_run_two_active_consumers(objs: tuple[Obj, ...]) -> None:
    consumers = [
        w
        for w in k8s.workloads(objs)
        for c in k8s.containers(k8s.pod_template(w))
        if (c.get("command") or [])[:2] == ["replicator", "run"]
    ]
    assert len(consumers) == 1, "exactly one workload may consume the replication slot"
    replicator = consumers[0]
    assert replicator["kind"] == "Deployment"
    assert replicator["spec"].get("replicas") == 1
    assert replicator["spec"]["strategy"] == {"type": "Recreate"}
    assert not [
        h
        for h in k8s.of_kind(objs, "HorizontalPodAutoscaler")
        if h["spec"]["scaleTargetRef"]["name"] == "replicator"
    ]
    assert _pdbs_for(objs, replicator) == [], "a PDB on the single replicator blocks node drains"


def test_approval_keeps_two_replicas_and_a_pdb_that_allows_drains(objs: tuple[Obj, ...]) -> None:
    approval = k8s.service_workload(objs, "approval")
    replicas = approval["spec"]["replicas"]
    assert replicas >= 2
    pdbs = _pdbs_for(objs, approval)
    assert len(pdbs) == 1
    assert 1 <= _disruptions_allowed(pdbs[0], replicas) < replicas


def test_history_scales_horizontally(objs: tuple[Obj, ...], namespace: str) -> None:
    history = k8s.service_workload(objs, "history")
    assert "replicas" not in history["spec"], "the HPA owns the replica count; applying must not reset it"
    (hpa,) = [
        h
        for h in k8s.of_kind(objs, "HorizontalPodAutoscaler")
        if h["spec"]["scaleTargetRef"]["name"] == "history"
    ]
    assert hpa["spec"]["minReplicas"] >= 2
    assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    assert any(m["type"] == "Resource" and m["resource"]["name"] == "cpu" for m in hpa["spec"]["metrics"])
    (pdb,) = _pdbs_for(objs, history)
    assert 1 <= _disruptions_allowed(pdb, hpa["spec"]["minReplicas"]) < hpa["spec"]["minReplicas"]
    labels = k8s.pod_template(history)["metadata"]["labels"]
    services = [
        s for s in k8s.of_kind(objs, "Service") if k8s.simple_selector_matches(s["spec"]["selector"], labels)
    ]
    headless = [s for s in services if s["spec"].get("clusterIP") == "None"]
    normal = [s for s in services if s["spec"].get("clusterIP") != "None"]
    assert len(headless) == 1
    assert len(normal) == 1
    _, container = _service_container(objs, "history")
    env = k8s.container_env(container, objs, namespace)
    age = float(env.get("HISTORY_MAX_CONNECTION_AGE_SECONDS", 300))
    assert 0 < age <= 600, "clients only re-resolve the headless Service when connections age out"


def test_migration_runs_as_a_job_and_never_at_container_start(objs: tuple[Obj, ...]) -> None:
    migrating = [
        w
        for w in k8s.workloads(objs)
        for c in k8s.containers(k8s.pod_template(w))
        if (c.get("command") or [])[:2] == ["approval-svc", "migrate"]
    ]
    assert [w["kind"] for w in migrating] == ["Job"]
    assert k8s.pod_template(migrating[0])["spec"]["restartPolicy"] == "Never"


# ----- hardening, labels, secrets ---------------------------------------------------------------


def test_pods_are_hardened(objs: tuple[Obj, ...]) -> None:
    for workload in k8s.workloads(objs):
        name = workload["metadata"]["name"]
        pod = k8s.pod_template(workload)["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] >= 10000, name
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert pod.get("automountServiceAccountToken") is False, name
        assert not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")), name
        mounts_by_volume = {v["name"]: v for v in pod.get("volumes", [])}
        for container in k8s.containers(k8s.pod_template(workload)):
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["readOnlyRootFilesystem"] is True, name
            assert context["capabilities"]["drop"] == ["ALL"], name
            assert "add" not in context["capabilities"], name
            assert context.get("privileged", False) is False, name
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][kind]), (name, kind)
            if container["image"].split("/")[-1].startswith("payments-cqrs"):
                (tmp,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
                assert "emptyDir" in mounts_by_volume[tmp["name"]], name


def test_recommended_labels_come_from_kustomize_labels(objs: tuple[Obj, ...], overlay: str) -> None:
    for obj in objs:
        labels = obj["metadata"].get("labels", {})
        for key in ("part-of", "managed-by", "instance", "version"):
            assert f"app.kubernetes.io/{key}" in labels, (obj["kind"], obj["metadata"]["name"], key)
        if obj["kind"] in (*k8s.WORKLOAD_KINDS, "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"):
            assert "app.kubernetes.io/name" in labels
            assert "app.kubernetes.io/component" in labels
    for workload in k8s.workloads(objs):
        labels = k8s.pod_template(workload)["metadata"]["labels"]
        for key in ("name", "component", "part-of", "instance"):
            assert f"app.kubernetes.io/{key}" in labels, (workload["metadata"]["name"], key)
    for kustomization in k8s.K8S_DIR.rglob("kustomization.yaml"):
        assert "commonLabels" not in kustomization.read_text(), kustomization


SECRET_LOOKING = re.compile(r"PASSWORD|SECRET|TOKEN|_URL$|DSN", re.IGNORECASE)


def test_credentials_only_come_from_secrets(objs: tuple[Obj, ...]) -> None:
    assert k8s.of_kind(objs, "Secret") == [], "Secrets are created out of band, never rendered"
    for configmap in k8s.of_kind(objs, "ConfigMap"):
        for key, value in configmap.get("data", {}).items():
            assert not (SECRET_LOOKING.search(key) and not key.endswith("_FILE")), (
                configmap["metadata"]["name"],
                key,
            )
            assert not re.search(r"://[^/\s]*:[^/\s]*@", value), (configmap["metadata"]["name"], key)
    for workload in k8s.workloads(objs):
        for container in k8s.containers(k8s.pod_template(workload)):
            for var in container.get("env", []):
                if "value" in var and SECRET_LOOKING.search(var["name"]):
                    assert var["name"].endswith("_FILE"), (workload["metadata"]["name"], var["name"])
                    assert var["value"].startswith("/var/run/secrets/"), var


def _mounted_file(pod: Obj, container: Obj, path: str) -> tuple[Obj, Obj, str]:
    """The volume mount and the volume that hold the file at `path`, and the volume's key for it."""
    directory, _, filename = path.rpartition("/")
    (mount,) = [m for m in container.get("volumeMounts", []) if m["mountPath"] == directory]
    (volume,) = [v for v in pod["spec"].get("volumes", []) if v["name"] == mount["name"]]
    source = volume.get("secret") or volume.get("configMap")
    assert source is not None, f"{path} is mounted from neither a Secret nor a ConfigMap"
    (item,) = [i for i in source["items"] if i["path"] == filename]
    return mount, volume, item["key"]


def test_file_settings_point_into_mounted_files(objs: tuple[Obj, ...], namespace: str) -> None:
    """Every `_FILE` setting names a file that a mounted Secret or ConfigMap provides.

    Credentials come from Secrets only; a ConfigMap must be rendered with the key the pod
    reads. No mount uses subPath, which would freeze the file: the JWKS (and any rotated
    credential) is updated in place when its Secret changes.
    """
    configmaps = {c["metadata"]["name"]: c.get("data", {}) for c in k8s.of_kind(objs, "ConfigMap")}
    for workload in k8s.workloads(objs):
        pod = k8s.pod_template(workload)
        name = workload["metadata"]["name"]
        for container in pod["spec"]["containers"]:
            assert not [m for m in container.get("volumeMounts", []) if "subPath" in m], name
            env = k8s.container_env(container, objs, namespace)
            for variable, path in env.items():
                if not variable.endswith("_FILE"):
                    continue
                _, volume, key = _mounted_file(pod, container, path)
                if "configMap" in volume:
                    assert not SECRET_LOOKING.search(variable.removesuffix("_FILE")), (name, variable)
                    assert key in configmaps.get(volume["configMap"]["name"], {}), (name, variable)


# ----- authentication ---------------------------------------------------------------------------

# The gRPC APIs: every call but health and reflection needs credentials. (The replicator's
# gRPC port serves health only.)
API_SERVICES = {"approval": approval_pb2, "history": history_pb2}


def _api_env(objs: tuple[Obj, ...], namespace: str, service: str) -> dict[str, str]:
    _, container = _service_container(objs, service)
    return k8s.container_env(container, objs, namespace)


def test_every_grpc_api_is_a_service_with_authentication(objs: tuple[Obj, ...]) -> None:
    # A new workload with a `grpc` port must be added to API_SERVICES, and so to the checks below.
    serving = {
        k8s.pod_template(w)["metadata"]["labels"]["app.kubernetes.io/name"]
        for w in k8s.workloads(objs)
        for c in k8s.containers(k8s.pod_template(w))
        if any(p.get("name") == "grpc" for p in c.get("ports", []))
    }
    assert serving == set(API_SERVICES)


@pytest.mark.parametrize("service", sorted(API_SERVICES))
def test_grpc_servers_verify_tokens_and_apply_a_policy(
    objs: tuple[Obj, ...], namespace: str, service: str
) -> None:
    env = _api_env(objs, namespace, service)
    prefix = SERVICES[service]["prefix"]
    assert env.get(f"{prefix}_AUTH_JWKS_FILE"), f"{service} has no JWKS to verify tokens with"
    for setting in ("AUTH_ISSUER", "AUTH_AUDIENCE", "AUTH_POLICY_FILE"):
        assert env.get(f"{prefix}_{setting}"), (service, setting)
    assert env[f"{prefix}_AUTH_ISSUER"].startswith("https://")


def test_no_workload_turns_authentication_off(objs: tuple[Obj, ...], namespace: str) -> None:
    for workload in k8s.workloads(objs):
        for container in k8s.containers(k8s.pod_template(workload)):
            names = set(k8s.container_env(container, objs, namespace))
            names |= {var["name"] for var in container.get("env", [])}  # valueFrom too
            disabled = sorted(n for n in names if n.endswith("AUTH_DISABLED"))
            assert disabled == [], (workload["metadata"]["name"], disabled)
    for configmap in k8s.of_kind(objs, "ConfigMap"):
        assert not [k for k in configmap.get("data", {}) if k.endswith("AUTH_DISABLED")], configmap


def test_both_apis_trust_the_same_issuer_audience_and_keys(
    objs: tuple[Obj, ...], namespace: str, overlay: str
) -> None:
    """A token from the identity provider works on both services; the dev overlay trusts `python -m stack token`."""
    approval, history = (_api_env(objs, namespace, s) for s in ("approval", "history"))
    for setting in ("AUTH_ISSUER", "AUTH_AUDIENCE"):
        assert approval[f"APPROVAL_{setting}"] == history[f"HISTORY_{setting}"], setting
    jwks = []
    for service in ("approval", "history"):
        workload, container = _service_container(objs, service)
        env = _api_env(objs, namespace, service)
        _, volume, key = _mounted_file(
            k8s.pod_template(workload), container, env[f"{SERVICES[service]['prefix']}_AUTH_JWKS_FILE"]
        )
        assert "secret" in volume, "the JWKS decides who may sign tokens: a Secret, under Secret RBAC"
        jwks.append((volume["secret"]["secretName"], key))
    assert jwks[0] == jwks[1]
    if overlay == "dev":
        assert approval["APPROVAL_AUTH_ISSUER"] == LocalAuthority.ISSUER
        assert approval["APPROVAL_AUTH_AUDIENCE"] == LocalAuthority.AUDIENCE


def _mounted_policy(objs: tuple[Obj, ...], namespace: str, service: str) -> tuple[str, dict[str, Any]]:
    """The ConfigMap that the service's policy file comes from, and the policy document."""
    workload, container = _service_container(objs, service)
    path = _api_env(objs, namespace, service)[f"{SERVICES[service]['prefix']}_AUTH_POLICY_FILE"]
    _, volume, key = _mounted_file(k8s.pod_template(workload), container, path)
    assert "configMap" in volume, f"{service}'s policy is configuration: a ConfigMap"
    configmap = k8s.named(objs, "ConfigMap", volume["configMap"]["name"])
    return configmap["metadata"]["name"], json.loads(configmap["data"][key])


@pytest.mark.parametrize("service", sorted(API_SERVICES))
def test_the_policy_covers_every_method_of_the_service(
    objs: tuple[Obj, ...], namespace: str, service: str
) -> None:
    """Every RPC of the contract has roles (a method the policy omits is denied to everyone), and no other."""
    _, policy = _mounted_policy(objs, namespace, service)
    (descriptor,) = API_SERVICES[service].DESCRIPTOR.services_by_name.values()
    methods = {f"{descriptor.full_name}/{method.name}" for method in descriptor.methods}
    assert set(policy["methods"]) == methods
    for method, roles in policy["methods"].items():
        assert roles, f"{method} allows no role"
        assert set(roles) <= set(ROLES), (method, roles)
    assert set(policy["customer_roles"]) <= set(ROLES)


def test_the_policies_are_the_local_stacks_and_kept_in_one_configmap(
    objs: tuple[Obj, ...], namespace: str
) -> None:
    """The deployed policies are exactly the defaults of stack/auth.py, which `make up` and the tests use."""
    approval_source, approval_policy = _mounted_policy(objs, namespace, "approval")
    history_source, history_policy = _mounted_policy(objs, namespace, "history")
    assert approval_source == history_source
    assert approval_policy == default_policy(APPROVAL_METHODS)
    assert history_policy == default_policy(HISTORY_METHODS)


RETIRE_COMMAND = ("replicator", "retire")

# What the Secrets created out of band hold, by key: values of the right form for each setting.
SECRET_SAMPLES = {
    "database-url": "postgresql://approval:sample@postgresql:5432/payments",
    "redis-url": "redis://history:sample@redis:6379/0",
    "page-token-secret": "a-page-token-secret-of-32-bytes!",
}
# The settings that each command of the image reads, and whether it serves calls (and so
# reads the authentication settings), as its __main__ does.
COMMAND_SETTINGS = {
    ("approval-svc", "serve"): ("approval_svc.config", True),
    ("approval-svc", "migrate"): ("approval_svc.config", False),
    ("history-svc", "serve"): ("history_svc.config", True),
    ("replicator", "run"): ("replicator.config", True),
    # Only with components/read-model-next: the Job that retires the old read-model version.
    RETIRE_COMMAND: ("replicator.config", True),
}
# The commands that switch tracing on when their environment says so (their __main__ calls
# tracing.configure_or_exit): the three services. The Jobs' commands export nothing.
TRACED_COMMANDS = {tuple(contract["command"]) for contract in SERVICES.values()}


def test_every_command_accepts_the_settings_its_pod_gets(
    objs: tuple[Obj, ...], namespace: str, tmp_path: Path
) -> None:
    """Each container's environment and mounted files, as rendered, pass its settings' checks.

    The files are laid out as the pod would see them: ConfigMaps with their rendered data,
    Secrets with sample values (the JWKS a local authority's), so the check covers the
    policies too (every method a policy names must be one the server serves).
    """
    assert _commands_accept_their_settings(objs, namespace, tmp_path) == set(COMMAND_SETTINGS) - {
        RETIRE_COMMAND
    }


def _commands_accept_their_settings(
    objs: tuple[Obj, ...], namespace: str, tmp_path: Path
) -> set[tuple[str, ...]]:
    """The commands of the image that the workloads run, each checked with its pod's settings."""
    samples = {
        **SECRET_SAMPLES,
        "jwks.json": LocalAuthority.create(tmp_path / "authority").jwks_path.read_text(),
    }
    configmaps = {c["metadata"]["name"]: c.get("data", {}) for c in k8s.of_kind(objs, "ConfigMap")}
    checked: set[tuple[str, ...]] = set()
    for workload in k8s.workloads(objs):
        pod = k8s.pod_template(workload)
        for container in pod["spec"]["containers"]:
            command = tuple(container.get("command") or ())
            if "payments-cqrs" not in container["image"]:
                continue
            assert command in COMMAND_SETTINGS, f"no settings known for {command}"
            env = k8s.container_env(container, objs, namespace)
            for variable, path in list(env.items()):
                if not variable.endswith("_FILE"):
                    continue
                _, volume, key = _mounted_file(pod, container, path)
                if "configMap" in volume:
                    text = configmaps[volume["configMap"]["name"]][key]
                else:
                    assert key in samples, f"add a sample of the Secret key {key!r} to SECRET_SAMPLES"
                    text = samples[key]
                local = tmp_path / workload["metadata"]["name"] / volume["name"] / key
                local.parent.mkdir(parents=True, exist_ok=True)
                local.write_text(text)
                env[variable] = str(local)
            module, serving = COMMAND_SETTINGS[command]
            settings = importlib.import_module(module).Settings
            try:
                settings.from_env(env, serving=serving)
                if command in TRACED_COMMANDS:
                    tracing.enabled_by(env)  # start-up refuses an exporter or a protocol it lacks
            except SettingsError as error:
                pytest.fail(f"{workload['metadata']['name']} ({' '.join(command)}): {error}")
            checked.add(command)
    return checked


# ----- network policies -------------------------------------------------------------------------

OTHER_PORT = 8080  # a port nothing should reach: catches rules that allow every port
# The OpenTelemetry Collector that components/tracing sends spans to, as the OpenTelemetry
# Operator runs it: its OTLP/gRPC port, beside its OTLP/HTTP and metrics ports.
COLLECTOR_NAMESPACE = "observability"
COLLECTOR_PORT = 4317
COLLECTOR = Endpoint(
    "otel-collector",
    COLLECTOR_NAMESPACE,
    {"app.kubernetes.io/component": "opentelemetry-collector", "app.kubernetes.io/name": "otel-collector"},
    ports=((COLLECTOR_PORT, "TCP", ""), (4318, "TCP", ""), (8888, "TCP", "")),
)


def _world(
    objs: tuple[Obj, ...], overlay: str, namespace: str
) -> tuple[list[Endpoint], dict[str, dict[str, str]]]:
    endpoints = [
        k8s.workload_endpoint(service, k8s.service_workload(objs, service), namespace, [OTHER_PORT])
        for service in SERVICES
    ]
    endpoints.append(
        k8s.workload_endpoint("migrate", k8s.named(objs, "Job", "migrate"), namespace, [OTHER_PORT])
    )
    if overlay == "dev":
        endpoints += [
            k8s.workload_endpoint(
                "postgresql", k8s.named(objs, "StatefulSet", "postgresql"), namespace, [OTHER_PORT]
            ),
            k8s.workload_endpoint("redis", k8s.named(objs, "StatefulSet", "redis"), namespace, [OTHER_PORT]),
        ]
    else:
        # What the prod overlay's README asks for: a CloudNativePG cluster and Redis pods.
        endpoints += [
            Endpoint(
                "postgresql",
                "databases",
                {"cnpg.io/cluster": "payments-pg", "cnpg.io/instanceRole": "primary"},
                ports=((5432, "TCP", ""), (OTHER_PORT, "TCP", "")),
            ),
            Endpoint(
                "other-postgresql", "databases", {"cnpg.io/cluster": "other"}, ports=((5432, "TCP", ""),)
            ),
            Endpoint("redis", "redis", {"app.kubernetes.io/name": "redis"}, ports=((6379, "TCP", ""),)),
        ]
    endpoints += [
        Endpoint(
            "kube-dns", "kube-system", {"k8s-app": "kube-dns"}, ports=((53, "UDP", ""), (53, "TCP", ""))
        ),
        Endpoint(
            "client", namespace, {"payments-cqrs/grpc-client": "true"}, ports=((OTHER_PORT, "TCP", ""),)
        ),
        Endpoint(
            "stranger", namespace, {"app.kubernetes.io/name": "stranger"}, ports=((OTHER_PORT, "TCP", ""),)
        ),
        Endpoint(
            "outsider", "elsewhere", {"payments-cqrs/grpc-client": "true"}, ports=((OTHER_PORT, "TCP", ""),)
        ),
        Endpoint(
            "prometheus", "monitoring", {"app.kubernetes.io/name": "prometheus"}, ports=((9090, "TCP", ""),)
        ),
        Endpoint("internet", ip="203.0.113.7", ports=((443, "TCP", ""), (5432, "TCP", ""))),
        COLLECTOR,
        # Another OTLP receiver in the collector's namespace, and a collector in another one.
        Endpoint(
            "other-receiver",
            COLLECTOR_NAMESPACE,
            {"app.kubernetes.io/name": "jaeger"},
            ports=((COLLECTOR_PORT, "TCP", ""),),
        ),
        Endpoint(
            "other-collector",
            "elsewhere",
            {"app.kubernetes.io/component": "opentelemetry-collector"},
            ports=((COLLECTOR_PORT, "TCP", ""),),
        ),
    ]
    namespaces = {
        name: {"kubernetes.io/metadata.name": name}
        for name in (
            namespace,
            "kube-system",
            "databases",
            "redis",
            "elsewhere",
            "monitoring",
            COLLECTOR_NAMESPACE,
        )
    }
    return endpoints, namespaces


def test_network_policies_allow_exactly_the_intended_flows(
    objs: tuple[Obj, ...], overlay: str, namespace: str
) -> None:
    endpoints, namespaces = _world(objs, overlay, namespace)
    ours = {e.name for e in endpoints if e.namespace == namespace}
    policies = k8s.of_kind(objs, "NetworkPolicy")
    actual = {f for f in k8s.flows(policies, endpoints, namespaces) if f[0] in ours or f[1] in ours}
    expected = {(name, "kube-dns", 53, protocol) for name in ours for protocol in ("UDP", "TCP")}
    expected |= {
        ("approval", "postgresql", 5432, "TCP"),
        ("migrate", "postgresql", 5432, "TCP"),
        ("replicator", "postgresql", 5432, "TCP"),
        ("replicator", "redis", 6379, "TCP"),
        ("history", "redis", 6379, "TCP"),
        ("client", "approval", 50051, "TCP"),
        ("client", "history", 50052, "TCP"),
        ("prometheus", "approval", 9101, "TCP"),
        ("prometheus", "history", 9102, "TCP"),
        ("prometheus", "replicator", 9103, "TCP"),
    }
    if _lists_tracing(overlay):
        expected |= {(service, COLLECTOR.name, COLLECTOR_PORT, "TCP") for service in SERVICES}
    assert sorted(actual - expected) == [], "allowed but not intended"
    assert sorted(expected - actual) == [], "intended but not allowed"


def test_grpc_ports_accept_any_pod_of_the_namespace_and_no_other(
    objs: tuple[Obj, ...], overlay: str, namespace: str
) -> None:
    endpoints, namespaces = _world(objs, overlay, namespace)
    by_name = {e.name: e for e in endpoints}
    policies = k8s.of_kind(objs, "NetworkPolicy")
    for service, port in (("approval", 50051), ("history", 50052), ("replicator", 50053)):
        target = by_name[service]
        for source, expected in (
            ("stranger", True),
            ("client", True),
            ("outsider", False),
            ("prometheus", False),
        ):
            ingress = k8s._side_allows(
                policies, "ingress", target, by_name[source], target, port, "TCP", namespaces
            )
            assert ingress is expected, (source, service)


def test_there_is_a_default_deny_for_every_pod(objs: tuple[Obj, ...]) -> None:
    deny = [
        p
        for p in k8s.of_kind(objs, "NetworkPolicy")
        if p["spec"]["podSelector"] == {}
        and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
        and not p["spec"].get("ingress")
        and not p["spec"].get("egress")
    ]
    assert len(deny) == 1


# ----- overlays ---------------------------------------------------------------------------------


def _flag(args: list[str], name: str) -> str:
    values = [
        args[i + 1].split("=", 1)[1]
        for i, a in enumerate(args[:-1])
        if a == "-c" and args[i + 1].startswith(f"{name}=")
    ]
    assert len(values) == 1, f"postgres needs exactly one -c {name}=..."
    return values[0]


def test_dev_postgres_is_ready_for_logical_replication() -> None:
    objs = _objects("dev")
    postgres = k8s.named(objs, "StatefulSet", "postgresql")
    (container,) = k8s.pod_template(postgres)["spec"]["containers"]
    args = container["args"]
    assert _flag(args, "wal_level") == "logical"
    assert int(_flag(args, "max_replication_slots")) >= 2
    assert int(_flag(args, "max_wal_senders")) >= 2
    assert re.fullmatch(r"[1-9]\d*(MB|GB)", _flag(args, "max_slot_wal_keep_size")), "the slot must be capped"
    assert k8s.named(objs, "StatefulSet", "redis")


def test_prod_runs_no_database_and_is_bigger_than_dev() -> None:
    dev, prod = _objects("dev"), _objects("prod")
    assert k8s.of_kind(prod, "StatefulSet", "PersistentVolumeClaim") == []
    images = {c["image"] for w in k8s.workloads(prod) for c in k8s.containers(k8s.pod_template(w))}
    assert all("payments-cqrs" in image for image in images), images
    assert (
        k8s.service_workload(prod, "approval")["spec"]["replicas"]
        > k8s.service_workload(dev, "approval")["spec"]["replicas"]
    )
    hpa = {
        o: k8s.named(objs, "HorizontalPodAutoscaler", "history")["spec"]
        for o, objs in (("dev", dev), ("prod", prod))
    }
    assert hpa["prod"]["maxReplicas"] > hpa["dev"]["maxReplicas"]

    def millicores(value: str) -> float:
        return float(value[:-1]) if value.endswith("m") else float(value) * 1000

    for service in SERVICES:
        _, dev_container = _service_container(dev, service)
        _, prod_container = _service_container(prod, service)
        assert millicores(prod_container["resources"]["requests"]["cpu"]) > millicores(
            dev_container["resources"]["requests"]["cpu"]
        ), service


ALERT_RULES = ROOT / "deploy" / "k8s" / "components" / "alerts" / "replicator.rules.yml"


def test_the_alerts_ship_as_a_prometheus_rule_equal_to_the_rules_file(
    objs: tuple[Obj, ...], overlay: str
) -> None:
    """The PrometheusRule holds exactly what promtool checked (tests/integration/test_alert_rules.py).

    Only prod has it: it needs the Prometheus Operator's CRDs, which a dev cluster (kind,
    minikube) lacks; a Prometheus without the operator loads the rules file itself.
    """
    rules = k8s.of_kind(objs, "PrometheusRule")
    if overlay == "dev":
        assert rules == []
        return
    rule = k8s.named(objs, "PrometheusRule", "replicator-alerts")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    try:
        (source,) = k8s.yaml_documents(ALERT_RULES.read_text())
    except k8s.ToolMissing as missing:
        _missing(str(missing))
    assert rule["spec"] == source


def _scraped_by_the_pod_monitor(
    objs: tuple[Obj, ...],
    namespace: str,
    name: str = "replicator",
    command: tuple[str, ...] = ("replicator", "run"),
    setting: str = "REPLICATOR_METRICS_PORT",
) -> set[str]:
    """The workloads whose pods the PodMonitor `name` scrapes; each on the port of its `setting`.

    The PodMonitor selects pods in its own namespace (it has no namespaceSelector); the
    container scraped is the one that runs `command`.
    """
    monitor = k8s.named(objs, "PodMonitor", name)
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["namespace"] == namespace
    spec = monitor["spec"]
    assert "namespaceSelector" not in spec
    (endpoint,) = spec["podMetricsEndpoints"]
    assert endpoint.get("path", "/metrics") == "/metrics"
    scraped = set()
    for workload in k8s.workloads(objs):
        pod = k8s.pod_template(workload)
        if not k8s.selector_matches(spec["selector"], pod["metadata"]["labels"]):
            continue
        scraped.add(workload["metadata"]["name"])
        (container,) = [c for c in pod["spec"]["containers"] if c.get("command") == list(command)]
        ports = {port["name"]: port["containerPort"] for port in container["ports"]}
        metrics_port = k8s.container_env(container, objs, namespace)[setting]
        assert str(ports[endpoint["port"]]) == metrics_port, workload["metadata"]["name"]
    return scraped


def test_where_the_alerts_ship_a_pod_monitor_scrapes_the_replicators(
    objs: tuple[Obj, ...], overlay: str, namespace: str
) -> None:
    """The Prometheus Operator, which the PrometheusRule needs, ignores the prometheus.io/* annotations.

    So the alerts component ships a PodMonitor: without it nothing of the replicator would be
    scraped, absent(replicator_lock_held) would fire forever and no other alert ever. It
    scrapes the replicator's pods on their metrics port, and no other pod; with
    components/read-model-next, replicator-next's too (below).
    """
    if overlay == "dev":
        assert k8s.of_kind(objs, "PodMonitor") == [] == k8s.of_kind(objs, "PrometheusRule")
        return
    assert _scraped_by_the_pod_monitor(objs, namespace) == {"replicator"}


def test_where_the_alerts_ship_a_pod_monitor_scrapes_the_history_pods(
    objs: tuple[Obj, ...], overlay: str, namespace: str
) -> None:
    """ReadModelsStale reads the age of the read models that history exports, not the replicator.

    So that it fires while no replicator is scraped, the alerts component ships a second
    PodMonitor, `history`: it scrapes the history pods on the port of HISTORY_METRICS_PORT,
    and no other pod. Prometheus may reach that port (components/monitoring).
    """
    if overlay == "dev":
        assert k8s.of_kind(objs, "PodMonitor") == []
        return
    scraped = _scraped_by_the_pod_monitor(
        objs, namespace, "history", ("history-svc", "serve"), "HISTORY_METRICS_PORT"
    )
    assert scraped == {"history"}
    assert {m["metadata"]["name"] for m in k8s.of_kind(objs, "PodMonitor")} == {"replicator", "history"}


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_scrape_annotations_name_the_metrics_port(
    objs: tuple[Obj, ...], namespace: str, service: str
) -> None:
    workload, container = _service_container(objs, service)
    annotations = k8s.pod_template(workload)["metadata"].get("annotations", {})
    metrics_port = k8s.container_env(container, objs, namespace)[
        f"{SERVICES[service]['prefix']}_METRICS_PORT"
    ]
    assert annotations.get("prometheus.io/scrape") == "true"
    assert annotations.get("prometheus.io/port") == metrics_port
    assert annotations.get("prometheus.io/path") == "/metrics"


# ----- a second read-model version beside the live one -----------------------------------------

NEXT_COMPONENT = k8s.K8S_DIR / "components" / "read-model-next"
# What the component adds, by kind and name (a generated ConfigMap's name without its hash).
NEXT_OBJECTS = {
    ("Deployment", "replicator-next"),
    ("NetworkPolicy", "replicator-next"),
    ("ConfigMap", "replicator-next-config"),
    ("Job", "replicator-retire"),
}
NAME = "app.kubernetes.io/name"


def _next_settings() -> dict[str, str]:
    """The next version's settings, from the one file the operator edits."""
    lines = (NEXT_COMPONENT / "next.env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))


def _enable_next(overlay: str) -> tuple[k8s.Edit, ...]:
    """The component added to the overlay as deploy/k8s/README.md says: first in `components:`."""
    return (
        (
            f"overlays/{overlay}/kustomization.yaml",
            "\ncomponents:\n",
            "\ncomponents:\n  - ../../components/read-model-next\n",
        ),
    )


def _switch_history(overlay: str) -> tuple[k8s.Edit, ...]:
    """The README's switch of the readers: the overlay's history-config set to the next version."""
    settings = _next_settings()
    old = "  - name: history-config\n    behavior: merge\n    literals:\n"
    new = (
        f"{old}      - HISTORY_KEY_NAMESPACE={settings['REPLICATOR_KEY_NAMESPACE']}\n"
        f"      - HISTORY_SLOT_NAME={settings['REPLICATOR_SLOT_NAME']}\n"
    )
    return ((f"overlays/{overlay}/kustomization.yaml", old, new),)


def _edited(overlay: str, edits: tuple[k8s.Edit, ...]) -> tuple[Obj, ...]:
    try:
        return k8s.objects_edited(overlay, edits)
    except k8s.ToolMissing as missing:
        _missing(str(missing))


@pytest.fixture(scope="session")
def next_objs(overlay: str) -> tuple[Obj, ...]:
    """The overlay with components/read-model-next enabled."""
    return _edited(overlay, _enable_next(overlay))


def _by_id(objs: tuple[Obj, ...]) -> dict[tuple[str, str], Obj]:
    return {(o["kind"], o["metadata"]["name"]): o for o in objs}


def _unhashed(ids: set[tuple[str, str]]) -> set[tuple[str, str]]:
    return {(kind, name.rsplit("-", 1)[0] if kind == "ConfigMap" else name) for kind, name in ids}


def _replicator_env(objs: tuple[Obj, ...], namespace: str, name: str) -> dict[str, str]:
    (container,) = k8s.pod_template(k8s.named(objs, "Deployment", name))["spec"]["containers"]
    return k8s.container_env(container, objs, namespace)


def _version(env: dict[str, str]) -> tuple[str, str]:
    """The (key namespace, slot) a replicator's environment names, defaults included."""
    return (
        env.get("REPLICATOR_KEY_NAMESPACE", DEFAULT_NAMESPACE),
        env.get("REPLICATOR_SLOT_NAME", DEFAULT_SLOT_NAME),
    )


def test_the_next_version_adds_its_objects_and_changes_nothing_else(
    objs: tuple[Obj, ...], next_objs: tuple[Obj, ...]
) -> None:
    """Enabling the component leaves every object of the live version as it was: the live
    replicator (its selector cannot change in a running cluster), its policy, history, the alerts."""
    before, after = _by_id(objs), _by_id(next_objs)
    assert {key: obj for key, obj in after.items() if key in before} == before
    assert _unhashed(after.keys() - before.keys()) == NEXT_OBJECTS


def _next_rendered_file(overlay: str, directory: Path) -> Path:
    edits = _enable_next(overlay)
    _edited(overlay, edits)  # skips with the reason when a tool is missing
    path = directory / f"{overlay}-read-model-next.yaml"
    if not path.exists():
        path.write_text(k8s.render_edited(overlay, edits))
    return path


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_next_version_validates_strictly(overlay: str, rendered_dir: Path, version: str) -> None:
    _validate_strictly(_next_rendered_file(overlay, rendered_dir), version)


def test_the_next_version_passes_checkov_but_for_documented_skips(overlay: str, rendered_dir: Path) -> None:
    report = _run_checkov(_next_rendered_file(overlay, rendered_dir), rendered_dir)
    assert _checkov_failures_not_skipped(report, overlay) == []


def test_the_next_version_passes_the_checks_of_every_overlay(
    next_objs: tuple[Obj, ...], overlay: str, namespace: str, tmp_path: Path
) -> None:
    """The checks above that read only the rendered objects hold with the component too."""
    test_overlay_renders_into_its_namespace(next_objs, namespace)
    test_workload_selectors_match_their_pod_labels(next_objs)
    test_pods_are_hardened(next_objs)
    test_recommended_labels_come_from_kustomize_labels(next_objs, overlay)
    test_credentials_only_come_from_secrets(next_objs)
    test_file_settings_point_into_mounted_files(next_objs, namespace)
    test_no_workload_turns_authentication_off(next_objs, namespace)
    test_there_is_a_default_deny_for_every_pod(next_objs)
    test_manifest_commands_are_console_scripts_of_the_image(next_objs)
    assert _commands_accept_their_settings(next_objs, namespace, tmp_path) == set(COMMAND_SETTINGS)


def test_the_pod_monitor_scrapes_the_next_replicator_too(
    next_objs: tuple[Obj, ...], overlay: str, namespace: str
) -> None:
    """Both versions' replicators are scraped while they run side by side; the retire Job is not."""
    if overlay == "dev":
        assert k8s.of_kind(next_objs, "PodMonitor") == []
        return
    assert _scraped_by_the_pod_monitor(next_objs, namespace) == {"replicator", "replicator-next"}


def test_no_workload_selects_the_pods_of_another(next_objs: tuple[Obj, ...]) -> None:
    """The two replicators' selectors do not overlap, and the live one's is the one it always had."""
    pods = {
        w["metadata"]["name"]: k8s.pod_template(w)["metadata"]["labels"] for w in k8s.workloads(next_objs)
    }
    for workload in k8s.workloads(next_objs):
        if workload["kind"] in ("Job", "CronJob", "Pod"):
            continue  # a Job's selector is generated for its own pods
        name = workload["metadata"]["name"]
        selected = [
            other
            for other, labels in pods.items()
            if k8s.selector_matches(workload["spec"]["selector"], labels)
        ]
        assert selected == [name], (workload["kind"], name, selected)
    live = k8s.named(next_objs, "Deployment", "replicator")
    assert live["spec"]["selector"] == {"matchLabels": {NAME: "replicator"}}


def test_the_next_replicator_is_the_live_one_but_for_its_name_and_version(
    next_objs: tuple[Obj, ...],
) -> None:
    """Built from the live replicator's definition: the same image, command, security context,
    probes, resources, Secret and mounts, identity, strategy and scrape annotations. Only its
    name, its name label (and so its selector) and a ConfigMap of its own in envFrom differ."""
    live = k8s.named(next_objs, "Deployment", "replicator")
    second: Obj = json.loads(json.dumps(k8s.named(next_objs, "Deployment", "replicator-next")))
    pod = second["spec"]["template"]
    assert second["metadata"]["labels"][NAME] == "replicator-next"
    assert second["spec"]["selector"]["matchLabels"][NAME] == "replicator-next"
    assert pod["metadata"]["labels"][NAME] == "replicator-next"
    (container,) = pod["spec"]["containers"]
    (live_container,) = k8s.pod_template(live)["spec"]["containers"]
    *shared, own = container["envFrom"]
    assert shared == live_container["envFrom"], "the live settings first, the next version's over them"
    assert own["configMapRef"]["name"].startswith("replicator-next-config-")
    # With those differences undone, it is the live replicator field for field.
    second["metadata"]["name"] = "replicator"
    for labels in (
        second["metadata"]["labels"],
        second["spec"]["selector"]["matchLabels"],
        pod["metadata"]["labels"],
    ):
        labels[NAME] = "replicator"
    container["envFrom"] = shared
    assert second == live


def test_the_next_replicator_streams_its_own_slot_into_its_own_namespace(
    next_objs: tuple[Obj, ...], namespace: str
) -> None:
    live = _replicator_env(next_objs, namespace, "replicator")
    second = _replicator_env(next_objs, namespace, "replicator-next")
    (live_namespace, live_slot), (next_namespace, next_slot) = _version(live), _version(second)
    assert (next_namespace, next_slot) == (
        _next_settings()["REPLICATOR_KEY_NAMESPACE"],
        _next_settings()["REPLICATOR_SLOT_NAME"],
    )
    assert next_slot != live_slot, "a slot has one consumer"
    # Each version's lock, checkpoint and change stream are its own. (A nested namespace is
    # allowed: a rebuild or a retirement finds a version's keys by kind, docs/replicator.md.)
    assert next_namespace != live_namespace
    version = ("REPLICATOR_KEY_NAMESPACE", "REPLICATOR_SLOT_NAME")
    assert {k: v for k, v in second.items() if k not in version} == {
        k: v for k, v in live.items() if k not in version
    }


def test_the_next_replicator_and_the_retire_job_reach_what_the_live_replicator_reaches(
    objs: tuple[Obj, ...], next_objs: tuple[Obj, ...], overlay: str, namespace: str
) -> None:
    """replicator-next has the live replicator's flows (PostgreSQL, Redis, DNS, Prometheus), the
    retire Job its outgoing ones, and no other flow changes."""
    added = {("Deployment", "replicator-next"), ("Job", "replicator-retire")}
    endpoints, namespaces = _world(
        tuple(o for o in next_objs if (o["kind"], o["metadata"]["name"]) not in added), overlay, namespace
    )
    endpoints += [
        k8s.workload_endpoint(name, k8s.named(next_objs, kind, name), namespace, [OTHER_PORT])
        for kind, name in sorted(added)
    ]
    policies = k8s.of_kind(next_objs, "NetworkPolicy")
    actual = set(k8s.flows(policies, endpoints, namespaces))

    def involving(name: str) -> set[tuple[str, str, int, str]]:
        return {f for f in actual if name in f[:2]}

    def renamed(flows: set[tuple[str, str, int, str]], name: str) -> set[tuple[str, str, int, str]]:
        return {
            (name if f[0] == "replicator" else f[0], name if f[1] == "replicator" else f[1], f[2], f[3])
            for f in flows
        }

    live = involving("replicator")
    assert {("replicator", "postgresql", 5432, "TCP"), ("replicator", "redis", 6379, "TCP")} <= live
    assert involving("replicator-next") == renamed(live, "replicator-next")
    # The Job does not trace, so it does not reach the collector (components/tracing).
    outgoing = {f for f in live if f[0] == "replicator" and f[1] != COLLECTOR.name}
    assert involving("replicator-retire") == renamed(outgoing, "replicator-retire")
    plain, _ = _world(objs, overlay, namespace)
    assert actual - involving("replicator-next") - involving("replicator-retire") == set(
        k8s.flows(k8s.of_kind(objs, "NetworkPolicy"), plain, namespaces)
    )
    # And the ingress side alone (a pod whose egress is open elsewhere): the same as the live one's.
    by_name = {e.name: e for e in endpoints}
    for source in endpoints:
        for port in (50053, 9103, OTHER_PORT):
            verdicts = {
                k8s._side_allows(
                    policies, "ingress", by_name[target], source, by_name[target], port, "TCP", namespaces
                )
                for target in ("replicator", "replicator-next")
            }
            assert len(verdicts) == 1, (source.name, port)


def test_dev_postgres_has_a_slot_and_a_walsender_for_every_replicator() -> None:
    objs = _edited("dev", _enable_next("dev"))
    replicators = [
        w
        for w in k8s.workloads(objs)
        if any(
            c.get("command") == SERVICES["replicator"]["command"] for c in k8s.containers(k8s.pod_template(w))
        )
    ]
    slots = {_version(_replicator_env(objs, "payments-dev", w["metadata"]["name"]))[1] for w in replicators}
    assert len(replicators) == len(slots) == 2
    (container,) = k8s.pod_template(k8s.named(objs, "StatefulSet", "postgresql"))["spec"]["containers"]
    assert int(_flag(container["args"], "max_replication_slots")) >= len(slots)
    assert int(_flag(container["args"], "max_wal_senders")) >= len(replicators)


def test_the_retire_job_waits_to_be_told_and_names_the_live_version(
    next_objs: tuple[Obj, ...], namespace: str
) -> None:
    """Applying the component retires nothing; told to, the Job retires the version that the live
    replicator runs (never the next one), as the live replicator would connect."""
    job = k8s.named(next_objs, "Job", "replicator-retire")
    assert job["spec"]["suspend"] is True
    pod = job["spec"]["template"]
    assert pod["spec"]["restartPolicy"] == "Never"
    (container,) = pod["spec"]["containers"]
    assert tuple(container["command"]) == RETIRE_COMMAND
    args = container["args"]
    options = dict(zip(args[::2], args[1::2], strict=True))
    assert set(options) == {"--namespace", "--slot"}
    assert namespace_problem(options["--namespace"]) is None, (
        "the command refuses a namespace it cannot retire"
    )
    assert slot_problem(options["--slot"]) is None
    live = _version(_replicator_env(next_objs, namespace, "replicator"))
    assert (options["--namespace"], options["--slot"]) == live
    assert live != _version(_replicator_env(next_objs, namespace, "replicator-next"))
    # Bad settings (2) and a version in use (3) need a person; only "not reached" (4) is retried.
    assert job["spec"]["podFailurePolicy"]["rules"] == [
        {
            "action": "FailJob",
            "onExitCodes": {"containerName": container["name"], "operator": "In", "values": [2, 3]},
        }
    ]
    live_pod = k8s.pod_template(k8s.named(next_objs, "Deployment", "replicator"))
    (live_container,) = live_pod["spec"]["containers"]
    for key in ("serviceAccountName", "automountServiceAccountToken", "securityContext", "volumes"):
        assert pod["spec"][key] == live_pod["spec"][key], key
    for key in ("image", "imagePullPolicy", "env", "securityContext", "volumeMounts"):
        assert container[key] == live_container[key], key
    # The replicator's settings, but for components/tracing's: `replicator retire` exports nothing.
    assert container["envFrom"] == [
        source
        for source in live_container["envFrom"]
        if not source["configMapRef"]["name"].startswith("tracing-config-")
    ]


def test_history_switched_by_its_config_reads_what_the_next_replicator_writes(
    next_objs: tuple[Obj, ...], overlay: str, namespace: str
) -> None:
    """The README's switch (HISTORY_KEY_NAMESPACE and HISTORY_SLOT_NAME in the overlay's
    history-config) changes history only, and rolls it one pod at a time without a gap."""
    switched = _edited(overlay, _enable_next(overlay) + _switch_history(overlay))
    _, history = _service_container(switched, "history")
    history_env = k8s.container_env(history, switched, namespace)
    assert (history_env["HISTORY_KEY_NAMESPACE"], history_env["HISTORY_SLOT_NAME"]) == _version(
        _replicator_env(switched, namespace, "replicator-next")
    )
    before, after = _by_id(next_objs), _by_id(switched)
    changed = {key for key in before.keys() | after.keys() if before.get(key) != after.get(key)}
    assert _unhashed(changed) == {("ConfigMap", "history-config"), ("Deployment", "history")}
    # A new pod must be ready before an old one goes: the old pods serve the live version meanwhile.
    strategy = k8s.named(switched, "Deployment", "history")["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"]["maxUnavailable"] == 0


def _make_next_the_default() -> tuple[k8s.Edit, ...]:
    """The README's last step, in base: the live settings become the next version's."""
    settings = _next_settings()
    slot, key_namespace = settings["REPLICATOR_SLOT_NAME"], settings["REPLICATOR_KEY_NAMESPACE"]
    return (
        (
            "base/config/replicator.env",
            f"REPLICATOR_SLOT_NAME={DEFAULT_SLOT_NAME}\n",
            f"REPLICATOR_SLOT_NAME={slot}\nREPLICATOR_KEY_NAMESPACE={key_namespace}\n",
        ),
        (
            "base/config/history.env",
            f"HISTORY_SLOT_NAME={DEFAULT_SLOT_NAME}\n",
            f"HISTORY_SLOT_NAME={slot}\nHISTORY_KEY_NAMESPACE={key_namespace}\n",
        ),
    )


def test_making_the_next_version_the_default_moves_the_replicator_and_leaves_history_be(
    overlay: str, namespace: str
) -> None:
    """After the switch, the README's last step (the next version's settings in base, the
    overlay's history literals and the component removed) leaves history's pods as they are
    (the same ConfigMap, so no rollout), puts the live replicator on the next version, and
    what it no longer renders is exactly what the README's label selector deletes."""
    switched = _by_id(_edited(overlay, _enable_next(overlay) + _switch_history(overlay)))
    default = _by_id(_edited(overlay, _make_next_the_default()))
    for key in default.keys() & switched.keys():
        if key != ("Deployment", "replicator"):
            assert default[key] == switched[key], key
    # The live replicator: the same but for its settings (a new replicator-config), which roll it.
    moved, stayed = (
        json.loads(json.dumps(by_id[("Deployment", "replicator")])) for by_id in (default, switched)
    )
    configs = [k8s.pod_template(d)["spec"]["containers"][0].pop("envFrom") for d in (moved, stayed)]
    assert configs[0] != configs[1]
    assert moved == stayed
    assert ("Deployment", "history") in default
    env = _replicator_env(tuple(default.values()), namespace, "replicator")
    assert _version(env) == _version(_replicator_env(tuple(switched.values()), namespace, "replicator-next"))
    left = {key: switched[key] for key in switched.keys() - default.keys()}
    assert ("ConfigMap", "history-config") not in _unhashed(set(left)), "history must not roll"
    leftovers = {key for key, obj in left.items() if not key[1].startswith("replicator-config-")}
    assert _unhashed(leftovers) == NEXT_OBJECTS
    for key in leftovers:
        assert left[key]["metadata"]["labels"][NAME] in ("replicator-next", "replicator-retire"), key


# ----- tracing ----------------------------------------------------------------------------------

TRACING = "../../components/tracing"
# What the component adds, by kind and name (a generated ConfigMap's name without its hash).
TRACING_OBJECTS = {("ConfigMap", "tracing-config"), ("NetworkPolicy", "allow-otel-collector")}
# The files an OTLP exporter reads, each a path (and never over http, which ignores them).
OTLP_FILES = (
    "OTEL_EXPORTER_OTLP_CERTIFICATE",
    "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
    "OTEL_EXPORTER_OTLP_CLIENT_KEY",
)


@functools.cache
def _overlay_components(overlay: str) -> tuple[str, ...]:
    (kustomization,) = k8s.yaml_documents(
        (k8s.K8S_DIR / "overlays" / overlay / "kustomization.yaml").read_text()
    )
    return tuple(kustomization.get("components", []))


def _lists_tracing(overlay: str) -> bool:
    """Whether the overlay lists components/tracing."""
    try:
        return TRACING in _overlay_components(overlay)
    except k8s.ToolMissing as missing:
        _missing(str(missing))


def _enable_tracing(overlay: str) -> tuple[k8s.Edit, ...]:
    """The component added to an overlay that lacks it, after the components it lists (README)."""
    line = "  - ../../components/monitoring\n"
    return ((f"overlays/{overlay}/kustomization.yaml", line, f"{line}  - {TRACING}\n"),)


def _disable_tracing(overlay: str) -> tuple[k8s.Edit, ...]:
    """The component removed from an overlay that lists it."""
    return ((f"overlays/{overlay}/kustomization.yaml", f"  - {TRACING}\n", ""),)


@pytest.fixture(scope="session")
def traced_objs(overlay: str) -> tuple[Obj, ...]:
    """The overlay with components/tracing: as rendered where it lists the component, else with it added."""
    return _objects(overlay) if _lists_tracing(overlay) else _edited(overlay, _enable_tracing(overlay))


@pytest.fixture(scope="session")
def untraced_objs(overlay: str) -> tuple[Obj, ...]:
    """The overlay without components/tracing."""
    return _edited(overlay, _disable_tracing(overlay)) if _lists_tracing(overlay) else _objects(overlay)


def _traced_workloads(objs: tuple[Obj, ...], namespace: str | None) -> set[str]:
    """The workloads that export spans, each checked for what it needs to reach the collector.

    A traced command in a Deployment gets the OTLP exporter and an endpoint at the collector
    that the network policies let it reach (its namespace, its port); a sampling ratio, if
    set, between 0 and 1; each file the exporter reads, over https only (http ignores them)
    and mounted (a client key from a Secret). Every other container gets no OTEL_ variable.
    """
    traced: set[str] = set()
    for workload in k8s.workloads(objs):
        pod = k8s.pod_template(workload)
        name = workload["metadata"]["name"]
        for container in pod["spec"]["containers"]:
            env = k8s.container_env(container, objs, namespace)
            settings = {key for key in env if key.startswith("OTEL_")}
            if tuple(container.get("command") or ()) not in TRACED_COMMANDS or not settings:
                assert not settings, f"{name} does not trace, yet gets {sorted(settings)}"
                continue
            assert workload["kind"] == "Deployment", name
            assert tracing.enabled_by(env), name
            assert env["OTEL_TRACES_EXPORTER"] == "otlp", name
            endpoint = urlparse(env["OTEL_EXPORTER_OTLP_ENDPOINT"])
            assert endpoint.scheme in ("http", "https"), name
            assert endpoint.port == COLLECTOR_PORT, name
            # <service>.<namespace>[.svc[.cluster.local]]
            assert (endpoint.hostname or "").split(".")[1:2] == [COLLECTOR_NAMESPACE], name
            ratio = env.get("OTEL_TRACES_SAMPLER_ARG")
            if ratio is not None:
                assert 0.0 <= float(ratio) <= 1.0, (name, ratio)
            for variable in OTLP_FILES:
                if variable not in env:
                    continue
                assert endpoint.scheme == "https", f"{name}: over http the exporter ignores {variable}"
                _, volume, _ = _mounted_file(pod, container, env[variable])
                if variable == "OTEL_EXPORTER_OTLP_CLIENT_KEY":
                    assert "secret" in volume, f"{name}: a private key comes from a Secret"
            traced.add(name)
    return traced


def test_prod_traces_and_dev_does_not() -> None:
    """prod lists the component, as it lists monitoring and alerts: it runs on the cluster's
    observability stack. dev has no collector to send spans to (deploy/k8s/README.md, Tracing)."""
    assert {overlay for overlay in OVERLAYS if _lists_tracing(overlay)} == {"prod"}


def test_without_the_component_nothing_traces(untraced_objs: tuple[Obj, ...]) -> None:
    """The base sets no OTEL_ variable, so without the component every service runs untraced."""
    try:
        base = k8s.render(k8s.BASE)
        base_objs = k8s.objects(k8s.BASE)
    except k8s.ToolMissing as missing:
        _missing(str(missing))
    assert "OTEL_" not in base
    assert _traced_workloads(base_objs, None) == set()
    assert "OTEL_" not in json.dumps(untraced_objs)


def test_the_services_export_to_the_collector(traced_objs: tuple[Obj, ...], namespace: str) -> None:
    """Every Deployment of the three services traces; no Job does. A stopping service waits for
    its last spans after its server's grace, so the pod's grace period leaves room for that too."""
    assert _traced_workloads(traced_objs, namespace) == {
        k8s.service_workload(traced_objs, service)["metadata"]["name"] for service in SERVICES
    }
    for service in SERVICES:
        workload, container = _service_container(traced_objs, service)
        env = k8s.container_env(container, traced_objs, namespace)
        grace = float(env.get(f"{SERVICES[service]['prefix']}_GRACE_SECONDS", k8s.DEFAULT_GRACE_SECONDS))
        pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        period = k8s.pod_template(workload)["spec"].get("terminationGracePeriodSeconds", 30)
        assert period >= pre_stop + grace + tracing.SHUTDOWN_SECONDS, (service, period)


def test_tracing_adds_its_settings_and_policy_and_changes_nothing_else(
    traced_objs: tuple[Obj, ...], untraced_objs: tuple[Obj, ...]
) -> None:
    """The component adds its ConfigMap and its NetworkPolicy, and puts the ConfigMap first in
    the three Deployments' envFrom; nothing else changes, so a pod rolls only for it."""
    before, after = _by_id(untraced_objs), _by_id(traced_objs)
    assert before.keys() <= after.keys()
    assert _unhashed(after.keys() - before.keys()) == TRACING_OBJECTS
    changed = {key for key in before if before[key] != after[key]}
    assert changed == {("Deployment", service) for service in SERVICES}
    for key in changed:
        undone: Obj = json.loads(json.dumps(after[key]))
        container = k8s.pod_template(undone)["spec"]["containers"][0]
        first = container["envFrom"].pop(0)
        assert first["configMapRef"]["name"].startswith("tracing-config-"), key
        assert undone == before[key], key


def test_the_services_reach_the_collector_on_its_otlp_grpc_port_and_nothing_more(
    traced_objs: tuple[Obj, ...], untraced_objs: tuple[Obj, ...], overlay: str, namespace: str
) -> None:
    """The component's only flows are the three services to the collector's OTLP/gRPC port: not
    its other ports, not another receiver in its namespace, not a collector elsewhere."""
    endpoints, namespaces = _world(traced_objs, overlay, namespace)
    traced = set(k8s.flows(k8s.of_kind(traced_objs, "NetworkPolicy"), endpoints, namespaces))
    plain, _ = _world(untraced_objs, overlay, namespace)
    untraced = set(k8s.flows(k8s.of_kind(untraced_objs, "NetworkPolicy"), plain, namespaces))
    assert traced - untraced == {(service, COLLECTOR.name, COLLECTOR_PORT, "TCP") for service in SERVICES}
    assert untraced <= traced
    policy = k8s.named(traced_objs, "NetworkPolicy", "allow-otel-collector")
    assert policy["spec"]["policyTypes"] == ["Egress"]
    (rule,) = policy["spec"]["egress"]
    assert rule["ports"] == [{"port": COLLECTOR_PORT, "protocol": "TCP"}]


def _traced_rendered_file(overlay: str, directory: Path) -> Path:
    if _lists_tracing(overlay):
        return _rendered_file(overlay, directory)
    edits = _enable_tracing(overlay)
    _edited(overlay, edits)  # skips with the reason when a tool is missing
    path = directory / f"{overlay}-tracing.yaml"
    if not path.exists():
        path.write_text(k8s.render_edited(overlay, edits))
    return path


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_overlay_with_tracing_validates_strictly(overlay: str, rendered_dir: Path, version: str) -> None:
    _validate_strictly(_traced_rendered_file(overlay, rendered_dir), version)


def test_the_overlay_with_tracing_passes_the_checks_of_every_overlay(
    traced_objs: tuple[Obj, ...], overlay: str, namespace: str, tmp_path: Path
) -> None:
    """The checks above that read only the rendered objects hold with the component too (checkov
    runs on prod, which lists it)."""
    test_overlay_renders_into_its_namespace(traced_objs, namespace)
    test_pods_are_hardened(traced_objs)
    test_recommended_labels_come_from_kustomize_labels(traced_objs, overlay)
    test_credentials_only_come_from_secrets(traced_objs)
    test_file_settings_point_into_mounted_files(traced_objs, namespace)
    test_there_is_a_default_deny_for_every_pod(traced_objs)
    assert _commands_accept_their_settings(traced_objs, namespace, tmp_path) == set(COMMAND_SETTINGS) - {
        RETIRE_COMMAND
    }


def test_with_the_next_version_both_replicators_trace_and_the_retire_job_does_not(
    overlay: str, namespace: str
) -> None:
    """With components/read-model-next listed first, replicator-next traces as the live
    replicator does and reaches the collector as it does; the retire Job does neither."""
    edits = _enable_next(overlay) + (() if _lists_tracing(overlay) else _enable_tracing(overlay))
    objs = _edited(overlay, edits)
    assert _traced_workloads(objs, namespace) == {"approval", "history", "replicator", "replicator-next"}
    otel = {
        name: {k: v for k, v in _replicator_env(objs, namespace, name).items() if k.startswith("OTEL_")}
        for name in ("replicator", "replicator-next")
    }
    assert otel["replicator"] == otel["replicator-next"]
    added = {("Deployment", "replicator-next"), ("Job", "replicator-retire")}
    endpoints, namespaces = _world(
        tuple(o for o in objs if (o["kind"], o["metadata"]["name"]) not in added), overlay, namespace
    )
    endpoints += [
        k8s.workload_endpoint(name, k8s.named(objs, kind, name), namespace, [OTHER_PORT])
        for kind, name in sorted(added)
    ]
    ours = {e.name for e in endpoints if e.namespace == namespace}
    observability = {COLLECTOR.name, "other-receiver", "other-collector"}
    reached = {
        f
        for f in k8s.flows(k8s.of_kind(objs, "NetworkPolicy"), endpoints, namespaces)
        if f[0] in ours and f[1] in observability
    }
    assert reached == {
        (name, COLLECTOR.name, COLLECTOR_PORT, "TCP") for name in (*SERVICES, "replicator-next")
    }


def _tls_to_the_collector(overlay: str) -> tuple[k8s.Edit, ...]:
    """The README's TLS example (its block that mounts otel-collector-ca) added to the patches
    of an overlay that lists the component: tracing-config patched (https, the CA's path, a
    sampling ratio) and the CA's ConfigMap mounted into the traced pods."""
    blocks = re.findall(r"```yaml\n(.*?)```", (k8s.K8S_DIR / "README.md").read_text(), re.DOTALL)
    (example,) = [block for block in blocks if "otel-collector-ca" in block]
    assert example.startswith("patches:\n")
    return ((f"overlays/{overlay}/kustomization.yaml", "\npatches:\n", f"\n{example}"),)


def test_tls_to_the_collector_as_the_readme_says() -> None:
    """The README's patches reach every traced pod: https, with the CA file mounted, so the
    exporter verifies the collector; and the sampling ratio."""
    for overlay in sorted(o for o in OVERLAYS if _lists_tracing(o)):
        namespace = OVERLAYS[overlay]
        objs = _edited(overlay, _tls_to_the_collector(overlay))
        traced = _traced_workloads(objs, namespace)
        assert traced == {"approval", "history", "replicator"}
        for name in traced:
            (container,) = k8s.pod_template(k8s.named(objs, "Deployment", name))["spec"]["containers"]
            env = k8s.container_env(container, objs, namespace)
            assert urlparse(env["OTEL_EXPORTER_OTLP_ENDPOINT"]).scheme == "https"
            assert "OTEL_EXPORTER_OTLP_CERTIFICATE" in env
            assert env["OTEL_TRACES_SAMPLER_ARG"] == "0.1"
        test_pods_are_hardened(objs)
        test_file_settings_point_into_mounted_files(objs, namespace)


# ----- image ------------------------------------------------------------------------------------

DOCKERFILE = ROOT / "Dockerfile"


def test_dockerfile_passes_hadolint() -> None:
    hadolint = _tool("hadolint")
    result = subprocess.run(
        [str(hadolint), "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_builds_a_slim_non_root_multi_stage_image() -> None:
    text = DOCKERFILE.read_text()
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.MULTILINE)
    assert base is not None
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", base.group(1)), "pin a patch release of the slim image"
    assert len(re.findall(r"^FROM ", text, re.MULTILINE)) >= 2
    final_stage = text.rsplit("\nFROM ", 1)[1]
    user = re.findall(r"^USER (\S+)$", final_stage, re.MULTILINE)
    assert user, "the final stage must set USER"
    uid = user[-1].split(":")[0]
    assert uid.isdigit()
    assert int(uid) >= 10000
    patterns = [
        line
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert patterns[0] == "**", "the build context starts from nothing and adds what the image needs"
    for source in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.MULTILINE):
        for path in source.split():
            assert f"!{path}" in patterns or f"!{path}/" in patterns, (
                f"{path} is excluded from the build context"
            )


def _first_party_imports(package: Path) -> set[str]:
    """The top-level names of this repository's modules that a package imports."""
    local = {path.name for path in ROOT.iterdir() if (path / "__init__.py").exists()}
    names: set[str] = set()
    for source in package.rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names & local


def test_the_image_holds_the_services_and_nothing_of_the_dev_tooling() -> None:
    """The packages the image installs are exactly those the services import: no stack, bench, tests."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packaged = {
        pattern.rstrip("*") for pattern in project["tool"]["setuptools"]["packages"]["find"]["include"]
    }
    copied = {
        path.split("/")[0]
        for source in re.findall(r"^COPY (?!--from)(.+) \S+$", DOCKERFILE.read_text(), re.MULTILINE)
        for path in source.split()
        if (ROOT / path / "__init__.py").exists()
    }
    assert copied == packaged
    entry_points = {value.split(".")[0] for value in project["project"]["scripts"].values()}
    needed = set(entry_points)
    for package in sorted(entry_points | packaged):
        needed |= _first_party_imports(ROOT / package)
    assert needed <= packaged, f"the services import {sorted(needed - packaged)}, which the image lacks"
    assert not packaged & {"stack", "bench", "tests", "tools"}


def test_manifest_commands_are_console_scripts_of_the_image(objs: tuple[Obj, ...]) -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for workload in k8s.workloads(objs):
        for container in k8s.containers(k8s.pod_template(workload)):
            if "payments-cqrs" in container["image"]:
                assert container["command"][0] in scripts, container["command"]


def _locked(path: Path) -> dict[str, Requirement]:
    """The lines of a lock file by package name: each pins one release, some only where a marker holds."""
    locked: dict[str, Requirement] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            requirement = Requirement(line)
            pins = list(requirement.specifier)
            assert len(pins) == 1, f"{path.name}: {line} is not pinned"
            assert pins[0].operator == "==", f"{path.name}: {line} is not pinned"
            assert re.fullmatch(r"[\w.]+", pins[0].version), f"{path.name}: {line} is not pinned"
            assert not requirement.extras, f"{path.name}: {line}: the lock names each package itself"
            locked[canonicalize_name(requirement.name)] = requirement
    return locked


def _pins(path: Path) -> dict[str, str]:
    return {name: next(iter(line.specifier)).version for name, line in _locked(path).items()}


def test_image_dependencies_are_pinned_and_satisfy_pyproject() -> None:
    pins = _pins(ROOT / "deploy" / "docker" / "requirements.lock")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for requirement in map(Requirement, project["project"]["dependencies"]):
        name = requirement.name.lower().replace("_", "-")
        assert name in pins, f"{name} is missing from deploy/docker/requirements.lock"
        assert requirement.specifier.contains(pins[name], prereleases=True), (name, pins[name])
    build = _pins(ROOT / "deploy" / "docker" / "build-requirements.lock")
    for requirement in map(Requirement, project["build-system"]["requires"]):
        assert requirement.specifier.contains(build[requirement.name.lower()], prereleases=True), requirement


def _claimed_pythons() -> list[str]:
    """Every release of Python 3.11 to 3.14 up to patch level 30 that pyproject.toml's requires-python admits."""
    claim = SpecifierSet(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"])
    versions = [f"3.{minor}.{patch}" for minor in range(11, 15) for patch in range(31)]
    return [version for version in versions if claim.contains(version)]


def _requirements_of(name: str, version: str) -> list[Requirement] | None:
    """What the locked release of `name` requires, from its metadata here; None where another release is installed."""
    try:
        distribution = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return None
    if distribution.version != version:
        return None
    return [Requirement(line) for line in distribution.requires or []]


def test_the_lock_installs_on_every_python_the_project_claims() -> None:
    """On each Python that requires-python admits, the lock holds every dependency the services need, pinned
    to a release the dependent accepts, and its markers keep exactly the lines that Python needs.

    The dependencies are read from the metadata of the locked releases installed here (the
    dev virtualenv installs the same releases, for this Python) with their markers evaluated
    for each claimed version: so a dependency that only an older Python needs, as redis
    needs async-timeout before 3.11.3, is found although this Python does not install it.
    """
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    locked = _locked(ROOT / "deploy" / "docker" / "requirements.lock")
    pins = {name: next(iter(line.specifier)).version for name, line in locked.items()}
    walked: set[str] = set()
    for python in _claimed_pythons():
        environment = {key: str(value) for key, value in default_environment().items()}
        environment |= {
            "python_version": python.rsplit(".", 1)[0],
            "python_full_version": python,
            "implementation_version": python,
        }
        needed: set[str] = set()
        seen: set[tuple[str, frozenset[str]]] = set()
        pending = [(Requirement(line), frozenset({""})) for line in project["project"]["dependencies"]]
        while pending:
            requirement, extras = pending.pop()
            marker = requirement.marker
            if marker is not None and not any(marker.evaluate({**environment, "extra": e}) for e in extras):
                continue
            package: str = canonicalize_name(requirement.name)
            assert package in pins, f"Python {python} needs {requirement}, which the lock lacks"
            assert requirement.specifier.contains(pins[package], prereleases=True), (
                f"Python {python}: {requirement} is not met by the locked {package}=={pins[package]}"
            )
            if (package, frozenset(requirement.extras)) in seen:
                continue
            seen.add((package, frozenset(requirement.extras)))
            needed.add(package)
            requires = _requirements_of(package, pins[package])
            if requires is not None:
                walked.add(package)
                extras_here = frozenset({"", *requirement.extras})
                pending += [(dependency, extras_here) for dependency in requires]
        for name, line in locked.items():
            kept = line.marker is None or line.marker.evaluate(environment)
            if name in needed:
                assert kept, f"Python {python} needs {name}, but its marker in the lock leaves it out"
            elif line.marker is not None:
                assert not kept, (
                    f"the lock's marker installs {name} on Python {python}, which does not need it"
                )
    # Not a vacuous walk: the dev virtualenv holds the locked releases, so most metadata was read.
    assert len(walked) >= len(pins) // 2, f"only {sorted(walked)} have their locked release installed here"
