"""The upstream: where data points come from, in three modules that each stand alone.

- `fetch`: one HTTP GET, bounded in total time and in size (http/https only, no proxies).
- `document`: one answer read strictly into a `Reading` (time, float32 value, tags, identity).
- `simulated`: the simulated upstream with its fault modes (`python -m dataproc source`);
  nothing on a request path imports it.

Nothing is re-exported here: `from dataproc.upstream import document, fetch` reads plainly at
each call site, and importing one module does not load the others.
"""
