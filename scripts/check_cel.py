#!/usr/bin/env python3
"""Evaluate every CEL rule (x-kubernetes-validations) in crds/ on the cases in cel-cases.yaml.

Each case names a kind, the schema node carrying the rules (a dotted path, `[]` = list item),
an object for that node, and the messages of the rules it must violate (empty = valid). The
object gets the schema's defaults first, as the API server applies them before validation.
Every rule must be violated by some case and satisfied by some case (no untested rule).
Run through scripts/check-k8s.sh (which installs cel-python into its venv).
"""
import sys
from pathlib import Path

import celpy
import yaml

ROOT = Path(__file__).resolve().parent.parent


def fail(msg):
    print(f"FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def crd_schemas():
    out = {}
    for f in sorted((ROOT / "crds").glob("*.yaml")):
        for doc in yaml.safe_load_all(f.read_text()):
            if doc and doc.get("kind") == "CustomResourceDefinition":
                kind = doc["spec"]["names"]["kind"]
                out[kind] = doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return out


def node_at(schema, path):
    node = schema
    for part in path.split("."):
        name = part.replace("[]", "")
        node = node["properties"][name]
        for _ in range(part.count("[]")):
            node = node["items"]
    return node


def rule_nodes(node, path=""):
    """(path, rules) for every schema node with x-kubernetes-validations."""
    if "x-kubernetes-validations" in node:
        yield path, node["x-kubernetes-validations"]
    for name, child in node.get("properties", {}).items():
        yield from rule_nodes(child, f"{path}.{name}" if path else name)
    if "items" in node:
        yield from rule_nodes(node["items"], path + "[]")


def with_defaults(value, schema):
    if isinstance(value, dict):
        value = dict(value)
        for name, child in schema.get("properties", {}).items():
            if name not in value and "default" in child:
                value[name] = child["default"]
            if name in value:
                value[name] = with_defaults(value[name], child)
    elif isinstance(value, list) and "items" in schema:
        value = [with_defaults(v, schema["items"]) for v in value]
    return value


def main():
    schemas = crd_schemas()
    cases = yaml.safe_load((ROOT / "scripts" / "cel-cases.yaml").read_text())
    env = celpy.Environment()
    programs = {}
    seen_fail, seen_pass = set(), set()
    problems = []
    for kind, schema in schemas.items():
        for path, rules in rule_nodes(schema):
            for r in rules:
                programs[(kind, r["rule"])] = env.program(env.compile(r["rule"]))
    for i, case in enumerate(cases):
        kind, path = case["kind"], case["path"]
        node = node_at(schemas[kind], path)
        rules = node.get("x-kubernetes-validations", [])
        if not rules:
            problems.append(f"case {i}: {kind} {path} has no CEL rules")
            continue
        obj = with_defaults(case["object"], node)
        violated = []
        for r in rules:
            result = programs[(kind, r["rule"])].evaluate({"self": celpy.json_to_cel(obj)})
            if isinstance(result, celpy.CELEvalError) or not isinstance(result, (bool, celpy.celtypes.BoolType)):
                problems.append(f"case {i}: rule {r['rule']!r} did not evaluate to a bool: {result!r}")
                continue
            if result:
                seen_pass.add((kind, r["rule"]))
            else:
                seen_fail.add((kind, r["rule"]))
                violated.append(r["message"])
        expected = case.get("violates", [])
        if sorted(violated) != sorted(expected):
            problems.append(f"case {i} ({kind} {path} {case['object']}): violated {violated}, expected {expected}")
    for key in programs:
        if key not in seen_fail:
            problems.append(f"{key[0]}: no case violates {key[1]!r}")
        if key not in seen_pass:
            problems.append(f"{key[0]}: no case satisfies {key[1]!r}")
    for p in problems:
        print(f"cel: {p}", file=sys.stderr)
    if problems:
        fail(f"{len(problems)} CEL problem(s)")
    print(f"cel: {len(programs)} rule(s), {len(cases)} case(s), every rule both violated and satisfied")


if __name__ == "__main__":
    main()
