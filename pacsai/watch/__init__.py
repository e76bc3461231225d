"""``pacsai watch``: a service that reports each new or changed study as it arrives in the PACS.

:mod:`~pacsai.watch.rules` (which studies, how), :mod:`~pacsai.watch.sources` (how changes are noticed),
:mod:`~pacsai.watch.state` (what was done, SQLite), :mod:`~pacsai.watch.service` (the loop),
:mod:`~pacsai.watch.job` (one report, in its own process); the verb is :mod:`pacsai.commands.watch`.
See docs/watch.md.
"""
