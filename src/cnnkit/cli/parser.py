"""The ``cnnkit`` parser: each command's options and help, and the parsing that lets predict's
options come between its inputs.
"""

from __future__ import annotations

import argparse
import sys

from cnnkit import __version__
from cnnkit.cli.arguments import (
    DATASETS,
    VERBOSE_HELP,
    add_data_arguments,
    add_device_argument,
    add_model_argument,
    add_quiet_argument,
    add_train_arguments,
    home_path,
    whole,
)
from cnnkit.cli.evaluate import command_evaluate, command_report
from cnnkit.cli.export import CALIBRATION_IMAGES, command_export
from cnnkit.cli.fetch import command_fetch
from cnnkit.cli.model_files import resolved_model_file
from cnnkit.cli.predict import command_predict
from cnnkit.cli.search import command_search
from cnnkit.cli.serve import command_serve
from cnnkit.cli.train import command_demo, command_models, command_train
from cnnkit.paths import default_cache_dir


def build_parser() -> argparse.ArgumentParser:
    """The ``cnnkit`` parser: the top-level options, then each command from its ``_add_*``."""
    parser = argparse.ArgumentParser(
        prog="cnnkit",
        description="Train, evaluate and serve convolutional image classifiers.",
        epilog="Start with `cnnkit demo`. Each command has its own --help.",
    )
    parser.add_argument("--version", action="version", version=f"cnnkit {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    for add_command in (
        _add_fetch,
        _add_train,
        _add_evaluate,
        _add_predict,
        _add_serve,
        _add_demo,
        _add_models,
        _add_export,
        _add_search,
        _add_report,
    ):
        add_command(commands)
    for sub in commands.choices.values():  # -v after the command too; unset, the top's holds.
        sub.add_argument(
            "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP
        )
    return parser


def _add_fetch(commands: argparse._SubParsersAction) -> None:
    """The ``fetch`` command."""
    fetch = commands.add_parser("fetch", help="download or import a dataset archive")
    fetch.add_argument(
        "name", choices=["hasy", "cub"], help="hasy: HASYv2 (Zenodo); cub: CUB-200-2011 (Caltech)"
    )
    fetch.add_argument(
        "--to", type=home_path, default="data", help="destination folder (default ./data)"
    )
    fetch.add_argument(
        "--from", dest="from_file", type=home_path, help="import this local archive instead"
    )
    fetch.add_argument(
        "--url", help="download from this mirror instead of the publisher (checked the same)"
    )
    fetch.add_argument("--no-verify", action="store_true", help="skip the checksum check")
    fetch.add_argument(
        "--sha256",
        metavar="HEX",
        help="check this SHA-256 instead of the publisher's MD5 (each fetch prints the "
        "archive's SHA-256)",
    )
    fetch.set_defaults(handler=command_fetch)


def _add_train(commands: argparse._SubParsersAction) -> None:
    """The ``train`` command."""
    train = commands.add_parser("train", help="train a model and save RUN_DIR/model.safetensors")
    add_train_arguments(train)
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue from the run folder's last checkpoint (after Ctrl-C, or with more "
        "epochs); a folder with no checkpoint starts a fresh run, so one command both starts "
        "and continues a run (a job that may be stopped and started again)",
    )
    train.set_defaults(handler=command_train)


def _add_evaluate(commands: argparse._SubParsersAction) -> None:
    """The ``evaluate`` command."""
    evaluate = commands.add_parser("evaluate", help="evaluate a model file on a dataset")
    add_model_argument(
        evaluate,
        "model file, its .onnx export, or a training run's folder (default: the bundled model)",
    )
    add_data_arguments(evaluate, required=False, model_input=False)
    evaluate.add_argument(
        "--split",
        choices=["test", "all"],
        default="test",
        help="score the test split (default) or every image of the dataset",
    )
    evaluate.add_argument(
        "--out",
        type=home_path,
        help="report folder (default: MODEL's folder/evaluation for a run's model.safetensors, "
        "evaluation-FILE beside any other model file; runs/evaluation-bundled for the bundled "
        "model)",
    )
    evaluate.add_argument("--json", action="store_true", help="print metrics as JSON")
    add_device_argument(
        evaluate,
        "auto",
        "where the model runs (auto: cuda, then mps, then cpu; an .onnx file runs on "
        "ONNX Runtime's CPU provider)",
    )
    evaluate.set_defaults(handler=command_evaluate)


def _add_predict(commands: argparse._SubParsersAction) -> None:
    """The ``predict`` command."""
    predict = commands.add_parser("predict", help="classify image files or folders")
    predict.add_argument("inputs", nargs="*", metavar="[MODEL] IMAGE", help="model file, images")
    predict.add_argument(
        "--model",
        type=home_path,
        help="model file, its .onnx export, or a training run's folder (default: the first "
        "argument when it is one of those, else the bundled model)",
    )
    predict.add_argument("--top-k", type=whole(1), default=1, help="show the K best classes (1)")
    predict.add_argument("--json", action="store_true", help="print JSON")
    predict.add_argument(
        "--interactive",
        action="store_true",
        help="then ask for filenames, one per line, until an empty line (the book's loop)",
    )
    predict.add_argument(
        "--backend",
        choices=["torch", "onnx"],
        help="run the model with PyTorch or ONNX Runtime (default: onnx for a .onnx file)",
    )
    add_device_argument(
        predict,
        "cpu",
        "where a PyTorch model runs (default cpu, the quickest to start for a few images; "
        "auto: cuda, then mps, then cpu; ONNX Runtime runs on the CPU)",
    )
    predict.set_defaults(handler=command_predict)


def _add_serve(commands: argparse._SubParsersAction) -> None:
    """The ``serve`` command."""
    serve = commands.add_parser("serve", help="web page and REST API for a model")
    add_model_argument(
        serve,
        "model file, its .onnx export, or a training run's folder (default: the bundled "
        "symbol model, as its shipped int8 export where onnxruntime is installed)",
    )
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1; others need --allow-remote)",
    )
    serve.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    serve.add_argument(
        "--max-upload-mb",
        type=float,
        default=5,
        help="largest accepted upload in MB (10^6 bytes; 0.5 is half of one); larger ones "
        "get 413 (default 5)",
    )
    serve.add_argument(
        "--allow-remote", action="store_true", help="allow binding to a non-loopback address"
    )
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="server processes on the one port, each with its own copy of the model: more "
        "requests/s on several cores (default 1)",
    )
    add_device_argument(
        serve,
        "cpu",
        "where a PyTorch model runs (default cpu, the bundled model's int8 export is "
        "fastest there; auto: cuda, then mps, then cpu; an .onnx file runs on the CPU)",
    )
    serve.set_defaults(handler=command_serve)


def _add_demo(commands: argparse._SubParsersAction) -> None:
    """The ``demo`` command."""
    demo = commands.add_parser("demo", help="train and use a CNN on the embedded digits")
    demo.add_argument(
        "--out", type=home_path, default="runs/demo", help="run folder (default runs/demo)"
    )
    demo.add_argument("--epochs", type=whole(1), default=12, help="training epochs (default 12)")
    add_quiet_argument(demo)
    demo.set_defaults(handler=command_demo)


def _add_models(commands: argparse._SubParsersAction) -> None:
    """The ``models`` command."""
    models = commands.add_parser("models", help="list registered models and their options")
    models.set_defaults(handler=command_models)


def _add_export(commands: argparse._SubParsersAction) -> None:
    """The ``export`` command."""
    export = commands.add_parser("export", help="export a model file to ONNX")
    add_model_argument(
        export,
        "model file (.safetensors) or a training run's folder (default: the bundled "
        "symbol model, exported into the current folder)",
    )
    export.add_argument("--format", choices=["onnx"], default="onnx", help="file format (onnx)")
    export.add_argument(
        "--out", type=home_path, help="output file (default: MODEL with a .onnx suffix)"
    )
    export.add_argument("--opset", type=int, help="ONNX opset version (default 18)")
    export.add_argument(
        "--quantize",
        choices=["int8"],
        help="int8 static quantization, calibrated on training images of --dataset/--data, "
        "else of the data the model file records (default output MODEL-int8.onnx); faster on "
        "CPUs, check the accuracy",
    )
    export.add_argument(
        "--dataset",
        choices=DATASETS,
        help="calibration data source (default: the one the model file records)",
    )
    export.add_argument(
        "--data",
        type=home_path,
        help="calibration dataset path (default: the one the model file records)",
    )
    export.add_argument(
        "--fold", type=whole(1, 10), help="HASYv2 fold whose training images calibrate"
    )
    export.add_argument(
        "--calibration-images",
        type=whole(1),
        help=f"training images that calibrate --quantize int8 (default {CALIBRATION_IMAGES})",
    )
    export.add_argument(
        "--cache-dir", type=home_path, help=f"decoded-image cache (default {default_cache_dir()})"
    )
    export.set_defaults(handler=command_export)


def _add_search(commands: argparse._SubParsersAction) -> None:
    """The ``search`` command."""
    search = commands.add_parser(
        "search", help="hyperparameter search (Optuna grid, TPE or random) with pruning"
    )
    add_train_arguments(search, search=True)
    search.add_argument(
        "--space",
        type=home_path,
        default="book",
        help="named space (book, book-wide, symbol) or a YAML file (default: book). "
        "--sampler grid takes book, or a file whose values are all listed",
    )
    search.add_argument(
        "--sampler", choices=["grid", "tpe", "random"], default="tpe", help="(default: tpe)"
    )
    search.add_argument(
        "--pruner",
        choices=["halving", "median", "none"],
        default="halving",
        help="stop weak trials early: successive halving (default), median, or none",
    )
    search.add_argument(
        "--n-trials",
        type=whole(1),
        help="finished trials the study should hold (default: every grid point with --sampler "
        "grid, else 20, or no limit with --timeout)",
    )
    search.add_argument("--timeout", type=float, help="stop starting trials after N seconds")
    search.add_argument("--storage", help="Optuna storage URL (default sqlite:///OUT/study.db)")
    search.add_argument("--study-name", help="study name in the storage (default: OUT's name)")
    search.add_argument("--sampler-seed", type=int, help="seed the sampler (reproducible order)")
    search.add_argument(
        "--prune-warmup",
        type=int,
        default=2,
        help="epochs before a trial can be pruned (default 2)",
    )
    search.add_argument(
        "--workers",
        type=int,
        help="processes sharing the study and the cores (default: one per core up to 4 on a "
        "CPU, 1 with a GPU)",
    )
    search.add_argument(
        "--retrain-best", action="store_true", help="retrain the best on train+val, save model"
    )
    search.add_argument(
        "--keep-checkpoints", action="store_true", help="keep each trial's checkpoint.pt"
    )
    search.set_defaults(handler=command_search)


def _add_report(commands: argparse._SubParsersAction) -> None:
    """The ``report`` command."""
    report = commands.add_parser("report", help="one self-contained HTML page for a run folder")
    report.add_argument("run_dir", help="a training run or search folder")
    report.add_argument("--out", type=home_path, help="HTML file (default RUN_DIR/report.html)")
    report.set_defaults(handler=command_report)


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    """The parser of one subcommand of ``parser``."""
    (commands,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices[command]


def _one_model(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Fold ``--model`` into the MODEL argument, refusing two different models."""
    flag = getattr(args, "model_flag", None)
    if flag is not None:
        if args.model is not None and resolved_model_file(args.model) != resolved_model_file(flag):
            _subparser(parser, args.command).error(
                f"two models given: {args.model} and --model {flag}; give one"
            )
        args.model = flag
    return args


def parse_arguments(parser: argparse.ArgumentParser, argv: list[str] | None = None):
    """``parser.parse_args(argv)``, except that predict's options may come between its inputs
    (``predict model.safetensors --top-k 2 a.png --json b.png``): argparse stops filling a
    positional list at the first option and would call the rest unrecognized."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # The top-level options take no values, so the first other word is the command.
    command_at = next((index for index, word in enumerate(argv) if not word.startswith("-")), None)
    if command_at is None or argv[command_at] != "predict":
        return _one_model(parser, parser.parse_args(argv))
    args = parser.parse_args(argv[: command_at + 1])
    rest = argv[command_at + 1 :]
    # After "--" every word is an input (argparse's intermixed mode would refuse them).
    end = rest.index("--") if "--" in rest else len(rest)
    predict = _subparser(parser, "predict").parse_intermixed_args(rest[:end])
    predict.inputs += rest[end + 1 :]
    return argparse.Namespace(**{**vars(args), **vars(predict)})
