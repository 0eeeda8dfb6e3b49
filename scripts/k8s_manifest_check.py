#!/usr/bin/env python3
"""Checks rendered manifests for the rule that fits their database.

SQLite (base and every overlay but `ha`): the single-writer rule. The
shindensen workload has exactly one replica and never a rolling update,
and nothing (HPA, StatefulSet with more replicas, second workload) adds a
writer.

PostgreSQL (`--ha FILE`): the opposite. At least 3 replicas, RollingUpdate
with maxUnavailable 0, a PodDisruptionBudget and topology spread; no
PersistentVolumeClaim at all (no SQLite volume to share); JWT_SECRET,
DATABASE_URL and the NATS URL each from a Secret key that is not optional.

Usage: k8s_manifest_check.py SQLITE.yaml... [--ha HA.yaml]"""
import sys

import yaml

failures = []


def load(path):
    return [d for d in yaml.safe_load_all(open(path)) if d]


def workloads_of(docs):
    return [d for d in docs if d["kind"] in ("Deployment", "StatefulSet", "ReplicaSet", "DaemonSet", "Pod")]


def pod_spec(w):
    spec = w["spec"]
    return spec.get("template", {}).get("spec", spec)


def single_writer(path):
    docs = load(path)
    before = len(failures)
    workloads = workloads_of(docs)
    mounts_pvc = []
    for w in workloads:
        spec = w["spec"]
        pod = pod_spec(w)
        claims = [v["persistentVolumeClaim"]["claimName"] for v in pod.get("volumes", []) if "persistentVolumeClaim" in v]
        if claims or w["kind"] == "StatefulSet":
            mounts_pvc.append(w)
        name = f'{path}: {w["kind"]}/{w["metadata"]["name"]}'
        if w["kind"] == "DaemonSet":
            failures.append(f"{name}: a DaemonSet runs one writer per node")
        if spec.get("replicas", 1) != 1:
            failures.append(f"{name}: replicas is {spec.get('replicas')}, must be 1")
        if w["kind"] == "Deployment" and spec.get("strategy", {}).get("type") != "Recreate":
            failures.append(f"{name}: strategy must be Recreate, not {spec.get('strategy', {}).get('type', 'RollingUpdate (default)')}")
        if w["kind"] == "StatefulSet" and spec.get("updateStrategy", {}).get("rollingUpdate", {}).get("maxUnavailable") not in (None, 1):
            failures.append(f"{name}: maxUnavailable above 1 lets two pods overlap")
    if len(mounts_pvc) > 1:
        failures.append(f"{path}: {len(mounts_pvc)} workloads mount the database volume")
    for d in docs:
        if d["kind"] == "HorizontalPodAutoscaler":
            failures.append(f"{path}: HorizontalPodAutoscaler {d['metadata']['name']} could add writers")
    if not workloads:
        failures.append(f"{path}: no workload rendered")
    print(f"{path}: {len(workloads)} workload(s), single writer: {'ok' if len(failures) == before else 'NO'}")


def secret_env(container, name):
    for e in container.get("env", []):
        if e["name"] == name:
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            return ref is not None and not ref.get("optional", False)
    return False


def several_nodes(path):
    docs = load(path)
    before = len(failures)
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    if len(workloads_of(docs)) != 1 or len(deployments) != 1:
        failures.append(f"{path}: expected exactly one workload, a Deployment")
        return
    d = deployments[0]
    spec = d["spec"]
    pod = pod_spec(d)
    if spec.get("replicas", 1) < 3:
        failures.append(f"{path}: replicas is {spec.get('replicas', 1)}, want at least 3")
    strategy = spec.get("strategy", {})
    if strategy.get("type", "RollingUpdate") != "RollingUpdate" or strategy.get("rollingUpdate", {}).get("maxUnavailable") != 0:
        failures.append(f"{path}: want RollingUpdate with maxUnavailable 0, got {strategy}")
    if not pod.get("topologySpreadConstraints"):
        failures.append(f"{path}: no topologySpreadConstraints")
    labels = pod.get("metadata", d["spec"]["template"]["metadata"]).get("labels", {})
    pdbs = [p for p in docs if p["kind"] == "PodDisruptionBudget"
            and all(labels.get(k) == v for k, v in p["spec"]["selector"].get("matchLabels", {}).items())]
    if not pdbs:
        failures.append(f"{path}: no PodDisruptionBudget selects the pods")
    if any(p["kind"] == "PersistentVolumeClaim" for p in docs):
        failures.append(f"{path}: renders a PersistentVolumeClaim (a shared SQLite volume?)")
    if any("persistentVolumeClaim" in v for v in pod.get("volumes", [])):
        failures.append(f"{path}: the pods mount a PersistentVolumeClaim")
    container = next(c for c in pod["containers"] if c["name"] == "shindensen")
    for var in ("JWT_SECRET", "DATABASE_URL", "SHINDENSEN_CLUSTER__NATS_URL"):
        if not secret_env(container, var):
            failures.append(f"{path}: {var} must come from a Secret key that is not optional")
    if not (container.get("lifecycle", {}).get("preStop") and container.get("readinessProbe")):
        failures.append(f"{path}: want a preStop drain and a readiness probe")
    print(f"{path}: {spec.get('replicas')} replicas, rolling, no shared volume: {'ok' if len(failures) == before else 'NO'}")


args = sys.argv[1:]
ha = []
while "--ha" in args:
    i = args.index("--ha")
    ha.append(args[i + 1])
    del args[i:i + 2]
for path in args:
    single_writer(path)
for path in ha:
    several_nodes(path)

for f in failures:
    print("FAIL", f)
sys.exit(1 if failures else 0)
