"""Load and apply the JSON Schemas shipped in the top-level ``schemas`` package."""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any

import jsonschema
from referencing import Registry, Resource


@functools.cache
def _registry() -> Registry:
    resources_ = []
    for entry in resources.files("schemas").iterdir():
        if entry.name.endswith(".schema.json"):
            doc = json.loads(entry.read_text(encoding="utf-8"))
            resources_.append((entry.name, Resource.from_contents(doc)))
            resources_.append((doc["$id"], Resource.from_contents(doc)))
    return Registry().with_resources(resources_)


def load_schema(name: str) -> dict[str, Any]:
    """The schema ``schemas/<name>.schema.json`` as a dict."""
    return _registry()[f"{name}.schema.json"].contents


def validate(instance: Any, name: str) -> list[str]:
    """Problems of ``instance`` against schema ``name`` (empty list: valid)."""
    schema = load_schema(name)
    validator = jsonschema.Draft202012Validator(schema, registry=_registry())
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(instance)]
