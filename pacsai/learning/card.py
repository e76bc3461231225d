"""The model card: a markdown page logged with every registered model version (``model_card.md``).

What a user needs before trusting a model's contours: what it is for, what it was trained on (counts, sources,
grids, fields of view, HU statistics, structure volume ranges; pseudonymised, no patient identifiers), how well it
did on patients it never saw, what is done to its output, and where it is known to fail. Torch-free.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

DEFAULT_INTENDED_USE = (
    "Research only, not for clinical use. Auto-contouring of thoracic organs at risk and the gross tumour volume "
    "on non-contrast planning CT (adult thorax, head-first supine), as a starting point that a qualified person "
    "reviews and edits. The report's QA gate compares every new image with the training domain below."
)
DEFAULT_LIMITATIONS = (
    "Trained on synthetic patients (pacsai.synthetic): real anatomy, scanners, contrast, implants, motion and "
    "pathology beyond a single tumour are outside its experience.",
    "Inputs outside the training domain below (spacing, field of view, body size, HU distribution) are flagged for "
    "review by the report, not corrected.",
    "The GTV is one lesion per patient in training; nodal disease, atelectasis and pleural effusion are unseen.",
    "Left and right come from the image orientation (no left-right flips in training): a wrongly labelled "
    "orientation swaps the lungs.",
)


def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:.0f}"
    if isinstance(value, (list, tuple)):
        return "–".join(_fmt(v, digits) for v in value) if len(value) == 2 else ", ".join(_fmt(v) for v in value)
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return out


def _domain_lines(domain: Mapping[str, Any]) -> list[str]:
    """The training domain as short tables: every range the QA gate checks."""
    lines: list[str] = []
    ranges = {k: v for k, v in domain.items() if isinstance(v, Mapping) and k != "structure_volumes_cc"}
    scalars = {k: v for k, v in domain.items() if not isinstance(v, Mapping)}
    if scalars:
        lines += _table(("property", "value"), [(k, v) for k, v in sorted(scalars.items())])
        lines.append("")
    for name, block in sorted(ranges.items()):
        rows = [(k, v) for k, v in sorted(block.items()) if not isinstance(v, Mapping)]
        nested = {k: v for k, v in block.items() if isinstance(v, Mapping)}
        if rows:
            lines += [f"**{name}**", ""] + _table(("figure", "range"), rows) + [""]
        for sub, inner in sorted(nested.items()):
            lines += [f"**{name}: {sub}**", ""]
            lines += _table(("figure", "range"), [(k, v) for k, v in sorted(inner.items())]) + [""]
    structures = domain.get("structure_volumes_cc")
    if isinstance(structures, Mapping) and structures:
        volume_rows: list[tuple[Any, Any, Any, Any]] = []
        for s, v in structures.items():
            if isinstance(v, Mapping):
                volume_rows.append((s, v.get("min"), v.get("median"), v.get("max")))
            else:
                volume_rows.append((s, v, "", ""))
        lines += ["**Reference structure volumes (cc)**", ""]
        lines += _table(("structure", "min", "median", "max"), volume_rows) + [""]
    return lines


def model_card(
    *,
    name: str,
    version: str | None,
    run_id: str,
    experiment: Mapping[str, Any],
    cohort: Mapping[str, Any],
    domain: Mapping[str, Any],
    metrics: Mapping[str, Mapping[str, float]],
    postprocess: Mapping[str, str],
    train_seconds: float,
    best_epoch: int,
) -> str:
    """Render the model card.

    Parameters
    ----------
    name, version, run_id
        The registered model and its training run (version None while it is not registered yet).
    experiment
        The training experiment config (``preprocess``, ``model``, ``train``, ``card``: optional
        ``intended_use`` text and ``limitations`` list that replace the defaults).
    cohort
        ``{"train": n, "val": n, "test": n, "sources": [...], "series": n}`` (counts only; no identifiers).
    domain
        :func:`pacsai.domain.training_domain` of the training cases.
    metrics
        ``{structure: {"dice": ..., "hd95": ...}}`` on the validation patients.
    postprocess
        ``{structure: description}`` of the post-processing rules.
    train_seconds, best_epoch
        Wall time of training and the epoch whose weights were kept.
    """
    card_cfg = experiment.get("card") or {}
    intended = str(card_cfg.get("intended_use") or DEFAULT_INTENDED_USE)
    limitations = list(card_cfg.get("limitations") or DEFAULT_LIMITATIONS)
    pp, model, train = experiment.get("preprocess", {}), experiment.get("model", {}), experiment.get("train", {})
    title = f"{name} v{version}" if version else name
    lines = [
        f"# Model card: {title}",
        "",
        f"Training run `{run_id}`, experiment `{experiment.get('name', '')}`. "
        f"Structures: {', '.join(experiment.get('structures', []))}.",
        "",
        "## Intended use",
        "",
        intended,
        "",
        "## Training cohort",
        "",
        f"- Patients: {cohort.get('train', 0)} training, {cohort.get('val', 0)} validation, "
        f"{cohort.get('test', 0)} held out for the promotion gate (split by patient; pseudonymised in split.json).",
        f"- Image series: {cohort.get('series', 0)}; sources: {', '.join(cohort.get('sources', [])) or 'unknown'}.",
        f"- Training grid: {_fmt(list(pp.get('spacing_mm', [])))} mm (x, y, z), HU window "
        f"{_fmt(list(pp.get('window', [])))}, cropped to the body (> {pp.get('body_threshold_hu', -500)} HU) "
        f"plus {pp.get('margin_mm', 8)} mm.",
        f"- Network: {model.get('architecture', 'UNet')} {model.get('channels', model.get('filters', ''))}, "
        f"{model.get('output', 'softmax')} head; {train.get('epochs')} epochs × {train.get('steps_per_epoch')} "
        f"steps of {train.get('batch_size')} patches {train.get('patch_size')} (z, y, x), best epoch {best_epoch}, "
        f"{train_seconds:.0f} s.",
        "",
        "### Training domain (what the QA gate compares new images with)",
        "",
        *_domain_lines(domain),
        "## Validation metrics (validation patients, never trained on)",
        "",
        "Dice and HD95 (mm) per structure on the training grid, after post-processing. The promotion gate's "
        "figures on the held-out test patients are added to the registered version when it is validated.",
        "",
        *_table(
            ("structure", "Dice", "HD95 mm"),
            [(s, m.get("dice", float("nan")), m.get("hd95", float("nan"))) for s, m in metrics.items()],
        ),
        "",
        "## Post-processing (applied by `segment`, recorded in the model's metadata)",
        "",
        *_table(("structure", "rule"), list(postprocess.items())),
        "",
        "## Known limitations",
        "",
        *[f"- {text}" for text in limitations],
        "",
    ]
    return "\n".join(lines)
