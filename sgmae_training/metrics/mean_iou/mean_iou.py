"""Mean IoU as an `evaluate` module shipped with the package, so that it loads offline by path: the inputs, options
and outputs of the Hub's `evaluate-metric/mean_iou` (mmsegmentation's definition), computed with bincounts.

import evaluate
metric = evaluate.load("path/to/sgmae_training/metrics/mean_iou")
metric.compute(predictions=maps, references=maps, num_labels=150, ignore_index=255)

A whole validation split need not be handed over as pixels: per-class `areas` (what `pixel_areas` returns for each
image, summed) give the same numbers, which is how a run spread over processes scores full-resolution maps.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Intersection over union (IoU) of each class is |prediction AND reference| / |prediction OR reference| over all pixels
of all images (pixels whose reference is the ignore index left out); mean IoU is its mean over the classes that occur
in the references or predictions (NaN classes skipped). Also reported: per-class accuracy (recall), its mean, and
overall pixel accuracy.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of 2-D `int` arrays): predicted class ids per image, [H, W] each.
    references (`list` of 2-D `int` arrays): reference class ids per image, same shapes.
    num_labels (`int`): number of classes.
    ignore_index (`int`): reference value left out of every count (e.g. 255).
    nan_to_num (`int`, *optional*): replace NaN (a class absent from references and predictions) with this value.
    label_map (`dict`, *optional*): old id -> new id, applied to the references first.
    reduce_labels (`bool`, defaults to `False`): references' 0 becomes the ignore index (255) and every other id
        decreases by 1 (ADE20K's "other" class).
    areas (`dict`, *optional*): instead of pixels, summed per-class counts "intersect", "union", "pred_label" and
        "label" ([num_labels] each, see `pixel_areas`); predictions and references are then empty lists.
Returns:
    mean_iou (`float`), mean_accuracy (`float`), overall_accuracy (`float`),
    per_category_iou (`ndarray` [num_labels]), per_category_accuracy (`ndarray` [num_labels]).
Examples:
    >>> metric = evaluate.load("path/to/metrics/mean_iou")
    >>> metric.compute(predictions=[[[0, 1], [1, 1]]], references=[[[0, 1], [0, 255]]], num_labels=2,
    ...                ignore_index=255)["mean_iou"]
    0.5
"""

_CITATION = """
@misc{mmseg2020, title={{MMSegmentation}: OpenMMLab Semantic Segmentation Toolbox and Benchmark},
      author={MMSegmentation Contributors}, howpublished={\\url{https://github.com/open-mmlab/mmsegmentation}},
      year={2020}}
"""

AREA_NAMES = ("intersect", "union", "pred_label", "label")


def pixel_areas(
    prediction: np.ndarray,
    reference: np.ndarray,
    num_labels: int,
    ignore_index: int,
    label_map: dict | None = None,
    reduce_labels: bool = False,
) -> dict[str, np.ndarray]:
    """Per-class pixel counts of one image: intersection, union, predicted and reference areas ([num_labels] each)."""
    prediction = np.asarray(prediction).astype(np.int64)
    reference = np.asarray(reference).astype(np.int64)
    if prediction.shape != reference.shape:
        raise ValueError(f"a prediction of shape {prediction.shape} for a reference of shape {reference.shape}")
    if label_map:
        mapped = reference.copy()
        for old, new in label_map.items():
            mapped[reference == old] = new
        reference = mapped
    if reduce_labels:
        reference = np.where(reference == 0, 255, reference - 1)
        reference[reference == 254] = 255
    kept = reference != ignore_index
    prediction, reference = prediction[kept], reference[kept]
    intersect = np.bincount(prediction[prediction == reference], minlength=num_labels)[:num_labels]
    pred_label = np.bincount(prediction[(prediction >= 0) & (prediction < num_labels)], minlength=num_labels)
    label = np.bincount(reference[(reference >= 0) & (reference < num_labels)], minlength=num_labels)
    return {"intersect": intersect, "union": pred_label + label - intersect, "pred_label": pred_label, "label": label}


def scores(areas: dict[str, np.ndarray], nan_to_num: int | None = None) -> dict:
    """mIoU, accuracies and per-class values from summed per-class areas."""
    intersect, union, label = (np.asarray(areas[name], dtype=np.float64) for name in ("intersect", "union", "label"))
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = intersect / union
        accuracy = intersect / label
        overall = intersect.sum() / label.sum()
    if nan_to_num is not None:
        iou, accuracy = np.nan_to_num(iou, nan=nan_to_num), np.nan_to_num(accuracy, nan=nan_to_num)
    return {
        "mean_iou": float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
        "mean_accuracy": float(np.nanmean(accuracy)) if np.isfinite(accuracy).any() else float("nan"),
        "overall_accuracy": float(overall),
        "per_category_iou": iou,
        "per_category_accuracy": accuracy,
    }


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MeanIoU(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Sequence(datasets.Value("uint16"))),
                    "references": datasets.Sequence(datasets.Sequence(datasets.Value("uint16"))),
                }
            ),
        )

    def _compute(
        self,
        predictions,
        references,
        num_labels: int,
        ignore_index: int,
        nan_to_num: int | None = None,
        label_map: dict | None = None,
        reduce_labels: bool = False,
        areas: dict | None = None,
    ):
        if areas is not None:
            if len(predictions) or len(references):
                raise ValueError("give either pixels (predictions, references) or areas, not both")
            total = {name: np.asarray(areas[name], dtype=np.int64) for name in AREA_NAMES}
            if any(len(value) != num_labels for value in total.values()):
                raise ValueError(f"areas must hold {num_labels} values per count")
        else:
            if not len(references):
                raise ValueError("mean IoU of an empty set of predictions")
            total = {name: np.zeros(num_labels, dtype=np.int64) for name in AREA_NAMES}
            for prediction, reference in zip(predictions, references, strict=True):
                for name, value in pixel_areas(
                    prediction, reference, num_labels, ignore_index, label_map, reduce_labels
                ).items():
                    total[name] += value
        return scores(total, nan_to_num)
