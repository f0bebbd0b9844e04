#!/usr/bin/env python3
"""`helm template` and `helm lint` without the helm binary, over PyPI's helm-python-sdk
(real Helm, through its C library). Used by e2e/tests/packaging.rs; also handy by hand:

    python3 e2e/tools/helm.py template charts/mortar --name mortar --namespace mortar-system \
        [-f values.yaml ...] [--set key=value ...] [--include-crds]
    python3 e2e/tools/helm.py lint charts/mortar [-f values.yaml ...] [--strict]

`template` prints one multi-document YAML stream (like `helm template`); `lint` prints the
findings and exits 1 on an error (and on a warning with --strict).
"""

import argparse
import os
import sys

import helm_python as helm
import yaml


def merged_values(args):
    values = {}
    for path in args.values or []:
        with open(path) as f:
            doc = yaml.safe_load(f) or {}
        values = deep_merge(values, doc)
    if args.set:
        # One expression, as `helm --set a[0].x=1 --set a[0].y=2` builds one list entry.
        values = deep_merge(values, helm.parse_set_string(",".join(args.set)))
    return values


def deep_merge(base, over):
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def template(args):
    chart = helm.Chart.load(args.chart)
    values = merged_values(args)
    chart.validate_schema(values)
    rendered = chart.render(values, name=args.name, namespace=args.namespace, is_install=True)
    docs = []
    if args.include_crds:
        for crd in sorted(chart.crds, key=lambda c: c["name"]):
            docs.append(f"# Source: {crd['name']}\n{crd['data'].strip()}\n")
    for path in sorted(rendered):
        body = rendered[path].strip()
        if not body or path.endswith("NOTES.txt"):
            continue
        # A template may hold several documents; keep the ones with content.
        for part in body.split("\n---"):
            part = part.strip().removeprefix("---").strip()
            if any(line.strip() and not line.lstrip().startswith("#") for line in part.splitlines()):
                docs.append(f"# Source: {path}\n{part}\n")
    sys.stdout.write("---\n" + "---\n".join(docs))
    if args.notes:
        notes = [v for k, v in rendered.items() if k.endswith("NOTES.txt")]
        sys.stderr.write("".join(notes))


def lint(args):
    values = merged_values(args)
    report = helm.lint(args.chart, values, strict=args.strict, namespace=args.namespace)
    names = {0: "UNKNOWN", 1: "INFO", 2: "WARNING", 3: "ERROR"}
    bad = False
    for m in report.get("messages") or []:
        sev = m.get("severity", 0)
        print(f"[{names.get(sev, sev)}] {m.get('path', '')}: {m.get('error', '')}")
        if sev >= 3 or (args.strict and sev >= 2):
            bad = True
    for e in report.get("errors") or []:
        print(f"[ERROR] {e}")
        bad = True
    print(f"{report.get('total_charts_linted', 0)} chart(s) linted, {'failed' if bad else 'no failures'}")
    return 1 if bad else 0


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("template", "lint"):
        s = sub.add_parser(name)
        s.add_argument("chart")
        s.add_argument("-f", "--values", action="append")
        s.add_argument("--set", action="append")
        s.add_argument("--namespace", default="default")
        if name == "template":
            s.add_argument("--name", default="mortar")
            s.add_argument("--include-crds", action="store_true")
            s.add_argument("--notes", action="store_true", help="print NOTES.txt to stderr")
        else:
            s.add_argument("--strict", action="store_true")
    args = p.parse_args()
    try:
        if args.cmd == "template":
            template(args)
            return 0
        return lint(args)
    except helm.HelmError as e:
        print(f"helm: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
