"""Radix cluster agent: turns a Docker (GPU) host into a worker of a Radix control plane."""

__version__ = "0.1.0"
