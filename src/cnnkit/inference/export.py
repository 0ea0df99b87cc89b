"""Export a saved model to ONNX with a dynamic batch axis and the cnnkit metadata embedded.

The ONNX file carries the same metadata as the ``.safetensors`` file in its ``metadata_props``,
so :class:`cnnkit.inference.onnx_backend.OnnxPredictor` can preprocess and label without the
original file.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnnkit.atomic import write_atomically
from cnnkit.errors import caused_by_interrupt, error_line, root_cause
from cnnkit.inference.artifact import ModelFileError, load_model, read_metadata
from cnnkit.inference.checksums import check_metadata_digest
from cnnkit.inference.model_metadata import parse_metadata_text, utf8_json

logger = logging.getLogger(__name__)

MIN_OPSET = 18
DEFAULT_OPSET = 18
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
# Keys of the ONNX ``metadata_props``; METADATA_KEY holds the whole cnnkit metadata JSON.
METADATA_KEY = "cnnkit"
CLASS_NAMES_KEY = "cnnkit.class_names"
PREPROCESSING_KEY = "cnnkit.preprocessing"
ARCHITECTURE_KEY = "cnnkit.architecture"
# Set by cnnkit.inference.quantize on an int8 export: how it was quantized (JSON).
QUANTIZATION_KEY = "cnnkit.quantization"


def _example_input(model: nn.Module) -> torch.Tensor:
    """A ``[2, C, H, W]`` batch; batch 2 keeps torch.export from specialising the batch to 1."""
    preprocessing = model.metadata.preprocessing
    size = preprocessing.image_size
    return torch.zeros(2, preprocessing.channels, size, size)


def _torch_export_quietly(model: nn.Module, example: torch.Tensor, opset: int) -> Any:
    """Run the torch.export-based exporter without its log lines and warnings."""
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    # onnxscript's version converter says it falls back to onnx's for opsets it lacks (newer
    # than 18): the export is fine, so that line is noise too.
    quieted = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript")]
    levels = [each.level for each in quieted]
    for each in quieted:
        each.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.onnx.export(
                model,
                (example,),
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: batch},),
                opset_version=opset,
                external_data=False,
                optimize=True,
                verbose=False,
            )
    finally:
        for each, level in zip(quieted, levels, strict=True):
            each.setLevel(level)


def _export_failure(model_path: Path, error: Exception) -> BaseException:
    """What to raise for an exporter error: the Ctrl-C behind it, or a one-line ModelFileError.

    An interrupt during the exporter's imports leaves a half-imported ``torch._dynamo``, and
    the exporter then fails on that while handling the interrupt: a stop, not a bad model.
    """
    if caused_by_interrupt(error):
        return KeyboardInterrupt()
    # The exporter wraps the real error in a long, coloured message with advice for its
    # developers; the error it was raised from says what went wrong.
    cause = root_cause(error)
    return ModelFileError(
        f"{model_path}: ONNX export failed ({type(cause).__name__}: {error_line(cause)})"
    )


def build_onnx_model(model_path: str | Path, opset: int = DEFAULT_OPSET) -> Any:
    """Convert a cnnkit model file to an in-memory ``onnx.ModelProto``.

    Args:
        model_path: a ``.safetensors`` model file written by :func:`cnnkit.save_model`.
        opset: the ONNX operator set version (18 or newer for the torch.export exporter).

    Returns:
        The ONNX model, with input ``input`` ``float32 [B, C, H, W]`` (normalised, as from
        :func:`cnnkit.data.normalize.to_model_input`) and output ``logits`` ``[B, num_classes]``.

    Raises:
        ModelFileError: if the model file is missing, tampered with or inconsistent, or the
            exporter fails (the message is one line).
        KeyboardInterrupt: if Ctrl-C stopped the exporter, even where the exporter then
            failed on what the interrupt left half done.
        ImportError: if ``onnx`` or ``onnxscript`` is not installed (``pip install cnnkit[onnx]``).
    """
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= newest:
        raise ValueError(
            f"opset must be between {MIN_OPSET} (the torch.export exporter's oldest) and "
            f"{newest} (this onnx package's newest); got {opset!r}"
        )
    model_path = Path(model_path)
    raw_metadata = read_metadata(model_path)
    model = load_model(model_path).float().eval()
    try:
        program = _torch_export_quietly(model, _example_input(model), opset)
    except Exception as error:  # The exporter raises many unrelated types.
        raise _export_failure(model_path, error) from error
    proto = program.model_proto
    written = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if written != opset:  # The exporter falls back to another opset rather than fail.
        raise ModelFileError(
            f"{model_path}: the exporter cannot write opset {opset} (it wrote {written})"
        )
    metadata = model.metadata
    properties = {
        METADATA_KEY: utf8_json(raw_metadata),
        CLASS_NAMES_KEY: utf8_json(list(metadata.class_names)),
        PREPROCESSING_KEY: json.dumps(asdict(metadata.preprocessing)),
        ARCHITECTURE_KEY: metadata.architecture,
    }
    del proto.metadata_props[:]
    for key, value in properties.items():
        proto.metadata_props.add(key=key, value=value)
    proto.doc_string = f"cnnkit {metadata.architecture}, {metadata.num_classes} classes"
    loadable_by_older_runtimes(proto)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def loadable_by_older_runtimes(proto: Any) -> Any:
    """Drop the operator sets no node uses and lower the IR version to the oldest those left
    allow, in place.

    Exporters and the quantizer write the newest IR version they know (10 for opset 18 models,
    which need only 8) and import operator sets they never use, and onnxruntime refuses a file
    whose IR version is newer than it reads (1.17 reads up to 9), whatever its operators.
    """
    import onnx

    def domains(nodes: Any) -> set[str]:
        found = set()
        for node in nodes:
            found.add(node.domain)
            for attribute in node.attribute:  # Branches and loop bodies hold nodes too.
                graphs = [attribute.g] if attribute.HasField("g") else []
                for graph in [*graphs, *attribute.graphs]:
                    found |= domains(graph.node)
        return found

    used = domains(proto.graph.node) | {function.domain for function in proto.functions}
    for function in proto.functions:
        used |= domains(function.node)
    used = {"" if domain == "ai.onnx" else domain for domain in used}
    kept = [
        opset
        for opset in proto.opset_import
        if ("" if opset.domain == "ai.onnx" else opset.domain) in used or opset.domain == ""
    ]
    del proto.opset_import[:]
    proto.opset_import.extend(kept)
    lowest = onnx.helper.find_min_ir_version_for(list(proto.opset_import), ignore_unknown=True)
    if proto.functions:
        lowest = max(lowest, 8)  # Model-local functions came with IR version 8.
    proto.ir_version = min(proto.ir_version, lowest)
    return proto


def export_onnx(model_path: str | Path, out_path: str | Path, opset: int = DEFAULT_OPSET) -> Path:
    """Write a cnnkit model file as a self-contained ONNX file, atomically.

    Args:
        model_path: a ``.safetensors`` model file.
        out_path: the ``.onnx`` file to write (replaced if it exists).
        opset: the ONNX operator set version.

    Returns:
        The path written.

    Raises:
        ModelFileError: if the model file is bad or the export fails.
    """
    out_path = Path(out_path)
    data = build_onnx_model(model_path, opset).SerializeToString()
    write_atomically(out_path, lambda temporary: temporary.write_bytes(data))
    logger.info("exported %s to %s (%d bytes)", model_path, out_path, len(data))
    return out_path


def metadata_from_properties(properties: Mapping[str, str], source: str = "<onnx>") -> dict:
    """The raw cnnkit metadata dictionary from an ONNX model's ``metadata_props``.

    Args:
        properties: key -> value, as ``{p.key: p.value for p in proto.metadata_props}`` or
            onnxruntime's ``session.get_modelmeta().custom_metadata_map``.
        source: the file name used in error messages.

    Raises:
        ModelFileError: if the ONNX model has no (valid) cnnkit metadata.
    """
    raw = parse_metadata_text(properties.get(METADATA_KEY), source, "ONNX file (use cnnkit export)")
    return check_metadata_digest(raw, source)
