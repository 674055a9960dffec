"""Export to ONNX: dynamic batch axis, checked with ``onnx.checker``, metadata in the file."""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import ExportError

OPSET = 17
INPUT_NAME, OUTPUT_NAME = "input", "logits"


@dataclass(frozen=True)
class ExportResult:
    path: Path
    bytes: int
    opset: int


def _unsupported_op(exc: BaseException) -> str | None:
    match = re.search(r"operator '?([\w:.]+)'? to ONNX", str(exc)) or re.search(r"(aten::\w+)", str(exc))
    return match.group(1) if match else None


def to_onnx_bytes(model: nn.Module, example_input: torch.Tensor, *, opset: int = OPSET) -> bytes:
    """Serialise ``model`` (on the CPU, eval mode) to ONNX with a dynamic batch axis."""
    buffer = io.BytesIO()
    model = model.cpu().eval()
    fastpath = torch.backends.mha.get_fastpath_enabled()
    try:
        # Under no_grad in eval mode nn.MultiheadAttention takes a fused kernel that has no ONNX
        # symbolic; with the fast path off it exports as the matmuls it computes.
        torch.backends.mha.set_fastpath_enabled(False)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            # The TorchScript-based exporter: it needs no extra package and handles the dynamic batch
            # axis of every architecture we test; the dynamo exporter needs onnxscript.
            torch.onnx.export(
                model, (example_input[:1].cpu(),), buffer, dynamo=False, opset_version=opset,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, do_constant_folding=True,
            )
    except Exception as exc:
        op = _unsupported_op(exc)
        where = f" (unsupported operator {op})" if op else ""
        raise ExportError(f"ONNX export failed{where}: {str(exc).splitlines()[0][:300]}",
                          hint="rewrite or replace that operation, or try a newer torch") from exc
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return buffer.getvalue()


def export_onnx(model: nn.Module, path: Path, *, example_input: torch.Tensor,
                metadata: dict[str, str], opset: int = OPSET) -> ExportResult:
    """Write ``model`` to ``path`` as a checked ONNX file carrying ``metadata``."""
    import onnx

    proto = onnx.load_from_string(to_onnx_bytes(model, example_input, opset=opset))
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, str(value)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:
        raise ExportError(f"the exported ONNX model failed onnx.checker: {str(exc).splitlines()[0]}") from exc
    data = proto.SerializeToString()
    path.write_bytes(data)
    return ExportResult(path=path, bytes=len(data), opset=opset)
