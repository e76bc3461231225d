"""Series retrieval into the instance cache, whatever the back end: served from the cache when complete, else
only what is missing is fetched, and a complete series gets a manifest.

The back end supplies a :class:`SeriesSource` (the DICOMweb one is :class:`pacsai.pacs.wado.WadoSource`, the
embedded store's :class:`pacsai.pacs.embedded.StoreSource`); this module decides what "complete" means and
what to fetch, and restates failures for the series (which one, how many instances arrived, how to resume).
What arrived is cached whole (never a partial file), so calling again fetches only the rest.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from pacsai.errors import (
    PacsaiWarning,
    PacsAuthError,
    PacsConnectionError,
    PacsError,
    PacsNotFoundError,
    PacsTimeoutError,
    RetrieveError,
)
from pacsai.pacs.cache import InstanceCache, SeriesManifest

logger = logging.getLogger(__name__)

#: ``(sop_uid, path, size)`` after each instance is committed to the cache.
OnInstance = Callable[[str, Path, int], None]


class BrokenTransfer(PacsConnectionError):
    """A transfer broke off midway (connection cut, reset, stalled, or a truncated answer); ``timeout`` says
    whether it stalled. Instances committed before the break stay cached."""

    def __init__(self, message: str, *, timeout: bool) -> None:
        super().__init__(message)
        self.timeout = timeout


class SeriesSource(Protocol):
    """What :func:`retrieve_series` needs from a back end."""

    url: str
    cache: InstanceCache

    @property
    def lists_cheaply(self) -> bool:
        """Listing a series' instances costs little next to fetching them (then it is always listed first)."""
        ...

    def list_instances(self, study_uid: str, series_uid: str) -> list[str]:
        """SOPInstanceUIDs of the series on the PACS, by InstanceNumber."""
        ...

    def count_instances(self, study_uid: str, series_uid: str) -> int:
        """NumberOfSeriesRelatedInstances: 0 when the series is absent, -1 when present but not counted."""
        ...

    def fetch(
        self,
        study_uid: str,
        series_uid: str,
        expected: list[str] | None,
        missing: list[str] | None,
        total: int,
        done: OnInstance,
    ) -> list[str]:
        """Fetch ``missing`` (``None``: the whole series) into the cache, calling ``done`` per instance; return
        the full instance list (``expected``, or what the fetch learnt)."""
        ...


def _from_cache(source: SeriesSource, series_uid: str, study_uid: str, refresh: bool) -> tuple[
    list[Path] | None, list[str] | None, list[str] | None
]:
    """``(paths, None, None)`` when the cache holds the whole series, else ``(None, expected, missing)``."""
    cache = source.cache
    manifest = None if refresh else cache.read_manifest(series_uid)
    if manifest is None or manifest.study_uid != study_uid:
        return None, None, None
    paths, broken = cache.check(manifest)
    if not broken:
        logger.debug("series %s served from the cache (%d instances)", series_uid, len(paths))
        return paths, None, None
    warnings.warn(
        f"{len(broken)} cached instance(s) of series {series_uid} are missing or have the wrong size in "
        f"{cache.root}; fetching them again from {source.url}",
        PacsaiWarning,
        stacklevel=4,
    )
    return None, list(manifest.instances), list(broken)


def retrieve_series(
    source: SeriesSource, study_uid: str, series_uid: str, *, progress: bool = True, refresh: bool = False
) -> list[Path]:
    """Part-10 files of one series in the local cache (fetched only where missing).

    See :meth:`pacsai.pacs.Pacs.retrieve_series` for parameters, result and errors.
    """
    from tqdm.auto import tqdm

    cache = source.cache
    paths, expected, missing = _from_cache(source, series_uid, study_uid, refresh)
    if paths is not None:
        return paths
    cached = expected is not None
    received: dict[str, int] = {}
    total = 0
    try:
        if not cached and (source.lists_cheaply or refresh or cache.is_partial(series_uid)):
            expected = source.list_instances(study_uid, series_uid)
            missing = [uid for uid in expected if not cache.has(uid)]
        # else: unknown yet: stream the whole series, then check it is complete
        if expected is not None and not expected:
            raise not_found(source.url, study_uid, series_uid)
        cache.drop_manifest(series_uid)
        total = len(missing) if missing is not None else source.count_instances(study_uid, series_uid)
        if missing is None and total == 0:
            raise not_found(source.url, study_uid, series_uid)
        wanted = set(missing) if missing is not None else None
        with tqdm(
            total=max(total, 0) or None,
            unit="inst",
            desc=f"series …{series_uid[-8:]}",
            disable=not progress,
            leave=False,
        ) as bar:

            def done(uid: str, path: Path, size: int) -> None:
                # Count each wanted instance once: a retried or whole-series answer may bring one again.
                if uid not in received and (wanted is None or uid in wanted):
                    bar.update(1)
                received[uid] = size

            expected = source.fetch(study_uid, series_uid, expected, missing, total, done)
    except PacsError as err:
        if received:
            cache.mark_partial(series_uid)
        restated = _incomplete(err, source, study_uid, series_uid, expected, total, received)
        if restated is err:
            raise
        raise restated from err
    except BaseException:
        if received:
            cache.mark_partial(series_uid)
        raise
    return _complete(source, study_uid, series_uid, expected, received)


def _complete(
    source: SeriesSource, study_uid: str, series_uid: str, expected: list[str], received: dict[str, int]
) -> list[Path]:
    """Check that every expected instance is cached, write the manifest; the paths in series order."""
    cache = source.cache
    absent = [uid for uid in expected if uid not in received and not cache.has(uid)]
    if absent:
        cache.mark_partial(series_uid)
        raise RetrieveError(
            f"{len(absent)} of {len(expected)} instances of series {series_uid} (study {study_uid}) did not "
            f"arrive from {source.url} (first: {absent[0]}); the {len(expected) - len(absent)} that did are "
            "cached; call again to resume"
        )
    seen = set(expected)
    order = expected + [uid for uid in received if uid not in seen]
    final = {uid: received[uid] if uid in received else cache.path_for(uid).stat().st_size for uid in order}
    cache.write_manifest(SeriesManifest(study_uid=study_uid, series_uid=series_uid, instances=final))
    cache.clear_partial(series_uid)
    logger.info(
        "series %s: %d instance(s) fetched from %s, %d already cached",
        series_uid,
        len(received),
        source.url,
        len(order) - len(received),
    )
    return [cache.path_for(uid) for uid in order]


def not_found(url: str, study_uid: str, series_uid: str) -> PacsNotFoundError:
    """The error for a series the PACS does not hold."""
    return PacsNotFoundError(
        f"series {series_uid} of study {study_uid} has no instances on {url}; "
        "check the UIDs with `pacsai pacs search --level series`"
    )


def _incomplete(
    err: PacsError,
    source: SeriesSource,
    study_uid: str,
    series_uid: str,
    expected: list[str] | None,
    total: int,
    received: dict[str, int],
) -> PacsError:
    """``err`` restated for the series: which one, how many instances arrived, how to resume.

    Connection problems stay :class:`PacsConnectionError` / :class:`PacsTimeoutError` (a caller may treat an
    unreachable PACS differently from a bad series); anything else becomes :class:`RetrieveError`.
    """
    if isinstance(err, (PacsAuthError, PacsNotFoundError)):
        return err  # about credentials or UIDs, not about this transfer: already says what to fix
    if expected is not None:
        arrived, of = sum(1 for uid in expected if uid in received or source.cache.has(uid)), len(expected)
    else:
        arrived, of = len(received), total
    count = f"{arrived} of {of} instances" if of > 0 else f"{arrived} instances"
    text = (
        f"{err}; series {series_uid} of study {study_uid}: {count} arrived"
        + (" and are cached; calling again fetches only the rest" if arrived else "")
    )
    if isinstance(err, PacsTimeoutError) or (isinstance(err, BrokenTransfer) and err.timeout):
        return PacsTimeoutError(text)
    if isinstance(err, PacsConnectionError):
        return PacsConnectionError(text)
    return RetrieveError(text)


__all__ = ["BrokenTransfer", "OnInstance", "SeriesSource", "not_found", "retrieve_series"]
