#!/usr/bin/env python3
"""Parses a /metrics exposition from stdin with the Prometheus project's own Python parser
(Debian's python3-prometheus-client) and prints what it read as JSON: one object per family
with its type and samples. Exits non-zero, with the parser's error, when the text does not parse.

    metrics_parse.py prometheus|openmetrics < exposition
"""
import json
import sys

from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families as prometheus_families


def main():
    kind = sys.argv[1]
    text = sys.stdin.read()
    parse = {"prometheus": prometheus_families, "openmetrics": openmetrics_families}[kind]
    families = []
    for family in parse(text):
        families.append({
            "name": family.name,
            "type": family.type,
            "samples": [{"name": s.name, "labels": s.labels, "value": s.value} for s in family.samples],
        })
    json.dump(families, sys.stdout)


if __name__ == "__main__":
    main()
