"""`radalign retrieval`: build a FAISS case base, search it with explanations, evaluate it.

    radalign retrieval build --checkpoint RUN_OR_EXPORT --data SHARDS --split train --out INDEX_DIR
    radalign retrieval search --index INDEX_DIR (--image PATH | --text "..." | --study-id ID) [--k 5]
    radalign retrieval eval --index INDEX_DIR --queries SHARDS --split test --out DIR
    radalign retrieval classify --index INDEX_DIR --queries SHARDS --split test [--k 20] [--prompts chexpert14]
"""

from __future__ import annotations

import argparse

from radalign.retrieval.serve_cli import register_serve

# retrieval.classify's DEFAULT_K and DEFAULT_TEMPERATURE, written out so that `radalign --help` imports no
# numpy/faiss (tests/test_retrieval_classify.py checks they agree).
DEFAULT_K, DEFAULT_TEMPERATURE = 20, 0.07

EXAMPLES = """examples:
  radalign retrieval build --checkpoint runs/demo/pretrain --data runs/demo/shards --split train \\
      --out runs/demo/retrieval/index
  radalign retrieval build ... --modality both --index auto --memory-budget 8G --recall-target 0.95
  radalign retrieval search --index runs/demo/retrieval/index --image chest.jpg --k 5
  radalign retrieval search --index IDX --text "large left pleural effusion" --format markdown
  radalign retrieval search --index IDX --study-id 50000123 --format html --out case.html
  radalign retrieval search --index IDX --example-from runs/demo/shards --split test --format html --out ex.html
  radalign retrieval eval --index IDX --queries runs/demo/shards --split test --out runs/demo/retrieval
  radalign retrieval classify --index IDX --queries runs/demo/shards --split test --prompts chexpert14 \\
      --out runs/demo/retrieval/classify
  radalign retrieval classify --index IDX --queries SHARDS --split test --val-split validate --out DIR
"""


def register(sub) -> None:
    from radalign.cli import add_verbs

    p = sub.add_parser("retrieval", help="similar-case search with FAISS (build, search, eval, classify)",
                       description="Build a FAISS index of a case base with exported encoders, search it for "
                                   "similar cases with a label explanation, and evaluate retrieval.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = add_verbs(p)
    b = verbs.add_parser("build", help="embed a shard split and write an index folder",
                         description="Embed a shard split with the exported encoders, L2-normalise, build and "
                                     "tune a FAISS inner-product index; writes INDEX_DIR atomically.")
    b.add_argument("--checkpoint", required=True, metavar="RUN_OR_EXPORT", help="run folder or export folder")
    b.add_argument("--data", required=True, metavar="SHARDS", help="shards folder of `radalign data prepare`")
    b.add_argument("--split", default="train", help="split that forms the case base (default: %(default)s)")
    b.add_argument("--out", required=True, metavar="INDEX_DIR", help="index folder to write")
    b.add_argument("--modality", default="image", choices=("image", "both"),
                   help="index image embeddings, or images and reports (default: %(default)s)")
    b.add_argument("--index", default="auto", choices=("auto", "flat", "hnsw", "ivf-flat", "ivf-pq"),
                   help="FAISS index type; auto chooses by size and memory budget (default: %(default)s)")
    b.add_argument("--memory-budget", metavar="SIZE", help="RAM the index may use, e.g. 4G (default: no limit)")
    b.add_argument("--flat-max", type=int, default=1_000_000,
                   help="auto: exact search up to this many vectors (default: %(default)s)")
    b.add_argument("--recall-target", type=float, default=0.95,
                   help="approximate indexes: tune nprobe/efSearch to this recall@10 (default: %(default)s)")
    b.add_argument("--thumbnail-size", type=int, default=96,
                   help="pixels of the thumbnails stored for HTML results; 0 stores none (default: %(default)s)")
    _common(b)
    b.set_defaults(func=_build)

    s = verbs.add_parser("search", help="the k most similar cases, with a label explanation",
                         description="Search an index with an image, a text or a study; JSON, Markdown or a "
                                     "self-contained HTML page.")
    s.add_argument("--index", required=True, metavar="INDEX_DIR", help="folder of `retrieval build`")
    q = s.add_mutually_exclusive_group()
    q.add_argument("--image", metavar="PATH", help="query image (JPEG/PNG)")
    q.add_argument("--text", help="query text (searches images, or reports with --target report)")
    s.add_argument("--study-id", help="query study: from the index, or from --example-from shards")
    s.add_argument("--example-from", metavar="SHARDS",
                   help="take the query study from these shards (--split); without --study-id, the first "
                        "frontal study with a finding")
    s.add_argument("--split", default="test", help="split of --example-from (default: %(default)s)")
    s.add_argument("--k", type=int, default=5, help="number of cases (default: %(default)s)")
    s.add_argument("--target", default="image", choices=("image", "report"),
                   help="search image or report embeddings (report needs --modality both) (default: image)")
    s.add_argument("--exclude-patient", action=argparse.BooleanOptionalAction, default=None,
                   help="leave out the query's own patient (default: on for study queries)")
    s.add_argument("--no-dedup", action="store_true", help="list several images of one study")
    s.add_argument("--format", default="json", choices=("json", "markdown", "html"),
                   help="output format (default: %(default)s)")
    s.add_argument("--out", help="write the output to this file (default: print it)")
    s.add_argument("--checkpoint", metavar="RUN_OR_EXPORT",
                   help="encoders (default: the export recorded in the index; must be the same weights)")
    s.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    s.set_defaults(func=_search)

    e = verbs.add_parser("eval", help="Recall@1/5/10 and label precision@k with chance levels",
                         description="Image->report and report->image Recall@K within the query split, and "
                                     "image->image label precision@K against the index; writes metrics.json.")
    e.add_argument("--index", required=True, metavar="INDEX_DIR", help="folder of `retrieval build`")
    e.add_argument("--queries", required=True, metavar="SHARDS", help="shards folder with the query split")
    e.add_argument("--split", default="test", help="query split (default: %(default)s)")
    e.add_argument("--out", help="folder for metrics.json (default: print only)")
    e.add_argument("--checkpoint", metavar="RUN_OR_EXPORT", help="encoders (default: recorded in the index)")
    e.add_argument("--bootstrap", type=int, default=1000,
                   help="patient-level bootstrap resamples for the 95%% intervals; 0: none (default: %(default)s)")
    e.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: %(default)s)")
    _common(e)
    e.set_defaults(func=_eval)

    c = verbs.add_parser("classify", help="per-label probabilities from a k-NN vote, beside prompt zero-shot",
                         description="The index as a classifier: each query's k nearest cases (other patients, "
                                     "one image per study) vote with weights softmax(similarity / T); per-label "
                                     "AUROC with patient-level bootstrap intervals, beside prompt zero-shot "
                                     "(--prompts) with the paired difference. Writes metrics.json, metrics.md, "
                                     "predictions.csv.")
    c.add_argument("--index", required=True, metavar="INDEX_DIR", help="folder of `retrieval build`")
    c.add_argument("--queries", required=True, metavar="SHARDS", help="shards folder with the query split")
    c.add_argument("--split", default="test", help="query split scored (default: %(default)s)")
    c.add_argument("--k", type=int, default=DEFAULT_K, help="neighbours that vote (default: %(default)s)")
    t = c.add_mutually_exclusive_group()
    t.add_argument("--temperature", type=float,
                   help=f"softmax temperature over similarities (default: {DEFAULT_TEMPERATURE}, the k-NN "
                        "evaluation of Wu et al. 2018 / DINO)")
    t.add_argument("--val-split", help="fit the temperature on this split (lowest log loss on a grid); never "
                                       "the scored --split")
    c.add_argument("--prompts", metavar="NAME_OR_YAML",
                   help="a binary prompt set (chexpert14, competition5 or a YAML): zero-shot beside the vote")
    c.add_argument("--checkpoint", metavar="RUN_OR_EXPORT",
                   help="encoders (default: recorded in the index; another checkpoint is refused)")
    c.add_argument("--classes", nargs="+", metavar="LABEL",
                   help="labels of the headline macro AUROC (default: the prompt set's, else all)")
    c.add_argument("--uncertain", default="exclude", choices=("exclude", "positive", "negative"),
                   help="query label -1 (default: %(default)s from that label's metric); with positive, "
                        "uncertain neighbours vote for the label")
    c.add_argument("--blank", default="exclude", choices=("exclude", "negative"),
                   help="blank query label (default: %(default)s from that label's metric)")
    c.add_argument("--min-per-label", type=int, default=10,
                   help="a label enters the macro only with this many positives and negatives (default: "
                        "%(default)s)")
    c.add_argument("--bootstrap", type=int, default=1000, help="patient bootstrap resamples (default: %(default)s)")
    c.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: %(default)s)")
    c.add_argument("--out", help="folder for metrics.json, metrics.md, predictions.csv (default: print only)")
    _common(c)
    c.set_defaults(func=_classify)
    register_serve(verbs)


def _common(p) -> None:
    p.add_argument("--batch-size", type=int, default=64, help="images per forward (default: %(default)s)")
    p.add_argument("--num-workers", type=int, default=0, help="image loading workers (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")


def _build(args) -> int:
    from radalign.pretrain.export import load_encoders
    from radalign.retrieval.build import build_index_dir

    from radalign.log import rprint

    enc = load_encoders(args.checkpoint, device=args.device)
    m = build_index_dir(args.out, encoders=enc, data=args.data, split=args.split, checkpoint=args.checkpoint,
                        modality=args.modality, index=args.index, memory_budget=args.memory_budget,
                        flat_max=args.flat_max, recall_target=args.recall_target, batch_size=args.batch_size,
                        num_workers=args.num_workers, thumbnail_size=args.thumbnail_size)
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
           + lost_text + f" -> {args.out}")
    return 0


def _search(args) -> int:
    from radalign.retrieval.render import write
    from radalign.retrieval.search import Retriever, query_from_shards

    from radalign import RadalignError
    from radalign.log import rprint

    if args.image is None and args.text is None and args.study_id is None and args.example_from is None:
        raise RadalignError("give a query: --image PATH, --text \"...\", --study-id ID or --example-from SHARDS")
    if args.example_from and (args.image or args.text is not None):
        raise RadalignError("--example-from picks a study query; do not combine it with --image or --text")
    r = Retriever.load(args.index, checkpoint=args.checkpoint, device=args.device)
    target = "text" if args.target == "report" else "image"
    common = dict(k=args.k, target=target, exclude_patient=args.exclude_patient, dedup_study=not args.no_dedup)
    if args.example_from:
        r._check_k(args.k)  # before the (slow) pass over the shards
        vec, info = query_from_shards(r, args.example_from, args.split, args.study_id)
        res = r.search(vector=vec, query_info=info, **common)
    else:  # Retriever.search refuses anything but exactly one of image, text, study id
        res = r.search(image=args.image, text=args.text, study_id=args.study_id, **common)
    text = write(res, args.format, args.out)
    if args.out:
        rprint(f"wrote {args.out} ({len(res.neighbours)} cases)")
    else:
        print(text)
    return 0


def _eval(args) -> int:
    from radalign.retrieval.evaluate import evaluate, format_metrics
    from radalign.retrieval.search import Retriever

    from radalign.log import rprint

    r = Retriever.load(args.index, checkpoint=args.checkpoint, device=args.device)
    m = evaluate(r, args.queries, args.split, out=args.out, batch_size=args.batch_size,
                 num_workers=args.num_workers, n_boot=args.bootstrap, seed=args.seed)
    rprint(format_metrics(m))
    if args.out:
        rprint(f"wrote {args.out}/metrics.json")
    return 0


def _classify(args) -> int:
    from radalign.retrieval.classify import classify, format_summary
    from radalign.retrieval.search import Retriever

    from radalign.log import rprint

    prompt_set = None
    if args.prompts:
        from radalign.pretrain.prompts import load_prompt_set

        prompt_set = load_prompt_set(args.prompts)
    r = Retriever.load(args.index, checkpoint=args.checkpoint, device=args.device)
    m = classify(r, args.queries, args.split, k=args.k, temperature=args.temperature, val_split=args.val_split,
                 uncertain=args.uncertain, blank=args.blank, prompt_set=prompt_set, macro_classes=args.classes,
                 min_per_label=args.min_per_label, n_boot=args.bootstrap, seed=args.seed, out=args.out,
                 batch_size=args.batch_size, num_workers=args.num_workers)
    rprint(format_summary(m))
    if args.out:
        rprint(f"wrote {args.out}/metrics.json, metrics.md, predictions.csv")
    return 0


def main(argv: list[str] | None = None) -> int:
    from radalign.cli import stage_main

    return stage_main("retrieval", argv)
