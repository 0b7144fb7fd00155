"""Typed config of `radalign finetune` (YAML in configs/finetune/, `key=value` overrides; radalign.config)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Optional

MODALITIES = ("image", "text", "ehr")
# Training-time drop rates. Text and EHR follow the absence mix of MIMIC-CXR studies; every study has a film, so
# the image's absence is practised through dropout alone and its rate was chosen on validation with
# bench/degradation.py (the runs: bench/RESULTS.md, "degradation"; docs/finetune.md, "Graceful degradation").
DEFAULT_MODALITY_DROPOUT = {"image": 0.3, "text": 0.25, "ehr": 0.3}
# What validation accepts. Every task kind trains; the towers stay frozen in this release.
TASK_KINDS = ("binary", "multilabel", "multiclass")
IMAGE_TOWER = ("frozen", "last_blocks", "lora")  # the tuned modes: finetune.tower
LORA_TARGETS = ("attn.in_proj", "attn.out_proj", "mlp.c_fc", "mlp.c_proj")  # LoRA-able Linears of a ViT block
BASELINES = ("image_only", "ehr_only", "text_only", "late_fusion", "early_fusion", "gbdt")
# Few-shot methods: the prompt-anchored head and the probe (image embedding), and registry models fitted on the shots
# (finetune.registry.fewshot_method); each registry method's modality (None: every modality of the run).
FEWSHOT_REGISTRY_METHODS = {"fusion": None, "early_fusion": None, "image_only": "image", "text_only": "text",
                            "ehr_only": "ehr", "gbdt": "ehr"}
FEWSHOT_METHODS = ("anchored", "linear_probe", *FEWSHOT_REGISTRY_METHODS)
UNCERTAIN_POLICIES = ("exclude", "positive", "negative")
BLANK_POLICIES = ("exclude", "negative")  # data.labels.BLANK_POLICIES


@dataclass
class DataConfig:
    table: str = "runs/demo/ehr/finetune"
    """The finetune table: the `finetune/` DatasetDict folder written by `radalign data link-ehr`."""
    shards: str = "runs/demo/shards"
    """The shards folder the table's dicom_ids point into (images are embedded from it)."""
    checkpoint: str = "runs/demo/pretrain"
    """Pretrained run or export folder (pretrain.export) whose towers embed the images and indications."""
    cache: str = ""
    """Folder for cached image/text embeddings (keyed by the export checksum); empty: RUN/cache."""
    modalities: list[str] = field(default_factory=lambda: list(MODALITIES))
    """Modalities the fusion model uses: any of image, text (the order's indication), ehr (labs+demographics)."""
    features: Optional[list[str]] = None
    """Lab features; None: the table manifest's `features` (a checkpoint trained on another list is refused)."""
    train_split: str = "train"
    """Split the model and the EHR scaling statistics are fitted on."""
    val_split: str = "validate"
    """Split for model selection, thresholds, temperature and the late-fusion stacker (never test)."""
    test_split: str = "test"
    """Split the reported metrics come from."""
    image_patch_tokens: bool = False
    """The fusion heads (fusion, fusion_no_dropout, image_only) attend over the image tower's last-layer patch
    tokens (each projected, plus a learned position embedding) instead of its one pooled embedding. Frozen tower:
    cached beside the pooled ones; early fusion and the trees keep the pooled embedding. Tuned tower
    (model.image_tower=last_blocks|lora): the tower's patch tokens of each step, so it trains through them (its
    projection, which only the pooled token goes through, stays frozen)."""
    allow_overlap: bool = False
    """Allow evaluation patients that were in the pretraining run's training shards (refused by default)."""


@dataclass
class TaskConfig:
    name: str = "in_hospital_mortality"
    """Task name (the run's subfolder and the report title)."""
    kind: str = "binary"
    """binary: one 0/1 label column (one logit). multilabel: one 0/1 column per class (a logit each, masked BCE).
    multiclass: one column holding the class index 0..K-1 of `classes` (K logits, softmax, cross-entropy)."""
    labels: list[str] = field(default_factory=lambda: ["in_hospital_mortality"])
    """Label column(s) of the table. With `threshold_column`, the one name given to the derived label."""
    classes: list[str] = field(default_factory=list)
    """multiclass only: the class names, in the order of the label column's index (0, 1, ...)."""
    threshold_column: Optional[str] = None
    """Derive the binary label as `threshold_column > threshold` (e.g. los_days > 7); null stays unlabelled."""
    threshold: Optional[float] = None
    """Cut-off for `threshold_column`."""
    uncertain: str = "exclude"
    """CheXpert label -1 (uncertain): exclude (unlabelled), positive or negative."""
    blank: str = "exclude"
    """A blank label column (CheXpert: finding not mentioned): exclude (unlabelled) or negative, as zero-shot
    evaluation counts it (data.labels.apply_label_policy). Label columns only (a threshold label's null is no
    measurement and stays unlabelled)."""
    train_fraction: float = 1.0
    """Train on this fraction of the training split's PATIENTS (all their studies), drawn with `seed`; the list
    and its sha256 are written to RUN/train_patients.json. 1.0: every patient."""


@dataclass
class ModelConfig:
    d_model: int = 128
    """Width of the modality tokens and the fusion transformer."""
    n_layers: int = 2
    """Fusion transformer layers."""
    n_heads: int = 4
    """Fusion attention heads (d_model must be divisible by it)."""
    dropout: float = 0.1
    """Dropout inside the fusion and EHR transformers."""
    ehr_d: int = 64
    """Width of the EHR feature tokens (FT-Transformer d_block)."""
    ehr_blocks: int = 2
    """FT-Transformer blocks pooling the EHR tokens."""
    ehr_heads: int = 4
    """EHR attention heads (ehr_d must be divisible by it)."""
    modality_dropout: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MODALITY_DROPOUT))
    """Training-time drop rate per modality (each present modality dropped independently)."""
    modality_dropout_from_data: bool = False
    """Instead, set each rate to the modality's absence rate on the training split (clipped to [0.05, 0.5])."""
    cls_sees_absent: bool = True
    """The fusion [CLS] may attend to an absent modality's mask token (absence as information)."""
    image_tower: str = "frozen"
    """frozen: the towers stay fixed and their embeddings are cached. last_blocks: the image tower's last
    `tune_blocks` blocks, final norm and projection train with the head; lora: LoRA adapters (peft) on the image
    tower's attention and MLP projections train with the head. Both train end to end from the films (no embedding
    cache) and save only the trained weights beside the export's checksum (docs/finetune.md, "Tower
    adaptation"); baselines that read the frozen image embedding are not trained in such a run."""
    tune_blocks: int = 2
    """last_blocks: how many of the image tower's last transformer blocks train (1 .. the tower's depth)."""
    lora_rank: int = 8
    """lora: rank r of each adapter (r * (in + out) parameters per targeted Linear)."""
    lora_alpha: float = 16.0
    """lora: the adapters' scale numerator (the update is lora_alpha / lora_rank * B A x)."""
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    """lora: the Linear layers of every ViT block that get an adapter, any of attn.in_proj (q, k, v),
    attn.out_proj, mlp.c_fc, mlp.c_proj (why these: finetune/tower.py)."""


@dataclass
class OptimConfig:
    lr: float = 1.0e-3
    """AdamW learning rate of the fusion head (and baselines)."""
    tower_lr: Optional[float] = None
    """With model.image_tower=last_blocks|lora: the learning rate of the image tower's trained weights (the
    adapters or the unfrozen blocks); None: optim.lr, as the head. Pretrained weights usually want a smaller
    step than a fresh head; choose it on validation (it follows the same warm-up and cosine schedule)."""
    weight_decay: float = 1.0e-2
    """AdamW weight decay."""
    epochs: int = 30
    """Training epochs; the checkpoint with the best validation AUROC is kept."""
    batch_size: int = 256
    """Rows per batch (per process)."""
    warmup_steps: int = 50
    """Linear warm-up steps."""
    patience: int = 8
    """Stop a model after this many epochs without a better validation AUROC (0: train every epoch). The
    schedule still spans `epochs`, so a stop changes nothing when the best epoch came before it."""


@dataclass
class BaselinesConfig:
    models: list[str] = field(default_factory=lambda: list(BASELINES))
    """Baselines trained beside the fusion model (same data, same splits)."""
    late_fusion: str = "stacked"
    """Late fusion: average of the per-modality logits, or stacked (logistic regression on validation)."""
    gbdt_max_iter: int = 200
    """Boosting iterations of the gradient-boosted trees (no internal early stopping: it splits by row)."""
    gbdt_learning_rate: float = 0.05
    """Learning rate of the gradient-boosted trees."""
    fusion_without_dropout: bool = True
    """Also train the fusion model without modality dropout, for the graceful-degradation table."""
    degradation_seeds: int = 3
    """Training seeds of the with/without-dropout pair in the graceful-degradation table (seed, seed+1, ...):
    its mean drops over seeds sit beside the first seed's intervals. 1: the reported pair only."""


@dataclass
class FewshotConfig:
    REMOVED_KEYS: ClassVar[dict[str, str]] = {
        "l2": "removed with the prompt_init method (its fixed pull never left zero-shot); the anchored head's "
              "pull is fewshot.lam0 / (lam0 + n), chosen per k (docs/fewshot-head.md): drop fewshot.l2"}
    """Keys of the previous release, each refused with its fix (radalign.config)."""
    enabled: bool = False
    """The config is a few-shot sweep (`radalign finetune fewshot` sets it; its checks apply)."""
    label: str = ""
    """Binary label column of the few-shot task (a CheXpert label, or a clinical one such as
    in_hospital_mortality, which has no prompt: no anchored method and no zero-shot point)."""
    ks: list[str] = field(default_factory=lambda: ["1", "2", "4", "8", "16", "32"])
    """Examples per class; integers or 'all'."""
    seeds: int = 5
    """Draws per k (seeds 0..seeds-1); at least 5."""
    methods: list[str] = field(default_factory=lambda: ["anchored", "linear_probe"])
    """anchored (the zero-shot-anchored head, finetune.fewshot_heads; k=0 is zero-shot; needs the label's
    prompts), linear_probe (L2 logistic regression on the frozen image embedding), and any registry model fitted
    on the shots alone (finetune.registry.fewshot_method): fusion (every modality), early_fusion, image_only,
    text_only, ehr_only (the fusion model on one modality), gbdt (gradient-boosted trees on the EHR features and
    the frozen image embedding)."""
    prompts: str = "chexpert14"
    """Prompt set (configs/zeroshot/) that gives the zero-shot row and the anchored head's start; empty: the task
    has no prompt (no zero-shot point, anchored refused)."""
    lam0: float = 4.0
    """anchored: scale of the prior weights (in examples) its cross-validation inside the shots chooses from:
    inf (the zero-shot head) and lam0 x 4^j, j = 3 .. -4; the pull is lam / (lam + n) (docs/fewshot-head.md)."""
    probe_C: float = 1.0
    """linear_probe: inverse L2 strength (sklearn C); anchored tries the same probe (prior weight 1 / probe_C, at
    0) as its weakest candidate."""
    min_patients_adapt: int = 64
    """anchored: patients per class from which the head may leave the zero-shot head; below it the head is
    zero-shot, with no cross-validation (folds of a dozen patients per class cannot tell a gain from noise;
    chosen on the demo's validation split, docs/fewshot-head.md). 8: the rule until 2026-12-06, session 11; below 8
    the rule's own floor (8 patients per class, no fold can show a gain) still keeps the head zero-shot."""
    steps: int = 100
    """Torch methods (fusion, early_fusion, <modality>_only): fixed AdamW steps on the draw, in minibatches of
    optim.batch_size rows when it is larger (no early stopping, no validation set)."""


@dataclass
class FinetuneConfig:
    run_dir: str = "runs/finetune"
    """Output folder: resolved config, checkpoints, predictions.csv, metrics.json, report.md, plots."""
    seed: int = 0
    """Seed for initialisation, modality dropout and bootstrap."""
    precision: str = "auto"
    """Mixed precision (radalign.training): auto, bf16, fp16 or no."""
    log_every: int = 20
    """Steps between log lines (and NaN checks)."""
    bootstrap: int = 1000
    """Patient-level bootstrap resamples for the 95% intervals."""
    stop_after: int = 0
    """Stop after this many optimizer steps of the model in training (checkpointed; resume continues it)."""
    resume: str = "auto"
    """auto: continue what RUN holds when RUN/run_spec.json equals this config's (finished models are reused,
    the one in training continues from its newest complete checkpoint; another config is refused, naming the
    changed keys). never: refuse a run_dir that holds models or checkpoints. A folder
    RUN/train/<model>/checkpoints/step-N: that model continues from it (the others as auto). `--overwrite`
    trains afresh in RUN."""
    num_workers: int = 0
    """DataLoader workers for the one-off image embedding pass."""
    progress: bool = True
    """Progress bars."""
    data: DataConfig = field(default_factory=DataConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig)
    fewshot: FewshotConfig = field(default_factory=FewshotConfig)

    def validate(self) -> list[str]:
        return (_data_problems(self.data) + _task_problems(self.task) + _model_problems(self.model, self.data, self.optim)
                + _other_problems(self))


def _data_problems(d: DataConfig) -> list[str]:
    p = []
    bad = [m for m in d.modalities if m not in MODALITIES]
    if bad or not d.modalities:
        p.append(f"data.modalities: {list(d.modalities)}; use a non-empty subset of {', '.join(MODALITIES)}")
    if len(set(d.modalities)) != len(d.modalities):
        p.append(f"data.modalities: {list(d.modalities)} repeats a modality")
    if d.val_split == d.test_split:
        p.append(f"data.val_split: equals test_split {d.test_split!r}; select models on another split")
    if d.train_split in (d.val_split, d.test_split):
        p.append(f"data.train_split: {d.train_split!r} is also the validation or test split")
    return p


def _task_problems(t: TaskConfig) -> list[str]:
    p = []
    if t.kind not in TASK_KINDS:
        p.append(f"task.kind: {t.kind!r} is not one of {', '.join(TASK_KINDS)}")
    if not t.labels:
        p.append("task.labels: empty; name the label column(s)")
    if t.kind in ("binary", "multiclass") and len(t.labels) > 1:
        p.append(f"task.labels: {t.kind} takes one label column, got {len(t.labels)}; use kind=multilabel")
    if (t.threshold_column is None) != (t.threshold is None):
        p.append("task.threshold: threshold_column and threshold go together; set both or neither")
    if t.uncertain not in UNCERTAIN_POLICIES:
        p.append(f"task.uncertain: {t.uncertain!r} is not one of {', '.join(UNCERTAIN_POLICIES)}")
    if t.blank not in BLANK_POLICIES:
        p.append(f"task.blank: {t.blank!r} is not one of {', '.join(BLANK_POLICIES)}")
    elif t.blank != "exclude" and (t.threshold_column or t.kind == "multiclass"):
        p.append(f"task.blank: {t.blank!r} applies to binary/multilabel label columns; a threshold label's or a "
                 "class index's null is no measurement: use task.blank=exclude")
    if t.kind == "multiclass" and len(t.classes) < 2:
        p.append(f"task.classes: {list(t.classes)}; a multiclass task names its classes (at least 2), in the "
                 "order of the label column's index, e.g. task.classes=[none,mild,severe]")
    if t.kind != "multiclass" and t.classes:
        p.append(f"task.classes: only for kind=multiclass (a {t.kind} task's classes are task.labels)")
    if not 0 < t.train_fraction <= 1:
        p.append(f"task.train_fraction: {t.train_fraction}; use a fraction in (0, 1], e.g. 0.01 for 1 %")
    if t.threshold_column and t.kind != "binary":
        p.append(f"task.threshold_column: derives one binary label; use kind=binary (got {t.kind})")
    return p


def _model_problems(m: ModelConfig, d: DataConfig, o: OptimConfig) -> list[str]:
    p = []
    if m.d_model < 1 or m.n_heads < 1 or m.d_model % m.n_heads:
        p.append(f"model.d_model: {m.d_model} must be a positive multiple of model.n_heads ({m.n_heads})")
    if m.ehr_d < 1 or m.ehr_heads < 1 or m.ehr_d % m.ehr_heads:
        p.append(f"model.ehr_d: {m.ehr_d} must be a positive multiple of model.ehr_heads ({m.ehr_heads})")
    if not 0 <= m.dropout < 1:
        p.append(f"model.dropout: {m.dropout} must be in [0, 1)")
    for k, r in m.modality_dropout.items():
        if k not in MODALITIES:
            p.append(f"model.modality_dropout.{k}: unknown modality; use {', '.join(MODALITIES)}")
        elif not 0 <= r < 1:
            p.append(f"model.modality_dropout.{k}: {r} must be in [0, 1)")
    p += _tower_problems(m, d, o)
    if m.n_layers < 1 or m.ehr_blocks < 1:
        p.append("model.n_layers / model.ehr_blocks: must be >= 1")
    return p


def _tower_problems(m: ModelConfig, d: DataConfig, o: OptimConfig) -> list[str]:
    p = []
    if m.image_tower not in IMAGE_TOWER:
        p.append(f"model.image_tower: {m.image_tower!r} is not one of {', '.join(IMAGE_TOWER)}")
    elif m.image_tower != "frozen" and "image" not in d.modalities:
        p.append(f"model.image_tower: {m.image_tower} tunes the image tower, but data.modalities "
                 f"{list(d.modalities)} has no image; add image or use model.image_tower=frozen")
    if d.image_patch_tokens and "image" not in d.modalities:
        p.append(f"data.image_patch_tokens: true, but data.modalities {list(d.modalities)} has no image; add "
                 "image or use data.image_patch_tokens=false")
    if o.tower_lr is not None and not (math.isfinite(o.tower_lr) and o.tower_lr > 0):
        p.append(f"optim.tower_lr: {o.tower_lr}; it must be a number > 0 (e.g. optim.tower_lr=1e-4), or unset "
                 "(optim.tower_lr=null: the tower at optim.lr)")
    elif o.tower_lr is not None and m.image_tower == "frozen":
        p.append(f"optim.tower_lr: {o.tower_lr}, but model.image_tower=frozen trains no tower weights: unset it "
                 "(optim.tower_lr=null), or tune the tower (model.image_tower=last_blocks|lora)")
    if m.tune_blocks < 1:
        p.append(f"model.tune_blocks: {m.tune_blocks} must be >= 1")
    if m.lora_rank < 1 or m.lora_alpha <= 0:
        p.append(f"model.lora_rank / model.lora_alpha: {m.lora_rank} / {m.lora_alpha}; rank >= 1 and alpha > 0")
    bad = [t for t in m.lora_targets if t not in LORA_TARGETS]
    if bad or not m.lora_targets:
        p.append(f"model.lora_targets: {list(m.lora_targets)}; use a non-empty subset of {', '.join(LORA_TARGETS)}")
    return p


def _other_problems(c: FinetuneConfig) -> list[str]:
    p = []
    bad = [b for b in c.baselines.models if b not in BASELINES]
    if bad:
        p.append(f"baselines.models: unknown {bad}; use {', '.join(BASELINES)}")
    if c.baselines.late_fusion not in ("average", "stacked"):
        p.append(f"baselines.late_fusion: {c.baselines.late_fusion!r}; use average or stacked")
    if c.baselines.degradation_seeds < 1:
        p.append(f"baselines.degradation_seeds: {c.baselines.degradation_seeds} must be >= 1 (1: no extra seeds)")
    f = c.fewshot
    for k in f.ks:
        if k != "all" and not (k.isdigit() and int(k) >= 1):
            p.append(f"fewshot.ks: {k!r} is neither a positive integer nor 'all'")
    if f.seeds < 5:
        p.append(f"fewshot.seeds: {f.seeds}; the protocol needs at least 5 draws per k")
    if f.enabled and "prompt_init" in f.methods:  # a training run's saved config may still list it: it asks nothing
        p.append("fewshot.methods: 'prompt_init' was removed (its fixed l2 pull never left zero-shot); 'anchored' "
                 "replaces it (starts at zero-shot, pull shrinks with k): write fewshot.methods=[anchored,"
                 "linear_probe]")
    bad = [x for x in f.methods if x not in FEWSHOT_METHODS and x != "prompt_init"]
    if f.enabled and bad:
        p.append(f"fewshot.methods: unknown {bad}; use {', '.join(FEWSHOT_METHODS)}")
    p += _fewshot_method_problems(c)
    if not f.probe_C > 0:
        p.append(f"fewshot.probe_C: {f.probe_C}; the linear probe's inverse L2 strength must be > 0 (default 1)")
    if not (isinstance(f.min_patients_adapt, int) and f.min_patients_adapt >= 0):
        p.append(f"fewshot.min_patients_adapt: {f.min_patients_adapt!r}; use an integer >= 0 (patients per class "
                 "from which the anchored head may leave zero-shot; default 64)")
    if not f.lam0 > 0:
        p.append(f"fewshot.lam0: {f.lam0}; the anchored prior's weight must be > 0 (default 4)")
    if f.enabled and not f.label:
        p.append("fewshot.label: the few-shot task needs a binary label column (e.g. Pleural Effusion)")
    elif f.enabled and list(c.task.labels) != [f.label]:
        p.append(f"fewshot.label: {f.label!r} but task.labels is {list(c.task.labels)} (the draws and scores use "
                 f"task.labels, the prompts fewshot.label); set both, e.g. task.labels=[{f.label}]")
    if c.optim.lr <= 0 or c.optim.batch_size < 1 or c.optim.epochs < 1:
        p.append("optim: lr must be > 0, batch_size and epochs >= 1")
    if c.resume not in ("auto", "never") and not re.fullmatch(r"step-\d+", Path(c.resume).name):
        p.append(f"resume: {c.resume!r}; use auto, never or a checkpoint folder RUN/train/<model>/checkpoints/step-N")
    if c.stop_after < 0 or c.optim.patience < 0:
        p.append("stop_after / optim.patience: must be >= 0")
    if f.enabled and c.task.kind != "binary":
        p.append(f"task.kind: {c.task.kind!r}; the few-shot sweep is binary (one label, k per class): use "
                 "kind=binary, or `radalign finetune train` with task.train_fraction for a multi-label task")
    if f.enabled and c.task.train_fraction != 1:
        p.append(f"task.train_fraction: {c.task.train_fraction}; the few-shot sweep draws its own k per class: "
                 "leave it at 1.0")
    if f.enabled and c.model.image_tower != "frozen":
        p.append(f"model.image_tower: {c.model.image_tower}; the few-shot sweep fits heads on the frozen towers' "
                 "cached embeddings: use model.image_tower=frozen with fewshot.enabled")
    if c.bootstrap < 1:
        p.append(f"bootstrap: must be >= 1 (got {c.bootstrap})")
    return p


def _fewshot_method_problems(c: FinetuneConfig) -> list[str]:
    """Each few-shot method's inputs (a sweep's: fewshot.enabled): its modality in data.modalities, and
    anchored's prompts for the label."""
    f, mods = c.fewshot, c.data.modalities
    if not f.enabled:
        return []
    need = {"anchored": "image", "linear_probe": "image", **FEWSHOT_REGISTRY_METHODS}
    p = [f"fewshot.methods: {m} reads the {need[m]} modality, which data.modalities {list(mods)} lacks; add "
         f"{need[m]} to data.modalities or drop {m}" for m in f.methods if need.get(m) and need[m] not in mods]
    if "anchored" in f.methods:
        why = prompt_free_reason(f.label, f.prompts)
        if why:
            p.append(f"fewshot.methods: anchored starts at the zero-shot prompt classifier, but {why}; drop "
                     "anchored (e.g. fewshot.methods=[fusion,ehr_only,gbdt]) or set fewshot.prompts to a prompt "
                     f"set with prompts for {f.label!r}")
    return p


def prompt_free_reason(label: str, prompts: str) -> str | None:
    """Why `label` has no zero-shot classifier under prompt set `prompts` (None: it has one)."""
    from radalign.pretrain.prompts import load_prompt_set

    from radalign.config import ConfigError

    if not prompts:
        return f"the task {label!r} has no prompt (fewshot.prompts is empty)"
    try:
        ps = load_prompt_set(prompts)
    except ConfigError as e:
        return f"fewshot.prompts {prompts!r} does not load ({e.problems[0]})"
    if label not in ps.class_names:
        return (f"the task {label!r} has no prompt in prompt set {prompts!r} (its classes: "
                f"{', '.join(ps.class_names)})")
    if ps.mode != "binary":
        return f"prompt set {prompts!r} is {ps.mode}, not binary (a positive and a negative prompt per class)"
    return None


def fewshot_ks(cfg: FewshotConfig) -> list:
    """The configured ks as ints (and 'all')."""
    return [k if k == "all" else int(k) for k in cfg.ks]
