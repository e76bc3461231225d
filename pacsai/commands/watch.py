"""``pacsai watch``: report each new or changed study that matches the rules, as it arrives in the PACS."""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from pacsai.watch.rules import WatchRules
    from pacsai.watch.state import WatchState

log = logging.getLogger("pacsai.watch")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "watch",
        help="a service that reports every new/changed study matching the rules and pushes the outputs",
        description="Watch a PACS (Orthanc's changes feed, QIDO polling, or the embedded store's index) and, for "
        "each new or changed study that matches the rules, run the planning report (the code path of "
        "`pacsai report`, QA gate included) and push its outputs. Research use only. See docs/watch.md.",
    )
    p.add_argument("--pacs", default=None, help="DICOMweb URL or file:// store (default: PACSAI_PACS_URL or ./pacs)")
    p.add_argument("--rules", type=Path, default=None, help="rules YAML (default: a CT with an RTDOSE, "
                   "structures from the PACS, push)")
    p.add_argument("--model", default=None, help="model URI overriding the rules' report.model (an alias such "
                   "as models:/pacsai-thorax@champion is resolved at each report)")
    p.add_argument("--workers", type=int, default=1, help="reports at a time (default 1)")
    p.add_argument("--state", type=Path, default=None, help="state SQLite file (default beside the embedded "
                   "store, ./pacs.watch.sqlite; or pacsai-watch-<hash>.sqlite for a DICOMweb PACS)")
    p.add_argument("--out", type=Path, default=Path("reports"), help="report folders (default reports/)")
    p.add_argument("--status", action="store_true", help="print the queue, recent outcomes and latencies "
                   "(no patient identifiers) and exit")
    p.add_argument("--once", action="store_true", help="handle what is new now, then exit (cron)")
    p.add_argument("--stable-seconds", type=float, default=None, help="override the rules' stable_seconds")
    p.add_argument("--poll-seconds", type=float, default=None, help="override the rules' poll_seconds")
    p.add_argument("--health-seconds", type=float, default=60.0, help="health line interval (default 60)")
    p.add_argument("--grace-seconds", type=float, default=120.0,
                   help="on SIGTERM, how long running reports may finish before they are abandoned (default 120)")
    p.set_defaults(func=run)


class _WatchLogHandler(logging.StreamHandler):
    """The handler this verb installs (its class tells it apart, so it is installed once per process)."""


def _setup_logging() -> None:
    """INFO-level timestamped lines from the watch itself; libraries stay at WARNING (they could log identifiers)."""
    handler = _WatchLogHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("pacsai.watch")
    if not any(isinstance(h, _WatchLogHandler) for h in logger.handlers):
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def run(args: argparse.Namespace) -> int:
    from pacsai.errors import ConfigError
    from pacsai.pacs.credentials import credentials_out_of_url
    from pacsai.watch.rules import load_rules
    from pacsai.watch.state import default_state_path, open_state

    rules = load_rules(args.rules)
    overrides = {k: v for k, v in (("stable_seconds", args.stable_seconds), ("poll_seconds", args.poll_seconds))
                 if v is not None}
    if overrides:
        from pacsai.watch.rules import parse_rules

        rules = parse_rules({**rules.model_dump(by_alias=True), **overrides}, source="--rules and options")
    if args.workers < 1:
        raise ConfigError("--workers must be at least 1")
    if args.model and rules.report.structures_from != "model":
        raise ConfigError("--model needs rules with report.structures_from: model")
    from pacsai.config import load_settings
    from pacsai.pacs.address import redact_url

    url = args.pacs or load_settings().pacs_url
    with credentials_out_of_url(url) as clean_url:
        from pacsai.pacs import connect

        pacs = connect(clean_url)
        state_path = args.state or default_state_path(pacs.url)
        if args.status:
            state = open_state(state_path)
            try:
                print(status_text(state, rules))
            finally:
                state.close()
            return 0
        _setup_logging()
        state = open_state(state_path)
        try:
            state.lock()
            state.bind_pacs(redact_url(pacs.url))
            from pacsai import tracking
            from pacsai.watch.service import Watcher
            from pacsai.watch.sources import probe

            source = probe(pacs, state, backfill=rules.backfill, filters=rules.qido_filters)
            watcher = Watcher(
                pacs=pacs, rules=rules, state=state, source=source, pseudonym_key=tracking.pseudonym_key(),
                out_root=args.out, workers=args.workers, health_seconds=args.health_seconds,
                grace_seconds=args.grace_seconds, once=args.once, model_override=args.model or None,
            )
            watcher.install_signal_handlers()
            return watcher.run()
        finally:
            state.close()
            pacs.close()


def _ago(then: float | None, now: float) -> str:
    if not then:
        return "-"
    seconds = max(0.0, now - then)
    return f"{seconds:.0f} s ago" if seconds < 120 else f"{seconds / 60:.0f} min ago" if seconds < 7200 \
        else f"{seconds / 3600:.1f} h ago"


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    return float(statistics.quantiles(ordered, n=100, method="inclusive")[int(q) - 1])


def status_text(state: WatchState, rules: WatchRules, *, recent: int = 20) -> str:
    """What ``--status`` prints: queue, recent outcomes with reasons, latencies; keys and pseudonyms only."""
    now = time.time()
    counts = state.counts()
    lines = [
        f"pacsai watch state {state.path}",
        f"PACS: {state.get_meta('pacs_url') or '(never started)'}",
        "counts: " + ", ".join(f"{k} {v}" for k, v in counts.items()),
        "",
        "queue:",
    ]
    queue = state.rows("running", "waiting", "retry", order="last_change")
    if not queue:
        lines.append("  (empty)")
    for r in queue:
        if r.status == "running":
            what = f"running since {_ago(r.started, now)} (attempt {r.attempts})"
        elif r.status == "retry":
            what = (f"retry in {max(0.0, r.next_attempt - now):.0f} s (attempt {r.attempts} of "
                    f"{rules.retry.max_attempts} failed: {r.reason})")
        else:
            quiet = now - r.last_change
            what = (f"waiting to be stable ({quiet:.0f} of {rules.stable_seconds:.0f} s quiet)"
                    if quiet < rules.stable_seconds else "ready")
        lines.append(f"  {r.key}  patient {r.patient or '-'}  {what}")
    lines += ["", f"recent outcomes (latest {recent}):"]
    done = state.rows("done", "gave_up", "ignored", order="last_change DESC", limit=recent)
    if not done:
        lines.append("  (none)")
    for r in done:
        if r.status == "done":
            what = (f"done {_ago(r.finished, now)}: QA {r.qa_status or '?'}, latency "
                    f"{r.latency_s or 0:.1f} s, run {r.run_seconds or 0:.1f} s, attempts {r.attempts}, "
                    f"{len(r.output_list)} object(s)" + (f", model {r.model}" if r.model else ""))
        elif r.status == "gave_up":
            what = f"GAVE UP after {r.attempts} attempt(s): {r.reason}"
        else:
            what = f"ignored: {r.reason}"
        lines.append(f"  {r.key}  patient {r.patient or '-'}  {what}")
    latencies = [r.latency_s for r in state.rows("done") if r.latency_s is not None]
    lines.append("")
    if latencies:
        lines.append(f"latency (last change seen → outputs stored) over {len(latencies)} report(s): "
                     f"p50 {_percentile(latencies, 50):.1f} s, p95 {_percentile(latencies, 95):.1f} s, "
                     f"max {max(latencies):.1f} s")
    else:
        lines.append("latency: no report yet")
    return "\n".join(lines)
