"""The API's OpenAPI document (pyvmm/api/openapi.json): valid, its references
resolve, it agrees with the configuration model, and its validator catches
what it should.  The routes' responses are checked against it in
test_api_routes.py and test_api_http.py (framework.api.CheckedClient)."""
from __future__ import annotations

import json

from pyvmm.api.schema import openapi, route, validate


def test_the_document_is_openapi_3_and_refs_resolve():
    doc = openapi()
    assert doc["openapi"].startswith("3.")
    text = json.dumps(doc)
    for name in {part.split('"')[0] for part in text.split("#/components/schemas/")[1:]}:
        assert name in doc["components"]["schemas"], name
    for template, item in doc["paths"].items():
        for method, operation in item.items():
            if method == "parameters":
                continue
            assert "400" in operation["responses"], (template, method)


def test_the_document_and_the_model_agree_on_fields():
    """The request schemas list exactly the fields pyvmm.config accepts."""
    from pyvmm import config
    schemas = openapi()["components"]["schemas"]
    for schema, section in (("BootSource", config.BootSource),
                            ("MachineConfiguration", config.MachineConfig),
                            ("Drive", config.Drive), ("NetworkInterface", config.NetworkInterface),
                            ("EntropyDevice", config.Entropy), ("Vsock", config.Vsock),
                            ("Logger", config.Logger), ("Metrics", config.Metrics),
                            ("SerialDevice", config.SerialConfig)):
        assert set(schemas[schema]["properties"]) == set(section.FIELDS), schema
        assert set(schemas[schema].get("required", [])) == \
            {name for name, (_, required) in section.FIELDS.items() if required}, schema
    assert set(schemas["PartialDrive"]["properties"]) == set(config.Drive.PATCH_FIELDS)


def test_the_validator_catches_what_it_should():
    info = {"$ref": "#/components/schemas/InstanceInfo"}
    good = {"id": "a", "state": "Running", "vmm_version": "1", "app_name": "pyvmm"}
    assert validate(good, info) == []
    assert validate({**good, "state": "Dancing"}, info)
    assert validate({**good, "extra": 1}, info)
    assert validate({k: v for k, v in good.items() if k != "id"}, info)
    assert validate({"vcpu_count": True, "mem_size_mib": 128},
                    {"$ref": "#/components/schemas/MachineConfiguration"})
    assert route("/drives/abc") == "/drives/{drive_id}" and route("/drives/a/b") is None


