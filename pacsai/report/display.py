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
.pacsai-flag-error{color:#b00020;font-weight:600} .pacsai-flag-warning{color:#8a5a00} .pacsai-flag-note{color:#555}
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


def header(s: PlanSummary) -> None:
    p = s.params
    items = {
        "Patient": s.patient_id,
        "Planning study": f"{_date(s.study_date)}",
        "Structures": s.provenance["structures_source"],
        "Prescription": f"{p.prescription_gy:g} Gy in {p.fractions} × {p.dose_per_fraction_gy:.2f} Gy",
        "Margins": f"CTV {_fmt(p.ctv_margin_mm)} mm, PTV {_fmt(p.ptv_margin_mm)} mm",
        "Constraints": p.constraint_set,
    }
    head = "".join(f"<div><b>{k}</b>{html.escape(str(v))}</div>" for k, v in items.items())
    display(HTML(f"{_CSS}<div class='pacsai-banner'>{html.escape(pacsai.RESEARCH_USE_ONLY)}</div>"
                 f"<div class='pacsai-head'>{head}</div>"))
    errors = [q for q in s.qa if q["level"] == "error"]
    if errors:
        display(HTML("".join(f"<p class='pacsai-flag-error'>⚠ {html.escape(q['message'])}</p>" for q in errors)))


def _date(d: str) -> str:
    return f"{d[:4]}-{d[4:6]}-{d[6:8]}" if len(d) == 8 and d.isdigit() else (d or "unknown date")


def key_images(s: PlanSummary) -> None:
    from pacsai import viz

    fig = viz.plot_planes(s.image, structures=s.masks, dose=s.dose, center=_target_center(s),
                          prescription_gy=s.params.prescription_gy)
    display(fig)
    _close(fig)
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
            "Source": r["source"],
        }
        for r in s.structures
    ]
    display(HTML(_table(rows)))
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
    _close(fig)
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
        status = {"pass": "PASS", "fail": "FAIL"}.get(str(c.get("status")), "not evaluated")
        rows.append({
            "Structure": c.get("structure"),
            "Metric": c.get("metric"),
            "Value": c.get("value"),
            "Limit": f"{c.get('comparator', '')} {_fmt(c.get('limit'))} {c.get('unit', '')}".strip(),
            "Result": status,
            "Source": c.get("reason") or c.get("source"),
        })
    display(HTML(_table(rows, classes={"Result": lambda v: {"PASS": "pass", "FAIL": "fail"}.get(v, "na")})))


def response(s: PlanSummary) -> None:
    r = s.response
    if not r.get("category"):
        _note(f"No response assessment: {r.get('note') or 'no prior study'}.")
        return
    display(HTML(f"<p><b>Response category (RECIST 1.1-style): {html.escape(str(r['category']))}</b> "
                 f"against the prior study of {_date(str(r.get('prior_study_date', '')))}</p>"))
    display(HTML(_table([{
        "Target lesion(s)": r.get("target"),
        "Sum of longest axial diameters, prior (mm)": r.get("sld_prior_mm"),
        "now (mm)": r.get("sld_now_mm"),
        "Change (%)": r.get("change_pct"),
        "Change (mm)": r.get("change_mm"),
        "New lesions": r.get("new_lesions") if r.get("new_lesions") is not None else "not assessable",
    }])))
    prior_cc, now_cc = r.get("volumes_prior_cc") or {}, r.get("volumes_now_cc") or {}
    change = r.get("volume_change_pct") or {}
    display(HTML(_table([
        {"Structure": k, "Prior (cm³)": prior_cc.get(k), "Now (cm³)": now_cc.get(k), "ΔV (%)": change.get(k)}
        for k in sorted(set(prior_cc) | set(now_cc))
    ])))
    notes = [r.get("reference")] + list(r.get("notes") or [])
    _note(" ".join(str(n) for n in notes if n))
    if s.prior_image is not None:
        from pacsai import viz

        fig = viz.plot_comparison(s.prior_image, s.prior_masks, s.image, s.masks, target=s.params.target)
        display(fig)
        _close(fig)


def qa(s: PlanSummary) -> None:
    if not s.qa:
        _note("No QA flags.")
        return
    display(HTML("".join(
        f"<p class='pacsai-flag-{q['level']}'>{q['level'].upper()}: {html.escape(q['message'])}</p>" for q in s.qa)))


def provenance(s: PlanSummary) -> None:
    p = s.provenance
    model = p.get("model") or {}
    rows = [
        {"": "pacsai version", "value": p["pacsai_version"]},
        {"": "code (git)", "value": p["git_sha"]},
        {"": "PACS", "value": p["pacs_url"]},
        {"": "structures", "value": p["structures_source"]},
        {"": "model", "value": (f"{model.get('name')} v{model.get('version')} (MLflow run {model.get('run_id')})"
                                if model else "none (structures from the PACS)")},
        {"": "parameters", "value": ", ".join(f"{k}={v}" for k, v in p["parameters"].items())},
    ]
    display(HTML(_table(rows)))
    inputs = [{"Modality": i["modality"], "Series": i["series_instance_uid"],
               "Instances": len(i["sop_instance_uids"]),
               "SOP instance UIDs": " ".join(i["sop_instance_uids"][:3])
               + (f" … (+{len(i['sop_instance_uids']) - 3}; all in metrics.json)" if len(i["sop_instance_uids"]) > 3 else "")}
              for i in p["inputs"]]
    display(HTML(_table(inputs)))
    _note(p["definitions"] + ". " + pacsai.RESEARCH_USE_ONLY)


def _close(fig: Any) -> None:
    import matplotlib.pyplot as plt

    plt.close(fig)
