#!/usr/bin/env python3
"""Render, lint and check the dog Helm chart with Helm's own Go SDK (helm-python-sdk).

Used by scripts/check-k8s.sh; run it through that script (it sets up the venv).

  chart_tool.py render [--values FILE] [--out FILE]   render like `helm template`
  chart_tool.py lint                                  `helm lint --strict`
  chart_tool.py check-manifests                       manifests/dog.yaml == rendered defaults
  chart_tool.py update-manifests                      rewrite manifests/dog.yaml
  chart_tool.py check-policy FILE...                  security/shape assertions on rendered YAML
  chart_tool.py check-schema                          values.schema.json refuses bad values
  chart_tool.py check-alerts --promtool PATH          the alerts: promtool check + unit tests,
                                                      runbook_url anchors exist in the docs
"""
import argparse
import difflib
import sys
from pathlib import Path

import yaml
import helm_python as helm

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "dog"
MANIFEST = ROOT / "manifests" / "dog.yaml"
RELEASE = "dog"
NAMESPACE = "dog-system"
KUBE_VERSION = "v1.24.0"
# Values manifests/dog.yaml is rendered with: the chart defaults plus a Namespace object, so
# `kubectl apply -f crds/ -f manifests/dog.yaml` works on an empty cluster; its objects are
# labelled as managed by kubectl, not Helm (Helm would refuse to adopt them otherwise).
MANIFEST_VALUES = {"createNamespace": True, "managedBy": "kubectl"}

# Helm's install order (pkg/release/util/kind_sorter.go), so the file applies cleanly top-down.
KIND_ORDER = [
    "PriorityClass", "Namespace", "NetworkPolicy", "ResourceQuota", "LimitRange",
    "PodSecurityPolicy", "PodDisruptionBudget", "ServiceAccount", "Secret", "SecretList",
    "ConfigMap", "StorageClass", "PersistentVolume", "PersistentVolumeClaim",
    "CustomResourceDefinition", "ClusterRole", "ClusterRoleList", "ClusterRoleBinding",
    "ClusterRoleBindingList", "Role", "RoleList", "RoleBinding", "RoleBindingList", "Service",
    "DaemonSet", "Pod", "ReplicationController", "ReplicaSet", "Deployment",
    "HorizontalPodAutoscaler", "StatefulSet", "Job", "CronJob", "IngressClass", "Ingress",
    "APIService",
]


def fail(msg):
    print(f"FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def render(values=None):
    """Rendered documents (dicts) in install order, NOTES excluded."""
    with helm.Chart.load(str(CHART)) as chart:
        chart.validate_schema(values or {})
        out = chart.render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs = []
    for path in sorted(out):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(out[path]):
            if doc:
                docs.append((path, doc))

    def key(item):
        path, doc = item
        kind = doc.get("kind", "")
        order = KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER)
        return (order, kind, doc.get("metadata", {}).get("name", ""), path)

    return [(p, d) for p, d in sorted(docs, key=key)]


def to_yaml(docs):
    header = (
        "# Generated from charts/dog with default values (plus createNamespace: true) by\n"
        "# `scripts/check-k8s.sh --update`. Do not edit: change the chart instead.\n"
        "# Apply with: kubectl apply -f crds/ && kubectl apply -f manifests/dog.yaml\n"
    )
    parts = []
    for path, doc in docs:
        parts.append(f"---\n# Source: {path}\n" + yaml.safe_dump(doc, sort_keys=True, width=100))
    return header + "".join(parts)


def load_values(path):
    if not path:
        return {}
    return yaml.safe_load(Path(path).read_text()) or {}


def cmd_render(args):
    text = to_yaml(render(load_values(args.values)))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)


def cmd_lint(_args):
    report = helm.lint(str(CHART), strict=True, kube_version=KUBE_VERSION)
    problems = [m for m in report.get("messages", []) if m.get("severity", 0) >= 2]
    for m in report.get("messages", []):
        print(f"lint: severity={m.get('severity')} {m.get('path')}: {m.get('error')}")
    for e in report.get("errors", []) or []:
        print(f"lint error: {e}")
    if problems or report.get("errors"):
        fail("helm lint --strict reported problems")
    print(f"lint: {report.get('total_charts_linted')} chart(s) linted, no warnings")


def cmd_check_manifests(_args):
    expected = to_yaml(render(MANIFEST_VALUES))
    actual = MANIFEST.read_text() if MANIFEST.exists() else ""
    if actual != expected:
        diff = difflib.unified_diff(
            actual.splitlines(True), expected.splitlines(True),
            "manifests/dog.yaml (committed)", "manifests/dog.yaml (rendered)")
        sys.stderr.writelines(list(diff)[:80])
        fail("manifests/dog.yaml is stale; run `scripts/check-k8s.sh --update`")
    print("manifests/dog.yaml matches the rendered chart")


def cmd_update_manifests(_args):
    MANIFEST.parent.mkdir(parents=True, exist_ok=True)
    MANIFEST.write_text(to_yaml(render(MANIFEST_VALUES)))
    print(f"wrote {MANIFEST.relative_to(ROOT)}")


def containers(doc):
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    return spec, spec.get("containers", [])


def cmd_check_policy(args):
    """The security and scheduling properties the spec promises, on rendered YAML."""
    problems = []
    for f in args.files:
        docs = [d for d in yaml.safe_load_all(Path(f).read_text()) if d]
        by_kind = {}
        for d in docs:
            by_kind.setdefault(d["kind"], []).append(d)
        for ds in by_kind.get("DaemonSet", []):
            spec, cs = containers(ds)
            name = ds["metadata"]["name"]
            if not spec.get("hostNetwork"):
                problems.append(f"{f}: {name}: agent must use hostNetwork")
            if spec.get("dnsPolicy") != "ClusterFirstWithHostNet":
                problems.append(f"{f}: {name}: dnsPolicy must be ClusterFirstWithHostNet")
            if spec.get("automountServiceAccountToken") is not False:
                problems.append(f"{f}: {name}: the agent must not mount an API token")
            if {"operator": "Exists"} not in spec.get("tolerations", []):
                problems.append(f"{f}: {name}: must tolerate every taint by default")
            if spec.get("priorityClassName") != "system-node-critical":
                problems.append(f"{f}: {name}: priorityClassName must be system-node-critical")
            us = ds["spec"].get("updateStrategy", {})
            if us.get("type") != "RollingUpdate" or us.get("rollingUpdate", {}).get("maxUnavailable") != 1:
                problems.append(f"{f}: {name}: RollingUpdate with maxUnavailable 1 expected")
            paths = {v["name"]: v.get("hostPath", {}) for v in spec.get("volumes", [])}
            if paths.get("xtables-lock", {}).get("type") != "FileOrCreate":
                problems.append(f"{f}: {name}: /run/xtables.lock hostPath FileOrCreate expected")
            for c in cs:
                sc = c.get("securityContext", {})
                caps = sc.get("capabilities", {})
                if sc.get("privileged"):
                    problems.append(f"{f}: {name}: agent must not be privileged")
                if sorted(caps.get("add", [])) != ["NET_ADMIN", "NET_RAW"] or caps.get("drop") != ["ALL"]:
                    problems.append(f"{f}: {name}: capabilities must be drop ALL + NET_ADMIN, NET_RAW")
                env = {e["name"]: e for e in c.get("env", [])}
                if env.get("NODE_NAME", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") != "spec.nodeName":
                    problems.append(f"{f}: {name}: NODE_NAME must come from spec.nodeName")
                for probe in ("livenessProbe", "readinessProbe"):
                    if c.get(probe, {}).get("httpGet", {}).get("port") not in ("metrics", 10291):
                        problems.append(f"{f}: {name}: {probe} must target the health port")
        for dep in by_kind.get("Deployment", []):
            spec, cs = containers(dep)
            name = dep["metadata"]["name"]
            if dep["spec"].get("replicas", 1) < 2:
                problems.append(f"{f}: {name}: the operator runs 2 replicas (Lease) by default")
            if not spec.get("securityContext", {}).get("runAsNonRoot"):
                problems.append(f"{f}: {name}: operator pod must runAsNonRoot")
            for c in cs:
                sc = c.get("securityContext", {})
                if not sc.get("readOnlyRootFilesystem") or sc.get("capabilities", {}).get("drop") != ["ALL"]:
                    problems.append(f"{f}: {name}: readOnlyRootFilesystem and drop ALL expected")
                if sc.get("allowPrivilegeEscalation") is not False:
                    problems.append(f"{f}: {name}: allowPrivilegeEscalation must be false")
                paths = (c.get("livenessProbe", {}).get("httpGet", {}).get("path"),
                         c.get("readinessProbe", {}).get("httpGet", {}).get("path"))
                if paths != ("/healthz", "/readyz"):
                    problems.append(f"{f}: {name}: probes must be /healthz and /readyz")
        for role in by_kind.get("ClusterRole", []) + by_kind.get("Role", []):
            for rule in role.get("rules", []):
                for field in ("apiGroups", "resources", "verbs"):
                    if "*" in rule.get(field, []):
                        problems.append(f"{f}: {role['metadata']['name']}: wildcard in {field}")
                if "secrets" in rule.get("resources", []):
                    problems.append(f"{f}: {role['metadata']['name']}: no access to Secrets")
        problems.extend(env_problems(f, by_kind))
        if not by_kind.get("DaemonSet") or not by_kind.get("Deployment"):
            problems.append(f"{f}: expected the operator Deployment and the agent DaemonSet")
    for p in problems:
        print(f"policy: {p}", file=sys.stderr)
    if problems:
        fail(f"{len(problems)} policy problem(s)")
    print(f"policy: {len(args.files)} file(s) checked")


# The binaries' flags are clap args with `env = "NAME"`; every variable the chart sets must be
# one of them (a typo would be silently ignored by the binary).
# The broker flags both binaries share live in protocol/src/broker/config.rs (BrokerArgs).
SHARED_CONFIG = ROOT / "protocol" / "src" / "broker" / "config.rs"
CONFIG_SOURCES = {
    "Deployment": ROOT / "operator" / "src" / "config.rs",
    "DaemonSet": ROOT / "node-agent" / "src" / "config.rs",
}


def known_env(path):
    import re
    names = set(re.findall(r'env\s*=\s*"([A-Z0-9_]+)"', path.read_text()))
    if SHARED_CONFIG.exists():
        names |= set(re.findall(r'env\s*=\s*"([A-Z0-9_]+)"', SHARED_CONFIG.read_text()))
    return names


def env_problems(f, by_kind):
    problems = []
    for kind, src in CONFIG_SOURCES.items():
        if not src.exists():
            print(f"env: {src.relative_to(ROOT)} not present; env names of the {kind} not checked")
            continue
        known = known_env(src)
        for obj in by_kind.get(kind, []):
            _, cs = containers(obj)
            for c in cs:
                for e in c.get("env", []):
                    name = e["name"]
                    if name.startswith("DOG_") or name in ("NODE_NAME", "POD_NAME", "POD_NAMESPACE"):
                        if name not in known:
                            problems.append(
                                f"{f}: {obj['metadata']['name']}: env {name} is not a flag of "
                                f"{src.relative_to(ROOT)}")
    return problems


def cmd_check_schema(_args):
    """values.schema.json must refuse wrong types, unknown enums and unknown keys."""
    bad = [
        {"agent": {"mode": "bogus"}},
        {"agent": {"iptablesBackend": "iptables"}},
        {"operator": {"replicas": "two"}},
        {"operatorPublicKeys": ["not-a-key"]},
        {"broker": {"operatorUrl": "http://example"}},
        {"operator": {"failsafe": {"inbound": "ssh"}}},
        {"operator": {"failsafe": {"inbound": "tcp:70000"}}},
        {"operator": {"failsafe": {"outbound": "tcp:5672@nowhere"}}},
        {"operator": {"cluster": {"cni": "weave"}}},
        {"operator": {"cluster": {"podInterfaces": "no spaces"}}},
        {"operator": {"cluster": {"nodePorts": "30000-99999"}}},
        {"logLevel": "info debug"},
        {"operator": {"retireAfter": "a day"}},
        {"keepaliveInterval": 0},
        {"typoedTopLevel": True},
        {"operator": {"resources": {"limits": {"memory": "lots"}}}},
        {"agent": {"resources": {"requests": {"cpus": "1"}}}},
        {"agent": {"resources": {"limit": {"memory": "1Gi"}}}},
        {"agent": {"updateStrategy": {"type": "Sometimes"}}},
        {"agent": {"extraVolumes": [{"hostPath": {"path": "/"}}]}},
        {"operator": {"extraVolumeMounts": [{"name": "x", "mountPath": "relative"}]}},
        {"broker": {"port": 70000}},
        {"broker": {"classicQueues": "yes"}},
    ]
    # Valid one by one, wrong together: the chart's own checks (`dog.checks`) refuse them at
    # render time with a message naming the values.
    clash = [
        ({"keepaliveInterval": 30, "operator": {"inactiveAfter": "20s"}},
         "operator.inactiveAfter (20s) must be longer than keepaliveInterval (30)"),
        ({"keepaliveInterval": "1m", "operator": {"inactiveAfter": 60}},
         "operator.inactiveAfter (60) must be longer than keepaliveInterval (1m)"),
        ({"operator": {"inactiveAfter": "2h", "retireAfter": "1h"}},
         "operator.retireAfter (1h) must be longer than operator.inactiveAfter"),
        ({"operator": {"failsafe": {"outbound": "udp:53,tcp:53,tcp:6443"}}},
         "does not allow the broker port (tcp:5671 or tcp:5672)"),
        ({"broker": {"operatorUrl": "amqp://o:p@mq:5673/%2f", "agentUrl": "amqp://a:p@mq:5673/%2f",
                    "perNodeUsers": False}},
         "does not allow the broker port (tcp:5673)"),
        ({"broker": {"port": 5671}, "operator": {"failsafe": {"outbound": "udp:53,tcp:5672"}}},
         "does not allow the broker port (tcp:5671)"),
        ({"broker": {"operatorUrl": "amqp://o:p@mq:5672/%2f", "agentUrl": "amqp://b:p@mq:5672/%2f"}},
         "broker.perNodeUsers needs broker.managementUrl"),
        ({"broker": {"transientHostMessages": True}},
         "broker.transientHostMessages needs broker.classicQueues"),
    ]
    fits = [
        {"operator": {"inactiveAfter": "1m30s"}, "keepaliveInterval": "1m"},
        {"broker": {"operatorUrl": "amqp://o:p@mq:5673/%2f", "agentUrl": "amqp://a:p@mq:5673/%2f",
                    "perNodeUsers": False},
         "operator": {"failsafe": {"outbound": "udp:53,tcp:5600-5700@10.0.0.0/8"}}},
        {"broker": {"port": 5671}, "operator": {"failsafe": {"outbound": "udp:53,tcp:5671"}}},
        {"agent": {"resources": {"requests": {"cpu": "250m", "memory": "64Mi",
                                              "example.com/dongle": 1}}}},
    ]
    with helm.Chart.load(str(CHART)) as chart:
        chart.validate_schema({})
        for values in bad:
            try:
                chart.validate_schema(values)
            except helm.HelmError:
                continue
            fail(f"values.schema.json accepted bad values {values}")
        for values, message in clash:
            chart.validate_schema(values)
            try:
                chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
            except helm.HelmError as e:
                if message not in str(e):
                    fail(f"values {values} refused, but not with {message!r}: {e}")
                continue
            fail(f"the chart rendered clashing values {values}")
        for values in fits:
            chart.validate_schema(values)
            chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    print(f"schema: defaults accepted, {len(bad)} bad value sets refused, "
          f"{len(clash)} clashing sets refused at render, {len(fits)} edge cases rendered")


def github_anchor(heading):
    """The fragment a Markdown renderer gives a heading (GitHub's rule)."""
    import re
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return slug.replace(" ", "-")


def cmd_check_alerts(args):
    """The rendered PrometheusRule is valid for Prometheus, its unit tests pass, and every alert
    has a runbook_url whose anchor is a heading of docs/operations.md."""
    import subprocess
    import tempfile
    docs = render({"metrics": {"prometheusRule": {"enabled": True}}})
    rules = [d for _, d in docs if d["kind"] == "PrometheusRule"]
    if len(rules) != 1:
        fail(f"expected one PrometheusRule, rendered {len(rules)}")
    groups = rules[0]["spec"]["groups"]
    ops = (ROOT / "docs" / "operations.md").read_text()
    anchors = {github_anchor(l.lstrip("#")) for l in ops.splitlines() if l.startswith("#")}
    alerts = [r for g in groups for r in g["rules"] if "alert" in r]
    for r in alerts:
        url = r.get("annotations", {}).get("runbook_url", "")
        base, _, anchor = url.partition("#")
        if base != "https://dogfw.io/docs/operations" or anchor not in anchors:
            fail(f"alert {r['alert']}: runbook_url {url!r} is not a heading of docs/operations.md")
        if f"`{r['alert']}`" not in ops:
            fail(f"alert {r['alert']} is not in the Alerts table of docs/operations.md")
    panels = dashboard_queries(ops)
    with tempfile.TemporaryDirectory() as tmp:
        # The dashboard's queries, with its variables at "All", checked as recording rules.
        queries = Path(tmp) / "dashboard-queries.yaml"
        queries.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": [
            {"record": f"dashboard:query_{i}", "expr": q} for i, q in enumerate(panels)]}]}))
        p = subprocess.run([args.promtool, "check", "rules", str(queries)],
                           capture_output=True, text=True)
        if p.returncode != 0:
            sys.stderr.write(p.stdout + p.stderr)
            fail("a dashboard query is not valid PromQL")
        rules_file = Path(tmp) / "dog-rules.yaml"
        rules_file.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
        test_file = Path(tmp) / "dog.test.yaml"
        test_file.write_text((ROOT / "tests" / "alerts" / "dog.test.yaml").read_text())
        for cmd in ([args.promtool, "check", "rules", str(rules_file)],
                    [args.promtool, "test", "rules", str(test_file)]):
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode != 0:
                sys.stderr.write(p.stdout + p.stderr)
                fail(f"{' '.join(cmd[1:3])} failed")
    print(f"alerts: {len(alerts)} rules pass promtool check and unit tests; runbook anchors "
          f"exist; {len(panels)} dashboard queries are valid and filter by cluster, namespace, job")


def dashboard_queries(ops):
    """The dashboard's queries with its variables set to "All". Each dog metric in them is
    documented and filtered by the cluster, namespace and job variables."""
    import json
    import re
    board = json.loads((CHART / "dashboards" / "dog.json").read_text())
    names = [v["name"] for v in board["templating"]["list"]]
    if names != ["datasource", "cluster", "namespace", "job"]:
        fail(f"dashboard variables are {names}, expected datasource, cluster, namespace, job")
    selector = '{cluster=~"$cluster", namespace=~"$namespace", job=~"$job"}'
    queries = [v["query"]["query"] for v in board["templating"]["list"][1:]]
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for m in re.finditer(r"\b(dog_[a-z_]+?)(_bucket)?\b(\{[^}]*\})?", expr):
                if m.group(3) != selector:
                    fail(f"dashboard panel {panel['title']!r}: {m.group(0)} lacks {selector}")
                if f"`{m.group(1)}`" not in ops:
                    fail(f"dashboard panel {panel['title']!r}: {m.group(1)} is not documented")
            queries.append(expr)
    out = []
    for q in queries:
        q = re.sub(r"label_values\((.*), *[a-z_]+\)$", r"\1", q)
        out.append(q.replace("$cluster", ".*").replace("$namespace", ".*").replace("$job", ".*"))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("render")
    r.add_argument("--values")
    r.add_argument("--out")
    r.set_defaults(fn=cmd_render)
    sub.add_parser("lint").set_defaults(fn=cmd_lint)
    sub.add_parser("check-manifests").set_defaults(fn=cmd_check_manifests)
    sub.add_parser("update-manifests").set_defaults(fn=cmd_update_manifests)
    p = sub.add_parser("check-policy")
    p.add_argument("files", nargs="+")
    p.set_defaults(fn=cmd_check_policy)
    sub.add_parser("check-schema").set_defaults(fn=cmd_check_schema)
    a = sub.add_parser("check-alerts")
    a.add_argument("--promtool", required=True)
    a.set_defaults(fn=cmd_check_alerts)
    args = ap.parse_args()
    try:
        args.fn(args)
    except helm.HelmError as e:
        fail(f"helm: {e}")


if __name__ == "__main__":
    main()
