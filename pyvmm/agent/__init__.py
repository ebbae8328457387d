"""The host side of pyvmm's guest agent (firmware/agent, docs/agent-protocol.md)."""
from pyvmm.agent.client import (Agent, AgentClient, AgentInfo, Connector, ExecResult, ExitStatus, Health,
                                Process, connect_unix, connect_vsock_uds)
from pyvmm.agent.protocol import PROTOCOL_VERSION, AgentError, ProtocolError

__all__ = ["Agent", "AgentClient", "AgentInfo", "AgentError", "Connector", "ExecResult", "ExitStatus", "Health",
           "Process", "ProtocolError", "PROTOCOL_VERSION", "connect_unix", "connect_vsock_uds"]
