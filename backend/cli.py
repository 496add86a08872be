"""`tessera` command line: serve, worker, train, predict, generate, versions, rollback, demo."""
from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
from pathlib import Path

from backend.settings import Settings

logger = logging.getLogger("tessera")


def _setup_logging(settings: Settings) -> None:
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def cmd_serve(args, settings: Settings) -> int:
    """Run the HTTP backend (waitress: request bodies are read in full before a thread runs the app)."""
    from backend.serving import serve

    return serve(settings, args.host, args.port, workers=args.workers, threads=args.threads)


def cmd_worker(args, settings: Settings) -> int:
    """Process training runs from the RQ queue (needs REDIS_URL)."""
    from backend.jobs import worker_main

    url = args.redis_url or settings.redis_url
    if not url:
        print("tessera worker needs REDIS_URL (or --redis-url)", file=sys.stderr)
        return 2
    worker_main(url)
    return 0


def _registry(settings: Settings, project: str | None):
    from backend.service import DEFAULT_KEY, ModelCache

    return ModelCache(settings).registry(project or DEFAULT_KEY)


def cmd_versions(args, settings: Settings) -> int:
    """List stored versions with their metrics."""
    from backend.service import DEFAULT_KEY, version_string

    reg = _registry(settings, args.project)
    rows = reg.versions()
    if args.json:
        print(json.dumps([{**v.__dict__} for v in rows], indent=1))
        return 0
    if not rows:
        print(f"no versions in {reg.root}")
        return 0
    for v in rows:
        iou = v.metrics.get("val_iou")
        print(f"{version_string(args.project or DEFAULT_KEY, v.version):28s} {v.kind:6s} {v.status:9s} "
              f"val_iou={iou if iou is None else round(iou, 4)!s:7s} {v.reason}")
    return 0


def cmd_rollback(args, settings: Settings) -> int:
    """Serve an earlier version again."""
    version = args.version.rsplit("-", 1)[-1]
    info = _registry(settings, args.project).rollback(version)
    print(f"current {info.kind} version is now {info.version}")
    return 0


_progress_line = {"open": False}     # a progress line without its newline is on stderr


def _print_progress(info: dict) -> None:
    _progress_line["open"] = info.get("phase") != "done"
    total = info.get("max_iters") or 0
    frac = f"{info.get('iter', 0)}/{total}" if total else ""
    loss = f" loss {info['loss']:.4f}" if info.get("loss") else ""
    eta = f" eta {info['eta_s']:.0f}s" if info.get("eta_s") else ""
    print(f"\r{info.get('phase', '')} {frac}{loss}{eta}      ", end="\n" if info.get("phase") == "done" else "",
          file=sys.stderr, flush=True)


def cmd_train(args, settings: Settings) -> int:
    """Train the label model from a folder dataset or a Label Studio project and register a version."""
    from backend import training

    if bool(args.data) == bool(args.project):
        print("give exactly one of --data DIR or --project N", file=sys.stderr)
        return 2
    if args.data:
        result = training.train_from_folder(settings, Path(args.data), project=args.into,
                                            iters=args.iters, labels=args.labels, progress=_print_progress)
    else:
        result = training.train_project(str(args.project), "cli", settings=settings, iters=args.iters,
                                        progress=_print_progress)
    print(json.dumps(result, indent=1))
    return 0 if result.get("status") in ("promoted", "rejected", "skipped") else 1


def cmd_predict(args, settings: Settings) -> int:
    """Compute predictions for a whole project in the background and write them through the REST API."""
    from backend.bulk import predict_project

    result = predict_project(settings, str(args.project), batch=args.batch, overwrite=args.overwrite)
    print(json.dumps(result, indent=1))
    return 0


def cmd_generate(args, settings: Settings) -> int:
    """Generate synthetic, pre-annotated tasks into a Label Studio project."""
    from backend.synthetic import generate_into_project

    result = generate_into_project(settings, str(args.project), count=args.count, label=args.label,
                                   share=args.share, seed=args.seed, kind=args.kind)
    print(json.dumps(result, indent=1))
    return 0 if not result.get("failed") else 1


def cmd_demo(args, settings: Settings) -> int:
    """Start Label Studio and Tessera on localhost with a demo project (see backend/demo.py)."""
    from backend.demo import run_demo

    return run_demo(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tessera", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("serve", help=cmd_serve.__doc__)
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=int(os.environ.get("PORT", 9090)))
    p.add_argument("--workers", type=int, default=int(os.environ.get("WORKERS", 1)),
                   help="processes; each keeps its own model cache (default 1)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("THREADS", 8)))
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("worker", help=cmd_worker.__doc__)
    p.add_argument("--redis-url", default="")
    p.set_defaults(fn=cmd_worker)

    p = sub.add_parser("train", help=cmd_train.__doc__)
    p.add_argument("--data", help="folder dataset: images/ + labels/ (instances) or masks/ + classes.json")
    p.add_argument("--project", type=int, help="train from this Label Studio project's annotations")
    p.add_argument("--into", default=None, help="with --data: register into this project's store "
                                                "(default: the default model, used by projects without their own)")
    p.add_argument("--labels", nargs="*", default=None, help="with --data: label names for classes 1..C")
    p.add_argument("--iters", type=int, default=None, help="training iterations")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("predict", help=cmd_predict.__doc__)
    p.add_argument("--project", type=int, required=True)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--overwrite", action="store_true", help="also redo tasks that have a prediction of the "
                                                             "served version")
    p.set_defaults(fn=cmd_predict)

    p = sub.add_parser("generate", help=cmd_generate.__doc__)
    p.add_argument("--project", type=int, required=True)
    p.add_argument("--count", type=int, default=8)
    p.add_argument("--label", default=None, help="paste (edited) or raise the share of (generated) this label")
    p.add_argument("--kind", choices=["edited", "generated"], default="edited",
                   help="edited: real images with real objects pasted in (default); generated: mask GAN images")
    p.add_argument("--share", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("demo", help="run the whole loop on generated data with a real Label Studio "
                                    "(what `make demo` runs)")
    p.add_argument("--quick", action="store_true", help="fewer images and iterations (what CI runs)")
    p.add_argument("--data-dir", default=".demo", help="where Label Studio's data, models and images live")
    p.add_argument("--no-wait", action="store_true", help="exit when ready instead of serving until Ctrl-C")
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("versions", help=cmd_versions.__doc__)
    p.add_argument("--project", default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_versions)

    p = sub.add_parser("rollback", help=cmd_rollback.__doc__)
    p.add_argument("version", help="e.g. v0002 or tessera-p3-v0002")
    p.add_argument("--project", default=None)
    p.set_defaults(fn=cmd_rollback)

    args = parser.parse_args(argv)
    # OpenMP threads that spin while waiting make torch ~10x slower when training and serving share a
    # small CPU (measured on 2 cores); must be set before torch is first imported
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        settings = Settings.from_env()
    except ValueError as e:
        print(str(e), file=sys.stderr)
        return 2
    _setup_logging(settings)
    try:
        return args.fn(args, settings)
    except (ValueError, FileNotFoundError) as e:
        print(f"tessera {args.cmd}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tessera {args.cmd}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:            # one clear line; the traceback goes to the log at DEBUG
        from backend.lsclient import LabelStudioUnavailable

        logger.debug("tessera %s failed", args.cmd, exc_info=True)
        if isinstance(e, LabelStudioUnavailable):
            reason = str(e)
        elif isinstance(e, OSError):
            reason = f"{e.strerror or type(e).__name__}{f' ({e.filename})' if e.filename else ''}" + \
                (": the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else "")
        elif "unexpected pos" in str(e) or "file write failed" in str(e):   # torch.save on a full disk
            reason = "writing a checkpoint failed: is the disk full?"
        else:
            reason = f"{type(e).__name__}: {str(e)[:300]}"
        if _progress_line["open"]:
            print(file=sys.stderr)
        unchanged = " The served model is unchanged." if args.cmd == "train" else ""
        print(f"tessera {args.cmd} failed: {reason}.{unchanged} Run with TESSERA_LOG_LEVEL=DEBUG for the "
              "traceback.", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
