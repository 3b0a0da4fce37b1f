"""Top-1 and top-k accuracy as an `evaluate` module shipped with the package, so that it loads offline by path:

import evaluate, modeling_sgmae
from pathlib import Path
metric = evaluate.load(str(Path(modeling_sgmae.__file__).parent / "metrics" / "accuracy"))
metric.compute(predictions=logits, references=labels)  # {"accuracy": ..., "top5_accuracy": ...}
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Accuracy is the share of samples whose prediction is the reference label. Given per-class scores (logits,
probabilities or kNN votes, one row per sample) it also reports top-k accuracy: the share of samples whose
reference is among the k highest scores. Given class ids, it reports top-1 accuracy only.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float`, or `list` of `int`): per-class scores [N, C], or predicted class ids [N].
    references (`list` of `int`): reference class ids [N].
    top_k (`list` of `int`, defaults to `[5]`): the k of the extra top-k accuracies (scores only); a k of at least
        C counts every sample as correct.
    normalize (`bool`, defaults to `True`): shares if True, counts of correct samples if False.
    sample_weight (`list` of `float`, defaults to `None`): per-sample weights.
Returns:
    accuracy (`float` or `int`): top-1 accuracy (ties between scores go to the lowest class id, like argmax).
    top{k}_accuracy (`float` or `int`): top-k accuracy for each k in `top_k` (scores only).
Examples:
    >>> metric = evaluate.load("path/to/metrics/accuracy")
    >>> metric.compute(predictions=[[0.1, 0.7, 0.2], [0.5, 0.3, 0.2]], references=[2, 0], top_k=[2])
    {'accuracy': 0.5, 'top2_accuracy': 1.0}
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features(
                    {
                        "predictions": datasets.Sequence(datasets.Value("float32")),
                        "references": datasets.Value("int64"),
                    }
                ),
                datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
            ],
        )

    def _compute(self, predictions, references, top_k=(5,), normalize=True, sample_weight=None):
        predictions = np.asarray(predictions)
        references = np.asarray(references, dtype=np.int64)
        weights = np.ones(len(references)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        if len(references) == 0:
            raise ValueError("accuracy of an empty set of predictions")

        def share(correct: np.ndarray) -> float:
            total = float((weights * correct).sum())
            return total / float(weights.sum()) if normalize else total

        if predictions.ndim == 1:  # class ids
            return {"accuracy": share(predictions == references)}
        num_classes = predictions.shape[1]
        # rank of the reference = how many classes score strictly higher, or equal with a lower id (argmax's order)
        reference_scores = np.take_along_axis(predictions, references[:, None], axis=1)
        classes = np.arange(num_classes)[None, :]
        higher = (predictions > reference_scores) | (
            (predictions == reference_scores) & (classes < references[:, None])
        )
        rank = higher.sum(axis=1)
        results = {"accuracy": share(rank < 1)}
        for k in top_k:
            if int(k) < 1:
                raise ValueError(f"top_k values must be positive, got {k}")
            results[f"top{int(k)}_accuracy"] = share(rank < int(k))
        return results
