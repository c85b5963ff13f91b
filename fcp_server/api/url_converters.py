"""URL converters: numeric ids in paths are bounded to what the database columns can hold.

Werkzeug's `int` converter accepts any number of digits, and an id beyond the column type
then reaches the database driver, which refuses it (SQLite raises OverflowError above 2**63,
PostgreSQL "integer out of range" above 2**31 for the INTEGER task and round ids): a 500 for
what is just an unknown id. Installed as the app's `int` converter, this one makes such a
path match no route, so the caller gets a plain 404.
"""

from typing import Any

from werkzeug.routing import IntegerConverter, Map

from fcp_server.storage.models import MAX_ID


class BoundedIdConverter(IntegerConverter):
    """Non-negative integers up to `MAX_ID`; larger numbers do not match."""

    def __init__(self, map: Map, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("max", MAX_ID)
        super().__init__(map, *args, **kwargs)
