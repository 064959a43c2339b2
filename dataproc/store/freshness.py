"""The statements of the read cache's bookkeeping: the data version, LISTEN, the listener's
liveness check. The triggers that bump the version and send the NOTIFYs live in schema.sql."""

from __future__ import annotations

# LISTEN takes an identifier, not a value: the channel names are constants of `notify`'s
# callers, quoted with psycopg.sql.Identifier where this template is used.
LISTEN = "LISTEN {}"
STILL_LISTENING = "SELECT 1"

# The version of data_points: bumped (and NOTIFYed) by a statement trigger in schema.sql.
SELECT_DATA_VERSION = "SELECT version FROM dataproc_data_version WHERE name = 'data_points'"
