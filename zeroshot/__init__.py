"""radalign zeroshot stage: prompted classification of radiographs with exported encoders.

Prompt sets (`pretrain.prompts`, data in configs/zeroshot/) and the prompt classifier with its scoring modes and
prompt/checkpoint ensembling (`pretrain.classifier`: the export's capability, shared with retrieval and
finetune), AUROC tables with seeded patient bootstrap CIs (`radalign.metrics.auroc_table`; zero-shot's own
tables in `zeroshot.metrics`), inputs from shards or CSV (`zeroshot.inputs`),
5x200 benchmark lists (`zeroshot.benchmarks`) and the whole evaluation (`zeroshot.evaluate.run_zeroshot`).
See docs/zeroshot.md.
"""
