"""Quiet transformers' "Token indices sequence length is longer than the specified maximum sequence length" warning.

NEXUS tokenizes whole texts (a capability's corpus, a held-out document) and then cuts the ids into windows no longer
than the model's context, so a sequence longer than ``model_max_length`` at tokenization time is intended and never
reaches a model. transformers warns once per tokenizer *instance*, and a run loads a tokenizer per teacher, per stage
and per probe, so the same line was printed again and again. `install()` (run when ``nexus`` is imported) adds a
logging filter that drops that one message and nothing else.
"""

import logging

MESSAGE = "Token indices sequence length is longer than the specified maximum sequence length"
LOGGER = "transformers.tokenization_utils_base"


class LongTextWarningFilter(logging.Filter):
    def filter(self, record):
        return MESSAGE not in record.getMessage()


def install():
    """Add the filter to transformers' tokenizer logger once (idempotent)."""
    logger = logging.getLogger(LOGGER)
    if not any(isinstance(f, LongTextWarningFilter) for f in logger.filters):
        logger.addFilter(LongTextWarningFilter())
