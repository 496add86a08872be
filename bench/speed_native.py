"""Native-size speed, before and after, side by side in one run: per-stage breakdown in-process and
per-task latency over HTTP at 256 px, 520x696 (~100 objects) and 2048x2048 (~500 objects).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python -m bench.speed --native [--threads 2] [--quick] [--before REV]

"before" = the code of git revision REV (default: main), unpacked from an archive of that revision beside
the current code and run on the same checkpoint: its model/ and backend/ imported as the package
before_tessera beside the current tessera for the stage breakdown (each revision's own Predictor and region
encoder, alternating image by image in one process), and its whole backend as a second /predict server on
the same model store (PYTHONPATH = a folder whose tessera/backend and tessera/model link to the tree). The
model is trained for a few iterations on procedural nuclei (bench.speed's bench_model): speed does not depend
on what the weights learned, only on the object scale they were trained at. Stop 17's before/after HTTP
rows were measured before the install rename; after it, until this fix, both servers ran the installed
package (the main checkout's code), so their HTTP columns compared main with itself.
"""
from __future__ import annotations

import io
import inspect
import json
import os
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import requests
from PIL import Image

from bench.common import REPO

SIZES = {"256": (256, 256), "520x696": (520, 696), "2048": (2048, 2048)}


def mosaic(h: int, w: int, tile: int, seed: int):
    """A (h, w) image of procedural nuclei at the training scale, and its object count."""
    from tessera.model.data import make_nuclei_mosaic

    s = make_nuclei_mosaic(h, w, tile, seed)
    return s.image, int(len(np.unique(s.instances)) - 1)


class Laps:
    """Wall and CPU seconds (time.thread_time: this thread, where torch's one thread runs) of consecutive
    stages. A stage's CPU seconds are what it costs, less what the machine's load adds by taking the core away."""

    def __init__(self):
        self.t: dict[str, float] = {}
        self.w, self.c = time.perf_counter(), time.thread_time()

    def lap(self, name: str) -> None:
        w, c = time.perf_counter(), time.thread_time()
        self.t[name], self.t[name + "_cpu"] = w - self.w, c - self.c
        self.w, self.c = w, c


def stage_times(pred, png: bytes, encode=None) -> dict:
    """Seconds per stage for one image through decode -> resize -> forward -> upsample -> split -> regions -> JSON:
    wall ("forward") and CPU ("forward_cpu").

    Written against the Predictor internals both revisions share (_prepare, _net, _tiled_logits,
    _unletterbox, _prediction), so the same loop times the Predictor before and after. A model with a box
    head runs it as predict() does: its pass is in "forward", and its objects part the masks in
    "instance_split" (until stop 36 this loop called _forward, which leaves the head out, so a head's cost
    showed only in the HTTP rows)."""
    import sys

    import torch

    from tessera.backend.label_config import parse_label_config
    from tessera.backend.media import decode_image
    from tessera.backend.regions import instances_to_results
    from bench.speed import CONFIG

    encode = encode or instances_to_results         # a revision's own region encoder, when given

    controls = {c.type: c for c in parse_label_config(CONFIG).controls}
    laps = Laps()
    image = decode_image(png, 10 ** 9)
    image = image[0] if isinstance(image, tuple) else image        # (pixels, original size) since issue 9
    laps.lap("decode")
    with torch.inference_mode():
        x, sizes = pred._prepare([image])
        laps.lap("resize")
        tiled = pred.scale is not None and x.shape[-1] * x.shape[-2] > pred.tile ** 2
        head = getattr(pred, "has_box_head", False)
        dets = [] if head else None
        if tiled:
            logits = pred._tiled_logits(x, dets=dets)
        elif hasattr(pred, "_net"):                     # the pass predict() runs, the head's included
            logits, heads = pred._net(x)
            if head:
                dets = list(pred._boxes(heads))
        else:
            logits = pred._forward(x)[2]
        laps.lap("forward")
        if "image" in inspect.signature(pred._unletterbox).parameters:   # since stop 30 masks follow the
            probs = pred._unletterbox(logits[0], sizes[0], image.shape[:2], image)   # image's edges there
        else:
            probs = pred._unletterbox(logits[0], sizes[0], image.shape[:2])
        laps.lap("upsample")
    if dets is not None:                                # the head's boxes in image px, as predict() has them
        dets = sys.modules[type(pred).__module__]._to_image_px(np.concatenate(dets), sizes[0], image.shape[:2])
    p = pred._prediction(probs, dets)
    laps.lap("instance_split")
    labels = {k: "Nucleus" for k in p.instance_label}
    results = []
    for kind in ("brushlabels", "polygonlabels", "rectanglelabels"):
        results += encode(p.instances, labels, p.instance_score, controls[kind])
        laps.lap(kind.replace("labels", ""))
    json.dumps({"results": [{"result": results, "score": p.score}]})
    laps.lap("json")
    t = laps.t
    t["total"] = sum(v for k, v in t.items() if not k.endswith("_cpu"))
    t["total_cpu"] = sum(v for k, v in t.items() if k.endswith("_cpu"))
    t["n_regions"] = len(p.instance_label)
    return t


def finish_breakdown(args) -> None:
    """CPU ms per 520x696 task of what /predict's second thread does (predict_parts' finisher: upsampling
    softmax, instance split, task score, region cut; then the task's LS item: brush RLE, polygons, boxes;
    then its JSON text), before (git revision args.before) and after, on the 8 images of the Label Studio
    request (ls_big_request), image by image alternating the two in one thread: median over repetitions of
    the mean per image. The network pass runs untimed. Also checks that both write the same JSON text.
    Writes bench/results/<args.finish_name>.json."""
    import shutil
    import tempfile

    import torch

    from bench.common import write_result
    from bench.speed import bench_model

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="tessera-speed-finish-"))
    try:
        ckpt = bench_model(work)
        tree = importable_before_tree(args.before, work / "before")
        variants = {"before": _finish_variant(ckpt, tree), "after": _finish_variant(ckpt, None)}
        images = [mosaic(520, 696, 256, seed=11 + k)[0] for k in range(8)]
        load0 = os.getloadavg()
        runs: dict = {v: [] for v in variants}
        regions: dict = {v: [] for v in variants}
        same, rle_only = True, 0
        for r in range(args.reps + 1):                 # the first round warms up
            for i, image in enumerate(images):
                texts = {}
                for v in (list(variants) if (r + i) % 2 == 0 else list(variants)[::-1]):
                    t, n, texts[v] = variants[v](image, i)
                    if r:
                        runs[v].append(t)
                        regions[v].append(n)
                if texts["before"] != texts["after"]:
                    n = _brush_bytes_only(texts["before"], texts["after"])
                    same &= n is not None
                    rle_only += (n or 0) if r == 0 else 0     # regions of the 8 images (once, not per round)
        res: dict = {"threads": 1, "images": "8 x 520x696 procedural nuclei (mosaic seeds 11-18)",
                     "reps": args.reps, "before_rev": args.before, "same_regions": bool(same),
                     "brush_rle_bytes_differ_same_mask": rle_only,
                     "load_average_start": load0, "load_average_end": os.getloadavg()}
        for v, rs in runs.items():
            per_rep = [rs[k * len(images):(k + 1) * len(images)] for k in range(args.reps)]
            res[v] = {f"{s}_cpu_ms": statistics.median(1000 * float(np.mean([t[s] for t in rr])) for rr in per_rep)
                      for s in rs[0]}
            res[v]["regions_per_task"] = float(np.mean(regions[v]))
        res["ratio_after_to_before"] = {k: res["after"][k] / res["before"][k] for k in res["after"]
                                        if k.endswith("_cpu_ms")}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(res, indent=1), flush=True)
    write_result(args.finish_name, {"summary": res, "targets": {
        "ratio_after_to_before": {"total_cpu_ms": "<= 0.7 (issue 10: finishing + regions + JSON CPU -30%)"}}})


def annotation_reading(args) -> None:
    """Seconds per task to read an annotation into label maps (backend.regions.results_to_maps: what every
    training run and label check does for each annotated task), before (git revision args.before) and after,
    alternating in one thread: an accepted prediction of procedural nuclei (a brush mask, a polygon and a box
    per object) at 520x696 and 2048x2048. Also checks that both give the same maps.
    Writes bench/results/<args.annotations_name>.json."""
    import shutil
    import tempfile

    from bench.common import write_result
    from bench.speed import CONFIG
    from tessera.backend.label_config import parse_label_config
    from tessera.backend.regions import instances_to_results, results_to_maps
    from tessera.model.data import make_nuclei_mosaic

    work = Path(tempfile.mkdtemp(prefix="tessera-speed-annotations-"))
    try:
        readers = {"before": before_module(args.before, work, "backend.regions").results_to_maps,
                   "after": results_to_maps}
        controls = parse_label_config(CONFIG).controls
        res: dict = {"threads": 1, "before_rev": args.before, "reps": args.reps, "load_average_start": os.getloadavg()}
        for name, (h, w, tile) in {"520x696": (520, 696, 256), "2048": (2048, 2048, 512)}.items():
            inst = make_nuclei_mosaic(h, w, tile, 11).instances
            labels = {int(k): "Nucleus" for k in np.unique(inst) if k}
            results = [r for c in controls for r in instances_to_results(inst, labels, {}, c)]
            times: dict = {v: [] for v in readers}
            maps = {}
            for r in range(args.reps + 1):                 # the first round warms up
                for v in (list(readers) if r % 2 == 0 else list(readers)[::-1]):
                    t0 = time.thread_time()
                    maps[v] = readers[v](results, results[0]["to_name"], h, w, {"Nucleus": 1})
                    if r:
                        times[v].append(time.thread_time() - t0)
            same = all(np.array_equal(a, b) for a, b in zip(maps["before"], maps["after"]))
            res[name] = {"objects": len(labels), "regions": len(results), "same_maps": bool(same),
                         **{f"{v}_cpu_ms": 1000 * statistics.median(t) for v, t in times.items()}}
            res[name]["ratio_after_to_before"] = res[name]["after_cpu_ms"] / res[name]["before_cpu_ms"]
            print(name, res[name], flush=True)
        res["load_average_end"] = os.getloadavg()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_result(args.annotations_name, {"summary": res})


def training_batches(args) -> None:
    """Milliseconds per training batch (train_vqvae.Batcher.get_batch: 8 augmented crops, the default
    TrainConfig, the bench model's scale 0.6) of procedural nuclei images at 520x696, 1040x1388 (DSB2018's
    largest) and 2048x2048, before (git revision args.before) and after, alternating in one thread; median of
    10 after 2 warm-up rounds. Writes bench/results/<args.batches_name>.json."""
    import shutil
    import tempfile

    import torch

    from bench.common import write_result
    from tessera.model.data import make_nuclei_mosaic
    from tessera.model.train_vqvae import Batcher, TrainConfig

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="tessera-speed-batches-"))
    try:
        old = before_module(args.before, work, "model.train_vqvae")
        res: dict = {"threads": 1, "before_rev": args.before, "batch": 8, "load_average_start": os.getloadavg()}
        for name, (h, w, tile) in {"520x696": (520, 696, 256), "1040x1388": (1040, 1388, 256),
                                   "2048": (2048, 2048, 512)}.items():
            samples = [make_nuclei_mosaic(h, w, tile, 30 + k) for k in range(4)]
            batchers = {"before": old.Batcher(samples, old.TrainConfig(), 3, seed=0, scale=0.6),
                        "after": Batcher(samples, TrainConfig(), 3, seed=0, scale=0.6)}
            times: dict = {v: [] for v in batchers}
            for r in range(12):
                for v in (list(batchers) if r % 2 else list(batchers)[::-1]):
                    t0 = time.perf_counter()
                    batchers[v].get_batch(8, "cpu")
                    times[v].append(time.perf_counter() - t0)
            res[name] = {f"{v}_ms": 1000 * statistics.median(t[2:]) for v, t in times.items()}
            res[name]["ratio_after_to_before"] = res[name]["after_ms"] / res[name]["before_ms"]
            print(name, res[name], flush=True)
        res["load_average_end"] = os.getloadavg()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_result(args.batches_name, {"summary": res})


def _brush_bytes_only(a: str, b: str) -> int | None:
    """How many regions of two items' JSON texts differ, when every one that does is a brush region whose RLE
    decodes to the same mask (a revision before this stop wrote a long run's short last chunk a byte shorter
    than mask2rle); None when anything else differs."""
    from label_studio_sdk.converter.brush import decode_rle

    x, y = json.loads(a), json.loads(b)
    if {k: v for k, v in x.items() if k != "result"} != {k: v for k, v in y.items() if k != "result"} \
            or len(x["result"]) != len(y["result"]):
        return None
    n = 0
    for r, q in zip(x["result"], y["result"]):
        if r == q:
            continue
        rv, qv = r.get("value", {}), q.get("value", {})
        if r.get("type") != "brushlabels" or {**r, "value": None} != {**q, "value": None} \
                or {**rv, "rle": None} != {**qv, "rle": None} \
                or not np.array_equal(decode_rle(rv["rle"]), decode_rle(qv["rle"])):
            return None
        n += 1
    return n


def _finish_variant(ckpt: Path, tree: Path | None):
    """A function (image, index) -> ({stage: CPU s}, regions, the JSON text of the task's item) for the
    Predictor and backend of `tree` (None: the current code), stages "finish", "regions", "json", "total"."""
    import importlib

    from bench.speed import CONFIG

    pkg = "tessera" if tree is None else "before_tessera"
    pred = predictor_class(tree).from_checkpoint(ckpt, device="cpu", trace=True)
    preds = importlib.import_module(f"{pkg}.backend.predictions")
    config = importlib.import_module(f"{pkg}.backend.label_config").parse_label_config(CONFIG)
    served = preds.Served("bench", pred)

    def run(image, i: int):
        finish = pred.predict_parts([image])[0]        # the network pass, untimed
        laps = Laps()
        p = finish()
        laps.lap("finish")
        item = preds._task_item({"id": i}, [(config.images[0], image, None, p, None)], config, served, pred.label_names)
        laps.lap("regions")
        text = preds._as_json([item], True)[0]
        laps.lap("json")
        t = {k: laps.t[k + "_cpu"] for k in ("finish", "regions", "json")}
        t["total"] = sum(t.values())
        return t, len(item["result"]), text

    return run


def mosaic_pngs(n: int = 8) -> list[tuple[str, bytes]]:
    """n 520x696 mosaics of procedural nuclei (seeds 11...) as (name, PNG bytes), for an upload to Label Studio."""
    out = []
    for k in range(n):
        img, _ = mosaic(520, 696, 256, seed=11 + k)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "PNG")
        out.append((f"n{k}.png", buf.getvalue()))
    return out


def package_root(tree: Path, dest: Path, name: str = "tessera") -> Path:
    """A PYTHONPATH entry under which package `name`'s backend and model are tree/backend and tree/model
    (symlinks). Since the install became `tessera.backend`/`tessera.model`, a checkout's own folders on
    PYTHONPATH no longer shadow the installed package: this is how a server or an import gets a tree's code."""
    pkg = dest / name
    pkg.mkdir(parents=True, exist_ok=True)
    for part in ("backend", "model"):
        link = pkg / part
        if not link.exists():
            link.symlink_to(tree.resolve() / part, target_is_directory=True)
    return dest


def predictor_class(tree: Path | None):
    """tessera.model.inference.Predictor, or (tree given) the Predictor of tree/model/ imported as the
    package `before_tessera.model`, so both revisions run in one process, alternating call by call, each
    with its own helpers (vqvae, data, postprocess, ...)."""
    import importlib

    from tessera.model.inference import Predictor

    if tree is None:
        return Predictor
    root = package_root(tree, tree.parent / "before_pkg", "before_tessera")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module("before_tessera.model.inference").Predictor


def region_encoder(tree: Path | None):
    """instances_to_results of the current code, or of tree/backend/regions.py (imported as
    before_tessera.backend.regions; predictor_class(tree) put it on sys.path)."""
    import importlib

    if tree is None:
        from tessera.backend.regions import instances_to_results

        return instances_to_results
    return importlib.import_module("before_tessera.backend.regions").instances_to_results


def breakdown(ckpt: Path, media: Path, trees: dict, reps: int) -> dict:
    """Median ms per stage, image and variant ({variant: source tree, None = the current code}); within each
    repetition every image goes through every variant in turn, so load drifts hit both alike."""
    preds = {v: predictor_class(tree).from_checkpoint(ckpt, device="cpu") for v, tree in trees.items()}
    encoders = {v: region_encoder(tree) for v, tree in trees.items()}
    pngs = {name: (media / f"{name}.png").read_bytes() for name in SIZES}
    runs: dict = {name: {v: [] for v in preds} for name in SIZES}
    for r in range(reps + 1):
        for name, png in pngs.items():
            for v, pred in preds.items():
                t = stage_times(pred, png, encoders[v])
                if r:                                                  # the first round warms up
                    runs[name][v].append(t)
    out: dict = {}
    for name in SIZES:
        out[name] = {v: {k: statistics.median(x[k] for x in rs) * (1 if k == "n_regions" else 1000)
                         for k in rs[0]} for v, rs in runs[name].items()}
        print(name, json.dumps({v: {k: round(x, 1) for k, x in d.items()} for v, d in out[name].items()}),
              flush=True)
    return out


def before_tree(rev: str, dest: Path) -> Path:
    """backend/ and model/ of git revision `rev`, unpacked into dest (nothing of the repo is touched)."""
    data = subprocess.run(["git", "archive", rev, "backend", "model"], cwd=REPO, capture_output=True,
                          check=True).stdout
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def importable_before_tree(rev: str, dest: Path) -> Path:
    """before_tree, its modules importing each other as `before_tessera.*` (not the current tessera)."""
    tree = before_tree(rev, dest)
    for f in list(tree.rglob("*.py")):
        f.write_text(f.read_text().replace("from tessera.", "from before_tessera."))
    return tree


def before_module(rev: str, work: Path, name: str):
    """Module `name` (e.g. "model.train_vqvae") of git revision `rev`, imported as before_tessera.<name> beside
    the current code (unpacked under work/)."""
    import importlib

    tree = importable_before_tree(rev, work / "before")
    root = package_root(tree, work / "before_pkg", "before_tessera")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module(f"before_tessera.{name}")


def peak_rss_mb(pid: int) -> float:
    """Peak resident memory of a process (VmHWM), MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss(pid: int) -> None:
    """Start a process's peak resident memory (VmHWM) again from its current RSS (proc(5), clear_refs 5). Until
    stop 43 the 64-task request's "peak RSS growth" was the peak since the server started, so on float32 hosts
    it was the 2048 px requests' (~2 GB for 4 images) before it."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def http_per_task(url: str, base: str, name: str, batch: int, reps: int, tag: str, warmup: int = 1,
                  pid: int | None = None, cpu: list | None = None) -> list[float]:
    """ms per task of `reps` /predict requests of `batch` tasks of image `name` (fresh URLs: no cache), after
    `warmup` untimed ones; with `pid` and `cpu`, the server's CPU ms per task of each is appended to `cpu`."""
    from bench.speed import CONFIG

    s = requests.Session()
    s.post(url + "/setup", json={"project": "1.0", "schema": CONFIG}, timeout=30)
    out = []
    for r in range(reps + warmup):
        tasks = [{"id": i, "data": {"image": f"{base}/{name}.png?{tag}={r}-{i}"}} for i in range(batch)]
        c0 = cpu_seconds(pid) if pid else 0.0
        t0 = time.perf_counter()
        res = s.post(url + "/predict", json={"project": "1.0", "label_config": CONFIG, "tasks": tasks}, timeout=600)
        res.raise_for_status()
        ms = (time.perf_counter() - t0) * 1000 / batch               # until the whole answer is here
        if pid and cpu is not None and r >= warmup:
            cpu.append((cpu_seconds(pid) - c0) * 1000 / batch)
        results = res.json()["results"]                               # (parsed once, outside the timing)
        assert len(results) == batch and all(x["result"] for x in results)
        if r >= warmup:
            out.append(ms)
    return out


def http_runs(work: Path, base: str, before_path: Path | None, args) -> dict:
    """Per-task latency over HTTP for the current code and (when given) the `before` code, same model store."""
    from tests.conftest import TesseraProcess

    plan = [("256", 16, args.reps), ("520x696", 16, args.reps), ("2048", 4, max(1, args.reps // 2))]
    env = {"MODEL_DIR": str(work / "models"), "TESSERA_LOG_LEVEL": "WARNING", "TESSERA_ALLOWED_HOSTS": "127.0.0.1",
           "OMP_NUM_THREADS": str(args.threads), "OMP_WAIT_POLICY": "PASSIVE", "TESSERA_PREDICT_BATCH": "16",
           "TESSERA_PREDICT_DEADLINE_S": "0"}       # the --big request whole in its reply (stop 47's deadline off)
    roots = {"after": package_root(REPO, work / "pp-after")}
    if before_path is not None:
        roots["before"] = package_root(before_path, work / "pp-before")
    servers = {v: TesseraProcess({**env, "PYTHONPATH": str(root)}, work / f"{v}.log").wait_up()
               for v, root in roots.items()}
    out: dict = {v: {} for v in servers}
    try:
        for name, batch, reps in plan:
            ms: dict = {v: [] for v in servers}
            cpu: dict = {v: [] for v in servers}
            for variant, proc in servers.items():
                http_per_task(proc.url, base, name, batch, 0, f"warm{variant}")
            for r in range(reps):                          # request by request in turn: load drifts hit both
                for variant, proc in (servers.items() if r % 2 == 0 else list(servers.items())[::-1]):
                    ms[variant] += http_per_task(proc.url, base, name, batch, 1, f"{variant}{r}", warmup=0,
                                                 pid=proc.proc.pid, cpu=cpu[variant])
            for variant in servers:
                out[variant][f"http_{name}_batch{batch}_ms_per_task_p50"] = float(np.median(ms[variant]))
                out[variant][f"http_{name}_batch{batch}_ms_per_task_all"] = ms[variant]
                out[variant][f"http_{name}_batch{batch}_server_cpu_ms_per_task_p50"] = float(np.median(cpu[variant]))
                out[variant][f"http_{name}_batch{batch}_server_cpu_ms_per_task_all"] = cpu[variant]
                print(variant, name, f"{np.median(ms[variant]):.0f} ms/task, server CPU "
                      f"{np.median(cpu[variant]):.0f} ms/task", flush=True)
        big = args.big
        from bench.speed import CONFIG

        for p in servers.values():                         # the peak from here: not the 2048 px requests' above
            reset_peak_rss(p.proc.pid)
        rss0 = {v: rss_mb(p.proc.pid) for v, p in servers.items()}
        order = list(servers)
        for rnd in range(2):                               # twice, the order swapped: load drifts hit both
            for variant in (order if rnd == 0 else order[::-1]):
                proc = servers[variant]
                tasks = [{"id": i, "data": {"image": f"{base}/520x696.png?big{variant}{rnd}={i}"}} for i in range(big)]
                c0 = cpu_seconds(proc.proc.pid)
                t0 = time.perf_counter()
                r = requests.post(proc.url + "/predict", json={"project": "1.0", "label_config": CONFIG,
                                                               "tasks": tasks}, timeout=1200)
                r.raise_for_status()
                took = time.perf_counter() - t0
                out[variant].setdefault(f"http_{big}_tasks_520x696_one_request_s_all", []).append(took)
                out[variant].setdefault(f"http_{big}_tasks_520x696_server_cpu_s_all", []).append(
                    cpu_seconds(proc.proc.pid) - c0)
                results = r.json()["results"]
                out[variant][f"http_{big}_tasks_all_answered"] = len(results) == big and all(
                    isinstance(x, dict) for x in results)        # [] = left for after the reply
        for variant, proc in servers.items():
            out[variant][f"http_{big}_tasks_520x696_one_request_s"] = float(
                np.mean(out[variant][f"http_{big}_tasks_520x696_one_request_s_all"]))
            out[variant][f"http_{big}_tasks_520x696_server_cpu_s"] = float(
                np.mean(out[variant][f"http_{big}_tasks_520x696_server_cpu_s_all"]))
            out[variant][f"http_{big}_tasks_peak_rss_growth_mb"] = peak_rss_mb(proc.proc.pid) - rss0[variant]
            print(variant, big, "tasks", json.dumps({k: v for k, v in out[variant].items() if str(big) in k}),
                  flush=True)
    finally:
        for proc in servers.values():
            proc.stop()
    return out


def main(args) -> None:
    import shutil
    import tempfile

    import torch

    from bench.common import write_result
    from bench.speed import bench_model, serve_dir
    from tessera.model.data import make_nuclei
    from tessera.model.inference import Predictor

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="tessera-speed-native-"))
    try:
        ckpt = bench_model(work)
        after = Predictor.from_checkpoint(ckpt, device="cpu")
        media = work / "media"
        media.mkdir()
        objects = {}
        for name, (h, w) in SIZES.items():
            if name == "256":
                s = make_nuclei(1, size=256, seed=3)[0]
                img, objects[name] = s.image, int(s.instances.max())
            else:
                img, objects[name] = mosaic(h, w, 256 if h < 1024 else 512, seed=11)
            Image.fromarray(img).save(media / f"{name}.png")
        print("objects per image", objects, "scale", after.scale, flush=True)
        res = {"threads": args.threads, "scale": after.scale, "tile": after.tile, "objects_per_image": objects,
               "load_average_start": os.getloadavg()}
        before_path = None if args.before == "none" else before_tree(args.before, work / "before")
        trees = {"after": None, **({"before": before_path} if before_path else {})}
        res["stages_ms"] = breakdown(ckpt, media, trees, args.reps)
        srv, base = serve_dir(media)
        try:
            res["http"] = http_runs(work, base, before_path, args)
        finally:
            srv.shutdown()
        res["load_average_end"] = os.getloadavg()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    h = res["http"]
    summary = {f"{v}_{k}": x for v in h for k, x in h[v].items() if not k.endswith("_all")}
    for v in h:
        summary[f"{v}_ratio_520x696_to_256"] = h[v]["http_520x696_batch16_ms_per_task_p50"] / \
            h[v]["http_256_batch16_ms_per_task_p50"]
    write_result("speed_native", {"summary": summary, **res, "before_rev": args.before, "targets": {
        "http_520x696_batch16_ms_per_task_p50": "<= 60", "http_2048_ms_per_task_p50": "<= 400",
        "ratio_520x696_to_256": "<= 2", "http_1000_tasks_520x696_one_request_s": "<= 60",
        "peak_rss_growth_mb": "< 1500"}})


def cpu_seconds(root: int) -> float:
    """User + system CPU seconds of process `root` and every live process below it (from /proc)."""
    return sum(proc_counters(root)[:2])


def proc_counters(root: int) -> tuple[float, float, int]:
    """(user s, system s, minor page faults) of process `root` and every live process below it (from /proc).
    System time is mostly page faults here: the kernel zeroing pages that malloc took back from the OS."""
    tick = os.sysconf("SC_CLK_TCK")
    stats: dict[int, tuple] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # ppid, utime, stime, minflt (proc(5): fields 4, 14, 15, 10, counted from 1 with pid and comm)
        stats[int(d.name)] = (int(fields[1]), int(fields[11]) / tick, int(fields[12]) / tick, int(fields[7]))
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        kids = [pid for pid, st in stats.items() if st[0] == parent and pid not in tree]
        tree.update(kids)
        frontier += kids
    rows = [stats[pid] for pid in tree if pid in stats]
    return sum(r[1] for r in rows), sum(r[2] for r in rows), sum(r[3] for r in rows)


def started_ls(prefix: str):
    """(a scratch folder, a real Label Studio started in it from the test fixture's venv and data-dir template)
    for the benchmarks that talk to one; the caller stops it and removes the folder."""
    import tempfile

    from tessera.backend.lsserver import LabelStudioServer, build_template, default_ls_venv, default_template_dir

    work = Path(tempfile.mkdtemp(prefix=prefix))
    venv = default_ls_venv()
    server = LabelStudioServer(venv, work / "ls-data", template=build_template(venv, default_template_dir()))
    server.start(timeout=180)
    return work, server


def ls_big_request(args) -> None:
    """One /predict of `args.ls_tasks` 520x696 tasks whose images Tessera downloads from a real Label Studio
    (tests/conftest_ls's server: the LS venv and data-dir template), as "Retrieve predictions" sends them:
    wall time, Tessera's peak RSS growth, the CPU seconds Tessera and Label Studio spent on it, and Tessera's
    own per-stage seconds (its "predict:" log line). With --before REV (not 'none'), REV's backend is a second
    server on the same Label Studio and model store; the two alternate request by request, `--ls-rounds`
    rounds, the order swapped every round. 8 distinct uploads, each task names one of them (no cache on
    /predict: every task is one download). With --ls-arch KEY=VALUE..., both servers run the current code,
    "before" on the default model and "after" on one trained with those TrainConfig fields (each its own
    model store). Writes bench/results/speed_native_ls.json."""
    import shutil

    from bench.common import train_overrides, write_result
    from bench.speed import CONFIG, bench_model
    from tessera.backend import lsclient
    from tests.conftest import TesseraProcess

    work, server = started_ls("tessera-speed-ls-")
    procs: dict = {}
    runs: dict = {}
    try:
        bench_model(work)
        arch = train_overrides(args.ls_arch) if args.ls_arch else None
        if arch:
            bench_model(work, arch, models="models-after")
        pngs = mosaic_pngs()
        ls = server.client(timeout=300)
        pid = ls.projects.create(title="speed", label_config=CONFIG).id
        urls = lsclient.upload_files(ls, pid, pngs)
        lsclient.import_tasks(ls, pid, [{"data": {"image": urls[i % 8]}} for i in range(args.ls_tasks)])
        tasks = list(lsclient.tasks(ls, pid))
        env = {"MODEL_DIR": str(work / "models"), "LABEL_STUDIO_URL": server.url,
               "LABEL_STUDIO_API_KEY": server.token, "TESSERA_LOG_LEVEL": "INFO",
               "OMP_NUM_THREADS": str(args.threads), "OMP_WAIT_POLICY": "PASSIVE",
               # the whole request in the reply, as the target counts it: since stop 47 /predict answers what
               # fits in TESSERA_PREDICT_DEADLINE_S and writes the rest after (bench.retrieve_deadline measures
               # that path); --ls-env TESSERA_PREDICT_DEADLINE_S=60 times the default
               "TESSERA_PREDICT_DEADLINE_S": "0"}
        trees = {"after": REPO}
        if arch:
            trees["before"] = REPO
        elif args.before != "none":
            trees["before"] = before_tree(args.before, work / "before")
        body = {"tasks": tasks, "project": f"{pid}.1", "label_config": CONFIG}
        for v, tree in trees.items():
            extra = dict(kv.split("=", 1) for kv in args.ls_env) if v == "after" else {}
            if arch and v == "after":
                extra["MODEL_DIR"] = str(work / "models-after")
            procs[v] = TesseraProcess({**env, **extra, "PYTHONPATH": str(package_root(tree, work / f"pp-{v}"))},
                                      work / f"tessera-{v}.log").wait_up()
            requests.post(procs[v].url + "/predict", json={**body, "tasks": tasks[:2]}, timeout=300).raise_for_status()
        rss0 = {v: rss_mb(p.proc.pid) for v, p in procs.items()}
        order = list(procs)
        for rnd in range(args.ls_rounds):
            for v in (order if rnd % 2 == 0 else order[::-1]):
                runs.setdefault(v, []).append(_ls_request(procs[v], server, body))
                print(v, json.dumps(runs[v][-1]), flush=True)
        res = {"tasks": len(tasks), "threads": args.threads, "env": args.ls_env,
               "before_rev": "the current code, default model" if arch else args.before, "after_arch": arch}
        for v, rs in runs.items():
            res[v] = {"wall_s": float(np.mean([r["wall_s"] for r in rs])), "runs": rs,
                      "per_task_ms": 1000 * float(np.mean([r["wall_s"] for r in rs])) / len(tasks),
                      "peak_rss_growth_mb": peak_rss_mb(procs[v].proc.pid) - rss0[v],
                      "stage_log": [ln.split("predict: ", 1)[1] for ln in procs[v].log_text().splitlines()
                                    if "predict: " in ln][1:]}
        if "before" in res:
            res["ratio_after_to_before"] = res["after"]["wall_s"] / res["before"]["wall_s"]
    finally:
        for proc in procs.values():
            proc.stop()
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(res, indent=1), flush=True)
    write_result(args.ls_name, {"summary": res, "targets": {"wall_s": "<= 60 for 1,000 tasks",
                                                            "peak_rss_growth_mb": "< 1500"}})


def _ls_counters(proc, server) -> dict:
    user, system, faults = proc_counters(proc.proc.pid)
    return {"tessera_cpu_s": user + system, "tessera_sys_s": system, "tessera_minor_faults": faults,
            "ls_cpu_s": cpu_seconds(server.proc.pid)}


def _ls_request(proc, server, body: dict) -> dict:
    """One timed /predict: wall s, CPU s of Tessera and of Label Studio (all its processes), load."""
    load0 = os.getloadavg()
    cpu0 = _ls_counters(proc, server)
    t0 = time.perf_counter()
    r = requests.post(proc.url + "/predict", json=body, timeout=3600)
    wall = time.perf_counter() - t0
    r.raise_for_status()
    cpu = _ls_counters(proc, server)
    results = r.json()["results"]
    return {"wall_s": wall, **{k: round(cpu[k] - cpu0[k], 2) for k in cpu}, "load_average_start": load0,
            "load_average_end": os.getloadavg(),
            "answered_with_regions": sum(1 for x in results if isinstance(x, dict) and x["result"]),
            "answered_later": sum(1 for x in results if x == [])}     # past the deadline: written after the reply
