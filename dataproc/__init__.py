"""dataproc: a small, auditable data-point ingestion service.

Importing the package does no work: the public names for embedding (`Config`, `from_env`,
`create_app`, `Service`) are loaded on first use.
"""

from __future__ import annotations

__version__ = "1.0.0"  # the one place: pyproject.toml reads it (dynamic version)
__all__ = ["Config", "Service", "__version__", "create_app", "from_env"]

_LAZY = {
    "Config": ("config", "Config"),
    "from_env": ("config", "from_env"),
    "Service": ("runtime", "Service"),
    "create_app": ("runtime", "create_app"),
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'dataproc' has no attribute {name!r}")
    from importlib import import_module

    module, attribute = _LAZY[name]
    return getattr(import_module(f"dataproc.{module}"), attribute)
