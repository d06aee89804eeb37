"""Import pydicom without its network stack. Every module here that imports pydicom imports
this module first.

`import pydicom` reaches pydicom.data.download, which imports `requests` when it is installed;
`requests` imports urllib3, whose import-time IPv6 probe (urllib3/util/connection.py,
`_has_ipv6`) opens and binds a socket. The runtime promises no socket at all, and it never
downloads pydicom's test data, so while pydicom is first imported `requests` reads as absent
(a None entry in sys.modules makes `import requests` raise ImportError; pydicom then falls back
to urllib for a downloader we never call). An application that imported `requests` itself
keeps it: then the socket was its own.
"""

from __future__ import annotations

import sys


def _import_pydicom() -> None:
    if "pydicom" in sys.modules or "requests" in sys.modules:
        return
    sys.modules["requests"] = None  # type: ignore[assignment]
    try:
        import pydicom  # noqa: F401
    finally:
        if sys.modules.get("requests", False) is None:
            del sys.modules["requests"]


_import_pydicom()
