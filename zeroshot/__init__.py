"""radalign zeroshot stage: prompted classification of radiographs with exported encoders.

Prompt sets (`zeroshot.prompts`), scoring modes and prompt/checkpoint ensembling (`zeroshot.classifier`),
AUROC with seeded bootstrap CIs (`zeroshot.metrics`), inputs from shards or CSV (`zeroshot.inputs`),
5x200 benchmark lists (`zeroshot.benchmarks`) and the whole evaluation (`zeroshot.evaluate.run_zeroshot`).
See docs/zeroshot.md.
"""
