"""NEXUS: the `nexus` package. The command line lives in `nexus.cli`."""

__version__ = "0.1.0"

from .long_text_warning import install as _quiet_long_text_warning

_quiet_long_text_warning()  # transformers' repeated "Token indices sequence length ..." (see long_text_warning.py)
