"""The MMDS configuration: `PUT /mmds/config`, validated as Firecracker does.

Firecracker's MmdsConfig (src/vmm/src/vmm_config/mmds.rs) is a serde struct with
deny_unknown_fields: `network_interfaces` is required, `version` defaults to V1,
`ipv4_address` to 169.254.169.254 and `imds_compat` to false.  VmResources::
set_mmds_network_stack_config (src/vmm/src/resources.rs) then refuses an empty
interface list and an address outside the link-local range it accepts
(utils/net/ipv4addr.rs: is_link_local_valid).  Whether each interface exists is
the VM's business (pyvmm.config's VmSpec), not this module's.

This module must not import pyvmm.config: pyvmm.config imports it.
"""
from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass, field
from typing import Any

from pyvmm.errors import PyvmmError

# Firecracker's MmdsVersion (src/vmm/src/mmds/data_store.rs); V1 is the default
# and is deprecated there ("PUT /mmds/config: V1 is deprecated. Use V2 instead.").
VERSIONS = ("V1", "V2")
DEFAULT_VERSION = "V1"
# MmdsNetworkStack's DEFAULT_IPV4_ADDR (src/vmm/src/mmds/ns.rs).
DEFAULT_IPV4_ADDRESS = "169.254.169.254"
# is_link_local_valid (src/vmm/src/utils/net/ipv4addr.rs): 169.254.0.0/16 without
# its first and last /24, which RFC 3927 section 2.1 reserves.
LINK_LOCAL = ipaddress.IPv4Network("169.254.0.0/16")
LINK_LOCAL_RESERVED = (ipaddress.IPv4Network("169.254.0.0/24"),
                       ipaddress.IPv4Network("169.254.255.0/24"))

WHERE = "PUT /mmds/config"
FIELDS = ("version", "network_interfaces", "ipv4_address", "imds_compat")


class MmdsError(PyvmmError):
    """An MMDS request from the API is refused; `status` is the HTTP status
    Firecracker answers it with."""
    status = 400


class MmdsLimitError(MmdsError):
    """The data store would outgrow its size limit (Firecracker: 413)."""
    status = 413


def _show(value: Any) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_version(where: str, value: Any) -> str:
    if not isinstance(value, str) or value not in VERSIONS:
        raise MmdsError(f"{where}: version {_show(value)} is invalid: use \"V1\" or \"V2\"")
    return value


def _check_interfaces(where: str, value: Any) -> list[str]:
    if not isinstance(value, list):
        raise MmdsError(f"{where}: network_interfaces must be an array of interface ids, "
                        f"not {_show(value)}")
    for i, iface in enumerate(value):
        if not isinstance(iface, str):
            raise MmdsError(f"{where}: network_interfaces[{i}] must be a string (an "
                            f"interface id), not {_show(iface)}")
    if not value:
        # Firecracker: MmdsConfigError::EmptyNetworkIfaceList.
        raise MmdsError(f"{where}: network_interfaces is empty: list the id of at least one "
                        "network interface, through which the guest reaches MMDS")
    return list(value)


def _check_address(where: str, value: Any) -> str:
    if not isinstance(value, str):
        raise MmdsError(f"{where}: ipv4_address must be a string, not {_show(value)}")
    try:
        # Strict dotted quad, no leading zeros: as Rust's Ipv4Addr::from_str.
        address = ipaddress.IPv4Address(value)
    except ValueError:
        raise MmdsError(f"{where}: ipv4_address {_show(value)} is not an IPv4 address") from None
    if address not in LINK_LOCAL or any(address in net for net in LINK_LOCAL_RESERVED):
        # Firecracker: MmdsConfigError::InvalidIpv4Addr.
        raise MmdsError(f"{where}: ipv4_address {value} is not link-local: use an address from "
                        "169.254.1.0 to 169.254.254.255 (the default is "
                        f"{DEFAULT_IPV4_ADDRESS})")
    return str(address)


@dataclass
class MmdsConfig:
    """How the guest reaches MMDS, and which protocol it speaks."""
    version: str = DEFAULT_VERSION                 # "V1" | "V2"
    network_interfaces: list[str] = field(default_factory=list)
    ipv4_address: str = DEFAULT_IPV4_ADDRESS
    imds_compat: bool = False

    @classmethod
    def from_json(cls, body: Any, where: str = WHERE) -> "MmdsConfig":
        if not isinstance(body, dict):
            raise MmdsError(f"{where}: expected a JSON object, got {_show(body)}")
        unknown = sorted(set(body) - set(FIELDS))
        if unknown:
            raise MmdsError(f"{where}: unknown field {unknown[0]!r}; the fields are "
                            f"{', '.join(FIELDS)}")
        # A JSON null is "absent", as everywhere in pyvmm's configuration.
        if body.get("network_interfaces") is None:
            raise MmdsError(f"{where}: missing field 'network_interfaces' (the ids of the "
                            "network interfaces through which the guest reaches MMDS)")
        config = cls(network_interfaces=_check_interfaces(where, body["network_interfaces"]))
        if body.get("version") is not None:
            config.version = _check_version(where, body["version"])
        if body.get("ipv4_address") is not None:
            config.ipv4_address = _check_address(where, body["ipv4_address"])
        if body.get("imds_compat") is not None:
            if not isinstance(body["imds_compat"], bool):
                raise MmdsError(f"{where}: imds_compat must be a boolean, not "
                                f"{_show(body['imds_compat'])}")
            config.imds_compat = body["imds_compat"]
        return config

    def to_json(self) -> dict:
        """The shape Firecracker serializes in GET /vm/config's "mmds-config"."""
        return {"version": self.version, "network_interfaces": list(self.network_interfaces),
                "ipv4_address": self.ipv4_address, "imds_compat": self.imds_compat}
