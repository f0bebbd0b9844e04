#!/usr/bin/env python3
"""Validate custom resources against the openAPIV3Schema of their CRDs.

    python3 e2e/tools/validate_cr.py --crd crds/ FILE...

Every document of FILE whose apiVersion/kind a CRD under --crd defines is checked with
jsonschema (OpenAPI's `nullable` mapped to JSON Schema); other documents are ignored. Prints
one line per checked object and exits 1 on the first invalid one.
"""

import argparse
import copy
import glob
import os
import sys

import jsonschema
import yaml


def to_json_schema(s):
    """OpenAPI v3 (Kubernetes structural) schema -> JSON Schema draft 7."""
    if isinstance(s, list):
        return [to_json_schema(x) for x in s]
    if not isinstance(s, dict):
        return s
    out = {}
    for k, v in s.items():
        if k.startswith("x-kubernetes-"):
            if k == "x-kubernetes-int-or-string" and v:
                out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
            continue
        if k in ("nullable",):
            continue
        out[k] = to_json_schema(v)
    if s.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


def load_crds(path):
    files = [path] if os.path.isfile(path) else sorted(glob.glob(os.path.join(path, "*.yaml")))
    schemas = {}
    for f in files:
        for doc in yaml.safe_load_all(open(f)):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            spec = doc["spec"]
            for v in spec["versions"]:
                key = (f"{spec['group']}/{v['name']}", spec["names"]["kind"])
                schemas[key] = to_json_schema(copy.deepcopy(v["schema"]["openAPIV3Schema"]))
    return schemas


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--crd", required=True)
    p.add_argument("files", nargs="+")
    args = p.parse_args()
    schemas = load_crds(args.crd)
    if not schemas:
        print(f"no CRDs under {args.crd}", file=sys.stderr)
        return 1
    checked = 0
    for f in args.files:
        for doc in yaml.safe_load_all(open(f)):
            if not doc:
                continue
            key = (doc.get("apiVersion"), doc.get("kind"))
            if key not in schemas:
                continue
            name = doc.get("metadata", {}).get("name", "?")
            body = {k: v for k, v in doc.items() if k not in ("apiVersion", "kind", "metadata")}
            try:
                jsonschema.Draft7Validator(schemas[key]).validate(body)
            except jsonschema.ValidationError as e:
                where = "/".join(str(x) for x in e.absolute_path)
                print(f"{f}: {key[1]}/{name}: at {where or '.'}: {e.message}")
                return 1
            print(f"{f}: {key[1]}/{name} valid")
            checked += 1
    print(f"{checked} custom resource(s) valid")
    return 0


if __name__ == "__main__":
    sys.exit(main())
