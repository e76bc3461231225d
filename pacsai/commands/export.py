"""``pacsai export``: a cohort as an nnU-Net v2 / MONAI / NIfTI research dataset, optionally de-identified."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pacsai.commands.report import key_value
from pacsai.export.formats import FORMATS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write a cohort as an nnU-Net v2 / MONAI / NIfTI dataset (optionally de-identified)",
        description="Select a cohort (CT series with an RTSTRUCT) and write it as a dataset other tools read "
        "directly. --deidentify applies the DICOM PS3.15 Annex E basic profile (dicognito): pseudonyms, per-patient "
        "date shifts and remapped UIDs; the pseudonym ↔ patient manifest goes only to --manifest. Research use only.",
    )
    p.add_argument("--cohort", action="store_true", required=True, help="export every series matching -f filters")
    p.add_argument("-f", "--filter", type=key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="study-level QIDO filter (e.g. PatientID='SYN*'); repeat for more")
    p.add_argument("--structures", required=True, help="comma-separated ROI names → labels 1, 2, ... in this "
                   "order (a later one wins where ROIs overlap: list BODY first)")
    p.add_argument("--format", dest="fmt", choices=FORMATS, default="nnunet")
    p.add_argument("--out", type=Path, required=True, help="new or empty export folder")
    p.add_argument("--deidentify", action="store_true", help="pseudonymise (needs --manifest)")
    p.add_argument("--manifest", type=Path, default=None,
                   help="pseudonym ↔ patient manifest (JSON, PHI; outside --out). An existing one is reused so "
                   "pseudonyms stay the same across exports")
    p.add_argument("--dicom", action="store_true", help="also copy the source CT and RTSTRUCT (de-identified "
                   "with --deidentify) under DIR/dicom/")
    p.add_argument("--name", default="pacsai", help="dataset name in nnU-Net's dataset.json")
    p.add_argument("--pacs", default=None, help="DICOMweb URL or file:// store (default: PACSAI_PACS_URL or ./pacs)")
    p.add_argument("--modality", default="CT")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pacsai.cohort import CohortQuery, select_cohort
    from pacsai.export.core import export_cohort
    from pacsai.export.deid import Deidentifier
    from pacsai.export.nifti import ExportError
    from pacsai.pacs import connect

    structures = tuple(s.strip() for s in args.structures.split(",") if s.strip())
    if args.deidentify and args.manifest is None:
        raise ExportError("--deidentify needs --manifest FILE (outside --out): it maps pseudonyms back to patients")
    if args.manifest is not None and not args.deidentify:
        raise ExportError("--manifest only makes sense with --deidentify")
    deidentifier = Deidentifier(args.manifest, export_dir=args.out) if args.deidentify else None
    pacs = connect(args.pacs)
    query = CohortQuery(modality=args.modality, structures=structures, study_filters=dict(args.filter))
    cohort = select_cohort(pacs, query)
    if deidentifier is None:
        print("warning: no --deidentify: real patient IDs and UIDs are written into the export", file=sys.stderr)
    result = export_cohort(pacs, cohort, args.out, fmt=args.fmt, structures=structures,
                           deidentifier=deidentifier, with_dicom=args.dicom, dataset_name=args.name)
    print(f"exported {len(result.cases)} cases ({result.fmt}) to {result.out_dir} in {result.seconds:.1f} s")
    print(f"labels:   {', '.join(f'{v}={k}' for k, v in result.labels.items())}")
    print(f"index:    {result.index}")
    if result.dicom_files:
        print(f"dicom:    {result.dicom_files} files")
    if result.manifest:
        print(f"manifest: {result.manifest} (PHI: keep it apart from the export)")
    return 0
