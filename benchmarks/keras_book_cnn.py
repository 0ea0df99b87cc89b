"""The Keras side of ``vs_keras.py``: train the book's HASY CNN in Keras 3 and print images/s.

Runs in ``.bench-venv`` (``make bench-venv``), not in cnnkit's environment. The network is the
book's 1,024-unit model: Conv2D(32, 3, relu), MaxPool2D, Conv2D(32, 3, relu), MaxPool2D,
Flatten, Dense(1024, tanh), Dropout(0.5), Dense(369, softmax) on 32x32x3 input, Adam, with the
book's preprocessing (pixels / 255, one-hot labels). The first ``--warmup-steps`` steps (graph
tracing, XLA compilation) are excluded from the timing.

    .bench-venv/bin/python benchmarks/keras_book_cnn.py --data sample.npz --batch-size 32
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

BOOK_1024_PARAMETERS = 1_569_041


def build_book_model(num_classes: int, image_size: int = 32, channels: int = 3) -> keras.Model:
    """The book's HASY CNN with the 1,024-unit dense layer."""
    return keras.Sequential(
        [
            keras.Input((image_size, image_size, channels)),
            keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.MaxPool2D(),
            keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.MaxPool2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(1024, activation="tanh"),
            keras.layers.Dropout(0.5),
            keras.layers.Dense(num_classes, activation="softmax"),
        ]
    )


class StepTimer(keras.callbacks.Callback):
    """Records the wall-clock time at the end of every training step."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []
        self.cpu_times: list[float] = []

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.times.append(time.perf_counter())
        self.cpu_times.append(time.process_time())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help=".npz with images [N,32,32,3] and labels")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=100, help="measured steps")
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--threads", type=int, help="TensorFlow threads (default: its own)")
    parser.add_argument("--jit-compile", choices=["auto", "true", "false"], default="auto")
    args = parser.parse_args()

    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    arrays = np.load(args.data)
    num_classes = int(arrays["num_classes"])
    total_steps = args.warmup_steps + args.steps
    count = total_steps * args.batch_size
    if count > len(arrays["labels"]):
        raise SystemExit(f"{args.data} has {len(arrays['labels'])} images; {count} are needed")
    images = arrays["images"][:count].astype("float32") / 255.0
    labels = keras.utils.to_categorical(arrays["labels"][:count], num_classes)

    model = build_book_model(num_classes, images.shape[1], images.shape[3])
    if num_classes == 369 and model.count_params() != BOOK_1024_PARAMETERS:
        raise SystemExit(f"the book model has {model.count_params()} parameters")
    jit_compile = {"auto": "auto", "true": True, "false": False}[args.jit_compile]
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss="categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile=jit_compile,
    )
    timer = StepTimer()
    model.fit(images, labels, batch_size=args.batch_size, epochs=1, verbose=0, callbacks=[timer])
    # Time from the end of the last warm-up step to the end of the last step.
    seconds = timer.times[-1] - timer.times[args.warmup_steps - 1]
    cpu_seconds = timer.cpu_times[-1] - timer.cpu_times[args.warmup_steps - 1]
    measured = len(timer.times) - args.warmup_steps

    print(
        json.dumps(
            {
                "images_per_second": measured * args.batch_size / seconds,
                "images_per_cpu_second": measured * args.batch_size / max(cpu_seconds, 1e-9),
                "steps": measured,
                "batch_size": args.batch_size,
                "parameters": model.count_params(),
                "jit_compile": bool(model.jit_compile),
                "threads": tf.config.threading.get_intra_op_parallelism_threads(),
                "keras_version": keras.__version__,
                "tensorflow_version": tf.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
