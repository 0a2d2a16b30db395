"""iotref: connect print-shop machines to the Zaikio / connectprint IoT platform.

The public device API is re-exported here; the local platform lives in
:mod:`iotref.sandbox` (installed with the ``iotref[sandbox]`` extra).
"""

from iotref._version import __version__

__all__ = ["__version__"]
