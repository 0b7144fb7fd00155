"""`radalign retrieval`: build a FAISS case base, search it with explanations, evaluate it, classify with it.

    radalign retrieval build --export RUN_OR_EXPORT --shards SHARDS --split train --out INDEX_DIR
    radalign retrieval search --index-dir INDEX_DIR (--image PATH | --text "..." | --study-id ID) [--k 5]
    radalign retrieval eval --index-dir INDEX_DIR --shards SHARDS --split test --out DIR
    radalign retrieval classify --index-dir INDEX_DIR --shards SHARDS --split test [--k 20] [--prompts chexpert14]

Every verb also takes --config YAML (configs/retrieval/) and key=value overrides of its config
(retrieval/config.py).
"""

from __future__ import annotations

import argparse

from radalign.retrieval.config import (
    BLANK_POLICIES,
    DEFAULT_K,
    DEFAULT_TEMPERATURE,
    FORMATS,
    INDEX_TYPES,
    MODALITIES,
    TARGETS,
    UNCERTAIN_POLICIES,
    BuildConfig,
    ClassifyConfig,
    EvalConfig,
    SearchConfig,
)
from radalign.retrieval.serve_cli import register_serve

from radalign.cli import add_config_args, add_verbs, config_from_args, old_spelling, print_config

__all__ = ["register", "main", "DEFAULT_K", "DEFAULT_TEMPERATURE"]

EXAMPLES = """examples:
  radalign retrieval build --export runs/demo/pretrain --shards runs/demo/shards --split train \\
      --out runs/demo/retrieval/index
  radalign retrieval build ... --modality both --index-type auto --memory-budget 8G --recall-target 0.95
  radalign retrieval search --index-dir runs/demo/retrieval/index --image chest.jpg --k 5
  radalign retrieval search --index-dir IDX --text "large left pleural effusion" --format markdown
  radalign retrieval search --index-dir IDX --study-id 50000123 --out case.html
  radalign retrieval search --index-dir IDX --example-from runs/demo/shards --split test \\
      --out ex.html --out ex.md
  radalign retrieval eval --index-dir IDX --shards runs/demo/shards --split test --out runs/demo/retrieval
  radalign retrieval classify --index-dir IDX --shards runs/demo/shards --split test --prompts chexpert14 \\
      --out runs/demo/retrieval/classify
  radalign retrieval classify --config retrieval/demo-classify index_dir=IDX shards=SHARDS out=DIR
"""
# Old spellings, one release: the encoders were --checkpoint, the index folder --index (which in `build` named the
# FAISS type), the case-base shards --data and the query shards --queries.
_OLD = {"--checkpoint": "--export", "--index": "--index-dir"}


def register(sub) -> None:
    p = sub.add_parser("retrieval", help="similar-case search with FAISS (build, search, eval, classify)",
                       description="Build a FAISS index of a case base with exported encoders, search it for "
                                   "similar cases with a label explanation, and evaluate retrieval.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = add_verbs(p)
    b = verbs.add_parser("build", help="embed a shard split and write an index folder",
                         description="Embed a shard split with the exported encoders, L2-normalise, build and "
                                     "tune a FAISS inner-product index; writes INDEX_DIR atomically.")
    add_config_args(b, BuildConfig, export={"metavar": "RUN_OR_EXPORT"}, shards={"metavar": "SHARDS"},
                    out={"metavar": "INDEX_DIR"}, modality={"choices": MODALITIES},
                    index_type={"choices": INDEX_TYPES}, memory_budget={"metavar": "SIZE"})
    old_spelling(b, {"--checkpoint": "--export", "--data": "--shards", "--index": "--index-type"})
    b.set_defaults(func=_build)

    s = verbs.add_parser("search", help="the k most similar cases, with a label explanation",
                         description="Search an index with an image, a text or a study; JSON, Markdown or a "
                                     "self-contained HTML page.")
    add_config_args(s, SearchConfig, index_dir={"metavar": "INDEX_DIR"}, image={"metavar": "PATH"},
                    example_from={"metavar": "SHARDS"}, target={"choices": TARGETS}, format={"choices": FORMATS},
                    export={"metavar": "RUN_OR_EXPORT"})
    old_spelling(s, _OLD)
    s.set_defaults(func=_search)

    e = verbs.add_parser("eval", help="Recall@1/5/10 and label precision@k with chance levels",
                         description="Image->report and report->image Recall@K within the query split, and "
                                     "image->image label precision@K against the index; writes metrics.json.")
    add_config_args(e, EvalConfig, index_dir={"metavar": "INDEX_DIR"}, shards={"metavar": "SHARDS"},
                    export={"metavar": "RUN_OR_EXPORT"})
    old_spelling(e, {**_OLD, "--queries": "--shards"})
    e.set_defaults(func=_eval)

    c = verbs.add_parser("classify", help="per-label probabilities from a k-NN vote, beside prompt zero-shot",
                         description="The index as a classifier: each query's k nearest cases (other patients, "
                                     "one image per study) vote with weights softmax(similarity / T); per-label "
                                     "AUROC with patient-level bootstrap intervals, beside prompt zero-shot "
                                     "(--prompts) with the paired difference. Writes metrics.json, metrics.md, "
                                     "predictions.csv.")
    add_config_args(c, ClassifyConfig, index_dir={"metavar": "INDEX_DIR"}, shards={"metavar": "SHARDS"},
                    prompts={"metavar": "NAME_OR_YAML", "action": "store"}, export={"metavar": "RUN_OR_EXPORT"},
                    classes={"nargs": "+", "action": "store", "metavar": "LABEL"},
                    uncertain={"choices": UNCERTAIN_POLICIES}, blank={"choices": BLANK_POLICIES})
    old_spelling(c, {**_OLD, "--queries": "--shards"})
    c.set_defaults(func=_classify)
    register_serve(verbs)


def _build(args) -> int:
    from radalign.pretrain.export import load_encoders
    from radalign.retrieval.build import build_index_dir

    from radalign.log import rprint

    cfg = config_from_args(BuildConfig, args, stage="retrieval")
    if args.print_config:
        return print_config(cfg)
    enc = load_encoders(cfg.export, device=cfg.device)
    m = build_index_dir(cfg.out, encoders=enc, data=cfg.shards, split=cfg.split, checkpoint=cfg.export,
                        modality=cfg.modality, index=cfg.index_type, memory_budget=cfg.memory_budget,
                        flat_max=cfg.flat_max, recall_target=cfg.recall_target, batch_size=cfg.batch_size,
                        num_workers=cfg.num_workers, thumbnail_size=cfg.thumbnail_size)
    for name, entry in m["indexes"].items():
        t = entry["tuning"]
        tuned = f", recall@10 {t['recall']:.3f} with {entry['params']}" if entry["params"] else ""
        rprint(f"{name}: {entry['index_string']} ({entry['reason']}){tuned}")
    lost = {k: v for k, v in (m["data"].get("lost") or {}).items() if v}
    expected = m["data"].get("expected")
    of = f" of {expected}" if expected is not None else ""
    lost_text = (f"; lost {sum(lost.values())}: " + ", ".join(f"{k} {v}" for k, v in sorted(lost.items()))
                 if lost else "; none lost")
    rprint(f"indexed {m['count']}{of} images of {m['data']['studies']} studies in {m['build_seconds']:.1f}s"
           + lost_text + f" -> {cfg.out}")
    return 0


def _search(args) -> int:
    from radalign.retrieval.render import write
    from radalign.retrieval.search import Retriever, query_from_shards

    from radalign.config import output_targets
    from radalign.log import rprint

    cfg = config_from_args(SearchConfig, args, stage="retrieval")
    if args.print_config:
        return print_config(cfg)
    r = Retriever.load(cfg.index_dir, checkpoint=cfg.export, device=cfg.device)
    target = "text" if cfg.target == "report" else "image"
    common = dict(k=cfg.k, target=target, exclude_patient=cfg.exclude_patient, dedup_study=cfg.dedup)
    if cfg.example_from:
        r._check_k(cfg.k)  # before the (slow) pass over the shards
        vec, info = query_from_shards(r, cfg.example_from, cfg.split, cfg.study_id)
        res = r.search(vector=vec, query_info=info, **common)
    else:  # Retriever.search refuses anything but exactly one of image, text, study id
        res = r.search(image=cfg.image, text=cfg.text, study_id=cfg.study_id, **common)
    for fmt, out in output_targets(cfg.format, cfg.out):
        text = write(res, fmt, out)
        if out:
            rprint(f"wrote {out} ({len(res.neighbours)} cases)")
        else:
            print(text)
    return 0


def _eval(args) -> int:
    from radalign.retrieval.evaluate import evaluate, format_metrics
    from radalign.retrieval.search import Retriever

    from radalign.log import rprint

    cfg = config_from_args(EvalConfig, args, stage="retrieval")
    if args.print_config:
        return print_config(cfg)
    r = Retriever.load(cfg.index_dir, checkpoint=cfg.export, device=cfg.device)
    m = evaluate(r, cfg.shards, cfg.split, out=cfg.out, batch_size=cfg.batch_size,
                 num_workers=cfg.num_workers, n_boot=cfg.bootstrap, seed=cfg.seed)
    rprint(format_metrics(m))
    if cfg.out:
        rprint(f"wrote {cfg.out}/metrics.json")
    return 0


def _classify(args) -> int:
    from radalign.retrieval.classify import classify, format_summary
    from radalign.retrieval.search import Retriever

    from radalign.log import rprint

    cfg = config_from_args(ClassifyConfig, args, stage="retrieval")
    if args.print_config:
        return print_config(cfg)
    prompt_set = None
    if cfg.prompts:
        from radalign.pretrain.prompts import load_prompt_set

        prompt_set = load_prompt_set(cfg.prompts)
    r = Retriever.load(cfg.index_dir, checkpoint=cfg.export, device=cfg.device)
    m = classify(r, cfg.shards, cfg.split, k=cfg.k, temperature=cfg.temperature, val_split=cfg.val_split,
                 uncertain=cfg.uncertain, blank=cfg.blank, prompt_set=prompt_set, macro_classes=cfg.classes,
                 min_per_label=cfg.min_per_label, n_boot=cfg.bootstrap, seed=cfg.seed, out=cfg.out,
                 batch_size=cfg.batch_size, num_workers=cfg.num_workers)
    rprint(format_summary(m))
    if cfg.out:
        rprint(f"wrote {cfg.out}/metrics.json, metrics.md, predictions.csv")
    return 0


def main(argv: list[str] | None = None) -> int:
    from radalign.cli import stage_main

    return stage_main("retrieval", argv)
