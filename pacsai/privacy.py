"""Keep patient identifiers and credentials out of log output unless the user opts in (``PACSAI_LOG_PHI``).

pacsai's own log lines name patients only by UID or pseudonym. Some libraries it drives log more at DEBUG:
urllib3 and dicomweb-client log every request line with its query string (``/studies?PatientID=...``),
papermill logs every cell it runs with the report's parameters. :class:`NoIdentifyingDebug` drops those
records from a handler; the ``pacsai`` CLI installs it on its handlers when ``-vv`` turns DEBUG on.

Credentials never reach these records: the URL is stripped of ``user:password@`` before any request
(:func:`pacsai.pacs.client.redact_url`), and neither library logs request headers.
"""

from __future__ import annotations

import logging

# Loggers whose DEBUG records carry request URLs (query strings) or executed notebook content.
IDENTIFYING_DEBUG_LOGGERS = ("urllib3", "requests", "dicomweb_client", "papermill", "nbclient")


class NoIdentifyingDebug(logging.Filter):
    """Drop DEBUG records of :data:`IDENTIFYING_DEBUG_LOGGERS` (and their children)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.DEBUG:
            return True
        return not any(
            record.name == name or record.name.startswith(name + ".") for name in IDENTIFYING_DEBUG_LOGGERS
        )


def protect_handlers(handlers: list[logging.Handler], *, log_phi: bool) -> None:
    """Install :class:`NoIdentifyingDebug` on ``handlers`` unless identifiers may be logged (``log_phi``)."""
    if log_phi:
        return
    for handler in handlers:
        if not any(isinstance(f, NoIdentifyingDebug) for f in handler.filters):
            handler.addFilter(NoIdentifyingDebug())


__all__ = ["IDENTIFYING_DEBUG_LOGGERS", "NoIdentifyingDebug", "protect_handlers"]
