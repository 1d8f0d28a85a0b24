"""A development control plane: a real HTTP server speaking the Radix cluster-agent protocol, in memory.

For trying the agent by hand (`python -m devplane`) and for the tests. Not for production: no persistence.
"""

from .server import DevControlPlane

__all__ = ["DevControlPlane"]
