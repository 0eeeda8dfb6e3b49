#!/usr/bin/env python3
"""Prepares the rendered base for `podman kube play`: keeps the Deployment,
PVC, ConfigMap (and adds a Secret with JWT_SECRET), and publishes the http
port on 127.0.0.1:PORT with hostPort (podman has no Services). Nothing else
changes: same image, probes, security context, volumes.
Usage: k8s_podman_manifest.py RENDERED.yaml PORT SECRET > OUT.yaml"""
import base64
import sys

import yaml

rendered, port, secret = sys.argv[1], int(sys.argv[2]), sys.argv[3]
out = []
for d in yaml.safe_load_all(open(rendered)):
    if not d or d["kind"] == "Service":
        continue
    if d["kind"] == "Deployment":
        for c in d["spec"]["template"]["spec"]["containers"]:
            for p in c["ports"]:
                if p["name"] == "http":
                    p["hostPort"] = port
                    p["hostIP"] = "127.0.0.1"
    out.append(d)
out.append({
    "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "shindensen-jwt"},
    "type": "Opaque", "data": {"JWT_SECRET": base64.b64encode(secret.encode()).decode()},
})
yaml.safe_dump_all(out, sys.stdout, sort_keys=False)
