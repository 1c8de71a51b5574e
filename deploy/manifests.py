"""Checks what kustomize built that no schema can: that the parts fit together.

Run by deploy/check with the validators' Python (PyYAML):

    python deploy/manifests.py OUT BUILT.yaml...

For each built file (one kustomize build), writes every custom resource to
OUT/<build>/<kind>-<name>.yaml for check-jsonschema, and prints one line per custom kind:
"<schema file> <object files...>". Fails (exit 1, a message per problem) when an object has
a kind that neither kubernetes-validate nor a schema of deploy/schemas/ checks, or when the
objects disagree with each other (names, selectors, grace periods, the queue). Writes the
PrometheusRule's spec of the first build to OUT/rules/tenant-tokens.rules.yaml for promtool,
and fails if another build's rules differ from it.
"""

import os
import re
import sys

import yaml

# Kinds kubernetes-validate knows (validated there, strictly).
CORE = {
    ("v1", "ConfigMap"), ("v1", "Namespace"), ("v1", "ServiceAccount"),
    ("apps/v1", "Deployment"), ("batch/v1", "Job"), ("policy/v1", "PodDisruptionBudget"),
    ("networking.k8s.io/v1", "NetworkPolicy"),
}
# Custom kinds and the schema of deploy/schemas/ that checks them.
CUSTOM = {
    ("keda.sh/v1alpha1", "ScaledObject"): "keda.scaledobject.json",
    ("keda.sh/v1alpha1", "TriggerAuthentication"): "keda.triggerauthentication.json",
    ("monitoring.coreos.com/v1", "PodMonitor"): "monitoring.podmonitor.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "monitoring.prometheusrule.json",
}
QUEUE = "tenant-tokens.requests"

problems = []


def problem(build, text):
    problems.append(f"{build}: {text}")


def seconds(duration):
    """SHUTDOWN_GRACE's syntax (500ms, 25s, 5m, 1h30m, plain seconds) in seconds."""
    if re.fullmatch(r"[0-9.]+", duration):
        return float(duration)
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    parts = re.findall(r"([0-9.]+)(ms|s|m|h|d|w)", duration)
    if not parts or "".join(n + u for n, u in parts) != duration:
        raise ValueError(f"not a duration: {duration!r}")
    return sum(float(n) * units[u] for n, u in parts)


def one(objects, kind):
    found = [o for o in objects if o["kind"] == kind]
    return found[0] if len(found) == 1 else None


def selects(selector, labels):
    return all(labels.get(k) == v for k, v in (selector or {}).get("matchLabels", {}).items())


def check_fit(build, objects):
    deployment = one(objects, "Deployment")
    config = one(objects, "ConfigMap")
    if deployment is None or config is None:
        problem(build, "expected one Deployment and one ConfigMap")
        return
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    spec = pod["spec"]
    env = config.get("data", {})

    grace = spec.get("terminationGracePeriodSeconds", 30)
    shutdown = seconds(env.get("SHUTDOWN_GRACE", "25s"))
    if not grace > shutdown:
        problem(build, f"terminationGracePeriodSeconds {grace} must exceed SHUTDOWN_GRACE ({shutdown:g}s)")

    for c in spec["containers"]:
        sc = c.get("securityContext", {})
        for key, want in [("readOnlyRootFilesystem", True), ("allowPrivilegeEscalation", False)]:
            if sc.get(key) is not want:
                problem(build, f"container {c['name']}: securityContext.{key} must be {want}")
        for probe in ["livenessProbe", "readinessProbe"]:
            if probe not in c:
                problem(build, f"container {c['name']} has no {probe}")
        if "requests" not in c.get("resources", {}) or "limits" not in c.get("resources", {}):
            problem(build, f"container {c['name']} needs resource requests and limits")
    if spec.get("securityContext", {}).get("runAsNonRoot") is not True:
        problem(build, "the pod must run as non-root")

    for kind in ["PodDisruptionBudget", "PodMonitor", "NetworkPolicy"]:
        obj = one(objects, kind)
        if obj is None:
            problem(build, f"expected one {kind}")
            continue
        selector = obj["spec"].get("selector") or obj["spec"].get("podSelector")
        if not selects(selector, labels):
            problem(build, f"{kind} {obj['metadata']['name']} does not select the worker's pods")

    scaled = one(objects, "ScaledObject")
    auth = one(objects, "TriggerAuthentication")
    if scaled is None or auth is None:
        problem(build, "expected one ScaledObject and one TriggerAuthentication")
        return
    s = scaled["spec"]
    if s["scaleTargetRef"]["name"] != deployment["metadata"]["name"]:
        problem(build, "the ScaledObject scales something else than the Deployment")
    if "replicas" in deployment["spec"]:
        problem(build, "the Deployment sets replicas: every apply would fight KEDA")
    for t in s["triggers"]:
        if t["metadata"].get("queueName") != QUEUE:
            problem(build, f"a trigger watches {t['metadata'].get('queueName')!r}, not {QUEUE}")
        ref = t.get("authenticationRef", {}).get("name")
        if ref != auth["metadata"]["name"]:
            problem(build, f"a trigger refers to TriggerAuthentication {ref!r}, not the one built")
    pool = int(env.get("DB_POOL_SIZE", "8")) + 1
    print(f"# {build}: up to {s['maxReplicaCount']} replicas x {pool} Postgres connections"
          f" = {s['maxReplicaCount'] * pool} (min {s.get('minReplicaCount', 1)})", file=sys.stderr)


def main():
    out, builds = sys.argv[1], sys.argv[2:]
    by_schema = {}
    rules = None
    for path in builds:
        build = os.path.splitext(os.path.basename(path))[0]
        with open(path) as f:
            objects = [o for o in yaml.safe_load_all(f) if o]
        os.makedirs(os.path.join(out, build), exist_ok=True)
        for o in objects:
            key = (o.get("apiVersion"), o.get("kind"))
            if key in CORE:
                continue
            if key not in CUSTOM:
                problem(build, f"{key[1]} ({key[0]}) is checked by nothing: add a schema")
                continue
            name = f"{o['kind'].lower()}-{o['metadata']['name']}.yaml"
            target = os.path.join(out, build, name)
            with open(target, "w") as f:
                yaml.safe_dump(o, f, sort_keys=False)
            by_schema.setdefault(CUSTOM[key], []).append(target)
            if o["kind"] == "PrometheusRule":
                if rules is None:
                    rules = o["spec"]
                elif o["spec"] != rules:
                    problem(build, "its alert rules differ from the base's")
        check_fit(build, objects)
    if rules is None:
        problem("builds", "no PrometheusRule")
    else:
        os.makedirs(os.path.join(out, "rules"), exist_ok=True)
        with open(os.path.join(out, "rules", "tenant-tokens.rules.yaml"), "w") as f:
            yaml.safe_dump(rules, f, sort_keys=False)
    for p in problems:
        print(f"deploy/check: {p}", file=sys.stderr)
    if problems:
        sys.exit(1)
    for schema, files in sorted(by_schema.items()):
        print(schema, *files)


if __name__ == "__main__":
    main()
