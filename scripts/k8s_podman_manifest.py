#!/usr/bin/env python3
"""Prepares a rendered overlay for `podman kube play`: keeps the Deployment,
its PVCs and the ConfigMaps it mounts, and publishes the http port on
127.0.0.1:PORT with hostPort (podman has no Services). Images, probes,
security contexts, env and volumes stay as rendered. Secrets are not
written here: podman 4.3 stores a Secret object as YAML but reads
secretKeyRef values as JSON (containers/podman#16269), so k8s-check creates
the podman secret shindensen-jwt itself, in the JSON form podman reads.

Changes podman 4.3 needs, only where the overlay has init containers:
- Native sidecars (init containers with restartPolicy: Always) run as
  ordinary containers: podman runs every init container to completion,
  which a sidecar never reaches.
- The pod's restartPolicy becomes OnFailure: podman applies it to init
  containers too, so with Always a finished init container is started again
  and the pod never comes up.
- With --file-replica, Litestream replicates to file:///backup/shindensen on
  an extra PVC, shindensen-backup, instead of the S3 bucket of litestream.yml
  (no object store here); the rest of litestream.yml is used as rendered.

With --service-links, the pod gets what Kubernetes injects when
enableServiceLinks is not false: the variables of every rendered Service
(for the Service `shindensen`: SHINDENSEN_SERVICE_HOST, SHINDENSEN_PORT,
SHINDENSEN_PORT_80_TCP_ADDR, ...). podman has no Services and injects none,
so they are written into the container's env, as the kubelet would.

Usage: k8s_podman_manifest.py RENDERED.yaml PORT [--file-replica] [--service-links] > OUT.yaml"""
import argparse
import sys

import yaml

p = argparse.ArgumentParser()
p.add_argument("rendered")
p.add_argument("port", type=int)
p.add_argument("--file-replica", action="store_true")
p.add_argument("--service-links", action="store_true")
args = p.parse_args()

docs = [d for d in yaml.safe_load_all(open(args.rendered)) if d]
deployment = next(d for d in docs if d["kind"] == "Deployment")
pod = deployment["spec"]["template"]["spec"]
mounted = {v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v}

sidecars = [c for c in pod.get("initContainers", []) if c.pop("restartPolicy", None) == "Always"]
if sidecars:
    pod["initContainers"] = [c for c in pod["initContainers"] if c not in sidecars]
    pod["containers"] += sidecars
    print(f"# native sidecars run as containers: {[c['name'] for c in sidecars]}", file=sys.stderr)
if pod.get("initContainers"):
    pod["restartPolicy"] = "OnFailure"
for c in pod["containers"]:
    for port in c.get("ports", []):
        if port["name"] == "http":
            port["hostPort"] = args.port
            port["hostIP"] = "127.0.0.1"

if args.service_links:
    pod.pop("enableServiceLinks", None)
    links = []
    for svc in (d for d in docs if d["kind"] == "Service"):
        name = svc["metadata"]["name"].upper().replace("-", "_")
        host = "10.96.0.10"  # what a ClusterIP looks like; nothing listens there
        ports = svc["spec"]["ports"]
        links += [(f"{name}_SERVICE_HOST", host), (f"{name}_SERVICE_PORT", str(ports[0]["port"])),
                  (f"{name}_PORT", f"tcp://{host}:{ports[0]['port']}")]
        for port in ports:
            proto, number = port.get("protocol", "TCP"), port["port"]
            if port.get("name"):
                links.append((f"{name}_SERVICE_PORT_{port['name'].upper().replace('-', '_')}", str(number)))
            prefix = f"{name}_PORT_{number}_{proto}"
            links += [(prefix, f"{proto.lower()}://{host}:{number}"), (f"{prefix}_PROTO", proto.lower()),
                      (f"{prefix}_PORT", str(number)), (f"{prefix}_ADDR", host)]
    for c in pod["containers"]:
        c.setdefault("env", []).extend({"name": k, "value": v} for k, v in links)
    print(f"# service links: {[k for k, _ in links]}", file=sys.stderr)

out = [deployment]
for d in docs:
    if d["kind"] == "PersistentVolumeClaim" or (d["kind"] == "ConfigMap" and d["metadata"]["name"] in mounted):
        out.append(d)

if args.file_replica:
    config = next(d for d in out if d["kind"] == "ConfigMap" and "litestream.yml" in d["data"])
    litestream = yaml.safe_load(config["data"]["litestream.yml"])
    for db in litestream["dbs"]:
        db["replica"]["url"] = "file:///backup/shindensen"
    config["data"]["litestream.yml"] = yaml.safe_dump(litestream, sort_keys=False)
    pod["volumes"].append({"name": "backup", "persistentVolumeClaim": {"claimName": "shindensen-backup"}})
    for c in pod.get("initContainers", []) + pod["containers"]:
        if c["name"].startswith("litestream"):
            c["volumeMounts"].append({"name": "backup", "mountPath": "/backup"})
    out.append({
        "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "shindensen-backup"},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
    })

for d in out:
    d["metadata"].pop("namespace", None)
# podman creates objects in file order: what the pod refers to goes first.
out.sort(key=lambda d: ["ConfigMap", "PersistentVolumeClaim", "Deployment"].index(d["kind"]))
yaml.safe_dump_all(out, sys.stdout, sort_keys=False)
