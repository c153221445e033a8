"""The Helm chart (helm/moge), rendered offline by Helm's SDK and checked as the cluster would check it:
strict KubeRay CRD and Kubernetes schemas, the security baseline, resources, and a Serve config that
the project's own MogeConfig accepts and that agrees with the pods the chart creates."""

from __future__ import annotations

import base64
import functools
import json
import os
import subprocess
import sys
from typing import Any

import pytest
import yaml

from cluster.config import MogeConfig

try:  # tests/unit as a package or as a rootdir-relative directory
    from . import helm_render as hr
    from . import helm_schema as hs
except ImportError:
    import helm_render as hr  # type: ignore[no-redef]
    import helm_schema as hs  # type: ignore[no-redef]

VARIANTS = ["default", "gpu", "npu"]
ACCELERATOR_RESOURCE = {"nvidia": "nvidia.com/gpu", "ascend": "huawei.com/Ascend910"}


def values_of(variant: str) -> dict[str, Any]:
    return {} if variant == "default" else hr.load_values(hr.CI_VALUES / f"{variant}-values.yaml")


@functools.cache
def _rendered(variant: str) -> str:
    return json.dumps(hr.render(values_of(variant)))


def rendered(variant: str) -> list[dict[str, Any]]:
    return json.loads(_rendered(variant))  # a fresh copy per test


def merged_values(variant: str) -> dict[str, Any]:
    base = yaml.safe_load((hr.CHART / "values.yaml").read_text())
    return _merge(base, values_of(variant))


def _merge(base: dict, extra: dict) -> dict:
    for k, v in extra.items():
        base[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return base


def rayservice(variant: str) -> dict[str, Any]:
    return hr.one(rendered(variant), "RayService")


def serve_app(variant: str) -> dict[str, Any]:
    serve = yaml.safe_load(rayservice(variant)["spec"]["serveConfigV2"])
    (app,) = serve["applications"]
    return app


def worker_groups(variant: str) -> dict[str, dict[str, Any]]:
    groups = rayservice(variant)["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    return {g["groupName"]: g for g in groups}


def pod_specs(objects: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(where, pod spec) of every pod the release would create."""
    out = []
    for obj in objects:
        if obj["kind"] == "RayService":
            cluster = obj["spec"]["rayClusterConfig"]
            out.append(("head", cluster["headGroupSpec"]["template"]["spec"]))
            out += [(g["groupName"], g["template"]["spec"]) for g in cluster["workerGroupSpecs"]]
        elif obj["kind"] in ("StatefulSet", "Deployment", "DaemonSet", "Job"):
            out.append((obj["metadata"]["name"], obj["spec"]["template"]["spec"]))
    return out


def ray_resources(group: dict[str, Any]) -> dict[str, float]:
    """Parse `ray start --resources` the way the shell and Ray would: strip the quotes, read JSON."""
    raw = group["rayStartParams"].get("resources")
    if raw is None:
        return {}
    assert raw.startswith('"') and raw.endswith('"'), f"resources must be shell-quoted JSON: {raw!r}"
    return json.loads(raw[1:-1].replace('\\"', '"'))


@pytest.fixture(scope="module", autouse=True)
def _crds_present():
    if not hs.crds_available():
        message = (
            f"chart schema tests need the KubeRay CRDs: none in {hs.CRD_DIR} (../shared/kuberay-crds/ beside "
            "the repository; or set MOGE_KUBERAY_CRDS to a directory of KubeRay CRD YAMLs)"
        )
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


# ----------------------------------------------------------------------------- lint and schemas


@pytest.mark.parametrize("variant", VARIANTS)
def test_lint_reports_no_errors_or_warnings(variant):
    report = hr.lint(values_of(variant))
    serious = [m for m in report["messages"] if m["severity"] >= 2]
    assert not report["errors"] and not serious, report


@pytest.mark.parametrize("variant", VARIANTS)
def test_rendered_objects_pass_strict_crd_and_kubernetes_validation(variant):
    objects = rendered(variant)
    assert [o["kind"] for o in objects].count("RayService") == 1
    assert hs.validate_objects(objects) == []


def test_every_template_holds_at_most_one_object():
    helm = hr._helm()
    with helm.Chart.load(hr.CHART) as chart:
        manifests = chart.render(values=values_of("gpu"), name=hr.RELEASE, namespace=hr.NAMESPACE)
    for template, text in manifests.items():
        docs = [d for d in yaml.safe_load_all(text) if d] if template.endswith(".yaml") else []
        assert len(docs) <= 1, f"{template} renders {len(docs)} objects"


@pytest.mark.parametrize("path", sorted(hr.BROKEN_VALUES.glob("*.yaml")), ids=lambda p: p.stem)
def test_broken_values_fail_strict_validation_with_readable_message(path):
    expected = [line.split("expect:", 1)[1].strip() for line in path.read_text().splitlines() if "# expect:" in line]
    assert expected, f"{path} must say what it expects (# expect: ...)"
    problems = hs.validate_objects(hr.render(hr.load_values(path)))
    for message in expected:
        assert message in problems, f"{path.name}: wanted {message!r}, got {problems}"


def test_validator_accepts_what_it_should_and_catches_a_missing_required_field():
    service = rayservice("default")
    assert hs.validate_object(service) == []
    del service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]
    assert any("'template' is a required property" in p for p in hs.validate_object(service))


def test_values_schema_is_generated_from_the_current_moge_config():
    tool = hr.REPO / "helm" / "tools" / "values_schema.py"
    done = subprocess.run([sys.executable, str(tool), "--check"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


# ------------------------------------------------------------------------------- invalid values

INVALID_VALUES = [
    ({"expertPools": {"cpu": {"minReplicas": 3, "replicas": 1}}},
     "expertPools.cpu: need minReplicas <= replicas <= maxReplicas, got 3 <= 1 <= 4"),
    ({"expertPools": {"cpu": {"accelerator": {"kind": "tpu"}}}}, 'expertPools.cpu.accelerator.kind: "tpu" is not one of'),
    ({"expertPools": {"cpu": {"accelerator": {"count": 0}}}}, "expertPools.cpu.accelerator.count: must be a whole number >= 1"),
    ({"expertPools": {"cpu": {"enabled": False}}}, "expertPools: no pool is enabled"),
    ({"expertPools": {"gpu": {"accelerator": {"kind": "nvidia", "count": 1}, "replicas": 1, "minReplicas": 0, "maxReplicas": 1}}},
     "expertPools: all enabled pools must use one accelerator kind (expert workers share one resource request), found cpu and nvidia"),
    ({"expertPools": {"Big_Pool": {"accelerator": {"kind": "cpu", "count": 1}, "replicas": 1, "minReplicas": 1, "maxReplicas": 1}}},
     "expertPools.Big_Pool: a pool name must be lowercase letters"),
    ({"service": {"type": "ExternalName"}}, 'service.type: "ExternalName" is not one of ClusterIP, NodePort, LoadBalancer'),
    ({"podSecurity": {"runAsUser": 0}}, "podSecurity.runAsUser: must be a positive id (root, 0, is not allowed)"),
    ({"redis": {"external": {"url": "redis://r:6379/0"}}}, "redis: set either redis.enabled (in-chart Redis) or redis.external.url, not both"),
    ({"redis": {"enabled": False, "external": {"url": "redis://:secret@r:6379/0"}}}, "with no password (put it in redis.external.existingSecret)"),
    ({"redis": {"enabled": False}}, "redis: the controller needs Redis"),
    ({"moge": {"elastic": {"redis_password": "x"}}}, "moge.elastic.redis_password: set by the chart; use redis.auth"),
    ({"moge": {"server": {"api_keys": ["k"]}}}, "moge.server.api_keys: set by the chart; use apiKeys.keys"),
    ({"moge": {"data_plane": {"num_workers": 5}}}, "moge.data_plane.num_workers: 5 expert workers do not fit in the pools (at most 4 devices"),
    ({"moge": {"elastic": {"policy": {"max_devices": 9}}}}, "moge.elastic.policy.max_devices: 9 is more than the pools can hold (4 devices"),
    ({"moge": {"engine": {"max_num_seq": 8}}}, "additional properties 'max_num_seq' not allowed"),
    ({"moge": {"data_plane": {"transport": "carrier-pigeon"}}}, "/moge/data_plane/transport"),
    ({"apiKeys": {"keys": ["k"], "existingSecret": "s"}}, "apiKeys: set either keys/adminKeys or existingSecret, not both"),
    ({"modelVolume": {"enabled": True}}, "modelVolume.claimName: required when modelVolume.enabled is true"),
]


@pytest.mark.parametrize("values,message", INVALID_VALUES, ids=[m[:40] for _, m in INVALID_VALUES])
def test_invalid_values_stop_the_install_with_a_clear_message(values, message):
    assert message in hr.render_error(values)


# --------------------------------------------------------------------------------- serve config


@pytest.mark.parametrize("variant", VARIANTS)
def test_serve_config_deploys_the_app_with_a_valid_moge_config(variant):
    app = serve_app(variant)
    assert app["import_path"] == "cluster.serve.app:app_builder"
    assert set(app["args"]) == {"config"}
    cfg = MogeConfig.model_validate(app["args"]["config"])
    values = merged_values(variant)
    assert cfg.model.source == values["moge"]["model"]["source"]
    assert cfg.server.port == values["serve"]["port"]
    assert cfg.model.device == {"cpu": "cpu", "nvidia": "cuda", "ascend": "npu"}[values["attention"]["accelerator"]["kind"]]
    # Secrets never travel in the serve config (it is visible to anyone who can read the RayService).
    assert cfg.elastic.redis_password is None and cfg.server.api_keys == []


@pytest.mark.parametrize("variant", VARIANTS)
def test_expert_workers_fit_the_pools_they_are_scheduled_on(variant):
    cfg = MogeConfig.model_validate(serve_app(variant)["args"]["config"])
    pools = {name: g for name, g in worker_groups(variant).items() if name.startswith("expert-")}
    assert pools
    capacity = 0
    for name, group in pools.items():
        offered = ray_resources(group)
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        slots = offered["expert_slot"]
        capacity += slots * group["maxReplicas"]
        # Every resource an expert worker asks for is offered by every pod of every pool.
        for resource, amount in cfg.data_plane.worker_resources.items():
            assert offered.get(resource, 0) >= amount, f"{name} offers {offered}, workers need {resource}"
        if cfg.data_plane.worker_num_gpus:
            assert int(group["rayStartParams"]["num-gpus"]) == limits["nvidia.com/gpu"] == slots
        if "NPU" in cfg.data_plane.worker_resources:
            assert offered["NPU"] == limits["huawei.com/Ascend910"] == slots
    assert "expert_slot" in cfg.data_plane.worker_resources
    assert cfg.data_plane.num_workers <= capacity
    assert cfg.elastic.policy.min_devices <= cfg.elastic.policy.max_devices <= capacity
    # The attention group offers no expert slot, so no expert worker lands there.
    assert "expert_slot" not in ray_resources(worker_groups(variant)["attention"])


def test_gpu_pools_scale_between_their_bounds_and_workers_take_one_gpu_each():
    groups = worker_groups("gpu")
    assert {n: (g["minReplicas"], g["replicas"], g["maxReplicas"]) for n, g in groups.items() if n.startswith("expert-")} == {
        "expert-h100": (0, 1, 1),
        "expert-h100-spot": (0, 0, 2),
    }
    cfg = MogeConfig.model_validate(serve_app("gpu")["args"]["config"])
    assert cfg.data_plane.worker_num_gpus == 1 and cfg.elastic.policy.max_devices == 8 * 1 + 8 * 2
    assert groups["expert-h100-spot"]["template"]["spec"]["nodeSelector"]["cloud.example.com/capacity"] == "spot"


def test_secrets_reach_the_moge_config_through_the_environment():
    values = {"redis": {"auth": {"password": "r3dis-pw"}}, "apiKeys": {"keys": ["k1", "k2"], "adminKeys": ["adm"]}}
    objects = hr.render(values)
    secrets = {s["metadata"]["name"]: s for s in hr.by_kind(objects, "Secret")}
    head = hr.one(objects, "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    env = {}
    for var in head["containers"][0]["env"]:
        ref = var.get("valueFrom", {}).get("secretKeyRef")
        if ref and var["name"].startswith("MOGE_"):
            env[var["name"]] = base64.b64decode(secrets[ref["name"]]["data"][ref["key"]]).decode()
    config = yaml.safe_load(hr.one(objects, "RayService")["spec"]["serveConfigV2"])["applications"][0]["args"]["config"]
    cfg = MogeConfig.load(env=env, **config)
    assert cfg.elastic.redis_password == "r3dis-pw"
    assert cfg.server.api_keys == ["k1", "k2"] and cfg.server.admin_keys == ["adm"]
    assert cfg.elastic.redis_url == f"redis://demo-moge-redis.{hr.NAMESPACE}.svc:6379/0"
    redis_service = hr.one(objects, "Service", "-redis")
    assert redis_service["metadata"]["name"] == "demo-moge-redis" and redis_service["spec"]["ports"][0]["port"] == 6379


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_secret_reference_resolves(variant):
    objects = rendered(variant)
    values = merged_values(variant)
    rendered_keys = {(s["metadata"]["name"], k) for s in hr.by_kind(objects, "Secret") for k in s.get("data", {})}
    external = {values["redis"]["external"]["existingSecret"], values["redis"]["auth"]["existingSecret"],
                values["apiKeys"]["existingSecret"], values["rayAuth"]["existingSecret"]} - {""}
    refs = []
    for where, spec in pod_specs(objects):
        for c in spec["containers"]:
            refs += [(where, v["valueFrom"]["secretKeyRef"]) for v in c.get("env", []) if "secretKeyRef" in v.get("valueFrom", {})]
    assert refs
    for where, ref in refs:
        assert (ref["name"], ref["key"]) in rendered_keys or ref["name"] in external, f"{where}: {ref} points nowhere"


@pytest.mark.parametrize("variant", VARIANTS)
def test_ray_token_authentication_is_on_in_every_ray_process(variant):
    service = rayservice(variant)
    containers = [c for where, spec in pod_specs([service]) for c in spec["containers"]]
    containers.append(service["spec"]["rayClusterConfig"]["autoscalerOptions"])
    for c in containers:
        env = {v["name"]: v for v in c["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]


def test_generated_secrets_are_random_and_given_ones_are_kept():
    first = {s["metadata"]["name"]: s["data"] for s in hr.by_kind(hr.render(), "Secret")}
    second = {s["metadata"]["name"]: s["data"] for s in hr.by_kind(hr.render(), "Secret")}
    assert first.keys() == {"demo-moge-redis", "demo-moge-ray-auth"}
    for name in first:
        (value,) = first[name].values()
        assert len(base64.b64decode(value)) == 32 and first[name] != second[name]
    given = hr.render({"rayAuth": {"token": "tok"}})
    assert base64.b64decode(hr.one(given, "Secret", "-ray-auth")["data"]["auth_token"]) == b"tok"


# ----------------------------------------------------------------------- security and resources


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_pod_runs_non_root_with_a_read_only_root_and_no_capabilities(variant):
    specs = pod_specs(rendered(variant))
    assert len(specs) >= 3
    for where, spec in specs:
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] > 0, where
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert not spec.get("hostNetwork") and not spec.get("hostPID"), where
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, (where, c["name"])
            assert sc["allowPrivilegeEscalation"] is False and sc.get("privileged") is not True, (where, c["name"])
            assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add"), (where, c["name"])
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, (where, c["name"])
            # A read-only root needs somewhere to write: /tmp (Ray sessions) is a volume.
            assert "/tmp" in {m["mountPath"] for m in c["volumeMounts"]}, (where, c["name"])
    autoscaler = rayservice(variant)["spec"]["rayClusterConfig"]["autoscalerOptions"]["securityContext"]
    assert autoscaler["readOnlyRootFilesystem"] is True and autoscaler["capabilities"]["drop"] == ["ALL"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_container_has_cpu_and_memory_bounds_and_its_accelerators(variant):
    values = merged_values(variant)
    for where, spec in pod_specs(rendered(variant)):
        for c in spec["containers"]:
            res = c["resources"]
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(res[part]), (where, part, res)
    groups = worker_groups(variant)
    expected = {"attention": values["attention"]} | {
        f"expert-{n}": p for n, p in values["expertPools"].items() if p.get("enabled", True)
    }
    assert set(groups) == set(expected)
    for name, group_values in expected.items():
        accel = group_values["accelerator"]
        limits = groups[name]["template"]["spec"]["containers"][0]["resources"]["limits"]
        for kind, resource in ACCELERATOR_RESOURCE.items():
            assert limits.get(resource, 0) == (accel["count"] if accel["kind"] == kind else 0), (name, limits)


@pytest.mark.parametrize("variant", VARIANTS)
def test_services_are_cluster_ip_by_default(variant):
    objects = rendered(variant)
    assert rayservice(variant)["spec"]["rayClusterConfig"]["headGroupSpec"]["serviceType"] == "ClusterIP"
    assert all(s["spec"]["type"] == "ClusterIP" for s in hr.by_kind(objects, "Service"))


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_network_policies_select_the_pods_they_protect():
    objects = rendered("default")
    service = hr.one(objects, "RayService")
    ray_labels = [g["template"]["metadata"]["labels"] for g in service["spec"]["rayClusterConfig"]["workerGroupSpecs"]]
    ray_labels.append(service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["metadata"]["labels"])
    redis_labels = hr.one(objects, "StatefulSet")["spec"]["template"]["metadata"]["labels"]
    ray_np, redis_np = hr.one(objects, "NetworkPolicy", "-ray"), hr.one(objects, "NetworkPolicy", "-redis")
    assert all(_selects(ray_np["spec"]["podSelector"]["matchLabels"], labels) for labels in ray_labels)
    assert not _selects(ray_np["spec"]["podSelector"]["matchLabels"], redis_labels)
    assert _selects(redis_np["spec"]["podSelector"]["matchLabels"], redis_labels)
    (rule,) = redis_np["spec"]["ingress"]
    (peer,) = rule["from"]
    assert all(_selects(peer["podSelector"]["matchLabels"], labels) for labels in ray_labels)
    assert rule["ports"] == [{"port": "redis", "protocol": "TCP"}]
    assert hr.one(objects, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]["ports"][0]["name"] == "redis"


def test_service_monitor_scrapes_the_metrics_service():
    objects = rendered("gpu")
    monitor = hr.one(objects, "ServiceMonitor")
    metrics = hr.one(objects, "Service", "-metrics")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert _selects(monitor["spec"]["selector"]["matchLabels"], metrics["metadata"]["labels"])
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {p["name"] for p in metrics["spec"]["ports"]}
    head = rayservice("gpu")["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]
    assert _selects(metrics["spec"]["selector"], head["metadata"]["labels"])
    assert {"serve", "metrics"} <= {p["name"] for p in head["spec"]["containers"][0]["ports"]}
    assert "ServiceMonitor" not in {o["kind"] for o in rendered("default")}


def test_pod_monitor_scrapes_the_ray_pods_serve_and_metrics_ports():
    objects = rendered("npu")
    monitor = hr.one(objects, "PodMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    head = rayservice("npu")["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]
    assert _selects(monitor["spec"]["selector"]["matchLabels"], head["metadata"]["labels"])
    endpoints = monitor["spec"]["podMetricsEndpoints"]
    assert {e["port"] for e in endpoints} == {"serve", "metrics"} <= {p["name"] for p in head["spec"]["containers"][0]["ports"]}
    assert {e["interval"] for e in endpoints} == {"15s"}
    assert not {"PodMonitor", "ConfigMap"} & {o["kind"] for o in rendered("default")}  # both off by default


def test_grafana_dashboard_ships_as_a_config_map_for_the_sidecar():
    config_map = hr.one(rendered("gpu"), "ConfigMap", "-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["annotations"] == {"grafana_folder": "LLM serving"}
    shipped = json.loads(config_map["data"]["moge-serve.json"])
    assert shipped == json.loads((hr.CHART / "dashboards" / "moge-serve.json").read_text())


def test_monitor_validation_catches_a_missing_endpoint_list_and_a_misspelt_field():
    monitor = hr.one(rendered("npu"), "PodMonitor")
    assert hs.validate_object(monitor) == []
    broken = json.loads(json.dumps(monitor))
    del broken["spec"]["podMetricsEndpoints"]
    assert any("'podMetricsEndpoints' is a required property" in p for p in hs.validate_object(broken))
    broken = json.loads(json.dumps(monitor))
    broken["spec"]["podMetricsEndpoints"][0]["intervall"] = "30s"
    broken["spec"]["podMetricsEndpoints"][1]["interval"] = "half a minute"
    problems = hs.validate_object(broken)
    assert any("'intervall' was unexpected" in p for p in problems) and any("does not match" in p for p in problems)


def test_external_redis_needs_no_in_chart_redis():
    objects = rendered("npu")
    assert not hr.by_kind(objects, "StatefulSet") and not hr.by_kind(objects, "Secret")
    cfg = MogeConfig.model_validate(serve_app("npu")["args"]["config"])
    assert cfg.elastic.redis_url == "rediss://redis.infra.svc:6380/2"


def test_notes_tell_how_to_reach_the_api():
    notes = hr.render_notes()
    assert "port-forward svc/demo-moge-serve-svc 8000:8000" in notes


# ---------------------------------------------------------------------------------------- docs


def test_every_value_is_documented_and_the_readme_table_is_current():
    tool = hr.REPO / "helm" / "tools" / "values_table.py"
    done = subprocess.run([sys.executable, str(tool), "--check"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    readme = (hr.CHART / "README.md").read_text()
    for key in ("`expertPools.<name>.accelerator`", "`redis.external.url`", "`rayAuth.token`", "`networkPolicy.serveFrom`"):
        assert key in readme
