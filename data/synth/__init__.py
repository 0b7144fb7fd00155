"""The synthetic MIMIC stand-in: `radalign data synth` (see docs/synthetic-data.md).

Modules:
    generate  the driver: patients, studies, label files, splits, ground truth, `synthesize`/`synth_complete`
    ehr       the MIMIC-IV hosp/icu tables of each patient (admissions, labs, quirks, the latent truth table)
    images    procedural radiographs (frontal and lateral, findings drawn at their side and severity)
    reports   free-text reports in the MIMIC template, with the mentions the label files are made from
"""

from radalign.data.synth.generate import (
    CHEXPERT_FORMAT_COLUMNS,
    GENERATOR_VERSION,
    GROUND_TRUTH_COLUMNS,
    LABEL_COLUMNS,
    MARKER,
    METADATA_COLUMNS,
    SPLIT_COLUMNS,
    synth_complete,
    synthesize,
)

__all__ = ["CHEXPERT_FORMAT_COLUMNS", "GENERATOR_VERSION", "GROUND_TRUTH_COLUMNS", "LABEL_COLUMNS", "MARKER",
           "METADATA_COLUMNS", "SPLIT_COLUMNS", "synth_complete", "synthesize"]
