#!/usr/bin/env python3
"""Checks rendered manifests for the single-writer rule: the shindensen
workload has exactly one replica and never a rolling update, and nothing
(HPA, StatefulSet with more replicas, second workload) adds a writer.
Usage: k8s_manifest_check.py RENDERED.yaml..."""
import sys

import yaml

failures = []
for path in sys.argv[1:]:
    docs = [d for d in yaml.safe_load_all(open(path)) if d]
    workloads = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet", "ReplicaSet", "DaemonSet", "Pod")]
    mounts_pvc = []
    for w in workloads:
        spec = w["spec"]
        pod = spec.get("template", {}).get("spec", spec)
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
    print(f"{path}: {len(workloads)} workload(s), single writer: {'ok' if not failures else 'NO'}")

for f in failures:
    print("FAIL", f)
sys.exit(1 if failures else 0)
