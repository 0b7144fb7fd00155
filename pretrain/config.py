"""Typed config of the pretrain recipe. YAML files in `configs/pretrain/`; any key overridable as key=value."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
LOSSES = ("infonce", "siglip")


@dataclass
class DataConfig:
    shards: str = "runs/demo/shards"
    """Folder written by `radalign data prepare` (holds manifest.json and {train,validate,test}/shard-*.tar)."""
    train_split: str = "train"
    """Split used for training."""
    val_split: Optional[str] = "validate"
    """Split used for validation (image-report recall, quick zero-shot AUROC). Empty or null: no validation."""
    num_workers: int = 2
    """DataLoader worker processes per training process (decode + augment + tokenize happen there)."""
    shuffle_buffer: int = 1000
    """Samples in webdataset's shuffle buffer (per worker)."""
    resampled: bool = True
    """Sample shards with replacement (infinite stream; any shard/worker count works). False: exact epochs."""
    augment: bool = True
    """Mild CXR augmentation (random resized crop, small rotation, brightness/contrast; never horizontal flip)."""
    val_max_samples: int = 2000
    """Cap on validation samples (each process embeds its share; rank 0 scores them)."""
    shuffle_pairs: bool = False
    """Negative control: pair each image with a random report of its batch. Learning should then fail."""


@dataclass
class ModelConfig:
    name: str = "tiny"
    """A model config name from configs/models/ (see `radalign pretrain --list-models`), a path to a JSON file, or
    a folder whose architecture to take (an open_clip folder such as BiomedCLIP's, or a radalign export)."""
    pretrained: Optional[str] = None
    """Initial weights: a local file/folder in a known layout (radalign export, open_clip/BiomedCLIP folder,
    OpenAI-CLIP/CheXzero state dict, CXR-BERT-style HF text tower; docs/models.md), an open_clip tag or hf-hub: id
    (online only). None: random."""
    grad_checkpointing: bool = False
    """Recompute activations in backward to save memory (slower)."""
    compile: bool = False
    """Wrap the model with torch.compile."""


@dataclass
class LossConfig:
    kind: str = "infonce"
    """'infonce' (symmetric CLIP loss) or 'siglip' (sigmoid loss)."""
    false_negatives: bool = True
    """Treat pairs in the global batch sharing a study_id or an identical normalised report as positives."""
    max_logit_scale: float = 100.0
    """Upper clamp of the learned temperature's inverse (applied functionally in the loss)."""


@dataclass
class OptimConfig:
    lr: float = 5.0e-4
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.2
    """Decoupled weight decay for weights; never applied to norms, biases or the logit scale."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.98
    """AdamW beta2 (0.98 is the CLIP choice for stability with large batches)."""
    eps: float = 1.0e-6
    """AdamW epsilon."""
    warmup_steps: int = 50
    """Linear warm-up steps before the cosine decay."""
    grad_clip: Optional[float] = None
    """Clip the global gradient norm to this value; None: no clipping (also under DeepSpeed)."""


@dataclass
class PretrainConfig:
    run_dir: str = "runs/pretrain"
    """Output folder: config.yaml, metrics.jsonl, tensorboard/, checkpoints/, export/."""
    seed: int = 0
    """Seed for model init, data order and augmentation."""
    steps: int = 1000
    """Optimizer steps to train for (the cosine schedule spans exactly these)."""
    batch_size: int = 64
    """Micro-batch per process. Contrastive batch = batch_size x accum_freq x processes."""
    global_batch_size: Optional[int] = None
    """Optional check: the contrastive batch you expect; must equal batch_size x accum_freq x processes."""
    accum_freq: int = 1
    """Micro-batches per optimizer step; features are cached so the loss still sees the whole batch."""
    precision: str = "auto"
    """'auto' (bf16 on CUDA with bf16 support; on CPU bf16 only where native and measured faster, else fp32; the
    choice and why are logged), 'bf16', 'fp16' (loss scaling, CUDA only) or 'fp32'."""
    deepspeed: Optional[str] = None
    """DeepSpeed JSON config (name under configs/deepspeed/ or path). Needs CUDA or a 2-process CPU gloo launch."""
    log_every: int = 10
    """Steps between log lines (console, TensorBoard, metrics.jsonl)."""
    val_every: int = 0
    """Steps between validations (0: only at the end)."""
    ckpt_every: int = 200
    """Steps between checkpoints (0: only at the end). The latest checkpoint is always kept."""
    keep_checkpoints: int = 2
    """How many step checkpoints to keep on disk."""
    resume: Optional[str] = None
    """'latest' (newest verified checkpoint), 'auto' (the same, or a fresh start when run_dir has none) or a
    step-* folder. Unset with checkpoints in run_dir is an error (never overwritten). See docs/pretrain.md."""
    stop_after: Optional[int] = None
    """Stop (with a checkpoint) after this step without changing the schedule: for time-sliced jobs and tests."""
    tensorboard: bool = True
    """Write TensorBoard event files under run_dir/tensorboard."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def validate(self) -> list[str]:
        p = []
        if self.precision not in PRECISIONS:
            p.append(f"precision: {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.loss.kind not in LOSSES:
            p.append(f"loss.kind: {self.loss.kind!r} is not one of {', '.join(LOSSES)}")
        for key in ("steps", "batch_size", "accum_freq"):
            if getattr(self, key) < 1:
                p.append(f"{key}: must be >= 1 (got {getattr(self, key)})")
        if self.optim.lr <= 0:
            p.append(f"optim.lr: must be > 0 (got {self.optim.lr})")
        if self.optim.warmup_steps >= self.steps:
            p.append(f"optim.warmup_steps: {self.optim.warmup_steps} >= steps {self.steps}; "
                     "use fewer warm-up steps or more steps")
        if self.optim.grad_clip is not None and self.optim.grad_clip <= 0:
            p.append(f"optim.grad_clip: must be > 0 or null (got {self.optim.grad_clip})")
        if self.global_batch_size is not None and self.global_batch_size % (self.batch_size * self.accum_freq):
            p.append(f"global_batch_size: {self.global_batch_size} is not divisible by batch_size x accum_freq "
                     f"= {self.batch_size * self.accum_freq}; choose a multiple")
        if self.deepspeed and self.accum_freq != 1:
            p.append("accum_freq: must be 1 with deepspeed (the feature-cache accumulation needs DDP's no_sync); "
                     "raise batch_size or use DDP")
        if self.stop_after is not None and not 1 <= self.stop_after <= self.steps:
            p.append(f"stop_after: must be within 1..steps={self.steps} (got {self.stop_after})")
        if self.data.num_workers < 0:
            p.append(f"data.num_workers: must be >= 0 (got {self.data.num_workers})")
        return p
