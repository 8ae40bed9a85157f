"""The service image run as Kubernetes would run it, with docker or podman, each container as deploy/k8s/base says.

`make image` builds the image and writes .image/env (the tool, podman's private
CONTAINERS_CONF, the image's id); `engine()` reads it. `PodSpec.read` takes a workload of
the rendered base and reads what the kubelet would act on: the command, the environment
(ConfigMaps and literal values), the volume mounts (Secrets, ConfigMaps, emptyDirs), the
ports, the probes, the security contexts, the resource limits, the preStop sleep and the
termination grace period. A field this module cannot translate into the engine's options
fails the test, so that the manifests and the test cannot drift apart silently.

The containers share the host's network (Kubernetes gives each pod its own): every port a
container declares is moved to a free one through the one setting whose value is that port.
Secrets come from the test; files are written with the volume's mode and the pod's fsGroup,
as the kubelet writes them. `Pods` starts containers and removes them all at the end, with
their logs kept beside the test's other files.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from stack.local import wait_serving
from stack.servers import free_port, process_alive
from tests.support import ROOT, k8s
from tests.support.envfiles import read_env_file
from tests.support.k8s import Obj

IMAGE_ENV = ROOT / ".image" / "env"

# Every container a test starts carries this label, with the test's run id as its value.
LABEL = "org.example.payments-cqrs.test-run"


class Untranslated(AssertionError):
    """A manifest field that the test does not know how to reproduce with the engine."""


@dataclass(frozen=True)
class Engine:
    """docker or podman, with the settings `make image` chose, and the image it built."""

    tool: str
    env: Mapping[str, str]
    image: str

    def run(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [self.tool, *args],
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{self.tool} {' '.join(args[:2])} failed ({result.returncode}):\n{result.stderr}"
            )
        return result

    def inspect(self, target: str, template: str, *, image: bool = False) -> str:
        kind = ["image", "inspect"] if image else ["inspect"]
        return self.run(*kind, "--format", template, target).stdout.strip()


def engine() -> Engine:
    """The engine and image of the last `make image`; fails, saying so, when there is none."""
    if not IMAGE_ENV.exists():
        raise AssertionError(f"{IMAGE_ENV} is missing: build the image first (make image; make test does)")
    settings = read_env_file(IMAGE_ENV)
    conf = settings.get("CONTAINERS_CONF", "")
    found = Engine(
        settings["CONTAINER_TOOL"], {"CONTAINERS_CONF": conf} if conf else {}, settings["IMAGE_ID"]
    )
    if found.run("image", "inspect", found.image, check=False).returncode != 0:
        raise AssertionError(f"the image {settings['IMAGE']} ({found.image}) is gone: run make image again")
    return found


def _bytes(quantity: str) -> int:
    """A Kubernetes quantity of bytes (32Mi, 1G, 512) as a number."""
    for suffix, factor in (
        ("Ki", 2**10),
        ("Mi", 2**20),
        ("Gi", 2**30),
        ("k", 10**3),
        ("M", 10**6),
        ("G", 10**9),
    ):
        if quantity.endswith(suffix):
            return int(quantity[: -len(suffix)]) * factor
    return int(quantity)


def _cpus(quantity: str) -> str:
    """A Kubernetes CPU quantity (1, 500m) as the engine's --cpus."""
    return str(int(quantity[:-1]) / 1000) if quantity.endswith("m") else quantity


def _known(where: str, found: Iterable[str], known: Iterable[str]) -> None:
    unknown = sorted(set(found) - set(known))
    if unknown:
        raise Untranslated(f"{where}: {unknown} not translated for the engine (tests/support/containers.py)")


@dataclass(frozen=True)
class Volume:
    """Where a container mounts a volume, and what the kubelet would put there."""

    path: str
    read_only: bool
    kind: str  # emptyDir, secret or configMap
    source: str  # the Secret's or ConfigMap's name
    items: Mapping[str, str]  # file path in the volume -> key of the source; empty: every key
    mode: int
    size_bytes: int
    memory: bool


@dataclass(frozen=True)
class Probe:
    port: int
    service: str
    period_s: float
    failures: int


@dataclass(frozen=True)
class PodSpec:
    """One container of a workload (Deployment or Job) of the rendered manifests, as the kubelet would run it."""

    workload: str
    command: list[str]
    env: dict[str, str]
    volumes: list[Volume]
    ports: dict[str, int]
    port_settings: dict[str, str]  # port name -> the setting whose value is that port
    probes: dict[str, Probe]
    run_options: list[str]
    grace_s: float  # terminationGracePeriodSeconds
    pre_stop_s: float  # the preStop sleep, which the kubelet runs before SIGTERM, within the grace
    user: int
    group: int
    fs_group: int | None
    configmaps: dict[str, dict[str, str]]

    @property
    def term_budget_s(self) -> float:
        """How long the process has after SIGTERM before the kubelet sends SIGKILL."""
        return self.grace_s - self.pre_stop_s

    @classmethod
    def read(cls, objects: Iterable[Obj], kind: str, name: str, tool: str) -> PodSpec:
        objs = list(objects)
        workload = k8s.named(objs, kind, name)
        pod = k8s.pod_template(workload)["spec"]
        _known(
            f"{kind}/{name} pod",
            pod,
            {
                "serviceAccountName",
                "automountServiceAccountToken",
                "terminationGracePeriodSeconds",
                "securityContext",
                "topologySpreadConstraints",
                "containers",
                "volumes",
                "restartPolicy",
            },
        )
        (container,) = pod["containers"]
        _known(
            f"{kind}/{name} container",
            container,
            {
                "name",
                "image",
                "imagePullPolicy",
                "command",
                "args",
                "ports",
                "envFrom",
                "env",
                "startupProbe",
                "livenessProbe",
                "readinessProbe",
                "lifecycle",
                "resources",
                "securityContext",
                "volumeMounts",
            },
        )
        for source in container.get("envFrom", []):
            _known(f"{name} envFrom", source, {"configMapRef"})
        for variable in container.get("env", []):
            _known(f"{name} env {variable['name']}", variable, {"name", "value"})
        env = k8s.container_env(container, objs, None)

        ports = {p["name"]: int(p["containerPort"]) for p in container.get("ports", [])}
        port_settings = {}
        for port_name, number in ports.items():
            settings = [key for key, value in env.items() if value == str(number)]
            assert len(settings) == 1, (
                f"{name}: port {port_name} ({number}) is set by {settings}, not by one setting"
            )
            port_settings[port_name] = settings[0]

        probes = {}
        for probe_name in ("startupProbe", "livenessProbe", "readinessProbe"):
            if probe_name in container:
                probe = container[probe_name]
                _known(
                    f"{name} {probe_name}",
                    probe,
                    {"grpc", "periodSeconds", "failureThreshold", "timeoutSeconds"},
                )
                port = probe["grpc"]["port"]
                probes[probe_name] = Probe(
                    port=ports[port] if isinstance(port, str) else int(port),
                    service=probe["grpc"].get("service", ""),
                    period_s=float(probe.get("periodSeconds", 10)),
                    failures=int(probe.get("failureThreshold", 3)),
                )

        pre_stop_s = 0.0
        lifecycle = container.get("lifecycle", {})
        _known(f"{name} lifecycle", lifecycle, {"preStop"})
        if "preStop" in lifecycle:
            _known(f"{name} preStop", lifecycle["preStop"], {"sleep"})
            pre_stop_s = float(lifecycle["preStop"]["sleep"]["seconds"])

        options, (user, group, fs_group) = _security_options(
            name, pod.get("securityContext", {}), container.get("securityContext", {}), tool
        )
        limits = container.get("resources", {}).get("limits", {})
        _known(f"{name} limits", limits, {"cpu", "memory"})
        if "memory" in limits:
            options += ["--memory", str(_bytes(limits["memory"]))]
        if "cpu" in limits:
            options += ["--cpus", _cpus(limits["cpu"])]

        configmaps = {o["metadata"]["name"]: o.get("data", {}) for o in k8s.of_kind(objs, "ConfigMap")}
        return cls(
            workload=name,
            command=[*container.get("command", []), *container.get("args", [])],
            env=env,
            volumes=_volumes(name, container, pod),
            ports=ports,
            port_settings=port_settings,
            probes=probes,
            run_options=options,
            grace_s=float(pod.get("terminationGracePeriodSeconds", 30)),
            pre_stop_s=pre_stop_s,
            user=user,
            group=group,
            fs_group=fs_group,
            configmaps=configmaps,
        )


def _security_options(
    name: str, pod: Obj, container: Obj, tool: str
) -> tuple[list[str], tuple[int, int, int | None]]:
    """The engine's options for the pod's and the container's security contexts (the container's win),
    and the user, group and fsGroup they set."""
    _known(
        f"{name} pod securityContext",
        pod,
        {"runAsNonRoot", "runAsUser", "runAsGroup", "fsGroup", "seccompProfile"},
    )
    _known(
        f"{name} securityContext",
        container,
        {
            "allowPrivilegeEscalation",
            "readOnlyRootFilesystem",
            "privileged",
            "capabilities",
            "runAsNonRoot",
            "runAsUser",
            "runAsGroup",
            "seccompProfile",
        },
    )
    context = {**pod, **container}
    options: list[str] = []
    assert "runAsUser" in context, f"{name}: without runAsUser the image's user runs; the test sets one"
    user = int(context["runAsUser"])
    group = int(context.get("runAsGroup", user))
    options += ["--user", f"{user}:{group}"]
    if context.get("runAsNonRoot"):
        assert user != 0, f"{name}: runAsNonRoot with runAsUser 0 would not start"
    fs_group = pod.get("fsGroup")
    if fs_group is not None:
        options += ["--group-add", str(fs_group)]
    seccomp = context.get("seccompProfile", {}).get("type", "RuntimeDefault")
    if seccomp == "Unconfined":
        options += ["--security-opt", "seccomp=unconfined"]
    elif seccomp != "RuntimeDefault":
        raise Untranslated(f"{name}: seccompProfile {seccomp}")
    if context.get("allowPrivilegeEscalation") is False:
        options += ["--security-opt", "no-new-privileges"]
    if context.get("privileged"):
        options += ["--privileged"]
    if context.get("readOnlyRootFilesystem"):
        options += ["--read-only"]
        if tool == "podman":
            # podman would otherwise mount writable tmpfs on /tmp, /run and /var/tmp; only the pod's volumes are writable.
            options += ["--read-only-tmpfs=false"]
    capabilities = context.get("capabilities", {})
    _known(f"{name} capabilities", capabilities, {"drop", "add"})
    for capability in capabilities.get("drop", []):
        options += ["--cap-drop", capability]
    for capability in capabilities.get("add", []):
        options += ["--cap-add", capability]
    return options, (user, group, None if fs_group is None else int(fs_group))


def _volumes(name: str, container: Obj, pod: Obj) -> list[Volume]:
    by_name = {volume["name"]: volume for volume in pod.get("volumes", [])}
    found = []
    for mount in container.get("volumeMounts", []):
        _known(f"{name} volumeMount {mount['name']}", mount, {"name", "mountPath", "readOnly"})
        volume = by_name[mount["name"]]
        kinds = set(volume) - {"name"}
        _known(f"{name} volume {mount['name']}", kinds, {"emptyDir", "secret", "configMap"})
        (kind,) = kinds
        spec = volume[kind] or {}
        size, memory, source, mode = 0, False, "", 0o644
        items: dict[str, str] = {}
        if kind == "emptyDir":
            _known(f"{name} emptyDir", spec, {"medium", "sizeLimit"})
            memory = spec.get("medium") == "Memory"
            size = _bytes(spec["sizeLimit"]) if "sizeLimit" in spec else 0
        else:
            _known(f"{name} {kind}", spec, {"secretName", "name", "defaultMode", "items"})
            source = spec["secretName"] if kind == "secret" else spec["name"]
            mode = int(spec.get("defaultMode", 0o644))
            for item in spec.get("items", []):
                _known(f"{name} {kind} item", item, {"key", "path"})
                items[item["path"]] = item["key"]
        found.append(
            Volume(
                path=mount["mountPath"],
                read_only=bool(mount.get("readOnly", False)),
                kind=kind,
                source=source,
                items=items,
                mode=mode,
                size_bytes=size,
                memory=memory,
            )
        )
    return found


@dataclass
class Container:
    """A container started from a PodSpec: its name, its host ports, its main process."""

    engine: Engine
    name: str
    spec: PodSpec
    ports: dict[str, int]
    pid: int = 0

    def address(self, port: str = "grpc") -> str:
        return f"127.0.0.1:{self.ports[port]}"

    @property
    def alive(self) -> bool:
        return process_alive(self.pid)

    def logs(self) -> str:
        result = self.engine.run("logs", self.name, check=False)
        return result.stdout + result.stderr

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.logs().splitlines()[-lines:])

    def exit_code(self) -> int:
        return int(self.engine.inspect(self.name, "{{.State.ExitCode}}"))

    def wait_ready(self) -> None:
        """Waits as the kubelet would: the startup probe within its budget, then readiness; liveness answers too."""
        startup = self.spec.probes.get("startupProbe")
        budget = startup.period_s * startup.failures if startup else 60.0
        for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = self.spec.probes.get(probe_name)
            if probe is None:
                continue
            port = next(name for name, number in self.spec.ports.items() if number == probe.port)
            try:
                wait_serving(self.address(port), budget, probe.service, alive=lambda: self.alive)
            except (TimeoutError, ChildProcessError) as error:
                raise AssertionError(f"{self.name}: {probe_name}: {error}\n{self.log_tail()}") from None

    def terminate(self) -> int:
        """What the kubelet does after the preStop sleep: SIGTERM, then SIGKILL once the grace runs out.

        Returns the exit code: 137 means the grace ran out.
        """
        budget = max(1, round(self.spec.term_budget_s))
        self.engine.run("stop", "--time", str(budget), self.name, timeout=budget + 60)
        return self.exit_code()

    def kill(self) -> None:
        """SIGKILL, as a node crash or the OOM killer would end it."""
        self.engine.run("kill", "--signal", "KILL", self.name)
        self.engine.run("wait", self.name, timeout=60)

    def exec(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return self.engine.run("exec", self.name, *args, timeout=timeout, check=False)


@dataclass
class Pods:
    """Starts containers from PodSpecs and removes every one at the end, with their logs kept under `work`."""

    engine: Engine
    work: Path
    secrets: Mapping[str, Mapping[str, str]]
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    started: list[Container] = field(default_factory=list)

    def __enter__(self) -> Pods:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for container in self.started:
            (self.work / f"{container.name}.log").write_text(container.logs())
        names = [container.name for container in self.started]
        if names:
            self.engine.run("rm", "--force", *names, check=False)

    def logs(self) -> str:
        return "\n".join(f"--- {c.name}\n{c.log_tail()}" for c in self.started)

    def _files(self, spec: PodSpec, name: str, volume: Volume) -> Path:
        """A folder with what the kubelet would project into a Secret or ConfigMap volume."""
        folder = self.work / name / volume.path.strip("/").replace("/", "-")
        folder.mkdir(parents=True)
        if volume.kind == "secret":
            assert volume.source in self.secrets, f"the test has no Secret {volume.source}"
            data = self.secrets[volume.source]
        else:
            assert volume.source in spec.configmaps, f"no ConfigMap {volume.source} is rendered"
            data = spec.configmaps[volume.source]
        items = volume.items or {key: key for key in data}
        for path, key in items.items():
            assert key in data, f"{volume.kind} {volume.source} has no key {key}"
            target = folder / path
            target.write_text(data[key])
            target.chmod(volume.mode)
            if spec.fs_group is not None:
                os.chown(target, 0, spec.fs_group)
        folder.chmod(0o755)
        return folder

    def start(self, spec: PodSpec, instance: str) -> Container:
        """Starts a container of `spec` named for `instance`, its ports moved to free ones."""
        name = f"payments-{self.run_id}-{instance}"
        ports = {port_name: free_port() for port_name in spec.ports}
        env = dict(spec.env)
        for port_name, setting in spec.port_settings.items():
            env[setting] = str(ports[port_name])
        env_file = self.work / f"{name}.env"
        env_file.write_text("".join(f"{key}={value}\n" for key, value in env.items()))
        env_file.chmod(0o600)
        options = ["--name", name, "--label", f"{LABEL}={self.run_id}", "--network", "host"]
        options += ["--env-file", str(env_file), *spec.run_options]
        for volume in spec.volumes:
            if volume.kind == "emptyDir" and volume.memory:
                size = f",size={volume.size_bytes}" if volume.size_bytes else ""
                options += ["--tmpfs", f"{volume.path}:rw,mode=1777{size}"]
            elif volume.kind == "emptyDir":
                folder = self.work / name / volume.path.strip("/").replace("/", "-")
                folder.mkdir(parents=True)
                folder.chmod(0o1777)
                options += ["--volume", f"{folder}:{volume.path}"]
            else:
                folder = self._files(spec, name, volume)
                options += ["--volume", f"{folder}:{volume.path}:{'ro' if volume.read_only else 'rw'}"]
        container = Container(self.engine, name, spec, ports)
        self.started.append(container)
        self.engine.run("run", "--detach", *options, self.engine.image, *spec.command)
        container.pid = int(self.engine.inspect(name, "{{.State.Pid}}"))
        return container

    def run_to_completion(self, spec: PodSpec, instance: str, timeout: float = 180) -> Container:
        """Starts a container of `spec` (a Job's) and waits until it exits."""
        container = self.start(spec, instance)
        self.engine.run("wait", container.name, timeout=timeout)
        return container
