"""infra/ and the Dockerfile: every manifest parses and says what the code expects.

What is checked against what:
- Kubernetes manifests: kinds and API versions (KubeRay ray.io/v1, batch/v1 CronJob), the
  service's probes, port and scrape annotations against serving/ and the Dockerfile, the
  retraining schedule (CronJob Forbid, RayCronJob), Ray token auth, images against the
  Dockerfile's targets.
- Prometheus: `promtool check config` and `promtool check rules` (promtool must be installed:
  .ci/run installs Debian's `prometheus`; this test fails without it, it never skips), and every
  metric an alert or a dashboard panel names exists in serving/metrics.py, in BentoML, or in the
  training contract documented in infra/README.md.
- Dockerfile: the `serve` stage installs `.[serve]` and never torch; the `train` stage pins torch
  as the Makefile does, before `.[train,gpu]`.
No Docker engine or Kubernetes cluster runs here: these are static checks. The manifests against
Kubernetes' and KubeRay's schemas: tests/test_manifests.py; the built images: infra/images/
(`make images image-smoke`).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
K8S = INFRA / "k8s"
DOCKERFILE = ROOT / "Dockerfile"
PROM_CONFIG = INFRA / "prometheus" / "prometheus.yml"
PROM_RULES = INFRA / "prometheus" / "alerts.yml"
DASHBOARD = INFRA / "grafana" / "polytask-dashboard.json"
NAMESPACE = "polytask"
RAY_SECRET = ("polytask-ray-auth", "auth_token")

# Metric names are whole words starting with these prefixes (label values such as
# job="polytask_retrain" do not occur in expressions).
METRIC_RE = re.compile(r"\b((?:polytask|bentoml)_[a-z0-9_]+)\b")


# --------------------------------------------------------------------------- helpers
def yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def manifests() -> list[dict[str, Any]]:
    return [doc for path in sorted(K8S.glob("*.yaml")) for doc in yaml_docs(path)]


def one(kind: str, name: str | None = None) -> dict[str, Any]:
    """The manifest of `kind` (named `name`, or by generateName prefix)."""
    found = [
        m
        for m in manifests()
        if m["kind"] == kind
        and (
            name is None
            or m["metadata"].get("name") == name
            or m["metadata"].get("generateName", "").startswith(name)
        )
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''} in infra/k8s, found {len(found)}"
    return found[0]


def containers(obj: Any) -> list[dict[str, Any]]:
    """Every container spec anywhere under `obj` (pod templates nest at different depths)."""
    out: list[dict[str, Any]] = []
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                out.extend(value)
            else:
                out.extend(containers(value))
    elif isinstance(obj, list):
        for item in obj:
            out.extend(containers(item))
    return out


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def dockerfile_stages() -> dict[str, list[str]]:
    """Stage name -> its instruction lines (comments dropped, continuations joined)."""
    lines: list[str] = []
    current = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        current += line[:-1].strip() + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            lines.append(current)
            current = ""
    stages: dict[str, list[str]] = {}
    name = None
    for line in lines:
        m = re.match(r"FROM\s+(\S+)\s+AS\s+(\S+)", line, re.IGNORECASE)
        if m:
            name = m.group(2)
            stages[name] = [line]
        elif name is not None:
            stages[name].append(line)
    return stages


def dockerfile_base(stage: list[str]) -> str:
    """The stage's base image; for `FROM ${ARG}`, the ARG's default (what Docker builds on)."""
    base = stage[0].split()[1]
    m = re.fullmatch(r"\$\{(\w+)\}", base)
    if not m:
        return base
    defaults = dict(re.findall(r"^ARG (\w+)=(\S+)$", DOCKERFILE.read_text(), re.MULTILINE))
    assert m.group(1) in defaults, f"Dockerfile: ARG {m.group(1)} has no default"
    return defaults[m.group(1)]


def built_images() -> dict[str, str]:
    """Target -> image tag, from the build commands at the top of the Dockerfile."""
    return dict(re.findall(r"docker build --target (\w+) -t (\S+) \.", DOCKERFILE.read_text()))


def makefile_torch_pin() -> str:
    m = re.search(r"pip install torch==([\w.+]+)", (ROOT / "Makefile").read_text())
    assert m, "Makefile: no `pip install torch==X` line"
    return m.group(1)


def serving_metric_names() -> dict[str, set[str]]:
    """serving/metrics.py: metric name -> the sample names it exposes on /metrics."""
    from serving.metrics import get_metrics

    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    out = {}
    for metric in vars(get_metrics()).values():
        kind = metric._type
        assert kind in suffixes, f"serving/metrics.py: unexpected metric type {kind}"
        out[metric._name] = {metric._name + s for s in suffixes[kind]}
    return out


def training_contract() -> dict[str, str]:
    """infra/README.md's table of training metrics: name -> type."""
    rows = re.findall(
        r"^\| `(polytask_[a-z0-9_]+)` \| (gauge|counter|histogram) \|",
        (INFRA / "README.md").read_text(),
        re.MULTILINE,
    )
    assert rows, "infra/README.md: no training metric table"
    return dict(rows)


def bentoml_metric_names() -> set[str]:
    """BentoML's own request metrics, read from the installed bentoml (not from memory)."""
    spec = importlib.util.find_spec("bentoml")
    assert spec and spec.submodule_search_locations
    pkg = Path(spec.submodule_search_locations[0])
    config = (pkg / "_internal/configuration/v2/default_configuration.yaml").read_text()
    namespace = re.search(r"metrics:\s*\n\s*enabled: true\s*\n\s*namespace: (\w+)", config)
    assert namespace, "bentoml: metrics namespace not found in its default configuration"
    instruments = (pkg / "_internal/server/http/instruments.py").read_text()
    names = set(re.findall(r'name="(\w+)"', instruments))
    assert {"request_total", "request_duration_seconds"} <= names
    ns = namespace.group(1)
    out = {f"{ns}_request_total", f"{ns}_request_in_progress"}
    out |= {f"{ns}_request_duration_seconds{s}" for s in ("_bucket", "_sum", "_count")}
    return out


def recorded_metrics() -> set[str]:
    """The names alerts.yml's recording rules record (e.g. task:polytask_label_mix_tvd:1h), as
    METRIC_RE sees them in an expression (the polytask_* part)."""
    groups = yaml_docs(PROM_RULES)[0]["groups"]
    return {
        m
        for g in groups
        for r in g["rules"]
        if "record" in r
        for m in METRIC_RE.findall(r["record"])
    }


def known_metrics() -> set[str]:
    serving = set().union(*serving_metric_names().values())
    training = set()
    for name, kind in training_contract().items():
        suffixes = ("_bucket", "_sum", "_count") if kind == "histogram" else ("",)
        training |= {name + s for s in suffixes}
    return serving | training | bentoml_metric_names() | recorded_metrics()


def promtool() -> str:
    path = shutil.which("promtool")
    assert path, (
        "promtool not found: install Debian's prometheus package "
        "(`apt-get install -y prometheus prometheus-pushgateway`; .ci/run does)"
    )
    return path


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]


# --------------------------------------------------------------------------- parsing
def test_every_file_under_infra_parses() -> None:
    files = sorted(p for p in INFRA.rglob("*") if p.suffix in {".yaml", ".yml", ".json"})
    assert len(files) >= 9, files
    for path in files:
        if path.suffix == ".json":
            assert isinstance(json.loads(path.read_text()), dict), path
        else:
            docs = yaml_docs(path)
            assert docs, f"{path}: empty"
            assert all(isinstance(d, dict) for d in docs), path


def test_k8s_manifests_have_the_expected_kinds_and_api_versions() -> None:
    seen = set()
    for m in manifests():
        assert {"apiVersion", "kind", "metadata"} <= m.keys(), m
        meta = m["metadata"]
        assert meta.get("name") or meta.get("generateName"), m
        if m["kind"] != "Namespace":
            assert meta.get("namespace") == NAMESPACE, f"{m['kind']} {meta}: namespace"
        seen.add((m["kind"], m["apiVersion"]))
    assert seen >= {
        ("Namespace", "v1"),
        ("PersistentVolumeClaim", "v1"),
        ("RayCluster", "ray.io/v1"),
        ("RayJob", "ray.io/v1"),
        ("RayCronJob", "ray.io/v1"),
        ("CronJob", "batch/v1"),
        ("Deployment", "apps/v1"),
        ("Service", "v1"),
    }, seen


# --------------------------------------------------------------------------- serving
def dockerfile_serve_port() -> int:
    cmd = next(line for line in dockerfile_stages()["serve"] if line.startswith("CMD"))
    assert "serving.service:Polytask" in cmd
    return int(re.search(r'"--port",\s*"(\d+)"', cmd).group(1))


def test_serve_deployment_probes_port_and_scrape_annotations() -> None:
    port = dockerfile_serve_port()
    assert port == 3000  # README: `polytask serve [--port 3000]`
    service_doc = (ROOT / "serving" / "service.py").read_text()
    for path in ("/livez", "/readyz", "/metrics"):
        assert path in service_doc, f"serving/service.py no longer documents {path}"

    dep = one("Deployment", "polytask-serve")
    pod = dep["spec"]["template"]
    (c,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": port}

    def probe_port(probe: dict[str, Any]) -> int:
        p = probe["httpGet"]["port"]
        return ports[p] if isinstance(p, str) else p

    assert c["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["startupProbe"]["httpGet"]["path"] == "/livez"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert probe_port(c[probe]) == port, probe

    notes = pod["metadata"]["annotations"]
    assert notes["prometheus.io/scrape"] == "true"
    assert notes["prometheus.io/port"] == str(port)
    assert notes["prometheus.io/path"] == "/metrics"
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()

    for name in ("polytask-serve", "polytask-serve-pods"):
        svc = one("Service", name)
        assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items(), name
        (sp,) = svc["spec"]["ports"]
        assert sp["port"] == port and sp["targetPort"] in ("http", port), name
    assert one("Service", "polytask-serve-pods")["spec"]["clusterIP"] == "None"


def test_serve_deployment_env_and_resources() -> None:
    (c,) = one("Deployment", "polytask-serve")["spec"]["template"]["spec"]["containers"]
    env = env_of(c)
    documented = (ROOT / "serving" / "service.py").read_text()
    polytask_vars = [n for n in env if n.startswith("POLYTASK_")]
    assert len(polytask_vars) >= 5
    for name in polytask_vars:
        assert name in documented, f"{name} is not a variable serving/service.py reads"
    assert env["BENTOML_HOME"]["value"].startswith("/home/polytask/store")
    assert env["POLYTASK_ORT_DEVICE"]["value"] in {"auto", "cpu", "cuda"}
    res = c["resources"]
    assert res["requests"]["cpu"] and res["limits"]["memory"]
    # onnxruntime sizes its pool to the node, not the container: threads = the CPU limit.
    assert env["POLYTASK_ORT_THREADS"]["value"] == str(res["limits"]["cpu"])


def test_serving_imports_neither_torch_nor_pipeline() -> None:
    """The serve image holds serving/ only and no torch."""
    banned = {"torch", "pipeline", "ray", "transformers"}
    for path in sorted((ROOT / "serving").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = {(node.module or "").split(".")[0]}
            else:
                continue
            assert not roots & banned, f"{path.name}:{node.lineno} imports {roots & banned}"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    serve = project["optional-dependencies"]["serve"]
    assert not re.search(r"\b(torch|ray|transformers)\b", " ".join(serve).lower()), serve


# --------------------------------------------------------------------------- Ray and scheduling
def test_raycluster_token_auth_ports_and_ray_version() -> None:
    rc = one("RayCluster", "polytask-ray")
    spec = rc["spec"]
    assert spec["authOptions"] == {"mode": "token", "secretName": RAY_SECRET[0]}
    pyproject = (ROOT / "pyproject.toml").read_text()
    ray_pin = re.search(r"ray\[[^\]]*\]>=([\d.]+),<", pyproject).group(1)
    assert spec["rayVersion"].startswith(ray_pin), (spec["rayVersion"], ray_pin)
    (head,) = spec["headGroupSpec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    assert ports["dashboard"] == 8265 and ports["metrics"] == 8080
    assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    metrics_svc = one("Service", "polytask-ray-metrics")
    assert metrics_svc["spec"]["selector"] == {"ray.io/cluster": rc["metadata"]["name"]}
    assert metrics_svc["spec"]["clusterIP"] == "None"


def retrain_entrypoint_ok(entrypoint: str) -> None:
    assert entrypoint.startswith("polytask retrain /app/configs/"), entrypoint
    config = entrypoint.split()[2]
    assert (ROOT / config.removeprefix("/app/")).is_file(), f"{config} is not in configs/"


def test_cronjob_submits_retraining_with_token_and_never_overlaps() -> None:
    cj = one("CronJob", "polytask-retrain")
    assert cj["apiVersion"] == "batch/v1"
    spec = cj["spec"]
    assert len(spec["schedule"].split()) == 5, spec["schedule"]
    assert spec["concurrencyPolicy"] == "Forbid"
    assert spec["jobTemplate"]["spec"]["backoffLimit"] == 0
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    (c,) = pod["containers"]
    script = " ".join(c.get("command", []) + c.get("args", []))
    assert "ray job submit" in script and "--no-wait" not in script  # waits: Forbid holds
    assert "--submission-id" in script  # a unique id per run
    retrain_entrypoint_ok(script.split(" -- ", 1)[1].strip())
    env = env_of(c)
    rc_name = one("RayCluster")["metadata"]["name"]
    assert env["RAY_ADDRESS"]["value"] == (
        f"http://{rc_name}-head-svc.{NAMESPACE}.svc.cluster.local:8265"
    )
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert (ref["name"], ref["key"]) == RAY_SECRET


def test_rayjob_template_and_raycronjob_target_the_raycluster() -> None:
    rc_name = one("RayCluster")["metadata"]["name"]
    job = one("RayJob", "polytask-retrain")
    assert job["metadata"]["generateName"] == "polytask-retrain-"  # unique name per run
    assert "name" not in job["metadata"]
    cron = one("RayCronJob", "polytask-retrain")
    assert cron["apiVersion"] == "ray.io/v1"
    assert len(cron["spec"]["schedule"].split()) == 5
    for spec in (job["spec"], cron["spec"]["jobTemplate"]):
        assert spec["clusterSelector"] == {"ray.io/cluster": rc_name}
        retrain_entrypoint_ok(spec["entrypoint"])
        assert spec["activeDeadlineSeconds"] > 0
    text = (K8S / "raycronjob-retrain.yaml").read_text()
    assert "feature gate `RayCronJob`" in text and "RayCronJob=true" in text
    assert "1.6" in text


def test_container_images_are_the_dockerfile_targets() -> None:
    images = built_images()
    assert set(images) == {"serve", "train"}, images
    used: dict[str, set[str]] = {}
    for m in manifests():
        for c in containers(m.get("spec", {})):
            used.setdefault(c["image"], set()).add(f"{m['kind']}/{m['metadata'].get('name')}")
    ours = {img for img in used if img.startswith("polytask/")}
    assert ours == set(images.values()), (ours, images)
    (serve,) = containers(one("Deployment", "polytask-serve"))
    assert serve["image"] == images["serve"]
    for kind in ("RayCluster", "CronJob"):
        for c in containers(one(kind)):
            assert c["image"] == images["train"], (kind, c["name"])
    for img in used:
        assert ":" in img and not img.endswith(":latest"), f"unpinned image {img}"


# --------------------------------------------------------------------------- Dockerfile
def test_dockerfile_serve_stage_installs_serve_only_and_no_torch() -> None:
    stages = dockerfile_stages()
    assert set(stages) >= {"serve", "train"}
    serve = stages["serve"]
    assert re.fullmatch(r"python:3\.1[1-9]-slim", dockerfile_base(serve)), serve[0]
    runs = [line for line in serve if line.startswith("RUN")]
    assert any(re.search(r'pip install "[^"]*\[serve\]"', r) for r in runs), runs
    assert not any("torch" in line or "[train" in line for line in serve), serve
    copies = [line for line in serve if line.startswith("COPY")]
    assert not any("pipeline" in line for line in copies), copies
    assert any("serving/" in line for line in copies)
    assert any("pyproject.toml" in line for line in copies)
    user = next(line for line in serve if line.startswith("USER"))
    assert user.split()[1] not in {"root", "0"}
    health = next(line for line in serve if line.startswith("HEALTHCHECK"))
    assert f"127.0.0.1:{dockerfile_serve_port()}/livez" in health
    assert serve[-1].startswith("CMD") and "bentoml" in serve[-1]


def test_dockerfile_train_stage_pins_torch_like_the_makefile() -> None:
    train = dockerfile_stages()["train"]
    base = dockerfile_base(train)
    assert "cuda" in base and "cudnn" in base, base
    runs = [line for line in train if line.startswith("RUN")]
    torch_at = [i for i, r in enumerate(runs) if re.search(r"pip install .*\btorch==", r)]
    assert len(torch_at) == 1, runs
    pin = re.search(r"pip install .*\btorch==([\w.+]+)", runs[torch_at[0]]).group(1)
    assert pin == makefile_torch_pin()
    extras_at = [i for i, r in enumerate(runs) if 'pip install ".[train,gpu]"' in r]
    assert extras_at and extras_at[0] > torch_at[0], "torch must be installed before the project"
    assert any("onnxruntime-gpu" in r for r in runs)
    # KubeRay runs `ray start` in a login shell, whose /etc/profile resets PATH.
    assert any("/etc/profile.d/" in r and "/opt/venv/bin" in r for r in runs), runs


def test_dockerignore_keeps_what_the_dockerfile_copies() -> None:
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert "**" in ignore  # everything else (.venv, runs/) stays out of the context
    for stage in dockerfile_stages().values():
        for line in stage:
            if line.startswith("COPY") and "--from" not in line:
                for src in line.split()[1:-1]:
                    assert f"!{src}" in ignore, f".dockerignore drops {src}"


# --------------------------------------------------------------------------- Prometheus
def test_promtool_checks_the_config_and_rules() -> None:
    tool = promtool()
    for args in (["check", "config", str(PROM_CONFIG)], ["check", "rules", str(PROM_RULES)]):
        proc = subprocess.run([tool, *args], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "SUCCESS" in proc.stdout + proc.stderr


def test_scrape_config_targets_the_services_in_the_manifests() -> None:
    config = yaml_docs(PROM_CONFIG)[0]
    assert config["rule_files"] == [PROM_RULES.name]
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    assert set(jobs) == {"polytask-serve", "pushgateway", "ray"}

    def dns_target(job: dict[str, Any]) -> tuple[str, int]:
        (sd,) = job["dns_sd_configs"]
        (name,) = sd["names"]
        assert sd["type"] == "A"
        service, namespace = name.split(".")[:2]
        assert namespace == NAMESPACE, name
        return service, sd["port"]

    service, port = dns_target(jobs["polytask-serve"])
    assert jobs["polytask-serve"]["metrics_path"] == "/metrics"
    assert (service, port) == ("polytask-serve-pods", dockerfile_serve_port())
    service, port = dns_target(jobs["ray"])
    assert service == "polytask-ray-metrics"
    assert one("Service", service)["spec"]["ports"][0]["port"] == port == 8080

    push = jobs["pushgateway"]
    assert push["honor_labels"] is True
    (target,) = push["static_configs"][0]["targets"]
    host, push_port = target.rsplit(":", 1)
    svc = one("Service", host.split(".")[0])
    assert svc["spec"]["ports"][0]["port"] == int(push_port) == 9091


def alert_rules() -> dict[str, dict[str, Any]]:
    groups = yaml_docs(PROM_RULES)[0]["groups"]
    return {r["alert"]: r for g in groups for r in g["rules"] if "alert" in r}


def test_alerts_cover_the_issue_and_name_only_known_metrics() -> None:
    rules = alert_rules()
    known = known_metrics()
    for name, rule in rules.items():
        for metric in METRIC_RE.findall(rule["expr"]):
            assert metric in known, f"alert {name}: unknown metric {metric}"
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        assert rule["annotations"]["summary"], name

    def expr(name: str) -> str:
        return re.sub(r"\s+", " ", rules[name]["expr"])

    assert "polytask_train_dev_accuracy" in expr("PolytaskTaskAccuracyDropped")
    unavailable = expr("PolytaskServingUnavailable")
    assert 'polytask_rejected_requests_total{reason=~"unavailable|too_many_connections"}' in (
        unavailable
    )
    assert "polytask_retrain_last_failure_timestamp_seconds" in expr("PolytaskRetrainingFailed")
    assert 'bentoml_service_request_total{endpoint="/predict"}' in unavailable
    assert "http_response_code" in expr("PolytaskServingErrorRate")
    assert "polytask_predictions_total" in expr("PolytaskNoPredictions")
    assert "polytask_retrain_last_success_timestamp_seconds" in expr("PolytaskRetrainingStale")
    assert 'polytask_promotion_decisions_total{decision="refused"}' in expr(
        "PolytaskChallengerRefused"
    )
    # The training metrics the issue names are in the documented contract.
    contract = training_contract()
    assert contract["polytask_train_dev_accuracy"] == "gauge"
    assert contract["polytask_retrain_last_success_timestamp_seconds"] == "gauge"
    assert contract["polytask_promotion_decisions_total"] == "counter"


# Series for `promtool test rules`: one worker fails to load the promoted model at minute 2
# and serves a fallback until minute 12, when a good model is promoted.
LOAD_FAILURE_SERIES = [
    {"series": 'polytask_model_load_failures_total{job="polytask-serve"}', "values": "0 0 1x40"},
    {"series": 'polytask_model_fallback{job="polytask-serve"}', "values": "0 0 1x10 0x30"},
]


def test_model_load_failure_alert_fires_on_fallback_and_recent_failures(tmp_path: Path) -> None:
    """promtool's rule unit test: PolytaskModelLoadFailed is quiet before the failure, fires
    while a worker is on a fallback and for 15 minutes after the failure, then resolves."""
    rule = alert_rules()["PolytaskModelLoadFailed"]
    expr = re.sub(r"\s+", " ", rule["expr"])
    assert "polytask_model_fallback" in expr and "polytask_model_load_failures_total" in expr
    firing = [{"exp_labels": {"severity": rule["labels"]["severity"]}}]
    expected = {1: [], 5: firing, 14: firing, 20: []}  # minute -> alerts
    test = {
        "rule_files": [str(PROM_RULES)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": LOAD_FAILURE_SERIES,
                "alert_rule_test": [
                    {
                        "eval_time": f"{minute}m",
                        "alertname": "PolytaskModelLoadFailed",
                        "exp_alerts": [
                            {**a, "exp_annotations": rule["annotations"]} for a in alerts
                        ],
                    }
                    for minute, alerts in expected.items()
                ],
            }
        ],
    }
    path = tmp_path / "alerts_test.yml"
    path.write_text(yaml.safe_dump(test))
    proc = subprocess.run(
        [promtool(), "test", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --------------------------------------------------------------------------- Grafana
def test_dashboard_covers_every_serving_and_training_metric() -> None:
    dash = dashboard()
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 36
    panels = dash["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["task"]["multi"] and variables["task"]["includeAll"]
    assert any(p["type"] == "row" and p.get("repeat") == "task" for p in panels)
    for p in panels:
        assert {"x", "y", "w", "h"} <= p["gridPos"].keys(), p["title"]
        for t in p.get("targets", []):
            assert t["datasource"]["uid"] == "${datasource}", p["title"]

    used = {m for e in dashboard_exprs() for m in METRIC_RE.findall(e)}
    assert used <= known_metrics(), used - known_metrics()
    for metric, samples in serving_metric_names().items():
        assert samples & used, f"no dashboard panel shows {metric} (serving/metrics.py)"
    for metric in training_contract():
        assert metric in used, f"no dashboard panel shows {metric} (training contract)"
    titles = " ".join(p["title"].lower() for p in panels)
    for words in ("task weights", "alignment gains", "dev accuracy", "active model version"):
        assert words in titles, words


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses every panel query (Grafana's variables replaced by plain values)."""
    subs = {"$__rate_interval": "5m", "$__range": "6h", "$task": "mr"}
    rules = []
    for i, expr in enumerate(dashboard_exprs()):
        for var, value in subs.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, expr
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    proc = subprocess.run(
        [promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("path", sorted(K8S.glob("*.yaml")), ids=lambda p: p.name)
def test_every_manifest_says_how_to_apply_it(path: Path) -> None:
    head = path.read_text().split("\n---", 1)[0]
    assert re.search(r"kubectl (apply|create) -f infra/k8s/" + re.escape(path.name), head), path
