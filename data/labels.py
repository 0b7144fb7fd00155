"""The 14 CheXpert labels, in the two column orders the real files use."""

# CheXpert's own CSV order (train.csv / valid.csv of CheXpert-v1.0); also our canonical order.
CHEXPERT_LABELS: tuple[str, ...] = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
    "Fracture", "Support Devices",
)

# mimic-cxr-2.0.0-chexpert.csv.gz / -negbio.csv.gz: subject_id, study_id, then the labels alphabetically.
MIMIC_LABEL_ORDER: tuple[str, ...] = tuple(sorted(CHEXPERT_LABELS))

# The five CheXpert competition labels (GLoRIA's 5x200 classes).
COMPETITION_LABELS: tuple[str, ...] = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")

SPLITS: tuple[str, ...] = ("train", "validate", "test")
