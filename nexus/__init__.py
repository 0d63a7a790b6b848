"""NEXUS: the `nexus` package. The command line lives in `nexus.cli`."""

__version__ = "0.1.0"
