"""qpeft: combine any quantizer, any PEFT method and any trainer, each a plugin.

The architecture reads from two files: :mod:`qpeft.hookspecs` (what a plugin can provide)
and :mod:`qpeft.orchestrator` (what qpeft does with it, one function per verb).
"""

__version__ = "0.1.0"

#: Version of the plugin API (:mod:`qpeft.api` + :mod:`qpeft.hookspecs`). A plugin states the
#: version it targets in ``api_version``; a different major version is reported as broken.
API_VERSION = 1

from .hookspecs import hookimpl  # noqa: E402  (the one decorator plugins need)

__all__ = ["API_VERSION", "__version__", "hookimpl"]
