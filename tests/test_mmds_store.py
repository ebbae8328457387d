"""The MMDS data store (PUT/PATCH/GET /mmds) and configuration (PUT /mmds/config)."""
from __future__ import annotations

import json
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm.errors import PyvmmError
from pyvmm.mmds.config import MmdsConfig, MmdsError, MmdsLimitError
from pyvmm.mmds.store import (DEFAULT_SIZE_LIMIT, LIMIT_EXCEEDED, MAX_DEPTH, NOT_INITIALIZED,
                              DataStore, encode, merge_patch)

# -- RFC 7396 ---------------------------------------------------------------------------------

# RFC 7396 Appendix A, every example: (original, patch, result).
RFC7396_EXAMPLES = [
    ({"a": "b"}, {"a": "c"}, {"a": "c"}),
    ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
    ({"a": "b"}, {"a": None}, {}),
    ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
    ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
    ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
    ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
    ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
    (["a", "b"], ["c", "d"], ["c", "d"]),
    ({"a": "b"}, ["c"], ["c"]),
    ({"a": "foo"}, None, None),
    ({"a": "foo"}, "bar", "bar"),
    ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
    ([1, 2], {"a": "b", "c": None}, {"a": "b"}),
    ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
]

# RFC 7396 section 3's example.
RFC7396_TARGET = {"title": "Goodbye!", "author": {"givenName": "John", "familyName": "Doe"},
                  "tags": ["example", "sample"], "content": "This will be unchanged"}
RFC7396_PATCH = {"title": "Hello!", "phoneNumber": "+01-123-456-7890",
                 "author": {"familyName": None}, "tags": ["example"]}
RFC7396_RESULT = {"title": "Hello!", "author": {"givenName": "John"}, "tags": ["example"],
                  "content": "This will be unchanged", "phoneNumber": "+01-123-456-7890"}


@pytest.mark.parametrize("original, patch, result", RFC7396_EXAMPLES)
def test_merge_patch_rfc7396_appendix_a(original, patch, result) -> None:
    before = json.dumps(original)
    assert merge_patch(original, patch) == result
    assert json.dumps(original) == before            # the target is never changed in place


@pytest.mark.parametrize("original, patch, result", RFC7396_EXAMPLES)
def test_store_patch_rfc7396_appendix_a(original, patch, result) -> None:
    store = DataStore()
    store.put(original)
    store.patch(patch)
    assert store.get() == ({} if result is None else result)   # GET /mmds: {} for null
    assert store.current() == result


def test_store_patch_rfc7396_section_3() -> None:
    store = DataStore()
    store.put(RFC7396_TARGET)
    store.patch(RFC7396_PATCH)
    assert store.get() == RFC7396_RESULT


def test_firecracker_json_patch_example() -> None:
    """src/vmm/src/mmds/mod.rs: test_json_patch."""
    data = {"name": {"first": "John", "second": "Doe"}, "age": "43",
            "phones": {"home": {"RO": "+40 1234567", "UK": "+44 1234567"},
                       "mobile": "+44 2345678"}}
    patch = {"name": {"second": None, "last": "Kennedy"}, "age": "44",
             "phones": {"home": "+44 1234567",
                        "mobile": {"RO": "+40 2345678", "UK": "+44 2345678"}}}
    assert merge_patch(data, patch) == {
        "name": {"first": "John", "last": "Kennedy"}, "age": "44",
        "phones": {"home": "+44 1234567", "mobile": {"RO": "+40 2345678", "UK": "+44 2345678"}}}


# -- the store --------------------------------------------------------------------------------

def test_new_store_is_empty_and_patch_needs_a_put() -> None:
    store = DataStore()
    assert not store.initialized
    assert store.get() == {}                  # Firecracker's GET /mmds on its null store
    assert store.current() is None
    with pytest.raises(MmdsError) as info:
        store.patch({"a": 1})
    assert str(info.value).startswith(NOT_INITIALIZED)
    assert info.value.status == 400
    assert isinstance(info.value, PyvmmError)


def test_put_accepts_any_json_value() -> None:
    """Firecracker parses the body into a serde_json::Value: not only objects."""
    store = DataStore()
    for value in ([1, 2], "text", 3, 2.5, True, None, {"a": {"b": []}}):
        store.put(value)
        assert store.current() == value
        assert store.initialized


def test_get_returns_a_copy_and_put_copies() -> None:
    store = DataStore()
    value = {"a": {"b": [1]}}
    store.put(value)
    value["a"]["b"].append(2)
    got = store.get()
    got["a"]["c"] = 1
    assert store.get() == {"a": {"b": [1]}}


def test_default_size_limit_is_firecrackers() -> None:
    assert DEFAULT_SIZE_LIMIT == 51200         # vmm::HTTP_MAX_PAYLOAD_SIZE
    assert DataStore().size_limit == 51200


def test_size_limit_firecracker_data_store_example() -> None:
    """src/vmm/src/mmds/data_store.rs: test_update_data_store, number for number."""
    store = DataStore()
    store.put({"name": {"first": "John", "second": "Doe"}, "age": "43"})
    store.patch({"name": {"first": "John", "second": "Doe"}, "age": "100"})
    store.put({"name": {"first": "John", "second": "Doe"}, "age": 43})
    store.patch({"name": {"first": "John", "second": None}, "age": "43"})
    store.patch({"new_key": "X" * 51151})
    with pytest.raises(MmdsLimitError) as info:
        store.patch({"new_key2": "smth"})
    assert str(info.value).startswith(LIMIT_EXCEEDED)
    assert info.value.status == 413
    assert "smth" not in json.dumps(store.get())
    store.patch({"new_key": "smth"})
    assert store.size == 53
    store.patch({"new_key2": "smth2"})
    assert store.size == 72


def test_put_size_limit_leaves_the_store_empty() -> None:
    """data_store.rs: test_put_size_limit."""
    store = DataStore()
    with pytest.raises(MmdsLimitError, match="doesn't fit"):
        store.put({"key": "X" * 51300})
    assert not store.initialized
    assert store.get() == {}


def test_size_is_the_compact_utf8_serialization() -> None:
    store = DataStore(size_limit=len('{"a":"é"}'.encode()))
    store.put({"a": "é"})                    # 10 bytes: é is 2 in UTF-8, not \\u00e9
    with pytest.raises(MmdsLimitError):
        store.put({"a": "éé"})
    assert store.get() == {"a": "é"}


def test_json_is_compact_and_sorted_as_serde_json() -> None:
    assert encode({"b": 1, "a": [1, {"d": None, "c": "x\n\u00e9"}]}) == \
        '{"a":[1,{"c":"x\\n\u00e9","d":null}],"b":1}'.encode()


@pytest.mark.parametrize("value, match", [
    ({"a": float("nan")}, "not a JSON value"),
    ({"a": {1, 2}}, "not a JSON value"),
    ({"a": "\ud800"}, "not valid Unicode"),
])
def test_values_serde_json_cannot_hold_are_refused(value, match) -> None:
    store = DataStore()
    with pytest.raises(MmdsError, match=match):
        store.put(value)
    assert not store.initialized


def test_nesting_beyond_serde_jsons_limit_is_refused() -> None:
    def nested(levels: int):
        value: object = "leaf"
        for _ in range(levels):
            value = [value]
        return value
    store = DataStore()
    store.put(nested(MAX_DEPTH))
    store.patch({"a": nested(MAX_DEPTH - 1)})
    with pytest.raises(MmdsError, match="nested"):
        store.put(nested(MAX_DEPTH + 1))
    with pytest.raises(MmdsError, match="nested"):
        store.put(nested(5000))               # beyond Python's recursion limit too
    cycle: list = []
    cycle.append(cycle)
    with pytest.raises(MmdsError):
        store.put(cycle)


def test_clear_forgets_the_data() -> None:
    store = DataStore()
    store.put({"a": 1})
    store.clear()
    assert not store.initialized and store.get() == {}


def test_readers_see_whole_values_while_a_writer_writes() -> None:
    store = DataStore()
    store.put({"n": 0, "copy": 0})
    stop = threading.Event()
    torn = []

    def write() -> None:
        for i in range(1, 2000):
            store.patch({"n": i, "copy": i})
        stop.set()

    writer = threading.Thread(target=write)
    writer.start()
    while not stop.is_set():
        value = store.current()
        if value["n"] != value["copy"]:
            torn.append(value)
    writer.join()
    assert not torn
    assert store.get() == {"n": 1999, "copy": 1999}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=3), children, max_size=3),
    max_leaves=12)


@settings(max_examples=200, deadline=None)
@given(target=json_values, patch=json_values)
def test_merge_patch_properties(target, patch) -> None:
    """RFC 7396: a patch applied twice changes nothing more; the result has no
    nulls where the patch was an object."""
    once = merge_patch(target, patch)
    assert merge_patch(once, patch) == once
    if isinstance(patch, dict):
        assert isinstance(once, dict)
        assert all(once.get(k, "absent") is not None for k, v in patch.items() if v is None)


# -- PUT /mmds/config -------------------------------------------------------------------------

def test_config_defaults_as_firecracker() -> None:
    config = MmdsConfig.from_json({"network_interfaces": ["eth0"]})
    assert config == MmdsConfig(version="V1", network_interfaces=["eth0"],
                                ipv4_address="169.254.169.254", imds_compat=False)
    assert config.to_json() == {"version": "V1", "network_interfaces": ["eth0"],
                                "ipv4_address": "169.254.169.254", "imds_compat": False}


def test_config_full_and_round_trip() -> None:
    body = {"version": "V2", "network_interfaces": ["eth0", "net1"],
            "ipv4_address": "169.254.170.2", "imds_compat": True}
    config = MmdsConfig.from_json(body)
    assert config.to_json() == body
    assert MmdsConfig.from_json(config.to_json()) == config


def test_config_nulls_are_absent() -> None:
    config = MmdsConfig.from_json({"network_interfaces": ["eth0"], "version": None,
                                   "ipv4_address": None, "imds_compat": None})
    assert config == MmdsConfig(network_interfaces=["eth0"])


@pytest.mark.parametrize("body, words", [
    ([], ["PUT /mmds/config", "JSON object"]),
    ({}, ["missing field 'network_interfaces'"]),
    ({"network_interfaces": None}, ["missing field 'network_interfaces'"]),
    ({"network_interfaces": []}, ["network_interfaces is empty"]),
    ({"network_interfaces": "eth0"}, ["network_interfaces must be an array"]),
    ({"network_interfaces": ["eth0", 3]}, ["network_interfaces[1] must be a string"]),
    ({"network_interfaces": ["eth0"], "version": "V3"}, ["version \"V3\" is invalid"]),
    ({"network_interfaces": ["eth0"], "version": "v2"}, ["version \"v2\" is invalid"]),
    ({"network_interfaces": ["eth0"], "version": 2}, ["version 2 is invalid"]),
    ({"network_interfaces": ["eth0"], "ipv4_address": 1}, ["ipv4_address must be a string"]),
    ({"network_interfaces": ["eth0"], "ipv4_address": ""}, ["ipv4_address", "not an IPv4"]),
    ({"network_interfaces": ["eth0"], "ipv4_address": "169.254.169.254.1"}, ["not an IPv4"]),
    ({"network_interfaces": ["eth0"], "ipv4_address": "169.254.169.0254"}, ["not an IPv4"]),
    ({"network_interfaces": ["eth0"], "ipv4_address": "10.0.0.1"},
     ["ipv4_address 10.0.0.1 is not link-local"]),
    ({"network_interfaces": ["eth0"], "ipv4_address": "169.254.0.1"},
     ["ipv4_address 169.254.0.1 is not link-local"]),
    ({"network_interfaces": ["eth0"], "ipv4_address": "169.254.255.254"},
     ["ipv4_address 169.254.255.254 is not link-local"]),
    ({"network_interfaces": ["eth0"], "imds_compat": "yes"}, ["imds_compat must be a boolean"]),
    ({"network_interfaces": ["eth0"], "imds_compat": 1}, ["imds_compat must be a boolean"]),
    ({"network_interfaces": ["eth0"], "ipv4": "169.254.169.254"}, ["unknown field 'ipv4'"]),
])
def test_config_errors_name_the_field(body, words) -> None:
    with pytest.raises(MmdsError) as info:
        MmdsConfig.from_json(body)
    for word in words:
        assert word in str(info.value)
    assert str(info.value).startswith("PUT /mmds/config: ")


@pytest.mark.parametrize("address", ["169.254.1.0", "169.254.169.254", "169.254.170.2",
                                     "169.254.254.255"])
def test_config_link_local_addresses_firecracker_accepts(address) -> None:
    assert MmdsConfig.from_json({"network_interfaces": ["eth0"],
                                 "ipv4_address": address}).ipv4_address == address


def test_config_where_names_the_source() -> None:
    with pytest.raises(MmdsError, match=r"^config file mmds-config: network_interfaces"):
        MmdsConfig.from_json({"network_interfaces": []}, "config file mmds-config")
