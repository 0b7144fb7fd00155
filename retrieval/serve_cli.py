"""The `radalign retrieval serve` verb: its parser and handler (the service is retrieval/serve.py, imported only
when the verb runs, so `radalign --help` stays light)."""

from __future__ import annotations

import argparse

DEFAULT_PORT = 8765

EXAMPLES = """examples:
  radalign retrieval serve --index-dir runs/demo/retrieval/index
  radalign retrieval serve --index-dir IDX --finetune-run runs/demo/finetune/in_hospital_mortality --port 8800
  radalign retrieval serve --index-dir IDX --host 10.0.0.5 --allow-remote   # other machines: no login, audited
"""


def register_serve(verbs) -> None:
    s = verbs.add_parser("serve", help="a local web page and JSON API over an index (image, DICOM, text, study)",
                         description="Load the encoders and the index once and serve the similar-case lookup "
                                     "on http://127.0.0.1:PORT/ (the page) and /api (JSON; schema at /docs).",
                         epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--index-dir", required=True, metavar="INDEX_DIR", help="folder of `retrieval build`")
    s.add_argument("--finetune-run", metavar="RUN",
                   help="a finetune run: study answers carry its prediction, Shapley values and similar cases")
    s.add_argument("--checkpoint", metavar="RUN_OR_EXPORT", help="encoders (default: recorded in the index)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    s.add_argument("--allow-remote", action="store_true",
                   help="allow a --host other than loopback (no login: anyone who reaches it can query)")
    s.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default: %(default)s)")
    s.add_argument("--max-upload-mb", type=float, default=32, help="largest upload in MiB (default: %(default)s)")
    s.add_argument("--max-pixels", type=int, help="largest image in pixels (default: data.images' limit)")
    s.add_argument("--audit-log", default="serve-audit.jsonl",
                   help="JSONL audit log of queries (ids and filters only) (default: %(default)s)")
    s.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    s.set_defaults(func=_serve)


def _serve(args) -> int:
    from radalign.retrieval.serve import ServeConfig, allowed_hosts, check_bind, serve
    from radalign.retrieval.serve_api import create_app

    from radalign.log import rprint

    check_bind(args.host, args.allow_remote)  # before seconds of loading
    limits = {"max_pixels": args.max_pixels} if args.max_pixels else {}
    cfg = ServeConfig(max_upload_bytes=int(args.max_upload_mb * 1024 * 1024), audit_log=args.audit_log,
                      allowed_hosts=allowed_hosts(args.host), **limits)
    app = create_app(args.index_dir, finetune_run=args.finetune_run, checkpoint=args.checkpoint, config=cfg,
                     device=args.device)
    count = app.state.service.retriever.store.count
    rprint(f"radalign retrieval serve: http://{args.host}:{args.port}/ over {count} cases; audit log "
           f"{args.audit_log} (Ctrl-C stops)")
    serve(app, host=args.host, port=args.port, allow_remote=args.allow_remote)
    return 0


__all__ = ["register_serve", "DEFAULT_PORT"]
