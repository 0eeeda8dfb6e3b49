#!/usr/bin/env python3
"""Evaluates every PromQL expression of the Grafana dashboard against a
Prometheus and fails unless each evaluates without error and returns data.
Usage: dashboard_queries.py DASHBOARD.json PROMETHEUS_URL"""
import json
import sys
import urllib.parse
import urllib.request

dash_file, prom = sys.argv[1], sys.argv[2].rstrip("/")
dash = json.load(open(dash_file))


def exprs(panels):
    for p in panels:
        yield from exprs(p.get("panels", []))
        for t in p.get("targets", []):
            if t.get("expr"):
                yield p["title"], t["expr"]


failed = 0
checked = 0
for title, expr in exprs(dash["panels"]):
    q = expr.replace("$__rate_interval", "1m").replace('"$job"', '".*"')
    url = f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": q})
    try:
        res = json.load(urllib.request.urlopen(url, timeout=10))
    except Exception as e:  # an HTTP 400 means the expression is invalid
        print(f"ERROR  {title}: {q}\n       {e}")
        failed += 1
        continue
    checked += 1
    n = len(res["data"]["result"]) if res.get("status") == "success" else 0
    status = "ok    " if n else "EMPTY "
    if not n:
        failed += 1
    print(f"{status}{n:3d} series  {title}: {q}")
print(f"{checked} expressions evaluated, {failed} failed or empty")
sys.exit(1 if failed or not checked else 0)
