"""`tessera` command line: serve, worker, train, predict, check, generate, versions, rollback, demo."""
from __future__ import annotations

import argparse
import errno
import json
import logging
import sys
import time
from pathlib import Path

from tessera.backend.lsclient import NotFound
from tessera.backend.settings import Settings, apply_memory_policy, apply_thread_policy

logger = logging.getLogger("tessera")


def _setup_logging(settings: Settings) -> None:
    from tessera.backend.settings import configure_logging

    configure_logging(settings.log_level)


def cmd_serve(args, settings: Settings) -> int:
    """Run the HTTP backend (waitress: request bodies are read in full before a thread runs the app)."""
    from tessera.backend.serving import serve

    def given(value, default):
        return default if value is None else value

    return serve(settings, args.host, given(args.port, settings.port), workers=given(args.workers, settings.workers),
                 threads=given(args.threads, settings.threads))


def cmd_worker(args, settings: Settings) -> int:
    """Process training runs from the RQ queue (needs REDIS_URL)."""
    from tessera.backend.jobs import worker_main

    url = args.redis_url or settings.redis_url
    if not url:
        print("tessera worker needs REDIS_URL (or --redis-url)", file=sys.stderr)
        return 2
    worker_main(url)
    return 0


def _registry(settings: Settings, project: str | None):
    from tessera.backend.store import DEFAULT_KEY, Store

    return Store(settings.model_dir).registry(project or DEFAULT_KEY)


def cmd_versions(args, settings: Settings) -> int:
    """List stored versions with their metrics and what each decision rests on."""
    from tessera.backend.store import DEFAULT_KEY, version_string

    reg = _registry(settings, args.project)
    rows = reg.versions()
    if args.json:
        print(json.dumps([{**v.__dict__} for v in rows], indent=1))
        return 0
    if not rows:
        print(f"no versions in {reg.root}")
        return 0
    for v in rows:
        m = v.metrics
        print(f"{version_string(args.project or DEFAULT_KEY, v.version, v.kind):32s} {v.kind:6s} {v.status:9s} "
              f"{_evidence(m) if v.kind == 'label' else '':44s} {_figures(m) if v.kind == 'label' else ''} {v.reason}")
        if len(m.get("class_recall") or {}) > 1:   # one label can lose what another gains: show each
            print(f"{'':32s} recall per label: " + ", ".join(f"{n} {r:.2f}" for n, r in m["class_recall"].items()))
        if v.kind == "label" and "edit_confident" in m and m["edit_confident"] is None:
            print(f"{'':32s} no label-edit suggestions: the pixels it is sure of are wrong too often on its "
                  f"held-back tasks (annotations come back as drawn)")
        if m.get("missed_classes"):
            print(f"{'':32s} MISSES CLASS {', '.join(m['missed_classes'])}: no object of it found on the "
                  f"held-back tasks")
    return 0


def _evidence(metrics: dict) -> str:
    """'val_iou=0.8123 on 4 held-back (3 person-made)': the score and how many tasks it rests on."""
    iou = metrics.get("val_iou")
    if iou is None:
        return "val_iou=-"
    n = metrics.get("n_val_tasks", len(metrics.get("val_task_ids") or []))
    judged = metrics.get("n_val_judged")
    held = metrics.get("n_held_back_tasks")
    return (f"val_iou={iou:.4f} on {n} held-back" + (f" ({judged} person-made)" if judged is not None else "")
            + (f" of {held} (TESSERA_EVAL_MEGAPIXELS)" if isinstance(held, int) and held > n else ""))


def _figures(m: dict) -> str:
    """Box AP50, precision and recall after the region cut, as `tessera versions` prints them."""
    def f(key: str) -> str:
        v = m.get(key)
        return "-" if not isinstance(v, (int, float)) else f"{v:.3f}"
    out = f"box_ap50={f('box_ap50'):5s} precision={f('precision'):5s} recall={f('recall'):5s}"
    if "head_box_ap50" in m:     # a mask model's detection head: where its rectangles come from, and its figures
        out += (f" rectangles from the {m.get('rectangles', 'head')} (head box_ap50={f('head_box_ap50'):5s} "
                f"precision={f('head_precision'):5s} recall={f('head_recall'):5s})")
    return out


def cmd_rollback(args, settings: Settings) -> int:
    """Serve an earlier version again."""
    from tessera.backend.store import DEFAULT_KEY, parse_version, version_string

    parsed = parse_version(args.version)
    version = parsed.version if parsed else args.version
    info = _registry(settings, args.project).rollback(version)
    print(f"current {info.kind} version is now {info.version}")
    if args.project and info.kind == "label":
        _follow_in_label_studio(settings, args.project, version_string(args.project or DEFAULT_KEY, info.version))
    return 0


def _follow_in_label_studio(settings: Settings, project: str, version: str) -> None:
    """Name the project's Tessera connection in LS after `version` (see lsclient.follow_version); without
    LS settings the next /setup from Label Studio does it."""
    from tessera.backend.lsclient import LabelStudioUnavailable, follow_version, from_settings

    try:
        follow_version(from_settings(settings), project, version)
    except LabelStudioUnavailable as e:
        print(f"Label Studio not updated ({e}); `tessera serve` renames the connection on LS's next call to "
              "/setup when it has LABEL_STUDIO_URL", file=sys.stderr)


class ProgressBars:
    """The training and prediction progress-dict protocol ({"phase", "iter", "max_iters", "loss", "eta_s"}) as
    tqdm bars on stderr, one per phase. Off a terminal (logs, CI, pipes) no bar is drawn: each counted phase
    leaves one line when it ends ("predict: 4/4 tasks in 2.1s")."""

    UNITS = {"fetch": "tasks", "predict": "tasks"}         # other phases count iterations

    def __init__(self, file=sys.stderr):
        self.file, self.bar = file, None
        self.phase, self.total, self.n, self.t0 = None, None, 0, 0.0

    def __call__(self, info: dict) -> None:
        phase, total = info.get("phase", ""), info.get("max_iters") or None
        if phase == "done":
            self.close()
            return
        if self.bar is None or phase != self.phase or total != self.total:
            from tqdm import tqdm

            self.close()
            self.bar = tqdm(total=total, desc=phase, unit=self.UNITS.get(phase, "it"), file=self.file,
                            disable=None, dynamic_ncols=True, leave=False)
            self.phase, self.total, self.t0 = phase, total, time.monotonic()
        self.n = self.bar.n = info.get("iter") or 0
        if info.get("loss") and not self.bar.disable:
            self.bar.set_postfix(loss=f"{info['loss']:.4f}", refresh=False)
        self.bar.refresh()

    def __enter__(self) -> "ProgressBars":
        from tqdm.contrib.logging import logging_redirect_tqdm

        self._logs = logging_redirect_tqdm()       # log lines print above the bar, not through it
        self._logs.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.close()
        self._logs.__exit__(*exc)

    def close(self) -> None:
        bar, self.bar = self.bar, None
        if bar is None:
            return
        if bar.disable and self.total:
            print(f"{self.phase}: {self.n}/{self.total} {self.UNITS.get(self.phase, 'it')} in "
                  f"{time.monotonic() - self.t0:.1f}s", file=self.file, flush=True)
        bar.close()


def cmd_train(args, settings: Settings) -> int:
    """Train the label model from a folder dataset or a Label Studio project and register a version."""
    from tessera.backend import training

    if bool(args.data) == bool(args.project):
        print("give exactly one of --data DIR or --project N", file=sys.stderr)
        return 2
    with ProgressBars() as bars:
        if args.data:
            result = training.train_from_folder(settings, Path(args.data), project=args.into,
                                                iters=args.iters, labels=args.labels, progress=bars)
        else:
            result = training.train_project(str(args.project), "cli", settings=settings, iters=args.iters,
                                            progress=bars, force=args.force, budget_s=args.budget_s)
    print(json.dumps(result, indent=1))
    return 0 if result.get("status") in ("promoted", "rejected", "skipped") else 1


def cmd_predict(args, settings: Settings) -> int:
    """Compute predictions for a whole project and write them through Label Studio's REST API (no 100 s
    limit); needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY."""
    from tessera.backend.predict_project import predict_project

    with ProgressBars() as bars:
        result = predict_project(settings, str(args.project), batch=args.batch, overwrite=args.overwrite,
                                 replace=args.replace, progress=bars)
    print(json.dumps(result, indent=1))
    return 0


def cmd_check(args, settings: Settings) -> int:
    """Try every step between Tessera and a project's images (Label Studio's URL, the key, the project, its label
    config, the first tasks' images, the model, the connection) and say what to fix; needs LABEL_STUDIO_URL and
    LABEL_STUDIO_API_KEY. Exit status 1 when a step fails."""
    from tessera.backend.check import check_project

    width = 22
    steps = check_project(settings, args.project,
                          say=lambda s: print(f"{'ok' if s.ok else 'FAIL':4}  {s.name:{width}} {s.detail}", flush=True))
    return 0 if all(s.ok for s in steps) else 1


def cmd_generate(args, settings: Settings) -> int:
    """Generate synthetic, pre-annotated tasks into a Label Studio project; needs LABEL_STUDIO_URL and
    LABEL_STUDIO_API_KEY, and MODEL_DIR with the project's label model (and generator, for --kind generated)."""
    from tessera.backend.synthetic_tasks import generate_into_project

    if not 1 <= args.count <= 10_000:
        raise ValueError(f"--count must be between 1 and 10000, got {args.count}")
    if not 0.0 <= args.share <= 1.0:
        raise ValueError(f"--share must be between 0 and 1, got {args.share}")
    with ProgressBars() as bars:
        result = generate_into_project(settings, str(args.project), count=args.count, label=args.label,
                                       share=args.share, seed=args.seed, kind=args.kind, progress=bars)
    print(json.dumps(result, indent=1))
    return 0 if not result.get("failed") else 1


def cmd_demo(args, settings: Settings) -> int:
    """Start Label Studio and Tessera on localhost with a demo project (see backend/demo.py)."""
    from tessera.backend.demo import run_demo

    return run_demo(args)


def _project_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--project", type=int, required=True, help="Label Studio project id")


def _add_server_commands(sub) -> None:
    p = sub.add_parser("serve", help=cmd_serve.__doc__)
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=None, help="default PORT (9090)")
    p.add_argument("--workers", type=int, default=None,
                   help="processes; each keeps its own model cache (default WORKERS, 1)")
    p.add_argument("--threads", type=int, default=None, help="request threads per process (default THREADS, 8)")
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("worker", help=cmd_worker.__doc__)
    p.add_argument("--redis-url", default="", help="Redis to take runs from (default REDIS_URL)")
    p.set_defaults(fn=cmd_worker)


def _add_train_command(sub) -> None:
    p = sub.add_parser("train", help=cmd_train.__doc__)
    p.add_argument("--data", help="folder dataset: images/ + labels/ (instances) or masks/ + classes.json")
    p.add_argument("--project", type=int, help="train from this Label Studio project's annotations (needs "
                                               "LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY)")
    p.add_argument("--into", default=None, help="with --data: register into this project's store "
                                                "(default: the default model, used by projects without their own)")
    p.add_argument("--labels", nargs="*", default=None, help="with --data: label names for classes 1..C")
    p.add_argument("--iters", type=int, default=None, help="training iterations (default TESSERA_TRAIN_ITERS; "
                                                           "with --iters the run trains them all unless "
                                                           "--budget-s is given)")
    p.add_argument("--budget-s", type=float, default=None, help="wall-clock cap of the training in seconds "
                                                                "(default: TESSERA_TRAIN_BUDGET_S without --iters)")
    p.add_argument("--force", action="store_true", help="with --project: train even when nothing changed "
                                                        "since the newest version")
    p.set_defaults(fn=cmd_train)


def _add_store_commands(sub) -> None:
    p = sub.add_parser("versions", help=cmd_versions.__doc__, description=cmd_versions.__doc__)
    p.add_argument("--project", default=None, help="project id (default: the default model); reads MODEL_DIR")
    p.add_argument("--json", action="store_true", help="print every field as JSON")
    p.set_defaults(fn=cmd_versions)

    p = sub.add_parser("rollback", help=cmd_rollback.__doc__)
    p.add_argument("version", help="e.g. v0002 or tessera-p3-v0002")
    p.add_argument("--project", default=None, help="project id (default: the default model); reads MODEL_DIR, "
                                                   "and renames the LS connection with LABEL_STUDIO_URL/_API_KEY")
    p.set_defaults(fn=cmd_rollback)


def _add_project_commands(sub) -> None:
    p = sub.add_parser("predict", help=cmd_predict.__doc__, description=cmd_predict.__doc__)
    _project_arg(p)
    p.add_argument("--batch", type=int, default=128,
                   help="tasks per step (progress, resume point); each step streams in chunks of "
                        "TESSERA_PREDICT_BATCH, its regions encoded beside the next chunk's passes")
    p.add_argument("--overwrite", action="store_true", help="also redo tasks that have a prediction of the "
                                                             "served version")
    p.add_argument("--replace", action="store_true", help="delete Tessera's superseded predictions (older "
                                                           "label-model versions) of each task written")
    p.set_defaults(fn=cmd_predict)

    p = sub.add_parser("check", help=cmd_check.__doc__, description=cmd_check.__doc__)
    _project_arg(p)
    p.set_defaults(fn=cmd_check)

    p = sub.add_parser("generate", help=cmd_generate.__doc__, description=cmd_generate.__doc__)
    _project_arg(p)
    p.add_argument("--count", type=int, default=8, help="tasks to create (1-10000; default 8)")
    p.add_argument("--label", default=None, help="paste (edited) or raise the share of (generated) this label")
    p.add_argument("--kind", choices=["edited", "generated"], default="edited",
                   help="edited: real images with real objects pasted in (default); generated: mask GAN images")
    p.add_argument("--share", type=float, default=0.3, help="generated, with --label: share of layouts steered "
                                                             "toward it (0-1, default 0.3)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("demo", help="run the whole loop on generated data with a real Label Studio "
                                    "(what `make demo` runs)")
    p.add_argument("--quick", action="store_true", help="fewer images and iterations (what CI runs)")
    p.add_argument("--data-dir", default=".demo", help="where Label Studio's data, models and images live")
    p.add_argument("--no-wait", action="store_true", help="exit when ready instead of serving until Ctrl-C")
    p.set_defaults(fn=cmd_demo)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tessera", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    _add_server_commands(sub)
    _add_train_command(sub)
    _add_project_commands(sub)
    _add_store_commands(sub)
    return p


def _failure(cmd: str, e: Exception) -> str:
    """One line for a command that failed unexpectedly; the traceback goes to the log at DEBUG."""
    from tessera.backend.lsclient import LabelStudioUnavailable

    if isinstance(e, LabelStudioUnavailable):
        reason = str(e)
    elif isinstance(e, OSError):
        reason = f"{e.strerror or type(e).__name__}{f' ({e.filename})' if e.filename else ''}" + \
            (": the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else "")
    elif "unexpected pos" in str(e) or "file write failed" in str(e):   # torch.save on a full disk
        reason = "writing a checkpoint failed: is the disk full?"
    else:
        reason = f"{type(e).__name__}: {str(e)[:300]}"
    unchanged = " The served model is unchanged." if cmd == "train" else ""
    return f"tessera {cmd} failed: {reason}.{unchanged} Run with TESSERA_LOG_LEVEL=DEBUG for the traceback."


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except ValueError as e:
        print(str(e), file=sys.stderr)
        return 2
    apply_thread_policy(settings)         # before anything imports torch
    apply_memory_policy(settings)
    _setup_logging(settings)
    try:
        return args.fn(args, settings)
    except (ValueError, FileNotFoundError, NotFound) as e:    # NotFound: a project or task id LS does not have
        print(f"tessera {args.cmd}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tessera {args.cmd}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        logger.debug("tessera %s failed", args.cmd, exc_info=True)
        print(_failure(args.cmd, e), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
