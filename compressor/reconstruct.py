"""Reconstruction after a physical prune: re-fit each layer so it gives what it gave before the prune.

Pruning removes a layer's input channels; the kept weights were trained to work with the removed ones,
so the layer's output drifts, and the drift compounds down the network (a ResNet-20 pruned to half its
FLOPs scores 10% right after the cut). Here every convolution and linear layer of the pruned model is
re-fitted, from the input to the output, by ridge-regularised least squares on a few hundred calibration
images, so that its output on the kept channels matches the output the same layer (by module name:
physical pruning keeps names) gave in the model just before the prune (for ``oneshot``, the original).
Each layer is fed the pruned model's own activations, with the layers before it already re-fitted, so
errors do not compound (He et al. 2017; ThiNet; AIMET's channel pruning). The fit has an intercept:
where the layer has a bias it takes the removed channels' mean contribution; where it has none and a
batch norm reads its output, the intercept is folded into that norm's running mean (FLAP's bias
compensation). Those norms get the pre-prune running statistics of their kept channels, which is what
the re-fitted outputs now follow.

The ridge pulls towards the pruned weights, not towards zero, so a layer with few calibration rows per
weight stays close to what it was; a re-fit that does not lower the error on held-out calibration
images is not applied. Grouped and depthwise convolutions are solved per group. A layer that cannot be
handled is skipped and named, with the reason, in the :class:`Reconstruction`.

The whole pass is one forward of each model over one batch of calibration images: forward hooks
sample the pre-prune outputs, forward pre-hooks re-fit each pruned layer as the batch reaches it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

CALIBRATION_IMAGES = 256
"""Images of the one calibration batch (fewer where the model's activations would not fit in memory)."""
ACTIVATION_BUDGET_BYTES = 2 << 30
"""Rough bound on the calibration batch's transient activations (see :func:`affordable_images`)."""
MACS_BUDGET = 2e11
"""Bound on the calibration batch's multiply-accumulates in the model before the prune (the pass over the
pruned model costs less): about 10 s on two CPU cores. Small models take all ``CALIBRATION_IMAGES``
(ResNet-20 at 28x28: 41 MMACs an image); a ResNet-50 at 224x224 (4.1 GMACs) takes 48."""
RIDGE = 1e-3
"""Ridge strength, relative to the mean diagonal of the layer's Gram matrix (pulls towards the pruned weights)."""
MIN_ROWS = 2048
ROWS_PER_FEATURE = 8
"""Sampled output positions per layer: at least ``MIN_ROWS`` and ``ROWS_PER_FEATURE`` per weight of one output."""
HELD_OUT = 0.2
"""Share of the calibration images whose rows only check the fit."""

LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Linear)
BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass(frozen=True)
class LayerFit:
    """One re-fitted layer; errors are the squared error over the target's energy, on held-out rows."""

    name: str
    features: int
    """Weights per output (per group), plus one for the intercept."""
    rows: int
    error_before: float
    error_after: float
    applied: bool
    """False where the re-fit did not lower the held-out error (the pruned weights were kept)."""
    bias: str
    """Where the intercept went: ``bias``, ``batch norm`` (folded into its running mean) or ``none``."""


@dataclass(frozen=True)
class Reconstruction:
    """What one reconstruction pass did."""

    images: int
    seconds: float
    layers: list[LayerFit] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    """Layer name -> why it was not re-fitted."""
    norms_restored: int = 0
    """Batch norms given their pre-prune statistics (kept channels, intercept folded)."""

    @property
    def refitted(self) -> int:
        return sum(f.applied for f in self.layers)

    def summary(self) -> str:
        errors = sorted((f.error_before, f.error_after) for f in self.layers if f.applied)
        mid = errors[len(errors) // 2] if errors else None
        text = f"re-fitted {self.refitted} of {len(self.layers) + len(self.skipped)} layers on {self.images} images"
        if mid:
            text += f" (median held-out error {mid[0]:.3f} -> {mid[1]:.3f})"
        if self.skipped:
            text += f"; skipped {len(self.skipped)}: " + "; ".join(f"{k}: {v}" for k, v in list(self.skipped.items())[:3])
        return text + f", {self.seconds:.1f} s"


def calibration_images(data, n: int, *, seed: int = 0) -> torch.Tensor:
    """``n`` training images drawn at random (seeded): the one place reconstruction reads the data."""
    from .data import TensorImages

    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data.train), generator=g)[:n]
    if isinstance(data.train, TensorImages):
        return data.train.x[idx]
    return torch.stack([data.train[int(i)][0] for i in idx])  # a lazily read split: only these n are decoded


@torch.no_grad()
def affordable_images(model: nn.Module, example: torch.Tensor, n: int) -> int:
    """``n``, or fewer where one batch of ``n`` would hold more than ``ACTIVATION_BUDGET_BYTES`` of activations
    (the largest single activation of one image, times four for what is alive around it), or cost more
    than ``MACS_BUDGET`` multiply-accumulates in its convolutions and linear layers (at least 16 images)."""
    largest = [0]
    macs = [0]

    def hook(m, _i, out):
        if isinstance(out, torch.Tensor):
            largest[0] = max(largest[0], out[:1].numel())
            if isinstance(m, LAYER_TYPES):
                macs[0] += out[:1].numel() * (m.weight[0].numel())

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    training = model.training
    try:
        model.eval()(example[:1])
    finally:
        for h in handles:
            h.remove()
        model.train(training)
    per_image = 4 * largest[0] * example.element_size()
    by_compute = max(16, int(MACS_BUDGET // max(macs[0], 1)))
    return max(1, min(n, ACTIVATION_BUDGET_BYTES // max(per_image, 1), by_compute))


def kept_outputs(graph, plan) -> dict[str, torch.Tensor]:
    """For each convolution and linear layer, which of its output channels ``plan`` keeps (indices into the
    pre-prune layer), read off a copy pruned by the same plan whose weights hold their output index."""
    from .pruning import apply_plan, copy_graph

    twin = copy_graph(graph)
    with torch.no_grad():
        for m in twin.model.modules():
            if isinstance(m, LAYER_TYPES):
                shape = (-1,) + (1,) * (m.weight.dim() - 1)
                m.weight.copy_(torch.arange(m.weight.shape[0], dtype=m.weight.dtype, device=m.weight.device).view(shape))
    apply_plan(twin, plan)
    return {name: m.weight.detach().flatten(1)[:, 0].round().long().cpu()
            for name, m in twin.model.named_modules() if isinstance(m, LAYER_TYPES) and m.weight.numel()}


def unsupported(module: nn.Module, reference: nn.Module | None, kept: torch.Tensor | None) -> str | None:
    """Why ``module`` cannot be re-fitted, or None."""
    if reference is None or type(reference) is not type(module):
        return "no layer of the same name and kind in the pre-prune model"
    if kept is None or kept.numel() != module.weight.shape[0]:
        return "its kept output channels are unknown"
    if isinstance(module, nn.Linear):
        return None
    if module.padding_mode != "zeros":
        return f"padding mode {module.padding_mode!r} (only zero padding is re-fitted)"
    return None  # grouped: solved per group of the pruned layer, whatever the pre-prune grouping was


class _Targets:
    """What the pre-prune model's pass leaves for the pruned model's: sampled outputs, and which norm reads what."""

    def __init__(self) -> None:
        self.outputs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        """Layer -> (sampled positions [n, P], outputs there [n, P, kept channels])."""
        self.calls: dict[str, int] = {}
        self.norm_of: dict[str, str] = {}
        """Layer -> the batch norm that reads its output directly."""


def _positions(total: int, n: int, rows: int, generator: torch.Generator) -> torch.Tensor:
    per_image = min(total, max(1, math.ceil(rows / n)))
    if per_image == total:
        return torch.arange(total).expand(n, total)
    return torch.randint(total, (n, per_image), generator=generator)


def _flat_output(module: nn.Module, out: torch.Tensor) -> torch.Tensor:
    """Output as [n, positions, channels]."""
    if isinstance(module, nn.Linear):
        return out.reshape(out.shape[0], -1, out.shape[-1])
    return out.flatten(2).transpose(1, 2)


def _features(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.in_features + 1
    return module.in_channels // module.groups * math.prod(module.kernel_size) + 1


def _conv_rows(module: nn.Module, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The input patches the convolution reads at the sampled output positions: [n, P, C * K], channel-major
    like the weight. One gather from the padded input (far cheaper than ``F.unfold`` of every position)."""
    if isinstance(module, nn.Conv1d):
        x = x.unsqueeze(2)
        (kh, kw), (sh, sw), (dh, dw) = (1, *module.kernel_size), (1, *module.stride), (1, *module.dilation)
        pad = (*_pads(module, module.kernel_size, module.dilation), 0, 0)
    else:
        (kh, kw), (sh, sw), (dh, dw) = module.kernel_size, module.stride, module.dilation
        ph0, ph1, pw0, pw1 = _pads(module, module.kernel_size, module.dilation)
        pad = (pw0, pw1, ph0, ph1)
    xp = F.pad(x, pad)
    n, c, hp, wp = xp.shape
    wo = (wp - dw * (kw - 1) - 1) // sw + 1
    oy, ox = idx // wo, idx % wo
    offsets = torch.tensor([ky * dh * wp + kx * dw for ky in range(kh) for kx in range(kw)], device=x.device)
    flat = ((oy * sh * wp + ox * sw)[:, :, None] + offsets).reshape(n, -1)  # [n, P * K]
    picked = torch.gather(xp.flatten(2), 2, flat[:, None, :].expand(-1, c, -1))  # [n, C, P * K]
    p, k = idx.shape[1], kh * kw
    return picked.view(n, c, p, k).permute(0, 2, 1, 3).reshape(n, p, c * k)


def _pads(module: nn.Module, kernel: tuple[int, ...], dilation: tuple[int, ...]) -> tuple[int, ...]:
    """(before, after) zero padding per spatial dimension, flattened; ``padding='same'`` is asymmetric when odd."""
    if module.padding == "valid":
        return tuple(0 for _ in kernel for _ in range(2))
    if module.padding == "same":
        out = []
        for k, d in zip(kernel, dilation):
            total = d * (k - 1)
            out += [total // 2, total - total // 2]
        return tuple(out)
    return tuple(p for p in module.padding for _ in range(2))


def _rows(module: nn.Module, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The layer's inputs at the sampled positions, per group: [groups, n, P, features] (no intercept)."""
    if isinstance(module, nn.Linear):
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        return torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[-1]).to(x.device))[None]
    patches = _conv_rows(module, x, idx.to(x.device))  # [n, P, C * K], input channel major
    n, p, ck = patches.shape
    g = module.groups
    return patches.reshape(n, p, g, ck // g).permute(2, 0, 1, 3)


def _weights(module: nn.Module) -> torch.Tensor:
    """The layer's weights as [groups, features without intercept, outputs per group]."""
    g = 1 if isinstance(module, nn.Linear) else module.groups
    w = module.weight.detach().flatten(1)
    return w.reshape(g, -1, w.shape[1]).transpose(1, 2)


def _set_weights(module: nn.Module, w: torch.Tensor) -> None:
    module.weight.copy_(w.transpose(1, 2).reshape(module.weight.shape[0], -1).reshape(module.weight.shape))


def _error(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> float:
    """Squared error of ``x @ w`` against ``y`` over ``y``'s energy, summed over groups."""
    return float(((torch.bmm(x, w) - y) ** 2).sum() / (y ** 2).sum().clamp_min(1e-12))


def solve(x: torch.Tensor, y: torch.Tensor, w0: torch.Tensor, *, ridge: float, intercept: bool) -> torch.Tensor:
    """Ridge least squares per group: ``argmin ||x w - y||^2 + lam ||w - w0||^2`` with ``x`` [G, rows, d],
    ``y`` [G, rows, o], ``w0`` [G, d, o]; ``lam`` is ``ridge`` times the mean diagonal of ``x^T x``, and the
    last column of ``x`` (the intercept, where ``intercept``) is not pulled.

    Solved for the change from ``w0``; an unpulled intercept is the same as centring ``x`` and the residual
    (the intercept then takes the means). Where a layer has fewer rows than weights per output (the wide
    layers deep in a large model, fitted on a few dozen images), the same change comes from the rows x rows
    system (``x^T (x x^T + lam)^-1``), far smaller than the weights x weights one."""
    pulled = x.shape[-1] - int(intercept)
    xs = x[..., :pulled]
    residual = y - torch.bmm(x, w0)
    lam = ridge * (xs ** 2).sum(1).mean(1).double().clamp_min(1e-12)  # [G]
    if intercept:
        x_mean, r_mean = xs.mean(1, keepdim=True), residual.mean(1, keepdim=True)
        xs, residual = xs - x_mean, residual - r_mean
    rows = xs.shape[1]
    # Products in float32 (thousands of rows, well within its precision), the solve in float64.
    if rows < pulled:
        eye = torch.eye(rows, dtype=torch.float64, device=x.device)
        a = torch.bmm(xs, xs.transpose(1, 2)).double() + lam[:, None, None] * eye
        delta = torch.bmm(xs.transpose(1, 2).double(), _solve(a, residual.double()))
    else:
        eye = torch.eye(pulled, dtype=torch.float64, device=x.device)
        a = torch.bmm(xs.transpose(1, 2), xs).double() + lam[:, None, None] * eye
        delta = _solve(a, torch.bmm(xs.transpose(1, 2), residual).double())
    delta = delta.to(x.dtype)
    if intercept:
        delta = torch.cat([delta, r_mean - torch.bmm(x_mean, delta)], 1)
    return w0 + delta


def _solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    try:
        return torch.linalg.solve(a, b)
    except RuntimeError:  # singular (e.g. a dead input with no pull): the least-norm solution
        return torch.linalg.lstsq(a, b).solution


@torch.no_grad()
def reconstruct(reference: nn.Module, pruned: nn.Module, *, kept: dict[str, torch.Tensor], images: torch.Tensor,
                ridge: float = RIDGE, seed: int = 0) -> Reconstruction:
    """Re-fit ``pruned``'s layers in place so each gives ``reference``'s output on its kept channels (see the module docstring).

    ``kept``: layer name -> the pre-prune output channels the pruned layer kept (:func:`kept_outputs`).
    ``images``: one calibration batch, on the models' device.
    """
    start = time.perf_counter()
    ref_layers = {n: m for n, m in reference.named_modules() if isinstance(m, LAYER_TYPES)}
    ref_norms = {n: m for n, m in reference.named_modules() if isinstance(m, BN_TYPES)}
    skipped: dict[str, str] = {}
    layers: dict[str, nn.Module] = {}
    for name, m in pruned.named_modules():
        if isinstance(m, LAYER_TYPES):
            why = unsupported(m, ref_layers.get(name), kept.get(name))
            if why:
                skipped[name] = why
            else:
                layers[name] = m
    targets = _reference_pass(reference, {n: ref_layers[n] for n in layers}, ref_norms, kept, images, seed=seed)
    fits: list[LayerFit] = []
    shifts: dict[str, torch.Tensor | None] = {}
    """Re-fitted layer -> the intercept its batch norm is to take (None: nothing to fold)."""
    produced: dict[int, tuple[torch.Tensor, str, torch.Tensor | None]] = {}
    restored = [0]

    def refit(name: str):
        def hook(module, inputs):
            if name not in targets.outputs or targets.calls.get(name) != 1:
                return  # named after the pass
            fit, shift = _refit(name, module, inputs[0], targets, ridge=ridge,
                                fold=name in targets.norm_of and module.bias is None)
            fits.append(fit)
            shifts[name] = shift
        return hook

    def remember(name: str):
        def hook(module, inputs, output):
            if name in shifts:
                produced[id(output)] = (output, name, shifts.pop(name))
        return hook

    def restore(norm_name: str):
        def hook(module, inputs):
            entry = produced.get(id(inputs[0]))
            if entry is None or entry[0] is not inputs[0]:
                return
            _, layer, shift = entry
            ref = ref_norms.get(norm_name)
            idx = kept[layer].to(module.running_mean.device)
            if ref is None or targets.norm_of.get(layer) != norm_name or ref.running_mean.numel() <= int(idx.max()) \
                    or idx.numel() != module.num_features or not module.track_running_stats:
                return
            module.running_mean.copy_(ref.running_mean[idx] - (shift if shift is not None else 0))
            module.running_var.copy_(ref.running_var[idx])
            restored[0] += 1
        return hook

    handles = []
    for name, m in layers.items():
        handles += [m.register_forward_pre_hook(refit(name)), m.register_forward_hook(remember(name))]
    for name, m in pruned.named_modules():
        if isinstance(m, BN_TYPES):
            handles.append(m.register_forward_pre_hook(restore(name)))
    training = pruned.training
    try:
        pruned.eval()(images)
    finally:
        for h in handles:
            h.remove()
        pruned.train(training)
    fitted = {f.name for f in fits}
    for name in layers:
        if name not in fitted:
            skipped[name] = (f"called {targets.calls[name]} times per forward (shared weights)" if targets.calls.get(name)
                             else "not called as a module in the forward pass (e.g. nn.MultiheadAttention's out_proj)")
    return Reconstruction(images=len(images), seconds=time.perf_counter() - start, layers=fits, skipped=skipped,
                          norms_restored=restored[0])


def _reference_pass(reference: nn.Module, layers: dict[str, nn.Module], norms: dict[str, nn.Module],
                    kept: dict[str, torch.Tensor], images: torch.Tensor, *, seed: int) -> _Targets:
    """Run ``reference`` once, sampling each layer's output at random positions, and note which batch norm
    reads which layer's output."""
    t = _Targets()
    generator = torch.Generator().manual_seed(seed)
    produced: dict[int, tuple[torch.Tensor, str]] = {}

    def sample(name: str):
        def hook(module, inputs, output):
            t.calls[name] = t.calls.get(name, 0) + 1
            if t.calls[name] > 1:
                return
            flat = _flat_output(module, output)
            rows = max(MIN_ROWS, ROWS_PER_FEATURE * _features(layers[name]))
            idx = _positions(flat.shape[1], flat.shape[0], rows, generator)
            picked = torch.gather(flat, 1, idx[..., None].expand(-1, -1, flat.shape[2]).to(flat.device))
            t.outputs[name] = (idx, picked[..., kept[name].to(flat.device)])
            produced[id(output)] = (output, name)
        return hook

    def reads(norm_name: str):
        def hook(module, inputs):
            entry = produced.get(id(inputs[0]))
            if entry is not None and entry[0] is inputs[0]:
                t.norm_of[entry[1]] = norm_name
        return hook

    handles = [m.register_forward_hook(sample(n)) for n, m in layers.items()]
    handles += [m.register_forward_pre_hook(reads(n)) for n, m in norms.items()]
    training = reference.training
    try:
        reference.eval()(images)
    finally:
        for h in handles:
            h.remove()
        reference.train(training)
    return t


def _refit(name: str, module: nn.Module, x: torch.Tensor, targets: _Targets, *, ridge: float,
           fold: bool) -> tuple[LayerFit, torch.Tensor | None]:
    """Re-fit one layer on its current input ``x``; return the fit and the intercept to fold into a norm."""
    idx, y = targets.outputs[name]
    rows = _rows(module, x, idx)  # [G, n, P, d]
    g, n, p, d = rows.shape
    y = y.reshape(n, p, g, -1).permute(2, 0, 1, 3)  # [G, n, P, o]
    intercept = module.bias is not None or fold
    if intercept:
        rows = torch.cat([rows, torch.ones_like(rows[..., :1])], -1)
    w0 = _weights(module)
    if intercept:
        b0 = module.bias.detach() if module.bias is not None else torch.zeros(module.weight.shape[0], device=x.device,
                                                                             dtype=x.dtype)
        w0 = torch.cat([w0, b0.reshape(g, 1, -1)], 1)
    held = max(1, int(n * HELD_OUT)) if n > 1 else 0
    fit_x, fit_y = rows[:, : n - held].flatten(1, 2), y[:, : n - held].flatten(1, 2)
    check_x, check_y = (rows[:, n - held :], y[:, n - held :]) if held else (rows, y)
    check_x, check_y = check_x.flatten(1, 2), check_y.flatten(1, 2)
    if fold and module.bias is None:  # before: the pruned weights with their best intercept (what BN recalibration gives)
        w0[:, -1] = (fit_y - torch.bmm(fit_x[..., :-1], w0[:, :-1])).mean(1)
    w = solve(fit_x, fit_y, w0, ridge=ridge, intercept=intercept)
    before, after = _error(check_x, check_y, w0), _error(check_x, check_y, w)
    applied = after < before
    chosen = w if applied else w0
    shift = None
    if intercept:
        b = chosen[:, -1].reshape(-1)
        if module.bias is not None:
            module.bias.copy_(b)
        else:
            shift = b
        chosen = chosen[:, :-1]
    _set_weights(module, chosen)
    where = "bias" if module.bias is not None else "batch norm" if fold else "none"
    return LayerFit(name=name, features=d + int(intercept), rows=g * n * p, error_before=before, error_after=after,
                    applied=applied, bias=where), shift


def after_prune(graph, plan, pruned: nn.Module, data, *, config, kept: dict[str, torch.Tensor] | None = None) -> Reconstruction:
    """Reconstruct ``pruned`` (``graph.model`` pruned by ``plan``) against ``graph.model``, the model just before
    the prune; the hook :meth:`compressor.schedules.Run.prune` calls. ``kept``: :func:`kept_outputs` of the
    plan where the caller has it already."""
    start = time.perf_counter()
    if plan is None:
        return Reconstruction(images=0, seconds=0.0, skipped={"(every layer)": "the pruned model did not come from "
                              "Run.plan or Run.pruned, so its kept channels are unknown"})
    try:
        kept = kept if kept is not None else kept_outputs(graph, plan)
    except RecursionError:  # too deep to copy (pruning.copy_graph): the search traced its probes instead
        return Reconstruction(images=0, seconds=time.perf_counter() - start, skipped={
            "(every layer)": "the model's graph is too deep to copy, so its kept channels could not be read off"})
    device = next(pruned.parameters()).device
    n = affordable_images(graph.model, graph.example_input.to(device), CALIBRATION_IMAGES)
    images = calibration_images(data, n, seed=config.seed).to(device)
    result = reconstruct(graph.model, pruned, kept=kept, images=images, seed=config.seed)
    return Reconstruction(images=result.images, seconds=time.perf_counter() - start, layers=result.layers,
                          skipped=result.skipped, norms_restored=result.norms_restored)
