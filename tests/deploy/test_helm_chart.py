"""deploy/helm/pacs without a cluster: ``helm lint --strict``, ``helm template``
with the default values and every file in helm-values/, the rendered objects
validated against the Kubernetes 1.30 schemas (strict), and what would break
an install or a running system: a probe on the wrong port, an HPA or a
ScaledObject aimed at nothing (or both at the worker), a KEDA trigger on a
queue that does not exist, a migration Job that is not a hook, a Secret
reference to nothing, a PACS_* variable the services never read, a value the
schema should have refused.

Each values case is rendered once per module (``rendered``)."""

from __future__ import annotations

import functools
import importlib
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import kubernetes_validate  # type: ignore[import-untyped]
import kubernetes_validate.utils  # type: ignore[import-untyped]
import pytest
import yaml

from pacs_common.cli.main import build_parser
from pacs_common.localrun.runner import SERVICE_KINDS, ServiceKind
from pacs_common.messaging.topology import Topology
from pacs_common.settings_catalog import environment_variables, is_known_environment_variable

pytestmark = pytest.mark.deploy

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "pacs"
VALUES_DIR = Path(__file__).resolve().parent / "helm-values"
KUBERNETES_VERSION = "1.30"
RELEASE = "pacs-test"
NAMESPACE = "imaging"
DEFAULT = "default"
CASES = [DEFAULT, *sorted(path.stem for path in VALUES_DIR.glob("*.yaml"))]
# Custom resources: no schema in kubernetes-validate; checked by the tests below.
CUSTOM_API_GROUPS = {"monitoring.coreos.com", "keda.sh"}
# Secrets the values files name as existing (created outside the chart).
EXISTING_SECRETS = {
    "external-services": {"pacs-postgresql", "pacs-rabbitmq", "pacs-s3", "pacs-azure"},
    "loadbalancer-ingress-tls": {"pacs-dicom-tls"},
}
SCALABLE = {"dimse-gateway", "ingest-worker"}

Manifest = dict[str, Any]


def helm_binary() -> str | None:
    """$HELM, else helm on PATH, else the one deploy/local/bootstrap.sh --test installs."""
    candidates = [os.environ.get("HELM"), shutil.which("helm"), str(REPO / ".tools" / "helm" / "helm")]
    return next((c for c in candidates if c and Path(c).is_file() and os.access(c, os.X_OK)), None)


def run_helm(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm, *args], capture_output=True, text=True, timeout=60, check=False)


def values_args(case: str) -> list[str]:
    return [] if case == DEFAULT else ["--values", str(VALUES_DIR / f"{case}.yaml")]


def template(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    return run_helm(helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, *args)


def render(helm: str, case: str) -> list[Manifest]:
    result = template(helm, *values_args(case))
    assert result.returncode == 0, f"helm template ({case}) failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def helm() -> str:
    found = helm_binary()
    if found is None:
        pytest.skip("no helm: set HELM, put helm on PATH, or run deploy/local/bootstrap.sh --test")
    return found


@pytest.fixture(scope="module")
def rendered(helm: str) -> dict[str, list[Manifest]]:
    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(CASES, pool.map(lambda case: render(helm, case), CASES), strict=True))


@pytest.fixture(scope="module")
def validate_kubernetes() -> Iterator[Callable[[Manifest], object]]:
    """kubernetes_validate.validate, with each schema file read once (it reads
    them again for every object: 5x the time)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            kubernetes_validate.utils,
            "schema_contents",
            functools.lru_cache(maxsize=None)(kubernetes_validate.utils.schema_contents),
        )
        yield lambda manifest: kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)


@pytest.fixture(scope="module")
def catalog() -> dict[str, str]:
    return environment_variables()


@pytest.fixture(scope="module")
def case_values() -> dict[str, dict[str, Any]]:
    """The chart's values per case: values.yaml with the case's file merged in."""
    defaults: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())
    merged = {DEFAULT: defaults}
    for case in CASES[1:]:
        merged[case] = _merge(defaults, yaml.safe_load((VALUES_DIR / f"{case}.yaml").read_text()))
    return merged


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    result = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = _merge(result[key], value)
        else:
            result[key] = value
    return result


# -- helpers over rendered objects ------------------------------------------------


def of_kind(manifests: list[Manifest], kind: str) -> list[Manifest]:
    return [m for m in manifests if m["kind"] == kind]


def named(manifests: list[Manifest], kind: str, name: str) -> Manifest:
    found = [m for m in of_kind(manifests, kind) if m["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def dicom_service(manifests: list[Manifest]) -> Manifest:
    """The gateway's DICOM Service (the one with a port named dicom)."""
    (service,) = [
        s for s in of_kind(manifests, "Service") if "dicom" in {port["name"] for port in s["spec"]["ports"]}
    ]
    return service


def component_of(manifest: Manifest) -> str:
    return str(manifest["metadata"]["labels"]["app.kubernetes.io/component"])


def deployments(manifests: list[Manifest]) -> dict[str, Manifest]:
    return {component_of(d): d for d in of_kind(manifests, "Deployment")}


def container(deployment: Manifest) -> dict[str, Any]:
    containers: list[dict[str, Any]] = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def env_values(spec: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in spec.get("env", []) if "value" in item}


def env_secret_refs(spec: dict[str, Any]) -> dict[str, tuple[str, str]]:
    refs: dict[str, tuple[str, str]] = {}
    for item in spec.get("env", []):
        ref = item.get("valueFrom", {}).get("secretKeyRef")
        if ref is not None:
            refs[item["name"]] = (ref["name"], ref["key"])
    return refs


def pod_specs(manifests: list[Manifest]) -> Iterator[tuple[Manifest, dict[str, Any]]]:
    for manifest in manifests:
        if manifest["kind"] in {"Deployment", "Job"}:
            yield manifest, manifest["spec"]["template"]["spec"]


def kind_of_component(component: str) -> ServiceKind:
    return next(kind for kind in SERVICE_KINDS if kind.label == component)


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def pod_labels(deployment: Manifest) -> dict[str, str]:
    labels: dict[str, str] = deployment["spec"]["template"]["metadata"]["labels"]
    return labels


def settings_default(catalog: dict[str, str], variable: str) -> Any:
    """The default of the setting read from ``variable``, from its settings class."""
    module_name, class_name = catalog[variable].rsplit(".", 1)
    settings_class = getattr(importlib.import_module(module_name), class_name)
    prefix = str(settings_class.model_config.get("env_prefix", ""))
    return settings_class.model_fields[variable.removeprefix(prefix).lower()].default


# -- lint, render, validate ----------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_lint_strict_passes(helm: str, case: str) -> None:
    result = run_helm(helm, "lint", "--strict", str(CHART), *values_args(case))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("case", CASES)
def test_rendered_objects_are_valid_kubernetes_1_30(
    rendered: dict[str, list[Manifest]], validate_kubernetes: Callable[[Manifest], object], case: str
) -> None:
    problems: list[str] = []
    for manifest in rendered[case]:
        group = manifest["apiVersion"].rpartition("/")[0]
        if group in CUSTOM_API_GROUPS:
            continue
        try:
            validate_kubernetes(manifest)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(part) for part in exc.path)
            problems.append(f"{manifest['kind']}/{manifest['metadata']['name']}: {where}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            problems.append(f"{manifest['kind']} {manifest['apiVersion']}: no schema ({exc})")
    assert problems == []


@pytest.mark.parametrize("case", CASES)
def test_object_names_are_unique_and_dns_safe(rendered: dict[str, list[Manifest]], case: str) -> None:
    keys = [(m["kind"], m["metadata"]["name"]) for m in rendered[case]]
    assert len(keys) == len(set(keys))
    for _, name in keys:
        assert len(name) <= 63 and name == name.lower(), name


def test_object_names_fit_kubernetes_limits_with_a_long_release_name(helm: str) -> None:
    release = "a-release-name-as-long-as-helm-allows-it-to-be-x"
    result = run_helm(helm, "template", release, str(CHART), *values_args("loadbalancer-ingress-tls"))
    assert result.returncode == 0, result.stderr
    manifests = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    keys = [(m["kind"], m["metadata"]["name"]) for m in manifests]
    assert len(keys) == len(set(keys))
    assert [name for _, name in keys if len(name) > 63 or name.endswith("-")] == []
    for manifest in manifests:
        for value in manifest["metadata"]["labels"].values():
            assert len(value) <= 63, value


# -- components -----------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_every_deployment_runs_its_module_with_probes_on_its_http_port(
    rendered: dict[str, list[Manifest]], case: str
) -> None:
    found = deployments(rendered[case])
    assert found, "no Deployment rendered"
    for component, deployment in found.items():
        kind = kind_of_component(component)
        main = container(deployment)
        assert main["command"] == ["python", "-m", kind.module]
        ports = {port["name"]: port["containerPort"] for port in main["ports"]}
        # The service listens where its own setting says: the port the probes use.
        assert int(env_values(main)[kind.http_port_env]) == ports["http"]
        for probe, path in (("livenessProbe", "/health/live"), ("readinessProbe", "/health/ready")):
            action = main[probe]["httpGet"]
            assert action["path"] == path, (component, probe)
            assert action["port"] in ("http", ports["http"]), (component, probe)


def test_default_http_ports_are_the_services_own_defaults(
    rendered: dict[str, list[Manifest]], catalog: dict[str, str]
) -> None:
    found = deployments(rendered[DEFAULT])
    assert set(found) == {kind.label for kind in SERVICE_KINDS}
    for component, deployment in found.items():
        kind = kind_of_component(component)
        ports = {port["name"]: port["containerPort"] for port in container(deployment)["ports"]}
        assert ports["http"] == settings_default(catalog, kind.http_port_env), component
    gateway_ports = {p["name"]: p["containerPort"] for p in container(found["dimse-gateway"])["ports"]}
    assert gateway_ports["dicom"] == settings_default(catalog, "PACS_GATEWAY_PORT") == 11112


@pytest.mark.parametrize("case", CASES)
def test_pods_run_as_non_root_on_a_read_only_root_with_writable_scratch(
    rendered: dict[str, list[Manifest]], case: str
) -> None:
    for manifest, spec in pod_specs(rendered[case]):
        name = manifest["metadata"]["name"]
        # Kubernetes' service links (PACS_QUERY_SERVICE_PORT=tcp://...) would land among the settings.
        assert spec["enableServiceLinks"] is False, name
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["runAsUser"] == 10001, name
        main = spec["containers"][0]
        assert main["securityContext"]["readOnlyRootFilesystem"] is True, name
        assert main["securityContext"]["allowPrivilegeEscalation"] is False, name
        volumes = {volume["name"]: volume for volume in spec["volumes"]}
        mounts = {mount["mountPath"]: mount["name"] for mount in main["volumeMounts"]}
        assert "emptyDir" in volumes[mounts["/tmp"]], name
        for variable, value in env_values(main).items():
            if variable.endswith("_SPOOL_DIR"):
                assert "emptyDir" in volumes[mounts[value]], (name, variable)
            if variable.startswith("PACS_STORAGE_") and variable.endswith("_PATH"):
                assert value in mounts, (name, variable)


@pytest.mark.parametrize("case", CASES)
def test_components_stop_within_their_termination_grace_period(
    rendered: dict[str, list[Manifest]], case: str
) -> None:
    for component, deployment in deployments(rendered[case]).items():
        spec = deployment["spec"]["template"]["spec"]
        grace = float(env_values(container(deployment))["PACS_SHUTDOWN_GRACE_SECONDS"])
        assert 0 < grace < spec["terminationGracePeriodSeconds"], component


@pytest.mark.parametrize("case", CASES)
def test_every_pacs_variable_the_chart_sets_is_a_real_setting(
    rendered: dict[str, list[Manifest]], catalog: dict[str, str], case: str
) -> None:
    manifests = rendered[case]
    config_maps = {m["metadata"]["name"]: m.get("data", {}) for m in of_kind(manifests, "ConfigMap")}
    names: set[str] = set()
    for _, spec in pod_specs(manifests):
        for item in spec["containers"][0].get("env", []):
            names.add(item["name"])
        for source in spec["containers"][0].get("envFrom", []):
            names.update(config_maps[source["configMapRef"]["name"]])
    pacs_names = {name for name in names if name.startswith("PACS_")}
    assert "PACS_DB_URL" in pacs_names
    unknown = sorted(name for name in pacs_names if not is_known_environment_variable(name, catalog))
    assert unknown == []


@pytest.mark.parametrize("case", CASES)
def test_every_secret_reference_resolves(rendered: dict[str, list[Manifest]], case: str) -> None:
    manifests = rendered[case]
    rendered_secrets = {
        m["metadata"]["name"]: set(m.get("stringData", {})) | set(m.get("data", {}))
        for m in of_kind(manifests, "Secret")
    }
    existing = EXISTING_SECRETS.get(case, set())
    references: list[tuple[str, str | None]] = []
    for _, spec in pod_specs(manifests):
        references.extend(env_secret_refs(spec["containers"][0]).values())
        references.extend((v["secret"]["secretName"], None) for v in spec.get("volumes", []) if "secret" in v)
    for auth in of_kind(manifests, "TriggerAuthentication"):
        references.extend((ref["name"], ref["key"]) for ref in auth["spec"]["secretTargetRef"])
    assert references
    for name, key in references:
        if name in rendered_secrets:
            assert key is None or key in rendered_secrets[name], (name, key)
        else:
            assert name in existing, f"Secret {name} is neither rendered nor named as existing"
    # Named existing Secrets replace the chart's own: nothing rendered under those names.
    assert not existing & set(rendered_secrets)


@pytest.mark.parametrize("case", CASES)
def test_services_pdbs_and_policies_select_their_component(
    rendered: dict[str, list[Manifest]], case: str
) -> None:
    manifests = rendered[case]
    found = deployments(manifests)
    for service in of_kind(manifests, "Service"):
        targets = [d for d in found.values() if selects(service["spec"]["selector"], pod_labels(d))]
        assert [component_of(t) for t in targets] == [component_of(service)]
        port_names = {port["name"] for port in container(targets[0])["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names, (service["metadata"]["name"], port)
    for kind in ("PodDisruptionBudget", "NetworkPolicy"):
        for manifest in of_kind(manifests, kind):
            selector = manifest["spec"].get("selector") or manifest["spec"]["podSelector"]
            targets = [d for d in found.values() if selects(selector["matchLabels"], pod_labels(d))]
            assert [component_of(t) for t in targets] == [component_of(manifest)], manifest["metadata"]


# -- scaling --------------------------------------------------------------------------


def autoscaled(manifests: list[Manifest]) -> dict[str, list[str]]:
    """Deployment name → the kinds of the autoscalers aimed at it."""
    targets: dict[str, list[str]] = {}
    for hpa in of_kind(manifests, "HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        assert (ref["apiVersion"], ref["kind"]) == ("apps/v1", "Deployment")
        targets.setdefault(ref["name"], []).append("HorizontalPodAutoscaler")
    for scaled in of_kind(manifests, "ScaledObject"):
        targets.setdefault(scaled["spec"]["scaleTargetRef"]["name"], []).append("ScaledObject")
    return targets


@pytest.mark.parametrize("case", CASES)
def test_autoscalers_target_the_scalable_deployments_which_leave_replicas_to_them(
    rendered: dict[str, list[Manifest]], case: str
) -> None:
    manifests = rendered[case]
    by_name = {d["metadata"]["name"]: component_of(d) for d in of_kind(manifests, "Deployment")}
    targets = autoscaled(manifests)
    for name, kinds in targets.items():
        assert name in by_name, f"an autoscaler targets {name}, which is not rendered"
        assert by_name[name] in SCALABLE
        assert len(kinds) == 1, f"{name} has several autoscalers: {kinds}"
    for deployment in of_kind(manifests, "Deployment"):
        scaled = deployment["metadata"]["name"] in targets
        assert ("replicas" in deployment["spec"]) is not scaled, deployment["metadata"]["name"]


def test_default_scales_gateway_and_worker_on_cpu(rendered: dict[str, list[Manifest]]) -> None:
    manifests = rendered[DEFAULT]
    hpas = {component_of(h): h for h in of_kind(manifests, "HorizontalPodAutoscaler")}
    assert set(hpas) == SCALABLE
    for hpa in hpas.values():
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
        assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert of_kind(manifests, "ScaledObject") == []


def test_keda_scales_the_worker_on_the_ingest_queue_instead_of_its_hpa(
    rendered: dict[str, list[Manifest]], case_values: dict[str, dict[str, Any]]
) -> None:
    manifests = rendered["keda"]
    worker = deployments(manifests)["ingest-worker"]
    (scaled,) = of_kind(manifests, "ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["spec"]["scaleTargetRef"]["name"] == worker["metadata"]["name"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "rabbitmq"
    namespace = case_values["keda"]["broker"]["namespace"]
    topology = Topology(namespace=namespace, retry_delays_ms=(1000,))
    assert trigger["metadata"]["queueName"] == topology.ingest_queue == "site-a.ingest"
    assert trigger["metadata"]["mode"] == "QueueLength"
    assert int(trigger["metadata"]["value"]) == case_values["keda"]["ingestWorker"]["keda"]["queueLength"]
    # KEDA reaches the broker with the URL the worker itself uses.
    auth = named(manifests, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    (host,) = auth["spec"]["secretTargetRef"]
    assert host["parameter"] == "host"
    assert (host["name"], host["key"]) == env_secret_refs(container(worker))["PACS_AMQP_URL"]
    # The worker's CPU HPA is gone, the gateway's stays.
    assert [component_of(h) for h in of_kind(manifests, "HorizontalPodAutoscaler")] == ["dimse-gateway"]


# -- migrations -------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_migrations_run_as_a_pre_install_pre_upgrade_hook(
    rendered: dict[str, list[Manifest]], case_values: dict[str, dict[str, Any]], case: str
) -> None:
    manifests = rendered[case]
    jobs = of_kind(manifests, "Job")
    if not case_values[case]["migrations"]["enabled"]:
        assert jobs == []
        return
    (job,) = jobs
    annotations = job["metadata"]["annotations"]
    assert set(annotations["helm.sh/hook"].split(",")) == {"pre-install", "pre-upgrade"}
    weight = int(annotations["helm.sh/hook-weight"])
    assert "before-hook-creation" in annotations["helm.sh/hook-delete-policy"].split(",")
    spec = job["spec"]["template"]["spec"]
    assert spec["restartPolicy"] == "Never"
    command = spec["containers"][0]["command"]
    assert command[0] == "pacs"
    assert build_parser().parse_args(command[1:]).command == "migrate"
    secret_name, _ = env_secret_refs(spec["containers"][0])["PACS_DB_URL"]
    secrets = {s["metadata"]["name"]: s for s in of_kind(manifests, "Secret")}
    if secret_name in secrets:
        # Hooks run before the release's objects exist: the Secret must be a hook created first.
        hook = secrets[secret_name]["metadata"].get("annotations", {})
        assert "pre-install" in hook.get("helm.sh/hook", "").split(",")
        assert int(hook["helm.sh/hook-weight"]) < weight
    else:
        assert secret_name == case_values[case]["database"]["existingSecret"]
    # Nor does the chart's ServiceAccount exist yet.
    if case_values[case]["serviceAccount"]["create"]:
        assert "serviceAccountName" not in spec


# -- exposure ---------------------------------------------------------------------------


def test_default_dicom_service_is_cluster_internal_without_tls(rendered: dict[str, list[Manifest]]) -> None:
    service = dicom_service(rendered[DEFAULT])
    assert service["spec"]["type"] == "ClusterIP"
    assert [(p["name"], p["port"]) for p in service["spec"]["ports"]] == [("dicom", 11112)]
    assert of_kind(rendered[DEFAULT], "Ingress") == []


def test_load_balancer_exposes_dicom_and_dicom_tls_with_the_certificate_mounted(
    rendered: dict[str, list[Manifest]],
) -> None:
    manifests = rendered["loadbalancer-ingress-tls"]
    service = dicom_service(manifests)
    assert service["spec"]["type"] == "LoadBalancer"
    assert service["spec"]["loadBalancerSourceRanges"] == ["10.20.0.0/16"]
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {"dicom": 11112, "dicom-tls": 2762}
    gateway = container(deployments(manifests)["dimse-gateway"])
    env = env_values(gateway)
    assert env["PACS_GATEWAY_TLS_PORT"] == "2762"
    mounts = {m["mountPath"]: m["name"] for m in gateway["volumeMounts"]}
    for variable in ("PACS_GATEWAY_TLS_CERT_FILE", "PACS_GATEWAY_TLS_KEY_FILE", "PACS_GATEWAY_TLS_CA_FILE"):
        assert mounts[str(Path(env[variable]).parent)] == "tls"
    # The HTTP (metrics) port is never on the load balancer.
    assert all(p["name"] != "http" for p in service["spec"]["ports"])


def test_node_port_dicom_service(rendered: dict[str, list[Manifest]]) -> None:
    service = dicom_service(rendered["minimal"])
    assert service["spec"]["type"] == "NodePort"
    assert service["spec"]["ports"][0]["nodePort"] == 31112


def test_ingress_routes_to_the_dicomweb_api_over_tls(rendered: dict[str, list[Manifest]]) -> None:
    manifests = rendered["loadbalancer-ingress-tls"]
    (ingress,) = of_kind(manifests, "Ingress")
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["spec"]["tls"] == [{"hosts": ["pacs.hospital.example"], "secretName": "pacs-web-tls"}]
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "pacs.hospital.example"
    backend = rule["http"]["paths"][0]["backend"]["service"]
    service = named(manifests, "Service", backend["name"])
    assert component_of(service) == "dicomweb-api"
    assert backend["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}
    # Links in DICOMweb responses point at the public address.
    api = container(deployments(manifests)["dicomweb-api"])
    assert env_values(api)["PACS_DICOMWEB_PUBLIC_BASE_URL"] == "https://pacs.hospital.example"


def _policy_rules(manifests: list[Manifest], component: str) -> dict[str, list[dict[str, Any]] | None]:
    """Port name → the peers allowed (None: anyone)."""
    (policy,) = [p for p in of_kind(manifests, "NetworkPolicy") if component_of(p) == component]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    rules: dict[str, list[dict[str, Any]] | None] = {}
    for rule in policy["spec"]["ingress"]:
        for port in rule["ports"]:
            rules[port["port"]] = rule.get("from")
    return rules


def _peer_components(peers: list[dict[str, Any]], manifests: list[Manifest]) -> set[str]:
    found = deployments(manifests)
    components: set[str] = set()
    for peer in peers:
        if set(peer) == {"podSelector"}:
            labels = peer["podSelector"]["matchLabels"]
            components |= {c for c, d in found.items() if selects(labels, pod_labels(d))}
    return components


def test_network_policies_admit_only_the_callers(
    rendered: dict[str, list[Manifest]], case_values: dict[str, dict[str, Any]]
) -> None:
    manifests = rendered[DEFAULT]
    prometheus = case_values[DEFAULT]["networkPolicy"]["prometheusFrom"]
    assert {component_of(p) for p in of_kind(manifests, "NetworkPolicy")} == set(deployments(manifests))
    query = _policy_rules(manifests, "query-service")
    assert set(query) == {"http"}
    assert query["http"] is not None
    assert _peer_components(query["http"], manifests) == {"dimse-gateway", "dicomweb-api"}
    assert [peer for peer in query["http"] if "podSelector" not in peer] == prometheus
    dicomweb = _policy_rules(manifests, "dicomweb-api")
    assert dicomweb["http"] is not None
    assert _peer_components(dicomweb["http"], manifests) == {"ai-connector"}
    for component in ("ingest-worker", "hsm-migrator", "prefetch-scheduler", "ai-connector"):
        assert _policy_rules(manifests, component) == {"http": prometheus}
    gateway = _policy_rules(manifests, "dimse-gateway")
    assert gateway == {"http": prometheus, "dicom": None}  # DICOM from anywhere by default
    restricted = _policy_rules(rendered["loadbalancer-ingress-tls"], "dimse-gateway")
    assert restricted["dicom"] == restricted["dicom-tls"] == [{"ipBlock": {"cidr": "10.20.0.0/16"}}]


def test_disabled_components_render_nothing(rendered: dict[str, list[Manifest]]) -> None:
    manifests = rendered["minimal"]
    assert set(deployments(manifests)) == {"dimse-gateway", "ingest-worker", "query-service", "dicomweb-api"}
    for kind in (
        "NetworkPolicy",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "Job",
        "PersistentVolumeClaim",
    ):
        assert of_kind(manifests, kind) == [], kind
    components = {
        component_of(m) for m in manifests if "app.kubernetes.io/component" in m["metadata"]["labels"]
    }
    assert not components & {"hsm-migrator", "prefetch-scheduler", "ai-connector"}


def test_external_services_and_storage_tiers(rendered: dict[str, list[Manifest]]) -> None:
    manifests = rendered["external-services"]
    (config,) = [m for m in of_kind(manifests, "ConfigMap") if m["metadata"]["name"].endswith("-config")]
    data = config["data"]
    assert data["PACS_STORAGE_TIERS"].split(",")[0] == "hot"
    assert set(data["PACS_STORAGE_TIERS"].split(",")) == {"hot", "warm", "cold"}
    assert (data["PACS_STORAGE_HOT_BACKEND"], data["PACS_STORAGE_WARM_BACKEND"]) == ("s3", "azure")
    assert data["PACS_STORAGE_COLD_S3_STORAGE_CLASS"] == "DEEP_ARCHIVE"
    assert data["PACS_AMQP_NAMESPACE"] == "prod."
    for component, deployment in deployments(manifests).items():
        refs = env_secret_refs(container(deployment))
        assert refs["PACS_DB_URL"] == ("pacs-postgresql", "connection-url"), component
        assert refs["PACS_AMQP_URL"] == ("pacs-rabbitmq", "amqp-url"), component
        if component != "query-service":
            assert refs["PACS_STORAGE_HOT_S3_SECRET_ACCESS_KEY"] == ("pacs-s3", "AWS_SECRET_ACCESS_KEY")
            assert refs["PACS_STORAGE_WARM_AZURE_CONNECTION_STRING"] == ("pacs-azure", "connection-string")
        # No credential is ever a plain value.
        plain = set(env_values(container(deployment))) | set(data)
        assert not {
            v for v in plain if v in {"PACS_DB_URL", "PACS_AMQP_URL"} or "SECRET" in v or "CONNECTION" in v
        }
    assert of_kind(manifests, "PersistentVolumeClaim") == []


# -- values.schema.json ---------------------------------------------------------------------


def test_values_schema_is_draft_07_and_accepts_every_values_case(
    case_values: dict[str, dict[str, Any]],
) -> None:
    schema = yaml.safe_load((CHART / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    jsonschema.Draft7Validator.check_schema(schema)
    for values in case_values.values():
        jsonschema.Draft7Validator(schema).validate(values)


@pytest.mark.parametrize(
    "bad",
    [
        ["--set", "dimseGateway.replicas=3"],  # typo of replicaCount
        ["--set", "metrics.serviceMonitor.enable=true"],  # typo of enabled
        ["--set", "ingestWorker.keda.queuename=ingest"],
        ["--set", "dimseGateway.httpPort=http"],  # wrong type
        ["--set-string", "ingestWorker.autoscaling.enabled=yes"],
        ["--set", "dimseGateway.dicomService.type=External"],
        ["--set", "storage.tiers.hot.backend=tape"],
        ["--set", "database.url=mysql://db/pacs"],
        ["--set", "config.aeTitle=A_TITLE_LONGER_THAN_16"],
    ],
    ids=lambda args: args[1].split("=")[0],
)
def test_values_schema_rejects_typos_and_wrong_types(helm: str, bad: list[str]) -> None:
    result = template(helm, *bad)
    assert result.returncode != 0
    assert "values don't meet the specifications of the schema" in result.stderr
