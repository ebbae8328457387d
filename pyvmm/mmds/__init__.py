"""The microVM metadata service (MMDS), as Firecracker's.

- config: MmdsConfig, `PUT /mmds/config` (before boot; survives a snapshot);
- store: DataStore, the JSON value `PUT`/`PATCH`/`GET /mmds` work on (at any
  time; not saved in a snapshot: a restored VM starts with an empty store);
- service: Mmds, the HTTP server the guest reaches at the configured address
  (V1, or V2 with session tokens), fed by the TCP stack in netstack.

Importing this package imports neither the VM nor the network stack.
"""
from pyvmm.mmds.config import MmdsConfig, MmdsError, MmdsLimitError
from pyvmm.mmds.service import MAX_REQUEST_BYTES, HttpReply, Mmds
from pyvmm.mmds.store import DEFAULT_SIZE_LIMIT, DataStore

__all__ = ["DEFAULT_SIZE_LIMIT", "DataStore", "HttpReply", "MAX_REQUEST_BYTES", "Mmds",
           "MmdsConfig", "MmdsError", "MmdsLimitError"]
