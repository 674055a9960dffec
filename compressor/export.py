"""Export to ONNX: dynamic batch axis, checked with ``onnx.checker``, metadata in the file."""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import ExportError, one_line

OPSET = 17
MAX_OPSET = 18
"""An export that fails at OPSET for want of an operator added later (``col2im``: ``nn.Fold``, opset 18) is
retried at the opset that added it, up to this one (onnxruntime runs it); the file records its opset."""
INPUT_NAME, OUTPUT_NAME = "input", "logits"


@dataclass(frozen=True)
class ExportResult:
    path: Path
    bytes: int
    opset: int


def _unsupported_op(exc: BaseException) -> str | None:
    match = re.search(r"operator '?([\w:.]+)'?,? (?:to ONNX|output size)", str(exc)) or re.search(r"(aten::\w+)", str(exc))
    return match.group(1) if match else None


def _pool_matrix(size: int, out: int) -> torch.Tensor:
    """The averaging matrix of adaptive average pooling along one axis (PyTorch's bin edges)."""
    m = torch.zeros(out, size)
    for i in range(out):
        start, end = (i * size) // out, -(-((i + 1) * size) // out)
        m[i, start:end] = 1.0 / (end - start)
    return m


class _MatrixAdaptiveAvgPool2d(nn.Module):
    """``AdaptiveAvgPool2d`` for one input size as two matrix products.

    The TorchScript exporter only handles adaptive pooling whose output size divides the input
    size; torchvision's VGG pools its 1x1 map at 32 px to 7x7. The input size is fixed in the
    ONNX file anyway (only the batch axis is dynamic), so the pooling is a constant linear map.
    """

    def __init__(self, in_hw: tuple[int, int], out_hw: tuple[int, int]) -> None:
        super().__init__()
        self.register_buffer("rows", _pool_matrix(in_hw[0], out_hw[0]))
        self.register_buffer("cols", _pool_matrix(in_hw[1], out_hw[1]).t().contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rows @ x @ self.cols


@contextmanager
def _exportable_pools(model: nn.Module, example_input: torch.Tensor):
    """Swap the adaptive poolings the exporter cannot handle for matrix ones, and back afterwards."""
    shapes: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {}
    hooks = [m.register_forward_hook(lambda m, i, o, name=name: shapes.__setitem__(name, (i[0].shape[-2:], o.shape[-2:])))
             for name, m in model.named_modules() if isinstance(m, nn.AdaptiveAvgPool2d)]
    try:
        if hooks:
            with torch.no_grad():
                model(example_input)
    finally:
        for h in hooks:
            h.remove()
    swapped = {name: model.get_submodule(name) for name, (i, o) in shapes.items()
               if i[0] % o[0] or i[1] % o[1]}
    for name, (i, o) in shapes.items():
        if name in swapped:
            _set_submodule(model, name, _MatrixAdaptiveAvgPool2d(tuple(i), tuple(o)))
    try:
        yield
    finally:
        for name, m in swapped.items():
            _set_submodule(model, name, m)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def to_onnx_bytes(model: nn.Module, example_input: torch.Tensor, *, opset: int = OPSET) -> bytes:
    """Serialise ``model`` (on the CPU, eval mode) to ONNX with a dynamic batch axis.

    The TorchScript-based exporter first (fast, and it handles the dynamic batch axis of every
    architecture we test); where it fails, the dynamo exporter (onnxscript), which decomposes what the
    first has no symbolic for (``nn.Unfold`` of unknown size: HaloNet; antialiased bicubic resizing:
    NaFlexViT) at a cost of seconds to a minute."""
    model = model.cpu().eval()
    try:
        return _torchscript_bytes(model, example_input, opset=opset)
    except ExportError as first:
        try:
            return _dynamo_bytes(model, example_input)
        except ExportError as second:
            raise ExportError(f"{first.message}; the dynamo exporter failed too: {second.message}",
                              hint=first.hint) from first


@contextmanager
def _export_mode(model: nn.Module, example_input: torch.Tensor):
    fastpath = torch.backends.mha.get_fastpath_enabled()
    try:
        # Under no_grad in eval mode nn.MultiheadAttention takes a fused kernel that has no ONNX
        # symbolic; with the fast path off it exports as the matmuls it computes.
        torch.backends.mha.set_fastpath_enabled(False)
        with warnings.catch_warnings(), torch.no_grad(), _exportable_pools(model, example_input[:1].cpu()):
            warnings.simplefilter("ignore")
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def _torchscript_bytes(model: nn.Module, example_input: torch.Tensor, *, opset: int) -> bytes:
    buffer = io.BytesIO()
    try:
        with _export_mode(model, example_input):
            torch.onnx.export(
                model, (example_input[:1].cpu(),), buffer, dynamo=False, opset_version=opset,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, do_constant_folding=True,
            )
    except Exception as exc:
        op = _unsupported_op(exc)
        where = f" (unsupported operator {op})" if op else ""
        message = f"ONNX export failed{where}: {one_line(exc, 300, with_type=False)}"
        hint = "rewrite or replace that operation, or try a newer torch"
        newer = re.search(r"added in (?:opset )?version (\d+)", str(exc))
        if newer and opset < int(newer.group(1)) <= MAX_OPSET:
            try:
                return _torchscript_bytes(model, example_input, opset=int(newer.group(1)))
            except ExportError as retried:  # say why the first try failed too: the retry's reason can be obscure
                raise ExportError(f"{message}; retried at opset {newer.group(1)}, it failed again"
                                  f"{retried.message.removeprefix('ONNX export failed')}", hint=hint) from exc
        raise ExportError(message, hint=hint) from exc
    return buffer.getvalue()


def _dynamo_bytes(model: nn.Module, example_input: torch.Tensor) -> bytes:
    """The dynamo exporter's graph, traced at batch 2 (torch.export takes a dimension of size 1 for a
    constant), refused where it still fixed the batch size."""
    quiet = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [log.level for log in quiet]
    try:
        for log in quiet:
            log.setLevel(logging.ERROR)
        with _export_mode(model, example_input), contextlib.redirect_stdout(io.StringIO()):
            program = torch.onnx.export(
                model, (example_input[:1].cpu().expand(2, *example_input.shape[1:]).contiguous(),), dynamo=True,
                opset_version=MAX_OPSET, verbose=False,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},))
        proto = program.model_proto
    except Exception as exc:
        raise ExportError(one_line(exc, 200)) from exc
    finally:
        for log, level in zip(quiet, levels):
            log.setLevel(level)
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    if not dims or not dims[0].dim_param:
        raise ExportError("its graph fixes the batch size (the forward reshapes by the example's batch)")
    return proto.SerializeToString()


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
        raise ExportError(f"the exported ONNX model failed onnx.checker: {one_line(exc, with_type=False)}") from exc
    data = proto.SerializeToString()
    path.write_bytes(data)
    used = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=opset)
    return ExportResult(path=path, bytes=len(data), opset=used)
