"""Mask GAN benchmarks (issue #4): are generated images useful, are their labels right, is it fast.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python -m bench.gan [--quick] [--iters 300] [--gan-budget 120]

1. Usefulness on dsb2018 (fixed split by id hash, 20 % val, the first --max-val val images): for
   N real training images, the label model is trained with EQUAL iterations on
     real_only    N real, augmentation OFF (no flips / rot90 / zoom / intensity jitter)
     classic      N real, augmentation ON (TrainConfig's defaults: flips, rot90, zoom 0.8-1.25, jitter 0.2)
     gan          N real + M generated, augmentation OFF
     gan_classic  N real + M generated, augmentation ON
   (every arm keeps the random 96 px training crop). The GAN is trained on the same N real images only;
   its layouts come from LayoutSampler over the N real layouts; 3M are rendered and the M with the
   highest self-consistency IoU (>= --min-iou) under the `classic` model (the best model the N real images
   give) are kept. Real samples are repeated so that about half of each batch is real.
2. Label fidelity: IoU between layouts and a judge label model's prediction on generated images
   (unfiltered), against the same judge's IoU on real validation images. The judge is trained on ALL
   training images (augmentation ON, same iterations).
3. Speed: generated images/s at R=128 (batch 32) at 1 and 2 torch threads, and synthetic tasks/s into a
   real Label Studio (backend.synthetic_tasks.generate_into_project, end to end).
Writes bench/results/gan.json and bench/results/gan_grid.png (layout | generated | re-segmentation).
4. Realism (--realism, issue #12): a small real-vs-fake CNN's test accuracy and KID on the label model's encoder
   features, for generated and for edited images, against the KID between two sets of real images; the grid
   bench/results/gan_realism_grid.png (real | generated | edited). Goes into gan.json under "realism_part".
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import RESULTS, dataset, fixed_split, write_result
from tessera.model.data import Sample, load_folder, split_ids
from tessera.model.inference import Predictor
from tessera.model.layouts import LayoutSampler, fit_short_side
from tessera.model.metrics import mean_iou
from tessera.model.synthesizer import Synthesizer
from tessera.model.train_maskgan import GANTrainConfig, train as train_gan
from tessera.model.train_vqvae import TrainConfig, evaluate, train as train_label

AUG_OFF = dict(flips=False, rot90=False, scale_min=1.0, scale_max=1.0, jitter=0.0)
AUG_ON = {}  # TrainConfig defaults: flips, rot90, scale 0.8-1.25, jitter 0.2
LS_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="mask" toName="image"><Label value="Nucleus"/></BrushLabels>
  <PolygonLabels name="poly" toName="image"><Label value="Nucleus"/></PolygonLabels>
  <RectangleLabels name="bbox" toName="image"><Label value="Nucleus"/></RectangleLabels>
</View>"""


def log(msg: str, t0: list[float] = [time.time()]) -> None:  # noqa: B006 (start time of the run)
    print(f"[{time.time() - t0[0]:6.0f}s] {msg}", flush=True)


def load1() -> float:
    return os.getloadavg()[0]


# ----------------------------------------------------------------------------------------------- label model

def fit_label(train: list[Sample], names: list[str], iters: int, aug: dict, out: Path, threads: int,
              seed: int = 0) -> tuple[Path, float]:
    cfg = TrainConfig(max_iters=iters, eval_interval=10 * iters, log_interval=10 * iters, seed=seed,
                      device="cpu", threads=threads, **aug)
    t0 = time.time()
    ckpt = train_label(cfg, train, [], names, out)  # no selection on val: val is only for the final score
    return ckpt, time.time() - t0


def score(ckpt: Path, val: list[Sample]) -> dict:
    m = evaluate(Predictor.from_checkpoint(ckpt, device="cpu"), val)
    return {k: m[k] for k in ("fg_iou", "fg_iou_pooled", "instance_f1", "instance_ap")}


# ------------------------------------------------------------------------------------------------ generation

def fit_gan(train: list[Sample], names: list[str], budget_s: float, out: Path, threads: int) -> tuple[Path, dict]:
    cfg = GANTrainConfig(max_iters=1_000_000, time_budget_s=budget_s, device="cpu", threads=threads,
                         log_interval=10 ** 9)
    t0 = time.time()
    ckpt = train_gan(cfg, train, names, out)
    iters = int(torch.load(ckpt, map_location="cpu", weights_only=True)["iter_num"])
    return ckpt, {"iters": iters, "train_s": round(time.time() - t0, 1), "budget_s": budget_s,
                  "batch_size": cfg.batch_size}


def generated_set(synth: Synthesizer, sampler: LayoutSampler, judge: Predictor, m: int, oversample: int,
                  min_iou: float, seed: int) -> tuple[list[Sample], dict]:
    """Render oversample*m layouts, keep the (up to) m best that pass the self-consistency filter."""
    layouts = sampler.sample(oversample * m, seed=seed)
    t0 = time.time()
    images = synth.render(layouts, seed=seed)
    checks = synth.self_consistency(images, layouts, judge, threshold=min_iou)
    order = sorted(range(len(layouts)), key=lambda i: -checks[i][1])
    keep = [i for i in order if checks[i][0]][:m]
    samples = [Sample(images[i], layouts[i].classes, layouts[i].instances, id=f"gen{seed}_{i}", synthetic=True)
               for i in keep]
    ious = [c[1] for c in checks]
    return samples, {"rendered": len(layouts), "passed": int(sum(c[0] for c in checks)), "kept": len(keep),
                     "mean_iou_all": float(np.mean(ious)), "mean_iou_kept": float(np.mean([ious[i] for i in keep]))
                     if keep else 0.0, "min_iou": min_iou, "seconds": round(time.time() - t0, 1)}


def fidelity(synth: Synthesizer, sampler: LayoutSampler, judge: Predictor, n: int, seed: int):
    """Self-consistency IoU of unfiltered generated images under the judge: (mean, per image, layouts, images)."""
    layouts = sampler.sample(n, seed=seed)
    images = synth.render(layouts, seed=seed)
    checks = synth.self_consistency(images, layouts, judge, threshold=0.0)
    ious = [c[1] for c in checks]
    return float(np.mean(ious)), ious, layouts, images


def real_crops_iou(judge: Predictor, val: list[Sample], R: int, rng: np.random.Generator) -> float:
    """The judge's IoU on real val images cut the way generated images are framed: short side resized to R,
    a random R x R crop (so pixel scale and size match the generated images)."""
    images, truths = [], []
    for s in val:
        img = fit_short_side(s.image, R, nearest=False)
        cl = fit_short_side(s.classes.astype(np.int32), R, nearest=True)
        y, x = int(rng.integers(0, cl.shape[0] - R + 1)), int(rng.integers(0, cl.shape[1] - R + 1))
        images.append(np.ascontiguousarray(img[y:y + R, x:x + R]))
        truths.append(cl[y:y + R, x:x + R])
    preds = []
    for i in range(0, len(images), 16):
        preds += judge.predict(images[i:i + 16])
    return float(np.mean([mean_iou(p.classes, t, judge.n_classes) for p, t in zip(preds, truths)]))


def render_speed(synth: Synthesizer, sampler: LayoutSampler, threads: int, n_batches: int) -> dict:
    torch.set_num_threads(threads)
    layouts = sampler.sample(32 * (n_batches + 1), seed=99)
    synth.render(layouts[:32], seed=0)  # warm-up (oneDNN primitive cache)
    load = load1()
    t0, c0 = time.time(), time.process_time()
    synth.render(layouts[32:], seed=1, batch_size=32)
    dt, cpu = time.time() - t0, time.process_time() - c0
    # images per CPU second (this process's, all threads): less sensitive to other processes than wall time
    return {"threads": threads, "images": 32 * n_batches, "seconds": round(dt, 2),
            "images_per_s": 32 * n_batches / dt, "images_per_cpu_s": 32 * n_batches / cpu,
            "load1_before": round(load, 2)}


# ------------------------------------------------------------------------------------------------ grid PNG

def _colour(instances: np.ndarray) -> np.ndarray:
    palette = np.random.default_rng(3).integers(60, 256, (int(instances.max()) + 1, 3)).astype(np.uint8)
    palette[0] = 0
    return palette[instances]


def save_grid(rows, path: Path) -> None:
    """rows: (layout, image, prediction, iou); columns layout | generated | re-segmentation."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 3, figsize=(4.2, 1.45 * len(rows)), dpi=100)
    for r, (lay, img, pred, iou) in enumerate(rows):
        for c, (pic, title) in enumerate(((_colour(lay.instances), "layout"), (img, "generated"),
                                          (_colour(pred.instances), f"label model, IoU {iou:.2f}"))):
            ax = axes[r, c]
            ax.imshow(pic, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0 or c == 2:
                ax.set_title(title, fontsize=6.5, pad=2)
    fig.tight_layout(pad=0.3, h_pad=0.4, w_pad=0.2)
    fig.savefig(path)
    plt.close(fig)


# ------------------------------------------------------------------------------------------- Label Studio

def ls_project(ls, api, real: list[Sample], names: list[str], label_ckpt: Path, gan_ckpt: Path, work: Path,
               min_iou: float, title: str = "tessera gan bench"):
    """A project in the running LS `ls` (LS_CONFIG: brush + polygon + box) with the `real` images as tasks
    annotated with brush labels, and the label model and GAN checkpoints promoted in its registry under
    work/models -> (project id, the backend's Settings for it)."""
    from PIL import Image

    from tessera.backend import lsclient
    from tessera.backend.label_config import Control
    from tessera.backend.regions import instances_to_results
    from tessera.backend.settings import Settings
    from tessera.backend.store import Store

    pid = api.projects.create(title=title, label_config=LS_CONFIG).id
    pngs = []
    for s in real:
        buf = io.BytesIO()
        Image.fromarray(s.image).save(buf, "PNG")
        pngs.append((f"{s.id}.png", buf.getvalue()))
    ids = lsclient.upload_images(api, pid, pngs)
    brush = Control("brushlabels", "mask", "image", ("Nucleus",))
    for tid, s in zip(ids, real):
        k = [int(i) for i in np.unique(s.instances) if i]
        api.annotations.create(tid, result=instances_to_results(s.instances, {i: "Nucleus" for i in k}, {}, brush))
    settings = Settings(label_studio_url=ls.url, label_studio_api_key=ls.token, model_dir=work / "models",
                        device="cpu", synth_min_iou=min_iou)
    reg = Store(settings.model_dir).registry(str(pid))
    for ckpt, kind in ((label_ckpt, "label"), (gan_ckpt, "gan")):
        copy = work / f"{kind}_for_ls.pt"
        shutil.copy(ckpt, copy)  # add() moves the file into the store
        reg.add(copy, {"label_names": list(names)}, promote=True, kind=kind)
    return pid, settings


def ls_throughput(label_ckpt: Path, gan_ckpt: Path, real: list[Sample], names: list[str], count: int,
                  min_iou: float, work: Path, kinds: tuple[str, ...] = ("generated",)) -> dict:
    """Real LS server: project with brush+polygon+box, the `real` tasks annotated, then generate `count`
    tasks of each kind (one project per kind); -> {kind: measurements}."""
    from tessera.backend.lsserver import LabelStudioServer, build_template
    from tessera.backend import lsclient
    from tessera.backend.synthetic_tasks import generate_into_project

    t0 = time.time()
    template = build_template()
    with LabelStudioServer(data_dir=work / "ls-data", template=template) as ls:
        api = ls.client()
        start_s = time.time() - t0
        pid, settings = ls_project(ls, api, real, names, label_ckpt, gan_ckpt, work, min_iou)
        res = {}
        for kind in kinds:
            before = {t["id"] for t in lsclient.tasks(api, pid)}
            t1 = time.time()
            out = generate_into_project(settings, str(pid), count=count, seed=7, kind=kind)
            dt = time.time() - t1
            synthetic = [t for t in lsclient.tasks(api, pid) if t["id"] not in before and (t.get("meta") or {}).get("synthetic")]
            n_pred = sum(len(t.get("predictions") or []) for t in synthetic)
            res[kind] = {"requested": count, "created": len(out["created"]), "failed": out["failed"],
                         "seconds": round(dt, 2), "make_seconds": out.get("make_seconds"),
                         "tasks_per_s": len(out["created"]) / dt, "synthetic_tasks_in_ls": len(synthetic),
                         "predictions_in_ls": n_pred, "threshold": settings.synth_min_iou,
                         "ls_start_s": round(start_s, 1), "torch_threads": torch.get_num_threads(),
                         "load1": round(load1(), 2),
                         "region_types": sorted({r["type"] for t in synthetic for p in (t.get("predictions") or [])
                                                 for r in p["result"]})}
        api.close()
    return res


# -------------------------------------------------------------------- quality, speed, LS (issue #12 parts)

def fit_gan_iters(train: list[Sample], names: list[str], iters: int, out: Path, threads: int,
                  **model) -> tuple[Path, dict]:
    cfg = GANTrainConfig(max_iters=iters, device="cpu", threads=threads, log_interval=10 ** 9, **model)
    t0 = time.time()
    ckpt = train_gan(cfg, train, names, out)
    return ckpt, {"iters": iters, "train_s": round(time.time() - t0, 1), "batch_size": cfg.batch_size, **model}


def centre_crop(s: Sample, R: int) -> Sample:
    """Short side to R, centre R x R crop: the framing generated images have."""
    img = fit_short_side(s.image, R, nearest=False)
    cl = fit_short_side(s.classes.astype(np.int32), R, nearest=True)
    ins = fit_short_side(s.instances.astype(np.int32), R, nearest=True)
    y, x = (cl.shape[0] - R) // 2, (cl.shape[1] - R) // 2
    return Sample(np.ascontiguousarray(img[y:y + R, x:x + R]), cl[y:y + R, x:x + R], ins[y:y + R, x:x + R], id=s.id)


def save_compare_grid(rows: list[list[np.ndarray]], titles: list[str], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), len(titles), figsize=(1.45 * len(titles), 1.5 * len(rows)), dpi=200)
    for r, row in enumerate(rows):
        for c, pic in enumerate(row):
            axes[r, c].imshow(pic, interpolation="nearest")
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
            if r == 0:
                axes[r, c].set_title(titles[c], fontsize=6.5, pad=2)
    fig.tight_layout(pad=0.3, h_pad=0.3, w_pad=0.2)
    fig.savefig(path)
    plt.close(fig)


def synthetic_parts(args, threads: int) -> None:
    """The image-quality grid (real | layout | GAN before/after the quality fixes at equal iterations | edited),
    render speed and synthetic tasks/s into a real Label Studio for both kinds, without the (20 min)
    usefulness study; the previous usefulness figures are carried over, marked as such."""
    from tessera.model.edit import Editor

    t_start, work = time.time(), Path(tempfile.mkdtemp(prefix="tessera-bench-gan-"))
    samples, names = load_folder(dataset("dsb2018"))
    train_ids, _ = split_ids([s.id for s in samples], 0.2)
    by_id = {s.id: s for s in samples}
    real = [by_id[i] for i in train_ids][:args.sizes[0]]
    log(f"dsb2018: {len(real)} real training images; GAN {args.gan_iters} iters per variant; load {load1():.1f}")
    gans = {}
    for name, model in (("before", dict(upsample="nearest", grey_flag=False)),
                        ("after", dict(upsample="bilinear", grey_flag=True))):
        gans[name] = fit_gan_iters(real, names, args.gan_iters, work / f"gan_{name}.pt", threads, **model)
        log(f"GAN {name}: {gans[name][1]}")
    label_ckpt, label_t = fit_label(real, names, args.iters, AUG_ON, work / "label.pt", threads)
    crops = [centre_crop(s, 128) for s in real]
    rows_src = [c for c in crops if c.instances.any()][:6]
    rendered = {k: Synthesizer.from_checkpoint(c, device="cpu").render(rows_src, seed=11) for k, (c, _) in gans.items()}
    edits = Editor(crops, len(names), max_objects=4).edit(len(rows_src), seed=5)
    rows = [[s.image, _colour(s.instances), rendered["before"][i], rendered["after"][i], edits[i].sample.image,
             _colour(edits[i].sample.instances)] for i, s in enumerate(rows_src)]
    grid_path = RESULTS / ("gan_grid_quick.png" if args.quick else "gan_grid.png")
    save_compare_grid(rows, ["real", "its layout", "GAN before (nearest, RGB)", "GAN after (bilinear, grey flag)",
                             "edited (real + pasted)", "edited: exact labels"], grid_path)
    log(f"wrote {grid_path} ({grid_path.stat().st_size // 1024} KB)")
    speed = {}
    for k, (c, _) in gans.items():
        synth = Synthesizer.from_checkpoint(c, device="cpu")
        speed[k] = [render_speed(synth, LayoutSampler(real, resolution=128), t, 2 if args.quick else 4) for t in (1, 2)]
    torch.set_num_threads(threads)
    log("render: " + "; ".join(f"{k} " + ", ".join(f"{s['images_per_s']:.1f} img/s at {s['threads']} threads"
                                                  for s in v) for k, v in speed.items()))
    ls = ls_throughput(label_ckpt, gans["after"][0], real[:4], names, args.ls_count, args.ls_min_iou, work,
                       kinds=("edited", "generated"))
    log("Label Studio: " + ", ".join(f"{k} {v['created']} tasks at {v['tasks_per_s']:.1f}/s" for k, v in ls.items()))
    previous = json.loads((RESULTS / "gan.json").read_text()) if (RESULTS / "gan.json").exists() else {}
    if "previous_usefulness" in previous:
        previous = previous["previous_usefulness"]
    summary = {f"gen_images_per_s_{k}_{s['threads']}threads": s["images_per_s"] for k, v in speed.items() for s in v}
    summary.update({f"ls_{k}_tasks_per_s": v["tasks_per_s"] for k, v in ls.items()})
    summary.update({f"ls_{k}_tasks_created": v["created"] for k, v in ls.items()})
    summary["wall_s"] = round(time.time() - t_start, 1)
    write_result("gan_quick" if args.quick else "gan", {
        "parts": "grid, speed, label_studio (usefulness not rerun: see previous_usefulness and rare_label.json)",
        "summary": summary, "gan_training": {k: v[1] for k, v in gans.items()}, "render_speed": speed,
        "label_studio": ls, "label_model": {"iters": args.iters, "train_s": round(label_t, 1)},
        "setup": {"dataset": "dsb2018", "n_real": len(real), "gan_iters": args.gan_iters, "torch_threads": threads,
                  "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""), "ls_count": args.ls_count,
                  "ls_min_iou": args.ls_min_iou, "grid": "bench/results/gan_grid.png"},
        "targets": {"gen_images_per_s": ">= 100 at R=128 on 2 CPU cores", "ls_tasks_per_s": ">= 10 with predictions"},
        "previous_usefulness": {k: previous.get(k) for k in ("machine", "command", "summary", "usefulness")
                                if k in previous}})
    shutil.rmtree(work, ignore_errors=True)


# ------------------------------------------------------------------------------- realism (issue #12 part 2)

def realism_cnn() -> torch.nn.Module:
    """Small real-vs-fake classifier: four stride-2 convs, global average pool, one logit."""
    nn = torch.nn
    layers, c_in = [], 3
    for c in (16, 32, 64, 64):
        layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.BatchNorm2d(c), nn.ReLU()]
        c_in = c
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, 1))


def _tensor(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images).astype(np.float32) / 255).permute(0, 3, 1, 2)  # (B,H,W,3)->(B,3,H,W)


def classify_real_fake(real_tr, fake_tr, real_te, fake_te, iters: int, seed: int) -> dict:
    """Train realism_cnn on real (label 0) vs fake (label 1) images for `iters` steps of batch 32 (random
    flips and rot90); test accuracy on the held-out pairs (0.5 = indistinguishable)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    x, y = _tensor(real_tr + fake_tr), torch.tensor([0.0] * len(real_tr) + [1.0] * len(fake_tr))
    net, t0 = realism_cnn(), time.time()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(iters):
        idx = torch.from_numpy(rng.integers(0, len(x), 32))
        xb = torch.rot90(x[idx], int(rng.integers(4)), dims=(2, 3))
        xb = xb.flip(3) if rng.random() < 0.5 else xb
        loss = torch.nn.functional.binary_cross_entropy_with_logits(net(xb)[:, 0], y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        logits = torch.cat([net(_tensor(b)) for b in (real_te, fake_te)])[:, 0]
    truth = torch.tensor([0.0] * len(real_te) + [1.0] * len(fake_te))
    acc = float(((logits > 0).float() == truth).float().mean())
    return {"test_accuracy": acc, "n_train": len(x), "n_test": len(truth), "iters": iters, "batch": 32,
            "final_train_loss": loss.item(), "train_s": round(time.time() - t0, 1)}


def encoder_features(predictor: Predictor, images: list[np.ndarray]) -> np.ndarray:
    """(N, D) label-model encoder features: mean and std over space of its deepest feature map (the
    predictor's own normalisation and scale; _run is its forward pass)."""
    out = []
    for i in range(0, len(images), 16):
        _, feats, _, _, _ = predictor._run(images[i:i + 16])
        f = feats[-1]
        f = f.float()  # the predictor may run in bfloat16
        out.append(torch.cat([f.mean(dim=(2, 3)), f.std(dim=(2, 3))], dim=1).numpy())
    return np.concatenate(out).astype(np.float64)


def kid(a: np.ndarray, b: np.ndarray, subsets: int = 50, subset_size: int = 50, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (Binkowski et al. 2018) on given features: unbiased MMD^2 with the cubic
    polynomial kernel (x.y / d + 1)^3, mean and sd over random subsets. Hand-written (20 lines) because
    torchmetrics' KID is tied to Inception features; here the features are the label model's."""
    rng = np.random.default_rng(seed)
    d, m = a.shape[1], min(subset_size, len(a), len(b))
    vals = []
    for _ in range(subsets):
        x, y = a[rng.choice(len(a), m, replace=False)], b[rng.choice(len(b), m, replace=False)]
        kxx, kyy, kxy = ((x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3)
        off = 1 - np.eye(m)
        vals.append((kxx * off).sum() / (m * (m - 1)) + (kyy * off).sum() / (m * (m - 1)) - 2 * kxy.mean())
    return float(np.mean(vals)), float(np.std(vals))


def write_realism(args, part: dict, key: str = "realism_part") -> None:
    """The realism part goes into bench/results/gan.json under "realism_part" (the file's other parts kept),
    its summary keys into the file's summary."""
    import sys
    from bench.common import machine
    path = RESULTS / ("gan_quick.json" if args.quick else "gan.json")
    doc = json.loads(path.read_text()) if path.exists() else {"benchmark": "gan", "summary": {}}
    doc["summary"] = {**doc.get("summary", {}), **part["summary"]}
    doc[key] = {"machine": machine(), "command": " ".join(["python", "-m", "bench.gan"] + sys.argv[1:]),
                           **part}
    path.write_text(json.dumps(doc, indent=1, default=float))
    print(f"wrote {path} ({key})")


def _module_at(rev: str, relpath: str, name: str):
    """A file of the repository (relpath) at git revision `rev`, loaded as module `name` by path: for modules
    that import no project code."""
    import importlib.util
    src = subprocess.run(["git", "show", f"{rev}:{relpath}"], cwd=RESULTS.parents[1], capture_output=True,
                         text=True, check=True).stdout
    path = Path(tempfile.mkdtemp(prefix="tessera-before-")) / f"{name}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _generator_at(rev: str, config, state: dict):
    """The Generator of model/maskgan.py at git revision `rev` (loaded by path: it imports torch alone),
    with the given weights: the 'before' of a speed comparison."""
    mod = _module_at(rev, "model/maskgan.py", "maskgan_before")
    gen = mod.Generator(mod.MaskGANConfig(**{k: getattr(config, k) for k in mod.MaskGANConfig.__dataclass_fields__}))
    gen.load_state_dict(state)
    return gen


def _synth_with_grain_at(rev: str, *args, **kwargs) -> Synthesizer:
    """A Synthesizer whose grain is model/sensor.py's add_grain at `rev`, per image as that revision's
    Synthesizer applied it: the 'before' of a grain speed comparison (--grain-before)."""
    sensor = _module_at(rev, "model/sensor.py", "sensor_before")

    class Before(Synthesizer):
        def add_grain(self, images, seeds):
            return [sensor.add_grain(im, self.grain, s + 0x5EED) for im, s in zip(images, seeds)]

    return Before(*args, **kwargs)


def speed_only(args) -> None:
    """Generation speed alone: the default generator (GANTrainConfig's sizes, bilinear, grey flag; speed does not
    depend on the weights, so it is left untrained, with its z and noise weights made non-zero so that those paths
    count) renders DSB layouts at R=128, batch 32, 1 and 2 threads. With --before REV, REV's generator renders
    the same layouts alternately with this one (rounds x before/after, best round of each), and the images are
    compared (uint8 levels). With --grain-before REV, REV's add_grain (per image) runs beside this one's on the
    same generator and grain, alternately, and their images are compared."""
    from tessera.model.maskgan import Generator, MaskGANConfig
    cfg = GANTrainConfig()
    torch.manual_seed(0)
    gen = Generator(MaskGANConfig(resolution=128, n_labels=2, boundary=cfg.boundary, z_dim=cfg.z_dim,
                                  g_channels=cfg.g_channels, g_hidden=cfg.g_hidden, upsample=cfg.upsample,
                                  grey_flag=cfg.grey_flag))
    for name, p in gen.named_parameters():  # trained generators have non-zero z styles and noise scales
        if "z_gamma_beta.weight" in name or "noise_scale" in name:
            torch.nn.init.normal_(p, std=0.05)
    samples, names = load_folder(dataset("dsb2018"))
    sampler = LayoutSampler(samples[:30], resolution=128)
    gens = {"after": gen}
    if args.before != "none":
        gens = {"before": _generator_at(args.before, gen.config, gen.state_dict()), "after": gen}
    # before: float32, as every Synthesizer rendered before the bf16 copy (the old module has no dtype casts)
    synths = {k: Synthesizer(g, names, grey_share=0.5, bf16=False if k == "before" else None) for k, g in gens.items()}
    # the same generator with the imaging grain (model/sensor.py) fitted on 30 DSB crops and its images of them
    from tessera.model.sensor import fit_grain
    crops = [centre_crop(s, 128) for s in samples[:30]]
    grain = fit_grain([c.image for c in crops], synths["after"].render(crops))
    if args.grain_before != "none":  # REV's grain first, then this one's, alternating with the rest
        synths["grain_before"] = _synth_with_grain_at(args.grain_before, gen, names, grey_share=0.5, grain=grain)
    synths["after_grain"] = Synthesizer(gen, names, grey_share=0.5, grain=grain)
    speed, images = {k: [] for k in synths}, {}
    for t in (1, 2):
        rows = {k: [] for k in synths}
        for _ in range(args.rounds):
            for k, synth in synths.items():
                rows[k].append(render_speed(synth, sampler, t, 8))
        for k in synths:
            speed[k].append(max(rows[k], key=lambda r: r["images_per_s"]) | {"rounds": args.rounds})
    grain_cpu = {}
    if "grain_before" in synths:  # the grain alone, 1 thread, on the same 256 grain-free images: CPU ms per image,
        plain = synths["after"].render(sampler.sample(256, seed=98), seed=2)  # alternating, best of the rounds
        seeds = list(range(256))
        for _ in range(max(args.rounds, 5)):
            for k in ("grain_before", "after_grain"):
                c0 = time.process_time()
                for i in range(0, 256, 32):
                    synths[k].add_grain(plain[i:i + 32], seeds[i:i + 32])
                ms = (time.process_time() - c0) / 256 * 1e3
                grain_cpu[k] = min(grain_cpu.get(k, ms), ms)
    layouts = sampler.sample(16, seed=5)
    for k, synth in synths.items():
        images[k] = np.stack(synth.render(layouts, seed=3)).astype(np.int16)
    # the summary keys of speed_part and speed_grain_part stay as they were
    tag = "" if args.before != "none" else "grain_batch_" if args.grain_before != "none" else "grain_cmp_"
    summary = {f"{tag}gen_images_per_s_{k}_{s['threads']}threads": s["images_per_s"] for k, v in speed.items() for s in v}
    if "before" in images:
        d = np.abs(images["after"] - images["before"])
        summary |= {"image_diff_max_levels": int(d.max()), "image_diff_mean_levels": float(d.mean())}
    if "grain_before" in images:  # the same grain to the level, or how far from it
        d = np.abs(images["after_grain"] - images["grain_before"])
        summary |= {"grain_image_diff_max_levels": int(d.max()), "grain_image_diff_mean_levels": float(d.mean())}
        summary |= {f"grain_cpu_ms_per_image_{k}": v for k, v in grain_cpu.items()}
        log("grain alone: " + ", ".join(f"{k} {v:.3f} ms CPU per image" for k, v in grain_cpu.items()))
    log("render: " + "; ".join(f"{k} " + ", ".join(f"{s['images_per_s']:.1f} img/s at {s['threads']} threads "
                                                     f"(load {s['load1_before']})" for s in v)
                               for k, v in speed.items()))
    def commit(rev: str) -> str:  # the commit, not a branch name that moves
        return rev if rev == "none" else rev + " (" + subprocess.run(
            ["git", "rev-parse", "--short", rev], cwd=RESULTS.parents[1], capture_output=True, text=True).stdout.strip() + ")"
    write_realism(args, {"summary": summary, "speed": speed, "before_revision": commit(args.before),
                         "grain_before_revision": commit(args.grain_before), "batch": 32, "resolution": 128},
                  # without --before: the grain's cost alone, kept apart from the bf16 comparison in speed_part;
                  # with --grain-before: the grain's old and new implementation side by side
                  key="speed_part" if args.before != "none" else
                  "speed_grain_batch_part" if args.grain_before != "none" else "speed_grain_part")


def realism(args, threads: int) -> None:
    """Real vs generated and real vs edited: a small CNN's test accuracy at equal iterations, KID on the
    label model's encoder features against the KID between two halves of the held-out real images, and the
    grid real | generated | edited. Disjoint DSB training-split images: A (GAN training, layouts and edit
    sources for the classifier's training fakes), B (layouts and edit sources of the test fakes), C and D
    (real images of the classifier's training and test sets; D and C's first half are the KID halves)."""
    from tessera.model.edit import Editor

    t_start, work = time.time(), Path(tempfile.mkdtemp(prefix="tessera-bench-realism-"))
    samples, names = load_folder(dataset("dsb2018"))
    train_ids, _ = split_ids([s.id for s in samples], 0.2)
    by_id = {s.id: s for s in samples}
    pool = [by_id[i] for i in np.random.default_rng(0).permutation(train_ids)]
    n, nt = args.n_real_train, args.n_real_test
    A, B, C, D = pool[:30], pool[30:60], pool[60:60 + n], pool[60 + n:60 + n + nt]
    crop = [centre_crop(s, 128) for s in pool[:60 + n + nt]]
    cA, cB, cC, cD = crop[:30], crop[30:60], crop[60:60 + n], crop[60 + n:]
    log(f"realism: A {len(A)}, B {len(B)}, C {len(C)}, D {len(D)}; GAN {args.gan_iters} iters, classifier "
        f"{args.cls_iters} iters; load {load1():.1f}")
    gan_ckpt, gan_info = fit_gan_iters(A, names, args.gan_iters, work / "gan.pt", threads, upsample="bilinear",
                                       grey_flag=True)
    synth = Synthesizer.from_checkpoint(gan_ckpt, device="cpu")
    lay_tr, lay_te = LayoutSampler(A, resolution=128).sample(n, seed=1), LayoutSampler(B, resolution=128).sample(nt, seed=2)
    fakes = {"generated": (synth.render(lay_tr, seed=1), synth.render(lay_te, seed=2)),
             "edited": ([e.sample.image for e in Editor(cA, len(names), max_objects=4).edit(n, seed=3)],
                        [e.sample.image for e in Editor(cB, len(names), max_objects=4).edit(nt, seed=4)])}
    gan_info["grain"] = synth.grain is not None
    if synth.grain:  # side by side: the same generator and images without its grain (model/sensor.py)
        synth.grain = None
        fakes["generated_no_grain"] = (synth.render(lay_tr, seed=1), synth.render(lay_te, seed=2))
    label_ckpt, label_t = fit_label(A, names, args.iters, AUG_ON, work / "label.pt", threads)
    predictor = Predictor.from_checkpoint(label_ckpt, device="cpu")
    real_tr, real_te = [s.image for s in cC], [s.image for s in cD]
    f_c, f_d = encoder_features(predictor, real_tr), encoder_features(predictor, real_te)
    half = min(len(f_c), len(f_d))
    kid_ref = kid(f_c[:half], f_d[:half])
    res = {"kid_real_halves": {"mean": kid_ref[0], "std": kid_ref[1], "n": half}}
    for kind, (tr, te) in fakes.items():
        # one classifier per seed: a single seed's accuracy moved by 10-20 points (stop 21: 97.0 / 82.5 / 98.5 %)
        runs = [classify_real_fake(real_tr, tr, real_te, te, args.cls_iters, seed=s) for s in args.cls_seeds]
        accs = [r["test_accuracy"] for r in runs]
        cls = {"test_accuracy": float(np.mean(accs)), "test_accuracy_std": float(np.std(accs)),
               "test_accuracy_per_seed": accs, "seeds": list(args.cls_seeds), "runs": runs}
        k = kid(encoder_features(predictor, te), f_d)
        res[kind] = {"classifier": cls, "kid": {"mean": k[0], "std": k[1], "n": len(te)},
                     # the reference is ~0 (and may be negative: the estimate is unbiased), so no ratio
                     "kid_above_real_halves_in_their_sd": (k[0] - kid_ref[0]) / max(kid_ref[1], 1e-12)}
        log(f"{kind}: classifier test accuracy {cls['test_accuracy']:.3f} +- {cls['test_accuracy_std']:.3f} "
            f"(seeds {args.cls_seeds}: {[round(a, 3) for a in accs]}); KID {k[0]:.4g} (real halves {kid_ref[0]:.4g})")
    kinds = [k for k in ("generated_no_grain", "generated", "edited") if k in fakes]
    # label fidelity: the label model's IoU against the layout on the test fakes / its IoU on the real test crops
    real_iou = float(np.mean([mean_iou(np.asarray(p.classes, np.int32), c.classes, len(names))
                              for p, c in zip(predictor.predict(real_te), cD)]))
    res["label_fidelity"] = {"real_iou": real_iou}
    for kind in ("generated", "generated_no_grain"):
        if kind in fakes:
            iou = float(np.mean([c[1] for c in synth.self_consistency(fakes[kind][1], lay_te, predictor, 0.0)]))
            res["label_fidelity"][kind] = {"iou": iou, "ratio_to_real": iou / max(real_iou, 1e-9)}
    log(f"label fidelity: {res['label_fidelity']}")
    rows = [[real_te[i]] + [fakes[k][1][i] for k in kinds] for i in range(6)]
    titles = {"generated_no_grain": f"generated, no grain ({args.gan_iters} it)",
              "generated": f"generated + grain ({args.gan_iters} it)", "edited": "edited (real + pasted)"}
    grid = RESULTS / ("gan_realism_grid_quick.png" if args.quick else "gan_realism_grid.png")
    save_compare_grid(rows, ["real (held out)"] + [titles[k] for k in kinds], grid)
    log(f"wrote {grid} ({grid.stat().st_size // 1024} KB)")
    summary = {"realism_classifier_acc_generated": res["generated"]["classifier"]["test_accuracy"],
               "realism_classifier_acc_generated_std": res["generated"]["classifier"]["test_accuracy_std"],
               "realism_classifier_acc_edited": res["edited"]["classifier"]["test_accuracy"],
               "realism_classifier_acc_edited_std": res["edited"]["classifier"]["test_accuracy_std"],
               "kid_generated": res["generated"]["kid"]["mean"], "kid_edited": res["edited"]["kid"]["mean"],
               "kid_real_halves": kid_ref[0], "wall_s": round(time.time() - t_start, 1)}
    summary |= {f"label_fidelity_{k}": v["ratio_to_real"] for k, v in res["label_fidelity"].items() if k != "real_iou"}
    if "generated_no_grain" in res:
        summary |= {"realism_classifier_acc_generated_no_grain": res["generated_no_grain"]["classifier"]["test_accuracy"],
                    "realism_classifier_acc_generated_no_grain_std":
                        res["generated_no_grain"]["classifier"]["test_accuracy_std"],
                    "kid_generated_no_grain": res["generated_no_grain"]["kid"]["mean"]}
    write_realism(args, {
        "summary": summary, "realism": res, "gan_training": gan_info,
        "label_model": {"iters": args.iters, "train_s": round(label_t, 1), "trained_on": "A (30 images)"},
        "setup": {"dataset": "dsb2018, training split only; 128 px (short side to 128, centre crop)",
                  "sets": {"A": len(A), "B": len(B), "C_real_train": len(C), "D_real_test": len(D)},
                  "classifier": "4 stride-2 convs + BN + GAP + linear, Adam 1e-3, batch 32, flips/rot90, "
                                "same iterations for each kind, one per seed (--cls-seeds)",
                  "kid": "cubic polynomial kernel, 50 subsets of 50, label-model encoder deepest features "
                         "(mean+std pooled); reference: real C vs real D",
                  "torch_threads": threads, "load1_end": round(load1(), 2), "grid": f"bench/results/{grid.name}"},
        "targets": {"classifier_accuracy": "<= 0.75", "kid": "reported against the real-halves KID"}})
    shutil.rmtree(work, ignore_errors=True)


# ------------------------------------------------------------------------------------------------------ main

def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 30])
    ap.add_argument("--iters", type=int, default=300, help="label-model iterations, every arm")
    ap.add_argument("--gan-budget", type=float, default=120.0, help="GAN training seconds per N")
    ap.add_argument("--m-factor", type=int, default=3, help="M = m_factor * N generated images kept")
    ap.add_argument("--oversample", type=int, default=3, help="layouts rendered per kept image")
    ap.add_argument("--min-iou", type=float, default=0.5, help="self-consistency filter threshold")
    ap.add_argument("--max-val", type=int, default=60)
    ap.add_argument("--n-fidelity", type=int, default=64)
    ap.add_argument("--ls-count", type=int, default=20)
    ap.add_argument("--ls-min-iou", type=float, default=0.5, help="TESSERA_SYNTH_MIN_IOU for the LS run")
    ap.add_argument("--threads", type=int, default=0, help="torch threads for training; 0 = 2 if quiet else 1")
    ap.add_argument("--quick", action="store_true", help="smoke run: N=10, 30 iters, 15 s GAN, 10 val images")
    ap.add_argument("--synthetic-parts", action="store_true",
                    help="only the quality grid, render speed and LS throughput (edited and generated tasks)")
    ap.add_argument("--gan-iters", type=int, default=300, help="with --synthetic-parts: GAN iterations per variant")
    ap.add_argument("--speed", action="store_true", help="only generation speed (untrained default generator)")
    ap.add_argument("--before", default="none", help="--speed: git revision whose generator is timed alongside")
    ap.add_argument("--rounds", type=int, default=3, help="--speed: alternating rounds (best of each side)")
    ap.add_argument("--grain-before", default="none", help="--speed: git revision whose add_grain (model/sensor.py, "
                    "per image) is timed alongside this one's on the same generator and grain")
    ap.add_argument("--realism", action="store_true", help="only the realism classifier, KID and the realism grid")
    ap.add_argument("--cls-iters", type=int, default=300, help="with --realism: classifier iterations per kind")
    ap.add_argument("--cls-seeds", type=int, nargs="+", default=[0, 1, 2], help="with --realism: one classifier "
                    "per seed, accuracy as mean and std over them")
    ap.add_argument("--n-real-train", type=int, default=150, help="with --realism: real images, classifier train")
    ap.add_argument("--n-real-test", type=int, default=100, help="with --realism: real images, classifier test")
    args = ap.parse_args()
    if args.quick:
        args.sizes, args.iters, args.gan_budget, args.max_val = [10], 30, 15.0, 10
        args.n_fidelity, args.ls_count, args.ls_min_iou = 16, 4, 0.0  # the quick GAN passes no filter
    if os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
        print("note: export OMP_WAIT_POLICY=PASSIVE before python starts (busy-waiting threads on shared cores)")
    # the code that runs is the working tree at start: name the model/ files that differ from the commit
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "model"], cwd=RESULTS.parents[1],
                           capture_output=True, text=True).stdout.split()[1::2]
    threads = args.threads or (2 if load1() < 1.0 else 1)
    torch.set_num_threads(threads)
    if args.speed:
        return speed_only(args)
    if args.realism:
        if args.quick:
            args.gan_iters, args.cls_iters, args.iters, args.n_real_train, args.n_real_test = 4, 10, 10, 20, 12
        return realism(args, threads)
    if args.synthetic_parts:
        if args.quick:
            args.gan_iters = 10
        return synthetic_parts(args, threads)
    t_start = time.time()
    work = Path(tempfile.mkdtemp(prefix="tessera-bench-gan-"))

    train_all, val, names = fixed_split("dsb2018", args.max_val)
    log(f"dsb2018: {len(train_all)} train, {len(val)} val (capped), labels {names}; torch threads {threads}, "
        f"load {load1():.1f}")

    rows, gans = [], {}
    for n in args.sizes:
        real = train_all[:n]
        row = {"n_real": n}
        ckpt_classic, row_t = fit_label(real, names, args.iters, AUG_ON, work / f"classic_{n}.pt", threads)
        row["classic"] = {**score(ckpt_classic, val), "train_s": round(row_t, 1)}
        log(f"N={n} classic      fg IoU {row['classic']['fg_iou']:.4f} ({row_t:.0f}s)")
        ckpt, row_t = fit_label(real, names, args.iters, AUG_OFF, work / f"real_{n}.pt", threads)
        row["real_only"] = {**score(ckpt, val), "train_s": round(row_t, 1)}
        log(f"N={n} real_only    fg IoU {row['real_only']['fg_iou']:.4f} ({row_t:.0f}s)")

        gan_ckpt, row["gan_training"] = fit_gan(real, names, args.gan_budget, work / f"maskgan_{n}.pt", threads)
        gans[n] = gan_ckpt
        log(f"N={n} GAN trained {row['gan_training']['iters']} iters")
        synth = Synthesizer.from_checkpoint(gan_ckpt, device="cpu")
        sampler = LayoutSampler(real, resolution=synth.config.resolution)
        gen, row["generated"] = generated_set(synth, sampler, Predictor.from_checkpoint(ckpt_classic, device="cpu"),
                                              args.m_factor * n, args.oversample, args.min_iou, seed=1000 + n)
        log(f"N={n} generated: {row['generated']}")
        reps = max(1, round(len(gen) / n))  # real samples repeated: about half of each batch is real
        mixed = real * reps + gen
        row["mix"] = {"real_repeats": reps, "n_generated": len(gen), "real_share": n * reps / len(mixed)}
        for arm, aug in (("gan", AUG_OFF), ("gan_classic", AUG_ON)):
            ckpt, row_t = fit_label(mixed, names, args.iters, aug, work / f"label_{arm}_{n}.pt", threads)
            row[arm] = {**score(ckpt, val), "train_s": round(row_t, 1)}
            log(f"N={n} {arm:12s} fg IoU {row[arm]['fg_iou']:.4f} ({row_t:.0f}s)")
        rows.append(row)

    # 2. fidelity, judged by a label model trained on all training images
    judge_ckpt, judge_t = fit_label(train_all, names, args.iters, AUG_ON, work / "judge.pt", threads)
    judge = Predictor.from_checkpoint(judge_ckpt, device="cpu")
    judge_real = score(judge_ckpt, val)
    real_crop_iou = real_crops_iou(judge, val, 128, np.random.default_rng(5))
    log(f"judge (all {len(train_all)} train images): val fg IoU {judge_real['fg_iou']:.4f}, "
        f"on 128 px crops {real_crop_iou:.4f}")
    fid = {"judge": {"n_train": len(train_all), "iters": args.iters, "train_s": round(judge_t, 1), **judge_real,
                     "fg_iou_128_crops": real_crop_iou}}
    grid_rows = None
    for n, gan_ckpt in gans.items():
        synth = Synthesizer.from_checkpoint(gan_ckpt, device="cpu")
        real = train_all[:n]
        own, own_ious, layouts, images = fidelity(synth, LayoutSampler(real, resolution=128), judge,
                                                  args.n_fidelity, seed=2000 + n)
        unseen, _, _, _ = fidelity(synth, LayoutSampler(val, resolution=128), judge, args.n_fidelity, seed=3000 + n)
        fid[f"n{n}"] = {"synth_iou_train_layouts": own, "synth_iou_val_layouts": unseen,
                        "ratio_vs_real_val": own / judge_real["fg_iou"], "ratio_vs_real_crops": own / real_crop_iou,
                        "n_images": args.n_fidelity}
        log(f"fidelity N={n}: synthetic {own:.4f} (unseen layouts {unseen:.4f}) vs real {judge_real['fg_iou']:.4f}")
        preds = judge.predict(images[:6])
        grid_rows = [(layouts[i], images[i], preds[i], own_ious[i]) for i in range(6)]
        grid_n = n
    grid_path = RESULTS / "gan_grid.png"
    RESULTS.mkdir(parents=True, exist_ok=True)
    save_grid(grid_rows, grid_path)
    log(f"wrote {grid_path} ({grid_path.stat().st_size // 1024} KB, GAN of N={grid_n})")

    # 3. speed
    n_big = max(gans)
    synth = Synthesizer.from_checkpoint(gans[n_big], device="cpu")
    sampler = LayoutSampler(train_all[:n_big], resolution=128)
    speed = [render_speed(synth, sampler, t, 2 if args.quick else 4) for t in (1, 2)]
    torch.set_num_threads(threads)
    log("render: " + ", ".join(f"{s['images_per_s']:.1f} img/s at {s['threads']} threads" for s in speed))
    ls = ls_throughput(judge_ckpt, gans[n_big], train_all[:2], names, args.ls_count, args.ls_min_iou, work)
    log(f"Label Studio: {ls['generated']['created']}/{ls['generated']['requested']} synthetic tasks in "
        f"{ls['generated']['seconds']}s")

    summary = {}
    for r in rows:
        k = f"n{r['n_real']}"
        for arm in ("real_only", "classic", "gan", "gan_classic"):
            summary[f"{k}_{arm}_fg_iou"] = r[arm]["fg_iou"]
        summary[f"{k}_gan_gain_vs_real_only_points"] = 100 * (r["gan"]["fg_iou"] - r["real_only"]["fg_iou"])
        summary[f"{k}_gan_classic_gain_vs_classic_points"] = 100 * (r["gan_classic"]["fg_iou"] - r["classic"]["fg_iou"])
        summary[f"{k}_gan_vs_classic_points"] = 100 * (r["gan"]["fg_iou"] - r["classic"]["fg_iou"])
        summary[f"{k}_generated_kept"] = r["generated"]["kept"]
    summary["judge_real_val_fg_iou"] = judge_real["fg_iou"]
    summary["judge_real_crops_fg_iou"] = real_crop_iou
    for n in gans:
        summary[f"n{n}_fidelity_synth_iou"] = fid[f"n{n}"]["synth_iou_train_layouts"]
        summary[f"n{n}_fidelity_ratio"] = fid[f"n{n}"]["ratio_vs_real_val"]
        summary[f"n{n}_fidelity_ratio_crops"] = fid[f"n{n}"]["ratio_vs_real_crops"]
    for s in speed:
        summary[f"gen_images_per_s_{s['threads']}threads"] = s["images_per_s"]
    summary["ls_synthetic_tasks_per_s"] = ls["generated"]["tasks_per_s"]
    summary["ls_synthetic_tasks_created"] = ls["generated"]["created"]
    summary["wall_s"] = time.time() - t_start
    write_result("gan", {
        "quick": args.quick, "summary": summary, "usefulness": rows, "fidelity": fid, "render_speed": speed,
        "label_studio": ls,
        "setup": {"dataset": "dsb2018", "split": "split_ids(ids, 0.2)", "n_val": len(val),
                  "label_iters": args.iters, "label_batch": TrainConfig.batch_size, "label_crop": TrainConfig.crop,
                  "aug_off": AUG_OFF, "aug_on": "TrainConfig defaults (flips, rot90, scale 0.8-1.25, jitter 0.2)",
                  "gan_budget_s": args.gan_budget, "m_factor": args.m_factor, "oversample": args.oversample,
                  "min_iou": args.min_iou, "filter_model": "classic arm of the same N",
                  "torch_threads_training": threads, "uncommitted_model_files_at_start": dirty, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
                  "seeds": "label 0, GAN 1337, layouts 1000+N, one seed per arm"},
        "targets": {"gain_vs_real_only_n10": "+5 IoU points", "gain_vs_classic_n10": "+2 IoU points",
                    "fidelity_ratio": ">= 0.8", "gen_images_per_s": ">= 100 at R=128 on 2 CPU cores"}})
    shutil.rmtree(work, ignore_errors=True)
    log(f"done in {time.time() - t_start:.0f}s")


if __name__ == "__main__":
    main()
