"""The scale-out files: Kubernetes manifests validated against the Kubernetes API schemas
(kubernetes-validate ships them, offline), plus the properties serving relies on."""

from __future__ import annotations

import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
K8S_VERSION = "1.33.0"


def docs():
    out = []
    for f in sorted((DEPLOY / "k8s").glob("*.yaml")):
        out += [(f.name, d) for d in yaml.safe_load_all(f.read_text()) if d]
    return out


@pytest.mark.parametrize("name,doc", docs(), ids=lambda x: x if isinstance(x, str) else x["kind"])
def test_every_manifest_is_valid_against_the_api_schema(name, doc):
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_a_broken_manifest_is_caught():
    bad = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
           "spec": {"replicas": "one", "selector": {}, "template": {}}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def by_kind(kind):
    return [d for _, d in docs() if d["kind"] == kind]


def test_vllm_serves_loras_with_probes_and_runtime_updates():
    (dep,) = by_kind("Deployment")
    vllm = next(c for c in dep["spec"]["template"]["spec"]["containers"] if c["name"] == "vllm")
    assert "--enable-lora" in vllm["args"]
    assert {"readinessProbe", "livenessProbe", "startupProbe"} <= set(vllm)
    env = {e["name"]: e for e in vllm["env"]}
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"]["value"] == "True"
    assert "secretKeyRef" in env["VLLM_API_KEY"]["valueFrom"]  # the key is never a literal
    init = dep["spec"]["template"]["spec"]["initContainers"][0]
    assert init["name"] == "adapter-sync" and "/adapters/champion" in init["args"][0]
    (hpa,) = by_kind("HorizontalPodAutoscaler")
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "vllm:num_requests_waiting"


def test_the_proxy_passes_only_the_v1_inference_paths():
    cm = next(d for d in by_kind("ConfigMap") if d["metadata"]["name"] == "genops-vllm-proxy")
    conf = cm["data"]["nginx.conf"]
    passed = set(re.findall(r"location = (\S+) \{ proxy_pass", conf))
    assert passed == {"/v1/chat/completions", "/v1/completions", "/v1/models"}
    assert re.search(r"location / \{\s*return 404", conf)
    # The public Service targets the proxy; vLLM's port is only reachable inside the namespace.
    services = {s["metadata"]["name"]: s for s in by_kind("Service")}
    assert services["genops-vllm"]["spec"]["ports"][0]["targetPort"] == "http"
    (policy,) = by_kind("NetworkPolicy")
    admin_rule = next(r for r in policy["spec"]["ingress"] if r["ports"][0]["port"] == 8000)
    assert admin_rule["from"] == [{"podSelector": {}}]


def test_dockerfile_serves_the_genops_server():
    text = (DEPLOY / "Dockerfile").read_text()
    assert next(ln for ln in text.splitlines() if ln and not ln.startswith("#")).startswith("FROM python:3.11")
    assert "torch==2.13.0" in text and "-c constraints.txt" in text
    assert re.search(r'CMD \["genops", "serve"', text) and "HEALTHCHECK" in text and "USER genops" in text
