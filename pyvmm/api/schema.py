"""pyvmm's OpenAPI document (openapi.json) and a validator for the part of JSON
Schema it uses: type, nullable, properties, required, additionalProperties
(boolean), items, enum, minimum, maximum, pattern and $ref."""
from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Any

from pyvmm.api import OPENAPI_PATH

_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "integer": int,
          "number": (int, float)}


@lru_cache(maxsize=1)
def openapi() -> dict:
    return json.loads(OPENAPI_PATH.read_text())


def resolve(schema: dict, doc: dict | None = None) -> dict:
    doc = doc or openapi()
    while "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[1]
        extra = {k: v for k, v in schema.items() if k != "$ref"}
        schema = {**doc["components"]["schemas"][name], **extra}
    return schema


def validate(value: Any, schema: dict, where: str = "$", doc: dict | None = None) -> list[str]:
    """The ways value breaks schema (empty: it conforms)."""
    schema = resolve(schema, doc)
    if value is None:
        return [] if schema.get("nullable") else [f"{where}: null is not allowed"]
    errors: list[str] = []
    kind = schema.get("type")
    if kind is not None:
        expected = _TYPES[kind]
        if not isinstance(value, expected) or \
                (kind in ("integer", "number") and isinstance(value, bool)):
            return [f"{where}: expected {kind}, got {type(value).__name__}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: {value!r} is not one of {schema['enum']}")
    if "minimum" in schema and value < schema["minimum"]:
        errors.append(f"{where}: {value} < minimum {schema['minimum']}")
    if "maximum" in schema and value > schema["maximum"]:
        errors.append(f"{where}: {value} > maximum {schema['maximum']}")
    if "pattern" in schema and not re.search(schema["pattern"], value):
        errors.append(f"{where}: {value!r} does not match {schema['pattern']}")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for name in schema.get("required", []):
            if name not in value:
                errors.append(f"{where}: missing required {name!r}")
        for name, item in value.items():
            if name in props:
                errors += validate(item, props[name], f"{where}.{name}", doc)
            elif schema.get("additionalProperties", True) is False:
                errors.append(f"{where}: unexpected property {name!r}")
    if isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            errors += validate(item, schema["items"], f"{where}[{index}]", doc)
    return errors


def route(path: str, doc: dict | None = None) -> str | None:
    """The document's path template that matches a concrete path."""
    doc = doc or openapi()
    for template in doc["paths"]:
        pattern = re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template))
        if re.fullmatch(pattern, path):
            return template
    return None


def response_schema(method: str, path: str, status: int, doc: dict | None = None):
    """(found, schema): the schema of a documented response (None: no body)."""
    doc = doc or openapi()
    template = route(path, doc)
    if template is None:
        return False, None
    operation = doc["paths"][template].get(method.lower())
    if operation is None:
        return False, None
    response = operation["responses"].get(str(status))
    if response is None:
        return False, None
    content = response.get("content")
    return True, (content["application/json"]["schema"] if content else None)


def request_schema(method: str, path: str, doc: dict | None = None) -> dict | None:
    doc = doc or openapi()
    template = route(path, doc)
    operation = doc["paths"].get(template, {}).get(method.lower(), {})
    body = operation.get("requestBody")
    return body["content"]["application/json"]["schema"] if body else None
