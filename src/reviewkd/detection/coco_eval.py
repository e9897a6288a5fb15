"""COCO box (and mask) AP with pycocotools' COCOeval.

``evaluate_detector`` runs a torchvision detector (eval mode) over a loader of original-size
images, converts its detections to COCO results (xywh boxes, category ids, RLE masks from the
predicted mask probabilities at 0.5) and scores them. Under torchrun every process predicts its
share of the images and process 0 scores the gathered results.
"""
from __future__ import annotations

import contextlib
import io
from typing import Iterable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def to_coco_results(outputs: Iterable[dict], image_ids: Iterable[int], label_to_cat: dict[int, int],
                    masks: bool = False, mask_threshold: float = 0.5) -> list[dict]:
    """torchvision detections (one dict per image, boxes x1y1x2y2 in original pixels) -> COCO results."""
    results = []
    for out, image_id in zip(outputs, image_ids):
        boxes = out["boxes"].detach().float().cpu()
        if boxes.numel() == 0:
            continue
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        scores = out["scores"].detach().float().cpu().tolist()
        labels = out["labels"].detach().cpu().tolist()
        rles = None
        if masks and "masks" in out:
            from pycocotools import mask as mask_utils

            binary = (out["masks"].detach().float().cpu()[:, 0] > mask_threshold).numpy().astype(np.uint8)
            rles = [mask_utils.encode(np.asfortranarray(m)) for m in binary]
            for rle in rles:
                rle["counts"] = rle["counts"].decode("ascii")
        for i, (box, score, label) in enumerate(zip(xywh, scores, labels)):
            if int(label) not in label_to_cat:
                continue  # a class the dataset does not have (e.g. 91-class weights on a subset)
            r = {"image_id": int(image_id), "category_id": int(label_to_cat[int(label)]),
                 "bbox": [round(float(v), 3) for v in box], "score": float(score)}
            if rles is not None:
                r["segmentation"] = rles[i]
            results.append(r)
    return results


def coco_metrics(coco_gt, results: list[dict], iou_type: str = "bbox", image_ids: list[int] | None = None) -> dict[str, float]:
    """AP, AP50, AP75, APs, APm, APl (fractions in [0, 1]) of ``results`` against ``coco_gt``.

    An empty result list scores 0 everywhere (pycocotools cannot load an empty list).
    """
    if not results:
        return {k: 0.0 for k in METRICS}
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(results)
        evaluator = COCOeval(coco_gt, coco_dt, iou_type)
        if image_ids is not None:
            evaluator.params.imgIds = sorted(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    # COCOeval reports -1 where a size range has no ground truth; keep it visible as NaN.
    return {k: (float(v) if v >= 0 else float("nan")) for k, v in zip(METRICS, evaluator.stats[:6])}


def _gather(results: list[dict]) -> list[dict]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return results
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, results)
    return [r for part in parts for r in part]


@torch.inference_mode()
def evaluate_detector(model: nn.Module, loader, dataset, device: torch.device, autocast_ctx=None,
                      masks: bool = False, progress: bool = False) -> dict[str, float]:
    """``{"box_AP": ..., "box_AP50": ..., ...}`` (plus ``mask_*``) in percent, on every process."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    results, seen = [], []
    bar = tqdm(loader, desc="evaluating", leave=False, dynamic_ncols=True, disable=None if progress else True)
    for batch in bar:
        images, targets = [im.to(device, non_blocking=True) for im in batch.inputs["images"]], batch.targets
        with autocast_ctx if autocast_ctx is not None else contextlib.nullcontext():
            outputs = model(images)
        ids = [t["image_id"] for t in targets]
        seen += ids
        results += to_coco_results(outputs, ids, dataset.label_to_cat, masks=masks)
    model.train(was_training)
    results = _gather(results)
    image_ids = sorted({r["id"] for r in _gather([{"id": i} for i in seen])})
    metrics = {}
    for iou_type, prefix in (("bbox", "box"), ("segm", "mask")) if masks else (("bbox", "box"),):
        stats = coco_metrics(dataset.coco, results, iou_type, image_ids)
        metrics.update({f"{prefix}_{k}": 100.0 * v for k, v in stats.items()})
    return metrics
