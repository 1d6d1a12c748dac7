"""Validates YAML policies against `nbdfault policy schema` with python3-jsonschema.

    /usr/bin/python3 schema_check.py SCHEMA.json POLICY.yaml...

Checks the schema itself against its metaschema first, then prints one JSON line per policy:
{"file": PATH, "errors": ["what the schema refuses", ...]}.
"""

import json
import sys

import jsonschema
import yaml


def main():
    with open(sys.argv[1]) as f:
        schema = json.load(f)
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    validator = validator_class(schema)
    for path in sys.argv[2:]:
        with open(path) as f:
            document = yaml.safe_load(f)
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]
        print(json.dumps({"file": path, "errors": errors, "draft": validator_class.__name__}), flush=True)


if __name__ == "__main__":
    main()
