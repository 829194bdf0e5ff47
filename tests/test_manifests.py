"""infra/k8s/ against real schemas, offline, and against the Dockerfile and the service.

Schemas:
- Core resources (Namespace, PVC, Deployment, Service, CronJob): kubernetes-validate's strict
  schemas, in which an unknown field is an error (as `kubectl apply`'s strict field validation
  makes it), at the Kubernetes versions the manifests target (KUBERNETES_VERSIONS, stated in
  infra/README.md).
- KubeRay resources (RayCluster, RayJob, RayCronJob): the `openAPIV3Schema` of KubeRay's CRDs in
  ../shared/schemas/kuberay/, made strict the same way (unknown fields rejected where the schema
  does not preserve them), with `metadata` checked as Kubernetes' ObjectMeta. The CRDs' CEL rules
  (`x-kubernetes-validations`) are not evaluated here: a test checks that the manifests set none
  of the fields they guard.
A copy of a manifest with a deliberately broken field must fail, so that a validator which
accepts everything cannot pass these tests.

Consistency: the serve container runs the Dockerfile's CMD (`--host 0.0.0.0` said explicitly,
the port the probes and Services use), the pods run as the images' user, and every path the
env points at (BENTOML_HOME, data, cache) lies on a mounted volume, at the place the images'
BENTOML_HOME names.
"""

from __future__ import annotations

import copy
import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate  # the dev extra: offline Kubernetes schemas (never skipped)
import pytest
import yaml
from kubernetes_validate.utils import SchemaNotFoundError, ValidationError

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "infra" / "k8s"
DOCKERFILE = ROOT / "Dockerfile"
# ../shared/schemas/kuberay: KubeRay's published CRDs (shared/schemas/README.md says which).
KUBERAY_CRDS = ROOT.parent / "shared" / "schemas" / "kuberay"
# The oldest Kubernetes release the manifests target (infra/README.md) and the newest schemas
# kubernetes-validate ships (an API removed later would fail there).
KUBERNETES_VERSIONS = ("1.34", "1.37")
STORE_MOUNT = "/home/polytask/store"


# --------------------------------------------------------------------------- validation
def manifest_files() -> list[Path]:
    return sorted(K8S.glob("*.yaml"))


def load_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _strict(schema: Any) -> Any:
    """An OpenAPI v3 CRD schema as a JSON schema that, like the API server's strict field
    validation, rejects unknown fields (unless the schema preserves them) and honours
    `nullable`."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if (
        out.get("type") == "object"
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


@cache
def _definitions(version: str) -> dict[str, Any]:
    import importlib.resources

    base = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
    return json.loads((base / f"v{version}.0-local-strict" / "_definitions.json").read_text())


@cache
def kuberay_crds() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> the CRD's strict JSON schema, metadata as ObjectMeta."""
    out = {}
    for path in sorted(KUBERAY_CRDS.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if not version.get("served"):
                continue
            schema = _strict(version["schema"]["openAPIV3Schema"])
            schema["properties"]["metadata"] = {
                "$ref": "https://kubernetes.io/api/_definitions.json"
                "#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
            }
            schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind"})
            schema["properties"]["apiVersion"]["enum"] = [f"{group}/{version['name']}"]
            schema["properties"]["kind"]["enum"] = [kind]
            out[(f"{group}/{version['name']}", kind)] = schema
    assert out, f"no CRDs in {KUBERAY_CRDS}"
    return out


def schema_errors(doc: dict[str, Any], version: str) -> list[str]:
    """Every schema error of one resource at Kubernetes `version`, as `path: message`."""
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key in kuberay_crds():
        from referencing import Registry, Resource

        registry = Resource.from_contents(_definitions(version)) @ Registry()
        validator = jsonschema.Draft202012Validator(kuberay_crds()[key], registry=registry)
        errors = list(validator.iter_errors(doc))
    elif str(doc.get("apiVersion", "")).endswith("ray.io/v1"):
        return [f"{key}: no KubeRay CRD for it in {KUBERAY_CRDS}"]
    else:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
            errors = []
        except ValidationError as err:
            errors = [err]
        except SchemaNotFoundError as err:
            return [err.message]
    return [f"{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in errors]


def file_errors(path: Path, version: str) -> list[str]:
    return [
        f"{path.name}: {doc['kind']}/{doc['metadata'].get('name') or doc['metadata'].get('generateName')}: {error}"
        for doc in load_docs(path)
        for error in schema_errors(doc, version)
    ]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: p.name)
def test_every_manifest_passes_its_schema(path: Path, version: str) -> None:
    assert file_errors(path, version) == []


def test_every_kind_in_infra_k8s_has_a_schema() -> None:
    kinds = {(d["apiVersion"], d["kind"]) for p in manifest_files() for d in load_docs(p)}
    kuberay = {k for k in kinds if k[0].startswith("ray.io/")}
    assert kuberay == {("ray.io/v1", k) for k in ("RayCluster", "RayJob", "RayCronJob")}
    assert kuberay <= kuberay_crds().keys()
    for api_version, kind in kinds - kuberay:  # a core kind without a schema would be skipped
        doc = {"apiVersion": api_version, "kind": kind, "metadata": {"name": "x"}}
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSIONS[0], strict=True)
        except SchemaNotFoundError:
            pytest.fail(f"kubernetes-validate has no schema for {kind} {api_version}")
        except ValidationError:
            pass  # a schema exists (this stub is not a valid object)


def test_the_target_version_is_the_documented_one() -> None:
    readme = (ROOT / "infra" / "README.md").read_text()
    assert f"Kubernetes {KUBERNETES_VERSIONS[0]}" in readme


# The RayCluster with one field broken at a time: (what, path to the field, new value).
BROKEN_RAYCLUSTER = [
    ("a replica count as text", ["spec", "workerGroupSpecs", 0, "replicas"], "two"),
    ("a misspelt field", ["spec", "headGroupSpec", "rayStartParam"], {"num-cpus": "1"}),
    (
        "a container port as text",
        ["spec", "headGroupSpec", "template", "spec", "containers", 0, "ports", 0, "containerPort"],
        "6379",
    ),
    (
        "an env entry without a name",
        ["spec", "headGroupSpec", "template", "spec", "containers", 0, "env", 0],
        {"value": "x"},
    ),
    (
        "a unknown field in the pod spec",
        ["spec", "workerGroupSpecs", 0, "template", "spec", "restartPolicyy"],
        "Never",
    ),
    ("a wrong type in metadata", ["metadata", "labels"], ["not", "a", "map"]),
    ("the headGroupSpec removed", ["spec", "headGroupSpec"], None),
]


@pytest.mark.parametrize(
    "what,path,value", BROKEN_RAYCLUSTER, ids=[b[0] for b in BROKEN_RAYCLUSTER]
)
def test_a_broken_field_in_a_copy_of_the_raycluster_is_caught(
    tmp_path: Path, what: str, path: list[str | int], value: Any
) -> None:
    source = K8S / "raycluster.yaml"
    docs = load_docs(source)
    broken = copy.deepcopy(docs)
    cluster = next(d for d in broken if d["kind"] == "RayCluster")
    parent = cluster
    for key in path[:-1]:
        parent = parent[key]
    if value is None:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    copy_path = tmp_path / "raycluster.yaml"
    copy_path.write_text(yaml.safe_dump_all(broken))
    assert file_errors(source, KUBERNETES_VERSIONS[0]) == []  # the original passes
    errors = file_errors(copy_path, KUBERNETES_VERSIONS[0])
    assert errors, f"{what}: not caught"
    field = str(path[-1]) if value is not None else "headGroupSpec"
    assert any(field in e for e in errors), errors


def test_a_broken_field_in_a_core_resource_is_caught() -> None:
    docs = load_docs(K8S / "serve.yaml")
    deployment = copy.deepcopy(next(d for d in docs if d["kind"] == "Deployment"))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinessProbe"]["httpGet"]["paht"] = "/readyz"
    assert any("paht" in e for e in schema_errors(deployment, KUBERNETES_VERSIONS[0]))
    container["readinessProbe"]["httpGet"].pop("paht")
    container["resources"]["limits"]["cpu"] = ["2"]
    assert schema_errors(deployment, KUBERNETES_VERSIONS[0])


def _cel_guarded_paths(schema: dict[str, Any], path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = [path] if "x-kubernetes-validations" in schema else []
    for key, sub in schema.get("properties", {}).items():
        out += _cel_guarded_paths(sub, (*path, key))
    if isinstance(schema.get("items"), dict):
        out += _cel_guarded_paths(schema["items"], (*path, "[]"))
    return out


def _has_path(obj: Any, path: tuple[str, ...]) -> bool:
    if not path:
        return True
    if path[0] == "[]":
        return isinstance(obj, list) and any(_has_path(o, path[1:]) for o in obj)
    return isinstance(obj, dict) and path[0] in obj and _has_path(obj[path[0]], path[1:])


def test_manifests_set_no_field_guarded_by_a_cel_rule() -> None:
    """CEL rules are not evaluated offline; the manifests stay clear of the fields they guard."""
    for path in manifest_files():
        for doc in load_docs(path):
            schema = kuberay_crds().get((doc["apiVersion"], doc["kind"]))
            for guarded in _cel_guarded_paths(schema) if schema else []:
                assert not _has_path(doc, guarded), (
                    f"{path.name}: {'.'.join(guarded)} has CEL rules"
                )


# --------------------------------------------------------------------------- consistency
def docs_of_kind(kind: str) -> list[dict[str, Any]]:
    return [d for p in manifest_files() for d in load_docs(p) if d["kind"] == kind]


def pod_specs() -> list[tuple[str, dict[str, Any]]]:
    """(where, pod spec) of every pod the manifests define."""
    out = []
    for d in docs_of_kind("Deployment"):
        out.append((f"Deployment/{d['metadata']['name']}", d["spec"]["template"]["spec"]))
    for d in docs_of_kind("CronJob"):
        spec = d["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        out.append((f"CronJob/{d['metadata']['name']}", spec))
    for d in docs_of_kind("RayCluster"):
        out.append(("RayCluster head", d["spec"]["headGroupSpec"]["template"]["spec"]))
        for group in d["spec"]["workerGroupSpecs"]:
            out.append((f"RayCluster {group['groupName']}", group["template"]["spec"]))
    return out


def dockerfile_stage(name: str) -> str:
    stages = re.split(r"^FROM ", DOCKERFILE.read_text(), flags=re.MULTILINE)
    (stage,) = [s for s in stages if re.match(rf"\S+ AS {name}\b", s)]
    return stage


def dockerfile_env(stage: str) -> dict[str, str]:
    text = dockerfile_stage(stage).replace("\\\n", " ")
    pairs = re.findall(r"^ENV (.+)$", text, re.MULTILINE)
    return dict(re.findall(r"(\w+)=(\S+)", " ".join(pairs)))


def dockerfile_cmd(stage: str) -> list[str]:
    (cmd,) = re.findall(r"^CMD (\[.*\])$", dockerfile_stage(stage), re.MULTILINE)
    return json.loads(cmd)


def dockerfile_uid(stage: str) -> int:
    text = dockerfile_stage(stage)
    uid = int(re.search(r"useradd .*--uid (\d+)", text).group(1))
    assert re.search(rf"^USER {uid}$", text, re.MULTILINE), f"{stage}: USER is not {uid}"
    return uid


def images() -> dict[str, str]:
    """Image tag -> Dockerfile target (the header's build commands)."""
    found = re.findall(r"docker build --target (\w+) -t (\S+) \.", DOCKERFILE.read_text())
    return {tag: target for target, tag in found}


def test_the_serve_container_runs_the_dockerfile_cmd_on_every_interface() -> None:
    (deployment,) = [
        d for d in docs_of_kind("Deployment") if d["metadata"]["name"] == "polytask-serve"
    ]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    cmd = dockerfile_cmd("serve")
    assert container.get("command", []) + container.get("args", []) == cmd
    # `polytask serve` binds loopback by default: the image must say 0.0.0.0 itself.
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
    port = int(cmd[cmd.index("--port") + 1])
    assert re.search(rf"^EXPOSE {port}$", dockerfile_stage("serve"), re.MULTILINE)
    assert {p["containerPort"] for p in container["ports"]} == {port}


def test_pods_run_as_the_images_user() -> None:
    for where, spec in pod_specs():
        for container in spec["containers"]:
            target = images().get(container["image"])
            if target is None:
                continue  # not one of ours (the Pushgateway)
            uid = dockerfile_uid(target)
            context = {**spec.get("securityContext", {}), **container.get("securityContext", {})}
            assert context.get("runAsUser") == uid, f"{where}: runAsUser is not {uid}"


def test_env_paths_lie_on_the_mounted_store_where_the_images_expect_it() -> None:
    for stage in ("serve", "train"):
        assert dockerfile_env(stage)["BENTOML_HOME"] == f"{STORE_MOUNT}/bentoml", stage
    (claim,) = [d["metadata"]["name"] for d in docs_of_kind("PersistentVolumeClaim")]
    for where, spec in pod_specs():
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for container in spec["containers"]:
            if container["image"] not in images():
                continue
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            for name in mounts.values():
                assert name in volumes, f"{where}: mounts an undefined volume {name}"
                if "emptyDir" in volumes[name]:  # scratch space: /tmp, caches
                    continue
                assert volumes[name]["persistentVolumeClaim"]["claimName"] == claim, where
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            target = images()[container["image"]]
            if target == "serve" or env.get("BENTOML_HOME"):
                assert (
                    env.get("BENTOML_HOME", dockerfile_env(target)["BENTOML_HOME"])
                    == (dockerfile_env(target)["BENTOML_HOME"])
                ), where
            for name in ("BENTOML_HOME", "POLYTASK_DATA_DIR", "POLYTASK_CACHE_DIR"):
                if env.get(name):
                    assert any(env[name].startswith(m + "/") for m in mounts), (
                        f"{where}: {name}={env[name]} is not on a mounted volume {sorted(mounts)}"
                    )
            if target == "serve":
                assert STORE_MOUNT in mounts, f"{where}: the model store is not mounted"


def test_serve_env_names_settings_the_service_reads_and_matches_the_image() -> None:
    sources = "\n".join(p.read_text() for p in sorted((ROOT / "serving").glob("*.py")))
    (deployment,) = [
        d for d in docs_of_kind("Deployment") if d["metadata"]["name"] == "polytask-serve"
    ]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    for name in env:
        if name.startswith("POLYTASK_"):
            assert name in sources, f"serve.yaml sets {name}, which serving/ never reads"
    from serving.model_store import DEFAULT_MODEL_NAME

    image_env = dockerfile_env("serve")
    assert env["POLYTASK_MODEL_NAME"] == image_env["POLYTASK_MODEL_NAME"] == DEFAULT_MODEL_NAME


def test_every_pod_meets_the_restricted_pod_security_standard() -> None:
    # Session 24 review: no container securityContext anywhere; the Ray pods did not even say
    # runAsNonRoot. The "restricted" profile's requirements, for every pod of ours.
    for where, spec in pod_specs():
        pod = spec.get("securityContext", {})
        assert pod.get("runAsNonRoot") is True, where
        assert pod.get("seccompProfile") == {"type": "RuntimeDefault"}, where
        for container in spec["containers"]:
            context = container.get("securityContext", {})
            assert context.get("allowPrivilegeEscalation") is False, where
            assert context.get("capabilities", {}).get("drop") == ["ALL"], where


def test_the_serve_pod_has_a_read_only_root_and_scratch_volumes_where_it_writes() -> None:
    (deployment,) = [
        d for d in docs_of_kind("Deployment") if d["metadata"]["name"] == "polytask-serve"
    ]
    spec = deployment["spec"]["template"]["spec"]
    assert spec["automountServiceAccountToken"] is False
    (container,) = spec["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    # BentoML's sockets and each server's Prometheus files; onnxruntime's device id.
    for path in ("/tmp", "/home/polytask/.cache"):
        assert "emptyDir" in mounts[path], path


def test_the_raycronjob_fires_in_utc_like_the_cronjob() -> None:
    (cron,) = docs_of_kind("CronJob")
    (ray_cron,) = docs_of_kind("RayCronJob")
    assert ray_cron["spec"]["timeZone"] == cron["spec"]["timeZone"] == "Etc/UTC"
