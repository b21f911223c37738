"""The status page's data side: access rules, traffic history, recent errors, the snapshot.

The page itself (HTML, script, routes) is in `api/status.py`; this package sits below the
front-ends and the middleware, so both the auth middleware and the page use one access rule.
"""

from .access import Access, access_for, decide, kind_of, refresh_interval
from .board import StatusBoard
from .history import History, RingBuffer, Sample, Traffic
from .recent_errors import RecentErrors

__all__ = [
    "Access",
    "History",
    "RecentErrors",
    "RingBuffer",
    "Sample",
    "StatusBoard",
    "Traffic",
    "access_for",
    "decide",
    "kind_of",
    "refresh_interval",
]
