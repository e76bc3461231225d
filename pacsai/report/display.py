"""How a PlanSummary looks in the report notebook (HTML tables and figures; no computation here)."""

from __future__ import annotations

import html
from typing import Any

import pandas as pd
from IPython.display import HTML, display

import pacsai
from pacsai.report.summary import PlanSummary

_CSS = """
<style>
.pacsai-banner{background:#8b1a1a;color:#fff;padding:6px 12px;font-weight:600;border-radius:4px;margin:4px 0}
.pacsai-head{display:flex;gap:28px;flex-wrap:wrap;font-size:14px;margin:8px 0 4px}
.pacsai-head div b{display:block;color:#555;font-weight:500;font-size:11px;text-transform:uppercase}
table.pacsai{border-collapse:collapse;font-size:13px;margin:6px 0 12px}
table.pacsai th{background:#eef2f6;text-align:left;padding:4px 10px;border-bottom:1px solid #bbb}
table.pacsai td{padding:3px 10px;border-bottom:1px solid #e3e3e3}
td.pass{color:#1b6e20;font-weight:600} td.fail{color:#b00020;font-weight:700} td.na{color:#777}
.pacsai-note{color:#555;font-size:12px;margin:2px 0 10px}
.pacsai-flag-error{color:#b00020;font-weight:600} .pacsai-flag-review{color:#8a5a00;font-weight:600}
.pacsai-flag-note{color:#555}
.pacsai-qa{border:3px solid;border-radius:6px;padding:8px 14px;margin:10px 0}
.pacsai-qa h2{font-size:26px;margin:2px 0 6px}
.pacsai-qa-PASS{border-color:#1b6e20;background:#eef8ee} .pacsai-qa-PASS h2{color:#1b6e20}
.pacsai-qa-REVIEW{border-color:#b36b00;background:#fff6e5} .pacsai-qa-REVIEW h2{color:#8a5a00}
.pacsai-qa-FAIL{border-color:#b00020;background:#fdecee} .pacsai-qa-FAIL h2{color:#b00020}
.pacsai-key{font-size:14px;margin:4px 0 12px} .pacsai-key li{margin:2px 0}
td.review{color:#8a5a00;font-weight:700}
</style>
"""


def _table(rows: list[dict[str, Any]] | pd.DataFrame, *, classes: dict[str, Any] | None = None) -> str:
    df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows)
    if df.empty:
        return "<p class='pacsai-note'>(none)</p>"
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = []
    for _, row in df.iterrows():
        cells = []
        for col in df.columns:
            value = row[col]
            cls = ""
            if classes and col in classes:
                cls = f" class='{classes[col](value)}'"
            cells.append(f"<td{cls}>{html.escape(_fmt(value))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table class='pacsai'><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


def _note(text: str) -> None:
    display(HTML(f"<p class='pacsai-note'>{html.escape(text)}</p>"))


QA_MEANING = {
    "PASS": "no reason found to distrust the structures, the input or the dose",
    "REVIEW": "a person must review the reasons below before relying on the numbers of this report",
    "FAIL": "the statements marked below cannot be made from this input; do not use them",
}


def header(s: PlanSummary) -> None:
    """Banner, the QA gate (large, first), what a clinician must see first, then the facts of the report."""
    p = s.params
    constraint_text = p.constraint_set
    if s.qa_status == "FAIL" or not any(c.get("status") in ("pass", "fail") for c in s.constraints):
        constraint_text += " (not evaluable here: see QA)" if s.constraints else " (no dose: not evaluated)"
    elif s.qa_status == "REVIEW":
        constraint_text += " (QA REVIEW)"
    items = {
        "Patient": s.patient_id,
        "Planning study": f"{_date(s.study_date)} ({s.provenance.get('image_modality', 'CT')})",
        "Structures": s.provenance["structures_source"] or "none",
        "Prescription": f"{p.prescription_gy:g} Gy in {p.fractions} × {p.dose_per_fraction_gy:.2f} Gy",
        "Margins": f"CTV {_fmt(p.ctv_margin_mm)} mm, PTV {_fmt(p.ptv_margin_mm)} mm",
        "Constraints": constraint_text,
    }
    head = "".join(f"<div><b>{k}</b>{html.escape(str(v))}</div>" for k, v in items.items())
    display(HTML(f"{_CSS}<div class='pacsai-banner'>{html.escape(pacsai.RESEARCH_USE_ONLY)}</div>"
                 f"{qa_box(s)}{key_findings(s)}<div class='pacsai-head'>{head}</div>"))


def qa_box(s: PlanSummary) -> str:
    """The QA gate as HTML: status, what it means, every error and review reason with its numbers."""
    status = s.qa_status
    shown = [r for r in s.qa.get("reasons", []) if r["level"] != "note"]
    items = "".join(
        f"<li class='pacsai-flag-{r['level']}'>{r['level'].upper()} [{html.escape(r['code'])}]: "
        f"{html.escape(r['message'])}</li>" for r in shown
    )
    notes = sum(r["level"] == "note" for r in s.qa.get("reasons", []))
    tail = f"<p class='pacsai-note'>{notes} note(s) at the end of the report.</p>" if notes else ""
    return (f"<div class='pacsai-qa pacsai-qa-{status}'><h2>QA: {status}</h2>"
            f"<p>{html.escape(QA_MEANING[status])}.</p><ul>{items}</ul>{tail}</div>")


def key_findings(s: PlanSummary) -> str:
    """Failed and not-evaluable constraints, target coverage and the response verdict with its sources."""
    h = s.headline()
    lines = []
    for text in h["constraints_failed"]:
        lines.append(f"<li class='pacsai-flag-error'>Constraint FAILED: {html.escape(text)}</li>")
    for text in h["constraints_review"]:
        lines.append(f"<li class='pacsai-flag-review'>Constraint REVIEW: {html.escape(text)}</li>")
    for text in h["constraints_not_evaluable"]:
        lines.append(f"<li class='pacsai-flag-review'>Constraint not evaluable: {html.escape(text)}</li>")
    if s.constraints and not (h["constraints_failed"] or h["constraints_review"] or h["constraints_not_evaluable"]):
        lines.append(f"<li>All {len(s.constraints)} constraints of '{html.escape(s.params.constraint_set)}' "
                     "pass.</li>")
    elif not s.constraints:
        lines.append(f"<li>Constraints not evaluated: {html.escape(s.dvh_note or 'no dose')}.</li>")
    lines.append(f"<li>Target coverage: {html.escape(coverage_text(s.coverage))}</li>")
    lines.append(f"<li>Response: {html.escape(response_text(s.response))}</li>")
    return f"<ul class='pacsai-key'>{''.join(lines)}</ul>"


def coverage_text(c: dict[str, Any]) -> str:
    if c.get("state") != "evaluated":
        return f"not evaluable — {c.get('note', '')}"
    text = (f"PTV D95 {c['ptv_d95_gy']:.1f} Gy ({c['ptv_d95_pct']:.0f} % of the prescription), V95% "
            f"{c['ptv_v95_pct']:.1f} %: {c['verdict'].upper()} ({c['criterion']})")
    ref = c.get("reference") or {}
    if ref.get("state") == "evaluated":
        text += (f"; reference contours: V95% {ref['ptv_v95_pct']:.1f} %, D95 {ref['ptv_d95_gy']:.1f} Gy, "
                 f"{ref['verdict']}")
    return text


def response_text(r: dict[str, Any]) -> str:
    if not r.get("category"):
        return f"not assessed — {r.get('note') or 'no prior study'}"
    text = f"{r['category']} (RECIST 1.1) against the prior study of {_date(str(r.get('prior_study_date', '')))}"
    if r.get("category") == "NE" and r.get("note"):
        text += f" — {r['note']}"
    if r.get("source"):
        text += f"; contours: {r['source']}"
    return text


def _date(d: str) -> str:
    return f"{d[:4]}-{d[4:6]}-{d[6:8]}" if len(d) == 8 and d.isdigit() else (d or "unknown date")


def key_images(s: PlanSummary) -> None:
    from pacsai import viz

    fig = viz.plot_planes(s.image, structures=s.masks, dose=s.dose, center=_target_center(s),
                          prescription_gy=s.params.prescription_gy)
    display(fig)  # a PlotFigure never enters pyplot's figure list: nothing to close (and no pyplot import)
    if s.dose is None:
        _note(f"No isodose overlay: {s.dvh_note or 'no RTDOSE in the planning study'}.")


def _target_center(s: PlanSummary) -> Any:
    for name in ("GTV", s.params.target, "PTV"):
        if name in s.masks and bool(s.masks[name].values.any()):
            return s.masks[name]
    return None


def structures(s: PlanSummary) -> None:
    rows = [
        {
            "Structure": r["name"],
            "Volume (cm³)": r["volume_cc"],
            "Longest 3D diameter (mm)": r["longest_diameter_mm"],
            "Longest axial diameter (mm)": r["longest_axial_diameter_mm"],
            "Slices": r["slices"],
            "Parts": r["n_components"],
            "Centroid LPS (mm)": r["centroid_lps"],
            "State": r.get("state"),
            "Drawn by": r.get("source"),
            **({"Uncertainty (TTA σ)": r.get("uncertainty")} if "uncertainty" in r else {}),
        }
        for r in s.structures
    ]
    display(HTML(_table(rows, classes={"State": lambda v: "pass" if v == "present" else "fail"})))
    _note(s.provenance["grid"]["note"] + f" (grid {s.provenance['grid']['shape_zyx']} voxels, spacing "
          f"{_fmt(s.provenance['grid']['spacing_mm'])} mm).")


def geometry(s: PlanSummary) -> None:
    m = s.margins
    _note(f"GTV {_fmt(m.get('gtv_cc'))} cm³ → CTV {_fmt(m.get('ctv_cc'))} cm³ → PTV {_fmt(m.get('ptv_cc'))} cm³. "
          f"{m['method']}.")
    rows = [
        {
            "Organ at risk": g["name"],
            "Min. distance to PTV (mm)": g["min_distance_mm"],
            "Overlap with PTV (cm³)": g["overlap_cc"],
            "Overlap (% of OAR)": g["overlap_pct"],
        }
        for g in s.geometry
    ]
    display(HTML(_table(rows)))


def dvh(s: PlanSummary) -> None:
    if not s.dvh:
        _note(f"No DVH: {s.dvh_note}.")
        return
    from pacsai import viz

    fig = viz.plot_dvh(s.dvh_curves, prescription_gy=s.params.prescription_gy)
    display(fig)
    rows = [
        {
            "Structure": name,
            "Volume (cm³)": d.get("volume_cc"),
            "Dmean (Gy)": d.get("mean_gy"),
            "Dmin (Gy)": d.get("min_gy"),
            "D0.03cc (Gy)": d.get("d0_03cc_gy"),
            "Dmax (Gy)": d.get("max_gy"),
            "D98 (Gy)": d.get("d98_gy"),
            "D95 (Gy)": d.get("d95_gy"),
            "D50 (Gy)": d.get("d50_gy"),
            "D2 (Gy)": d.get("d2_gy"),
        }
        for name, d in s.dvh.items()
    ]
    display(HTML(_table(rows)))
    if s.plan_quality:
        q = s.plan_quality
        display(HTML(_table([{
            "PTV V95% (%)": q.get("coverage_v95_pct"),
            "HI (ICRU 83)": q.get("homogeneity_index"),
            "CI (RTOG)": q.get("ci_rtog"),
            "CI (Paddick)": q.get("ci_paddick"),
            "GI": q.get("gradient_index"),
        }])))
    f = s.fractionation
    _note(f"{s.dvh_note}. Prescription BED {f['bed_tumour_gy']:.1f} Gy, EQD2 {f['eqd2_tumour_gy']:.1f} Gy "
          f"(α/β = {f['alpha_beta_tumour_gy']:g} Gy).")


def constraints(s: PlanSummary) -> None:
    if not s.constraints:
        _note(f"No constraints evaluated: {s.dvh_note or 'no dose'}.")
        return
    rows = []
    for c in s.constraints:
        status = str(c.get("status") or "not evaluable")
        row = {
            "Structure": c.get("structure"),
            "Metric": c.get("metric"),
            "Value": c.get("value"),
            "Limit": f"{c.get('comparator', '')} {_fmt(c.get('limit'))} {c.get('unit', '')}".strip(),
            "Result": status.upper() if status in ("pass", "fail", "review") else status,
        }
        if "reference_status" in c:
            row["Reference value"] = c.get("reference_value")
            row["Reference"] = str(c.get("reference_status") or "—")
        row["Reason / source"] = c.get("reason") or c.get("source")
        rows.append(row)
    display(HTML(_table(rows, classes={"Result": lambda v: {"PASS": "pass", "FAIL": "fail", "REVIEW": "review"}
                                                           .get(v, "na")})))


def response(s: PlanSummary) -> None:
    r = s.response
    if not r.get("category"):
        _note(f"No response assessment: {r.get('note') or 'no prior study'}.")
        return
    display(HTML(f"<p><b>Response category (RECIST 1.1): {html.escape(str(r['category']))}</b> "
                 f"against the prior study of {_date(str(r.get('prior_study_date', '')))}</p>"))
    now = (r.get("drawn_by_now") or {}).get("label", "?")
    prior = (r.get("drawn_by_prior") or {}).get("label", "?")
    _note(f"Contours compared: {r.get('source') or 'planner contours on both studies'} — now {now}, prior {prior}.")
    if r.get("category") == "NE" and r.get("note"):
        _note(str(r["note"]))
    if r.get("registration"):
        _note(str(r["registration"]))
    if "sld_prior_mm" in r:
        display(HTML(_table([{
            "Target lesion(s)": r.get("target"),
            "Sum of longest axial diameters, prior (mm)": r.get("sld_prior_mm"),
            "now (mm)": r.get("sld_now_mm"),
            "Change (%)": r.get("change_pct"),
            "Change (mm)": r.get("change_mm"),
            "New lesions": r.get("new_lesions") if r.get("new_lesions") is not None else "not assessable",
        }])))
    prior_cc, now_cc = r.get("volumes_prior_cc") or {}, r.get("volumes_now_cc") or {}
    change = r.get("volume_change_pct") or {
        k: 100.0 * (now_cc[k] - prior_cc[k]) / prior_cc[k] for k in now_cc if prior_cc.get(k)
    }
    display(HTML(_table([
        {"Structure": k, "Prior (cm³)": prior_cc.get(k), "Now (cm³)": now_cc.get(k), "ΔV (%)": change.get(k)}
        for k in sorted(set(prior_cc) | set(now_cc))
    ])))
    notes = [r.get("reference")] + list(r.get("notes") or [])
    _note(" ".join(str(n) for n in notes if n))
    if s.prior_image is not None:
        from pacsai import viz

        fig = viz.plot_comparison(s.prior_image, s.prior_masks, s.image, s.response_masks or s.masks,
                                  target=s.params.target)
        display(fig)


def agreement(s: PlanSummary) -> None:
    """Model vs the planner's reference contours: agreement per structure and the verdicts of both."""
    if not s.reference:
        _note("No reference contours in the planning study (or the structures are the planner's): no comparison.")
        return
    who = (s.reference.get("drawn_by") or {}).get("label", "the planner's RTSTRUCT")
    _note(f"Reference: {who}. Surface Dice and added path length at 2 mm; Δ dose = model − reference on the plan "
          "dose. Verdicts where model and reference disagree are REVIEW in the constraint table and the QA gate.")
    names = {"structure": "Structure", "dice": "Dice", "hd95": "HD95 (mm)", "surface_dice": "Surface Dice 2 mm",
             "added_path_length_mm": "Added path length (mm)", "delta_dmean_gy": "ΔDmean (Gy)",
             "delta_d_mean_gy": "ΔDmean (Gy)", "delta_d0_03cc_gy": "ΔD0.03cc (Gy)", "delta_v20_pct": "ΔV20 (%)",
             "reason": "Note"}
    rows = [{label: a.get(key) for key, label in names.items() if key in a} for a in s.agreement]
    display(HTML(_table(rows)))


def qa(s: PlanSummary) -> None:
    """Every QA reason with its numbers, notes included (the gate itself is at the top)."""
    reasons = s.qa.get("reasons", [])
    if not reasons:
        _note(f"QA {s.qa_status}: no reasons.")
        return
    rows = [{"Level": r["level"], "Code": r["code"], "Structure": r.get("structure"), "Reason": r["message"]}
            for r in reasons]
    display(HTML(_table(rows, classes={"Level": lambda v: {"error": "fail", "review": "review"}.get(v, "na")})))


def provenance(s: PlanSummary) -> None:
    p = s.provenance
    model = p.get("model") or {}
    rows = [
        {"": "pacsai version", "value": p["pacsai_version"]},
        {"": "code (git)", "value": p["git_sha"]},
        {"": "PACS", "value": p["pacs_url"]},
        {"": "structures", "value": p["structures_source"]},
        {"": "planning image", "value": p.get("image_modality", "")},
        {"": "training domain checked", "value": p.get("model_domain_checked", False) if model else "no model"},
        {"": "model", "value": (f"{model.get('name')} v{model.get('version')} (MLflow run {model.get('run_id')}; "
                                "model card at the end)"
                                if model else "none (structures from the PACS)")},
        {"": "parameters", "value": ", ".join(f"{k}={v}" for k, v in p["parameters"].items())},
    ]
    display(HTML(_table(rows)))
    inputs = [{"Modality": i["modality"], "Series": i["series_instance_uid"],
               "Instances": len(i["sop_instance_uids"]),
               "SOP instance UIDs": _first_uids(i["sop_instance_uids"])}
              for i in p["inputs"]]
    display(HTML(_table(inputs)))
    _note(p["definitions"] + ". " + pacsai.RESEARCH_USE_ONLY)


def model_card(s: PlanSummary) -> None:
    """The model's card (intended use, training cohort, held-out metrics, limitations), as logged with it."""
    card = str((s.provenance.get("model") or {}).get("card") or "")
    if not card:
        _note("No model card (structures from the PACS, or a model logged without one).")
        return
    from IPython.display import Markdown

    display(Markdown(card))


def _first_uids(uids: list[str], shown: int = 3) -> str:
    """The first ``shown`` UIDs and how many more there are (metrics.json lists them all)."""
    more = f" … (+{len(uids) - shown}; all in metrics.json)" if len(uids) > shown else ""
    return " ".join(uids[:shown]) + more
