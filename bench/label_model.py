"""Label-model quality against a standard peer, and label-edit suggestions, on real data.

    .venv/bin/python -m bench.label_model [--budget 90] [--sizes 10 30 all] [--datasets dsb2018 pets] [--quick]
        [--native] [--iters N] [--seed S] [--reuse NAME] [--edges-off-too]

For each data set (fixed 80/20 split by id hash) and N training images: Tessera's label model and
MONAI's UNet (from scratch, same resolution R=128, same normalisation and augmentation, same wall-clock
budget, one after the other on the same cores) are trained and evaluated on the validation split:
foreground IoU, mIoU, box AP50, instance recall at IoU 0.5, and (Tessera) how the task score tracks the
real IoU. Then Tessera's edit suggestions repair corrupted validation labels. Writes
bench/results/label_model.json.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from scipy import ndimage

from bench.common import dataset, train_overrides, write_result
from tessera.model import metrics
from tessera.model.checkpoint import load_checkpoint
from tessera.model.data import Sample, load_folder, read_image, semantic_instances, split_ids
from tessera.model.inference import Predictor, fit_size, normalize_image, pad_to, resize, scaled_size

BREEDS = ["Abyssinian", "Bengal", "american_bulldog"]
WORK_ROOT = Path("/tmp/tessera-bench-label")     # each run's checkpoints, kept for --reuse


def load_pets(root: Path) -> tuple[list[Sample], list[str]]:
    """Oxford-IIIT Pet sample: background + 3 breeds; pet = trimap 1 and 3; one instance per photo."""
    samples = []
    for img_path in sorted((root / "images").glob("*.jpg")):
        tri = cv2.imread(str(root / "trimaps" / (img_path.stem + ".png")), cv2.IMREAD_UNCHANGED)
        if tri is None:
            continue
        breed = img_path.stem.rsplit("_", 1)[0]
        pet = (tri == 1) | (tri == 3)
        classes = np.where(pet, BREEDS.index(breed) + 1, 0).astype(np.int32)
        samples.append(Sample(read_image(img_path), classes, pet.astype(np.int32), id=img_path.stem))
    return samples, list(BREEDS)


# ------------------------------------------------------------------------------------------- MONAI peer

class UNetPeer:
    """MONAI UNet trained from scratch; instances = connected components. Letterboxed to R x R, or (scale
    given) seen at Tessera's object scale like Tessera: random crop x crop windows in training, the whole
    scaled image (padded to x16) at prediction."""

    def __init__(self, n_classes: int, R: int = 128, seed: int = 0, scale: float | None = None, crop: int = 96):
        from monai.networks.nets import UNet

        torch.manual_seed(seed)
        self.R, self.C, self.scale, self.crop = R, n_classes, scale, crop
        self.net = UNet(spatial_dims=2, in_channels=3, out_channels=n_classes + 1, channels=(16, 32, 64, 128, 256),
                        strides=(2, 2, 2, 2), num_res_units=2)

    def _size(self, H: int, W: int) -> tuple[int, int]:
        return fit_size(H, W, self.R) if self.scale is None else scaled_size(H, W, self.scale)

    def _prep(self, s: Sample) -> tuple[np.ndarray, np.ndarray]:
        h, w = self._size(*s.image.shape[:2])
        pad = self.R if self.scale is None else (-(-h // 16) * 16, -(-w // 16) * 16)
        x = pad_to(resize(normalize_image(s.image), h, w), pad)
        y = pad_to(resize(s.classes.astype(np.uint8), h, w, nearest=True), pad)
        return x.transpose(2, 0, 1), y                              # (H, W, 3) -> (3, H, W)

    def _window(self, x: np.ndarray, y: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
        """A random crop x crop window (padded) of a scaled sample; letterboxed samples stay whole."""
        if self.scale is None:
            return x, y
        S = self.crop
        y0 = int(rng.integers(0, max(x.shape[1] - S, 0) + 1))
        x0 = int(rng.integers(0, max(x.shape[2] - S, 0) + 1))
        xc, yc = x[:, y0:y0 + S, x0:x0 + S], y[y0:y0 + S, x0:x0 + S]
        return pad_to(xc.transpose(1, 2, 0), S).transpose(2, 0, 1), pad_to(yc, S)

    def train(self, train: list[Sample], budget_s: float, batch_size: int = 8, seed: int = 0) -> int:
        from monai.losses import DiceCELoss

        rng = np.random.default_rng(seed)
        data = [self._prep(s) for s in train]
        opt = torch.optim.AdamW(self.net.parameters(), lr=2e-3, weight_decay=1e-4)
        loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
        self.net.train()
        t0, it = time.time(), 0
        while time.time() - t0 < budget_s:
            idx = rng.integers(0, len(data), batch_size)
            xs, ys = [], []
            for i in idx:
                x, y = self._window(*data[i], rng)
                k = int(rng.integers(0, 4))
                x, y = np.rot90(x, k, (1, 2)), np.rot90(y, k)
                if rng.random() < 0.5:
                    x, y = x[:, :, ::-1], y[:, ::-1]
                xs.append(np.ascontiguousarray(x))
                ys.append(np.ascontiguousarray(y))
            x = torch.from_numpy(np.stack(xs))
            y = torch.from_numpy(np.stack(ys)).long()[:, None]     # (B, R, R) -> (B, 1, R, R)
            frac = (time.time() - t0) / budget_s
            for g in opt.param_groups:
                g["lr"] = 2e-3 * 0.5 * (1 + np.cos(np.pi * min(frac, 1.0)))
            loss = loss_fn(self.net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            it += 1
        self.net.eval()
        return it

    @torch.no_grad()
    def predict(self, s: Sample):
        H, W = s.image.shape[:2]
        h, w = self._size(H, W)
        x, _ = self._prep(s)
        prob = torch.softmax(self.net(torch.from_numpy(x)[None]), 1)[0, :, :h, :w].numpy()
        prob = np.stack([resize(p, H, W) for p in prob])           # (C+1, h, w) -> (C+1, H, W)
        classes = prob.argmax(0).astype(np.int32)
        return classes, semantic_instances(classes), prob.max(0)


# ------------------------------------------------------------------------------------------- evaluation

def boxes_with_scores(instances: np.ndarray, conf: np.ndarray | dict) -> np.ndarray:
    ids = [int(i) for i in np.unique(instances) if i]
    boxes = metrics.boxes_from_instances(instances)
    if isinstance(conf, dict):
        scores = [conf.get(i, 0.5) for i in ids]
    else:
        scores = ndimage.mean(conf, instances, ids) if ids else []
    return np.array([[*b, s] for b, s in zip(boxes, scores)], np.float64).reshape(-1, 5)


def box_recall(pboxes: np.ndarray, tboxes: np.ndarray, thr: float = 0.5) -> tuple[int, int]:
    """(true boxes matched one-to-one by a predicted box at IoU >= thr, true boxes); boxes x0, y0, x1, y1."""
    if not len(tboxes) or not len(pboxes):
        return 0, len(tboxes)
    p, t = pboxes[:, None, :4], tboxes[None, :, :4]                       # (P, 1, 4), (1, T, 4)
    iw = (np.minimum(p[..., 2], t[..., 2]) - np.maximum(p[..., 0], t[..., 0])).clip(0)
    ih = (np.minimum(p[..., 3], t[..., 3]) - np.maximum(p[..., 1], t[..., 1])).clip(0)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    iou = iw * ih / (area(p) + area(t) - iw * ih + 1e-9)                  # (P, T)
    matched, used = 0, np.zeros(len(pboxes), bool)
    for j in np.argsort(-iou.max(0)):                                     # greedy, best-covered truths first
        cand = np.where(~used & (iou[:, j] >= thr), iou[:, j], -1)
        if cand.max() >= thr:
            used[int(cand.argmax())] = True
            matched += 1
    return matched, len(tboxes)


def score_all(outputs, val: list[Sample], n_classes: int, task_scores=None) -> dict:
    ious, mious, recalls, pboxes, tboxes = [], [], [], [], []
    for (classes, instances, conf), s in zip(outputs, val):
        ious.append(metrics.iou(classes > 0, s.classes > 0))
        mious.append(metrics.mean_iou(classes, s.classes, n_classes))
        recalls.append(metrics.instance_match(instances, s.instances)["recall"])
        pboxes.append(boxes_with_scores(instances, conf))
        tboxes.append(np.array(metrics.boxes_from_instances(s.instances), np.float64).reshape(-1, 4))
    out = {"fg_iou": float(np.mean(ious)), "miou": float(np.mean(mious)), "instance_recall_50": float(np.mean(recalls)),
           **box_scores(pboxes, tboxes)}
    if task_scores is not None:
        out["score_iou_pearson"] = metrics.pearson(task_scores, ious)
        out["score_iou_spearman"] = metrics.spearman(task_scores, ious)
    return out


def head_scores(preds, val: list[Sample]) -> dict:
    """Box AP50 and recall at IoU 0.5 of a mask model's head boxes (Prediction.head, TrainConfig.mask_box_head:
    what a RectangleLabels control gets) against the boxes of the true objects."""
    pboxes = [np.array([[*p.head.boxes[k], p.head.instance_score[k]] for k in sorted(p.head.boxes)],
                       np.float64).reshape(-1, 5) for p in preds]
    tboxes = [np.array(metrics.boxes_from_instances(s.instances), np.float64).reshape(-1, 4) for s in val]
    return {**box_scores(pboxes, tboxes), "boxes_per_image": float(np.mean([len(b) for b in pboxes]))}


def box_scores(pboxes: list[np.ndarray], tboxes: list[np.ndarray]) -> dict:
    """Box AP50 and recall at IoU 0.5 of per image predicted boxes (N, 5: x0, y0, x1, y1, score) against true
    boxes (M, 4)."""
    hits = np.array([box_recall(p, t) for p, t in zip(pboxes, tboxes)]).reshape(-1, 2)
    return {"box_ap50": metrics.box_ap50_many(pboxes, tboxes),
            "box_recall_50": float(hits[:, 0].sum() / max(hits[:, 1].sum(), 1))}


def run_tessera(train, val, names, budget_s, work: Path, seed: int = 0, object_px: float | None = None,
                iters: int = 0, overrides: tuple = (), reuse: Path | None = None, follow_edges: bool | None = None,
                head_flip_too: bool = False):
    """Train by wall-clock budget, or (iters > 0) by iterations: fair between arms on a loaded machine.
    `reuse`: score the checkpoint an earlier run left in that work directory instead of training;
    `follow_edges`: set Predictor.follow_edges (None: its default). A model with a head beside its masks
    (TrainConfig.mask_box_head, the default where objects are small) also gets its head's boxes scored (`head`),
    and with `head_flip_too` the head's boxes averaged with the mirror image's (`head_flip`)."""
    from tessera.model.train_vqvae import TrainConfig, train as train_vqvae

    cfg = TrainConfig(max_iters=iters or 100_000, time_budget_s=0.0 if iters else budget_s, eval_interval=10_000,
                      seed=seed, device="cpu")
    if object_px is not None:
        cfg = TrainConfig(**{**cfg.__dict__, "object_px": object_px})
    if overrides:                                       # --set KEY=VALUE: TrainConfig fields
        cfg = TrainConfig(**{**cfg.__dict__, **train_overrides(list(overrides))})
    t0 = time.time()
    if reuse is not None:
        ckpt = reuse / f"tessera_{len(train)}.pt"
        if not ckpt.is_file():
            raise SystemExit(f"--reuse: no checkpoint {ckpt}: run the benchmark with that --name and --seed first")
    else:
        ckpt = train_vqvae(cfg, train, [], names, work / f"tessera_{len(train)}.pt")   # no selection on val
    wall = time.time() - t0
    pred = Predictor.from_checkpoint(ckpt, device="cpu")
    if follow_edges is not None:
        pred.follow_edges = follow_edges
    preds = []
    t0 = time.time()
    for i in range(0, len(val), 8):
        preds += pred.predict([s.image for s in val[i:i + 8]])
    predict_s = time.time() - t0
    outputs = [(p.classes, p.instances, p.instance_score) for p in preds]
    res = score_all(outputs, val, len(names), [p.score for p in preds])
    if pred.head_beside_masks:
        res["head"] = head_scores(preds, val)
        if head_flip_too:
            pred.box_flip = True
            t1 = time.time()
            flipped = [p for i in range(0, len(val), 8) for p in pred.predict([s.image for s in val[i:i + 8]])]
            res["head_flip"] = {**head_scores(flipped, val),
                                "predict_ms_per_image": 1000 * (time.time() - t1) / max(len(val), 1)}
            pred.box_flip = False
    res.update({"train_wall_s": wall, "scale": pred.scale, "object_px": cfg.object_px,
                "reused": reuse.name if reuse else "", "follow_edges": pred.follow_edges,
                "iters": int(load_checkpoint(ckpt, "vqvae")["iter_num"]),
                "predict_ms_per_image": 1000 * predict_s / max(len(val), 1)})
    return res, pred


def run_unet(train, val, names, budget_s, seed: int = 0, scale: float | None = None):
    peer = UNetPeer(len(names), seed=seed, scale=scale)
    t0 = time.time()
    iters = peer.train(train, budget_s, seed=seed)
    res = score_all([peer.predict(s) for s in val], val, len(names))
    res.update({"train_wall_s": time.time() - t0, "iters": iters, "scale": scale})
    return res


# ------------------------------------------------------------------------------------- edit suggestions

def corrupt(s: Sample, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A plausible human labelling error applied to every object of a sample's annotation."""
    classes, inst = s.classes.copy(), s.instances.copy()
    r = int(rng.integers(2, 5))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    out_c, out_i = np.zeros_like(classes), np.zeros_like(inst)
    ids = [int(i) for i in np.unique(inst) if i]
    for k in ids:
        m = (inst == k).astype(np.uint8)
        c = int(np.bincount(classes[m > 0]).argmax())
        if kind == "erode":
            m = cv2.erode(m, kernel)
        elif kind == "dilate":
            m = cv2.dilate(m, kernel)
        elif kind == "jitter":
            m = cv2.dilate(m, kernel) if rng.random() < 0.5 else cv2.erode(m, kernel)
            noise = ndimage.gaussian_filter(rng.normal(size=m.shape), 3) > 0
            edge = cv2.dilate(m, kernel) - cv2.erode(m, kernel)
            m = np.where(edge > 0, noise, m).astype(np.uint8)
        elif kind == "missing_part":
            ys, xs = np.nonzero(m)
            if len(xs):
                m[:, int(np.median(xs)):] = 0 if rng.random() < 0.5 else m[:, int(np.median(xs)):]
                m[int(np.median(ys)):, :] = 0 if rng.random() < 0.5 else m[int(np.median(ys)):, :]
        elif kind == "box":
            ys, xs = np.nonzero(m)
            if len(xs):
                m[ys.min():ys.max() + 1, xs.min():xs.max() + 1] = 1
        out_c[m > 0], out_i[m > 0] = c, k
    if kind == "missing_objects":         # objects the labeller did not draw: each left out with chance 0.3
        out_c, out_i = classes.copy(), inst.copy()
        gone = np.isin(inst, [k for k in ids if rng.random() < 0.3])
        out_c[gone], out_i[gone] = 0, 0
    if kind == "spurious_blob":
        out_c, out_i = classes.copy(), inst.copy()
        h, w = classes.shape
        blob = np.zeros((h, w), np.uint8)
        cv2.circle(blob, (int(rng.integers(0, w)), int(rng.integers(0, h))), int(max(4, min(h, w) // 12)), 1, -1)
        out_c[blob > 0], out_i[blob > 0] = max(1, int(classes.max())), int(inst.max()) + 1
    return out_c, out_i


def ranks_above(bad: list[float], good: list[float]) -> float:
    """The chance that a corrupted annotation's mislabeling score is above a right one's (ties count half): the
    area under the ROC curve of sorting tasks by `tessera_mislabeling`, 0.5 for a score that says nothing."""
    b, g = np.asarray(bad, float)[:, None], np.asarray(good, float)[None, :]
    return float(((b > g) + 0.5 * (b == g)).mean()) if b.size and g.size else float("nan")


def run_edits(pred: Predictor, val: list[Sample], seed: int = 0, check: bool = True) -> dict:
    """Each corruption kind applied to every validation annotation and repaired by Predictor.review: IoU with
    the true labels before and after, the share made worse, and how well the mislabeling score tells the
    corrupted annotations from the right ones (ranks_above). `check`: how sure the model must be to edit is
    chosen as a version chooses it on its held-back tasks (train_vqvae.choose_edit_confident), here on the other
    half of the validation images (two folds: no image is edited at a threshold chosen on itself); without it,
    the predictor's own (EDIT_CONFIDENT for a checkpoint trained without held-back tasks, as the bench's are)."""
    from tessera.model.train_vqvae import choose_edit_confident

    rng = np.random.default_rng(seed)
    right = [pred.review(s.image, s.classes, s.instances)[1] for s in val if (s.classes > 0).any()]
    out = {"right": {"mean_mislabeling": float(np.mean(right)), "n": len(right)}}
    threshold, checks = {}, []                       # validation index -> the edit threshold its image gets
    if check:
        own = pred.edit_confident
        for fold in (0, 1):
            checks.append(choose_edit_confident(pred, val[1 - fold::2]))
            threshold.update({i: pred.edit_confident for i in range(fold, len(val), 2)})
            pred.edit_confident = own
    for kind in ("erode", "dilate", "jitter", "missing_part", "spurious_blob", "box", "missing_objects"):
        before, after, mis = [], [], []
        for k, s in enumerate(val):
            if not (s.classes > 0).any():
                continue
            c, i = corrupt(s, kind, rng)
            kept, pred.edit_confident = pred.edit_confident, threshold.get(k, pred.edit_confident)
            refined, m = pred.review(s.image, c, i)
            pred.edit_confident = kept
            before.append(metrics.iou(c > 0, s.classes > 0))
            after.append(metrics.iou(refined.classes > 0, s.classes > 0))
            mis.append(m)
        b, a = np.array(before), np.array(after)
        out[kind] = {"iou_before": float(b.mean()), "iou_after": float(a.mean()),
                     "gain_points": float((a - b).mean() * 100), "share_worse": float((a < b - 1e-6).mean()),
                     "mean_mislabeling": float(np.mean(mis)), "mislabeling_ranks_above_right": ranks_above(mis, right),
                     "n": int(len(b))}
    six = [v for k, v in out.items() if k not in ("right", "missing_objects")]   # the kinds of the first round
    out["mean"] = {"gain_points": float(np.mean([v["gain_points"] for v in six])),
                   "share_worse": float(np.mean([v["share_worse"] for v in six])),
                   "mislabeling_ranks_above_right": float(np.mean([v["mislabeling_ranks_above_right"]
                                                                   for k, v in out.items() if k != "right"]))}
    if check:
        out["edit_check"] = checks
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=90.0, help="training seconds per model and size")
    ap.add_argument("--sizes", nargs="+", default=["10", "30", "all"])
    ap.add_argument("--datasets", nargs="+", default=["dsb2018", "pets"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-val", type=int, default=0, help="cap the validation images (0 = all)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 15 s budgets, 20 validation images")
    ap.add_argument("--name", default="label_model", help="results file bench/results/<name>.json")
    ap.add_argument("--native", action="store_true",
                    help="native-size mode: Tessera at its learned object scale beside Tessera letterboxed to R "
                         "(the model before scales were learned) and the MONAI UNet at the same object scale")
    ap.add_argument("--no-edits", action="store_true", help="skip the edit-suggestion part")
    ap.add_argument("--no-edit-check", action="store_true", help="edit suggestions at the checkpoint's own edit "
                    "threshold, not one chosen on the other half of the validation images (two folds)")
    ap.add_argument("--no-letterbox", action="store_true", help="native mode without the letterboxed Tessera arm")
    ap.add_argument("--seed", type=int, default=0, help="training seed of every arm")
    ap.add_argument("--object-px", type=float, default=None, help="Tessera's object_px (default: TrainConfig's)")
    ap.add_argument("--no-unet", action="store_true", help="skip the MONAI UNet peer")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="TrainConfig overrides of the Tessera arms, e.g. contact_weight=5 (recorded in each row)")
    ap.add_argument("--iters", type=int, default=0, help="train Tessera for this many iterations instead of "
                    "--budget seconds; the UNet then gets Tessera's training time")
    ap.add_argument("--reuse", default="", metavar="NAME", help="score the checkpoints the run --name NAME (same "
                    "--seed) left in its work directory instead of training")
    ap.add_argument("--head-flip-too", action="store_true", help="a model with a head beside its masks "
                    "(TrainConfig.mask_box_head): also score the head's boxes averaged with the mirror image's")
    ap.add_argument("--edges-off-too", action="store_true", help="also score Tessera with its masks not made to "
                    "follow the image's edges (Predictor.follow_edges off; row tessera_edges_off)")
    args = ap.parse_args()
    if args.quick:
        args.budget, args.max_val = 15.0, 20
    torch.set_num_threads(args.threads)
    work = WORK_ROOT / f"{args.name}_s{args.seed}"
    work.mkdir(parents=True, exist_ok=True)
    rows, edits = [], {}
    for name in args.datasets:
        root = dataset(name)
        samples, names = load_pets(root) if name == "pets" else load_folder(root)
        train_ids, val_ids = split_ids([s.id for s in samples], 0.2)
        by_id = {s.id: s for s in samples}
        train_all, val = [by_id[i] for i in train_ids], [by_id[i] for i in val_ids]
        if args.max_val:
            val = val[:args.max_val]
        print(f"{name}: {len(train_all)} train, {len(val)} val, labels {names}", flush=True)
        for size in args.sizes:
            n = len(train_all) if size == "all" else int(size)
            train = train_all[:n]
            reuse = WORK_ROOT / f"{args.reuse}_s{args.seed}" if args.reuse else None
            tess, pred = run_tessera(train, val, names, args.budget, work, seed=args.seed, iters=args.iters,
                                     object_px=args.object_px, overrides=tuple(args.set), reuse=reuse,
                                     head_flip_too=args.head_flip_too)
            budget = tess["train_wall_s"] if args.iters else args.budget
            row = {"dataset": name, "n_train": n, "budget_s": budget, "iters": args.iters, "seed": args.seed,
                   "set": list(args.set), "tessera": tess}
            print(json.dumps(row), flush=True)
            if args.edges_off_too:                      # the same checkpoint, masks as the network's grid has them
                row["tessera_edges_off"] = run_tessera(train, val, names, args.budget, work, seed=args.seed,
                                                       object_px=args.object_px, overrides=tuple(args.set),
                                                       reuse=reuse or work, follow_edges=False)[0]
                print(json.dumps(row), flush=True)
            if args.native and not args.no_letterbox:
                row["tessera_letterbox"] = run_tessera(train, val, names, args.budget, work, object_px=0.0,
                                                       seed=args.seed, iters=args.iters,
                                                       overrides=tuple(args.set))[0]
                print(json.dumps(row), flush=True)
            if not args.no_unet:
                row["monai_unet"] = run_unet(train, val, names, budget, seed=args.seed,
                                             scale=pred.scale if args.native else None)
                print(json.dumps(row), flush=True)
            rows.append(row)
            if size == args.sizes[-1] and not args.no_edits:
                edits[name] = run_edits(pred, val, check=not args.no_edit_check)
                print(name, "edits", json.dumps(edits[name]["mean"]), flush=True)
    summary = {}
    for r in rows:
        key = f"{r['dataset']}_n{r['n_train']}"
        summary[f"{key}_tessera_fg_iou"] = r["tessera"]["fg_iou"]
        summary[f"{key}_unet_fg_iou"] = r["monai_unet"]["fg_iou"] if "monai_unet" in r else None
        summary[f"{key}_tessera_box_recall_50"] = r["tessera"]["box_recall_50"]
        summary[f"{key}_unet_box_recall_50"] = r["monai_unet"]["box_recall_50"] if "monai_unet" in r else None
        for arm in ("head", "head_flip"):
            if arm in r["tessera"]:
                summary[f"{key}_tessera_{arm}_box_ap50"] = r["tessera"][arm]["box_ap50"]
                summary[f"{key}_tessera_{arm}_box_recall_50"] = r["tessera"][arm]["box_recall_50"]
        if "tessera_edges_off" in r:
            summary[f"{key}_tessera_edges_off_fg_iou"] = r["tessera_edges_off"]["fg_iou"]
            summary[f"{key}_tessera_edges_off_box_recall_50"] = r["tessera_edges_off"]["box_recall_50"]
        if "tessera_letterbox" in r:
            summary[f"{key}_tessera_letterbox_fg_iou"] = r["tessera_letterbox"]["fg_iou"]
            summary[f"{key}_tessera_letterbox_box_recall_50"] = r["tessera_letterbox"]["box_recall_50"]
    for name, e in edits.items():
        summary[f"{name}_edit_gain_points"] = e["mean"]["gain_points"]
        summary[f"{name}_edit_share_worse"] = e["mean"]["share_worse"]
    write_result(args.name, {"summary": summary, "rows": rows, "edit_suggestions": edits,
                                 "targets": {"dsb_all_fg_iou": ">= 0.85", "dsb_n10_fg_iou": ">= 0.78",
                                             "vs_unet": ">= MONAI UNet at equal budget",
                                             "edits": "+8 IoU points on average, < 5% made worse"}})


if __name__ == "__main__":
    main()
