"""How much of the HASYv2 fold-1 error is shared by independently trained models.

Evaluates each given fold-1 model file on the fold's test split, then:

- the average of their probabilities (an ensemble) and the oracle (right when any model is
  right), an upper bound for any way of combining them;
- how many test errors every model makes;
- the test images with a pixel-identical training image, and how often those twins carry
  another label (no classifier can get both of two identical images with different labels);
- how many of the ensemble's errors fall between the most-confused pairs of classes (mostly
  LaTeX commands with one glyph, such as ``\\sum`` and ``\\Sigma``), and how many of them
  predicting each pair's one class for both (the better of the two, chosen on the test split
  itself: an upper bound) would fix.

    python -m benchmarks.hasy_agreement A.safetensors B.safetensors [--fold 1]

The model files come from ``python -m benchmarks.hasy_recipe default ... --keep-model PATH``.
"""

from __future__ import annotations

import argparse
import hashlib
from collections import Counter, defaultdict

import numpy as np
import torch

from benchmarks.record import record_result, shared_dataset
from cnnkit.evaluation.evaluate import align_labels, load_splits_for, predict_logits
from cnnkit.evaluation.metrics import topk_accuracy
from cnnkit.inference.artifact import load_model


def twin_figures(train, test, test_labels: np.ndarray, predictions: np.ndarray) -> dict:
    """Test images with a pixel-identical training image, and what their twins are labelled."""
    twins: dict[bytes, Counter] = defaultdict(Counter)
    for image, label in zip(np.asarray(train.images), train.labels, strict=True):
        twins[hashlib.blake2b(image.tobytes(), digest_size=16).digest()][int(label)] += 1
    count = conflicting = majority_right = model_right = 0
    for index, image in enumerate(np.asarray(test.images)):
        labels = twins.get(hashlib.blake2b(image.tobytes(), digest_size=16).digest())
        if not labels:
            continue
        count += 1
        conflicting += len(labels) > 1
        majority_right += labels.most_common(1)[0][0] == test_labels[index]
        model_right += predictions[index] == test_labels[index]
    return {
        "test_images_with_a_train_twin": count,
        "twins_with_several_labels": conflicting,
        "twin_majority_label_accuracy": majority_right / count if count else None,
        "ensemble_accuracy_on_them": model_right / count if count else None,
    }


def pair_figures(
    labels: np.ndarray, predictions: np.ndarray, class_names: tuple[str, ...], pairs: int
) -> dict:
    """Errors between the ``pairs`` most-confused class pairs, and what merging each pair into
    the better of its two classes (all of the pair's predictions become that class) would gain."""
    count = len(class_names)
    confusion = np.zeros((count, count), dtype=np.int64)
    np.add.at(confusion, (labels, predictions), 1)
    mistakes = confusion - np.diag(np.diag(confusion))
    both = np.triu(mistakes + mistakes.T, k=1)
    order = np.argsort(both, axis=None, kind="stable")[::-1]
    order = order[both.flat[order] > 0][:pairs]  # Only pairs (i < j) with a confusion.
    rows, in_pairs, gain = [], 0, 0
    for i, j in zip(*np.unravel_index(order, both.shape), strict=True):
        # Predicting i wherever the model says i or j turns true-i-said-j right and
        # true-j-said-j wrong; likewise for j.
        best = max(mistakes[i, j] - confusion[j, j], mistakes[j, i] - confusion[i, i], 0)
        in_pairs += int(both[i, j])
        gain += int(best)
        rows.append(
            {
                "classes": [class_names[i], class_names[j]],
                "confused": [int(mistakes[i, j]), int(mistakes[j, i])],
                "right": [int(confusion[i, i]), int(confusion[j, j])],
            }
        )
    return {
        "errors": int(mistakes.sum()),
        "pairs": len(rows),
        "errors_in_most_confused_pairs": in_pairs,
        "merge_to_better_class_gain_upper_bound": gain,
        "most_confused_pairs": rows,
    }


def fold_splits(archive, preprocessing, fold: int):
    """The fold's train and test images, preprocessed as the model expects."""
    overrides = {"dataset": "hasy", "data": str(archive), "fold": fold}
    return load_splits_for(preprocessing, overrides, progress=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="fold-K model files (.safetensors)")
    parser.add_argument("--fold", type=int, default=1)
    parser.add_argument("--pairs", type=int, default=40, help="most-confused pairs to count")
    parser.add_argument("--name", default="hasy_agreement")
    args = parser.parse_args()
    archive = shared_dataset("HASYv2-dev.tar.bz2")
    models = [load_model(path) for path in args.models]
    preprocessing = models[0].metadata.preprocessing
    if any(model.metadata.preprocessing != preprocessing for model in models):
        raise SystemExit("the models must share their preprocessing")
    splits = fold_splits(archive, preprocessing, args.fold)
    classes = models[0].metadata.class_names
    labels = torch.from_numpy(align_labels(splits.test, classes, str(archive)))
    probabilities = []
    for path, model in zip(args.models, models, strict=True):
        if model.metadata.class_names != classes:
            raise SystemExit(f"{path}: its classes differ from the first model's")
        logits = predict_logits(model.eval(), splits.test, preprocessing, torch.device("cpu"))
        probabilities.append(torch.softmax(logits, dim=1))
        print(f"{path}: test top-1 {topk_accuracy(logits, labels):.4f}")
    stacked = torch.stack(probabilities)
    right = stacked.argmax(2) == labels
    ensemble = stacked.mean(0)
    top1, top5 = topk_accuracy(ensemble, labels, 1), topk_accuracy(ensemble, labels, 5)
    figures = {
        "models": args.models,
        "test_images": len(labels),
        "model_top1": right.float().mean(1).tolist(),
        "ensemble_top1": top1,
        "ensemble_top5": top5,
        "oracle_top1": right.any(0).float().mean().item(),
        "errors_all_models_make": int((~right).all(0).sum()),
        "errors_any_model_makes": int((~right).any(0).sum()),
        **twin_figures(splits.train, splits.test, labels.numpy(), ensemble.argmax(1).numpy()),
        "confusion": pair_figures(labels.numpy(), ensemble.argmax(1).numpy(), classes, args.pairs),
    }
    print(f"ensemble of {len(models)}: top-1 {top1:.4f}, top-5 {top5:.4f}")
    print(f"oracle (any model right): {figures['oracle_top1']:.4f}")
    print(
        f"errors every model makes: {figures['errors_all_models_make']} of "
        f"{figures['errors_any_model_makes']} images some model gets wrong"
    )
    print(
        f"test images with a pixel-identical training image: "
        f"{figures['test_images_with_a_train_twin']}, of which "
        f"{figures['twins_with_several_labels']} have twins under several labels; the twins' "
        f"majority label is right on {figures['twin_majority_label_accuracy']:.3f} of them"
    )
    confusion = figures["confusion"]
    gain = confusion["merge_to_better_class_gain_upper_bound"]
    print(
        f"ensemble errors between its {confusion['pairs']} most-confused class pairs: "
        f"{confusion['errors_in_most_confused_pairs']} of {confusion['errors']}; predicting one "
        f"class for each pair would fix at most {gain}"
    )
    for row in confusion["most_confused_pairs"][:10]:
        first, second = row["classes"]
        print(f"  {first} <-> {second}: {row['confused'][0]} + {row['confused'][1]} confused")
    print(f"saved {record_result(args.name, figures)}")


if __name__ == "__main__":
    main()
