"""The `radalign retrieval serve` verb: its parser and handler (the service is retrieval/serve.py, imported only
when the verb runs, so `radalign --help` stays light)."""

from __future__ import annotations

import argparse

from radalign.retrieval.config import ServeCliConfig

from radalign.cli import add_config_args, config_from_args, old_spelling, print_config

DEFAULT_PORT = ServeCliConfig.port

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
    add_config_args(s, ServeCliConfig, index_dir={"metavar": "INDEX_DIR"}, finetune_run={"metavar": "RUN"},
                    export={"metavar": "RUN_OR_EXPORT"})
    old_spelling(s, {"--checkpoint": "--export"})
    s.set_defaults(func=_serve)


def _serve(args) -> int:
    from radalign.retrieval.serve import ServeConfig, allowed_hosts, check_bind, serve
    from radalign.retrieval.serve_api import create_app

    from radalign.log import rprint

    cfg = config_from_args(ServeCliConfig, args, stage="retrieval")
    if args.print_config:
        return print_config(cfg)
    check_bind(cfg.host, cfg.allow_remote)  # before seconds of loading
    limits = {"max_pixels": cfg.max_pixels} if cfg.max_pixels else {}
    service = ServeConfig(max_upload_bytes=int(cfg.max_upload_mb * 1024 * 1024), audit_log=cfg.audit_log,
                          allowed_hosts=allowed_hosts(cfg.host), **limits)
    app = create_app(cfg.index_dir, finetune_run=cfg.finetune_run, checkpoint=cfg.export, config=service,
                     device=cfg.device)
    count = app.state.service.retriever.store.count
    rprint(f"radalign retrieval serve: http://{cfg.host}:{cfg.port}/ over {count} cases; audit log "
           f"{cfg.audit_log} (Ctrl-C stops)")
    serve(app, host=cfg.host, port=cfg.port, allow_remote=cfg.allow_remote)
    return 0


__all__ = ["register_serve", "DEFAULT_PORT"]
