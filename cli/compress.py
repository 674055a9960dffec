"""``compress MODEL --target-flops 0.5 --data PATH``: the main job."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from ._render import (OneLineCommand, RichProgress, alert_panel, before_after_table, cancel_on_sigint, err, literal,
                      out, quiet_library_warnings, run_guarded)

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)


def _floats(value: Optional[str], flag: str) -> Optional[tuple[float, ...]]:
    if value is None:
        return None
    try:
        return tuple(float(v) for v in value.split(","))
    except ValueError:
        raise typer.BadParameter(f"{flag} takes comma-separated numbers, e.g. 0.485,0.456,0.406") from None


def _input_size(value: Optional[str]) -> Optional[tuple[int, int]]:
    if value is None:
        return None
    from compressor.preprocess import parse_input_size

    return parse_input_size(value)


@app.command(cls=OneLineCommand)
def compress(
    model: Annotated[Path, typer.Argument(help="Trained model: a state dict (with --arch) or a pickled module (with --trust-pickle).")],
    data: Annotated[Path, typer.Option(help="Labelled images: .npz (images/labels or x/y), .pt dict of tensors, "
                                       "a folder with one sub-folder per class (any image sizes), or "
                                       "package.module:function returning a torch Dataset or a (train, val) pair.")],
    target_flops: Annotated[Optional[float], typer.Option(help="Fraction of the original FLOPs to keep, 0 < x < 1. FLOPs are "
                                                          "multiply-accumulates (MACs) as torch-pruning counts them, batch 1.")] = None,
    target_latency: Annotated[Optional[float], typer.Option(help="Fraction of the original's onnxruntime latency to reach, "
                                                            "0 < x < 1, measured on the run's execution provider; with "
                                                            "--target-flops both must hold.")] = None,
    latency_batch: Annotated[int, typer.Option(help="Batch size at which --target-latency is measured.")] = 1,
    arch: Annotated[Optional[str], typer.Option(help="Architecture of a state dict: a name from `compressor models` "
                                                "or package.module:factory.")] = None,
    trust_pickle: Annotated[bool, typer.Option("--trust-pickle", help="Load a whole pickled module. It can run "
                                               "arbitrary code: only for files you trust.")] = False,
    criterion: Annotated[str, typer.Option(help="How channels are ranked: a name from `compressor criteria` "
                                           "or package.module:Class.")] = "l2",
    schedule: Annotated[str, typer.Option(help="When channels go within the cycle: oneshot (all before fine-tuning), "
                                          "gradual (cubic ramp of physical prunes), ocs (prune once the sub-network "
                                          "is stable), cyclical (soft masks released each cycle), or "
                                          "package.module:Class.")] = "oneshot",
    schedule_span: Annotated[Optional[float], typer.Option(help="Share of the cycle the schedule acts in [default: 0.3 "
                                                           "for gradual and ocs, 0.6 for cyclical].")] = None,
    prune_steps: Annotated[int, typer.Option(help="gradual: physical pruning steps along the ramp.")] = 4,
    check_every: Annotated[Optional[int], typer.Option(help="ocs, cyclical: steps between two searches of the "
                                                       "sub-network [default: the schedule's own].")] = None,
    stability_threshold: Annotated[float, typer.Option(help="ocs: prune once the kept channel sets' mean Jaccard "
                                                       "similarity reaches this.")] = 0.999,
    ocs_decay: Annotated[float, typer.Option(help="ocs: starting lambda of the (1 - lambda*lr) decay of the channels "
                                             "about to go; it grows by as much per epoch.")] = 1.0,
    cycles: Annotated[int, typer.Option(help="cyclical: mask cycles before the physical prune.")] = 3,
    from_scratch: Annotated[bool, typer.Option("--from-scratch", help="Re-initialise the weights first (OCSPruner's "
                                               "setting; give it many more epochs).")] = False,
    epochs: Annotated[int, typer.Option(help="Fine-tuning epochs, one OneCycleLR cycle over all of them (0 skips).")] = 5,
    batch_size: Annotated[int, typer.Option(help="Fine-tuning batch size.")] = 32,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate [default: 0.005 for sgd, 0.001 for adamw].")] = None,
    optimizer: Annotated[str, typer.Option(help="sgd or adamw.")] = "sgd",
    distill: Annotated[bool, typer.Option(help="Distil from the original model's logits while fine-tuning.")] = True,
    distill_alpha: Annotated[float, typer.Option(help="Weight of the distillation term; cross-entropy gets 1 - alpha.")] = 0.7,
    distill_temperature: Annotated[float, typer.Option(help="Softmax temperature of the distillation term.")] = 4.0,
    distill_features: Annotated[bool, typer.Option(help="Also match the original's outputs at the pruned layers, on "
                                                   "their kept channels.")] = False,
    bn_recalibration: Annotated[bool, typer.Option(help="Re-estimate batch-norm statistics right after pruning.")] = True,
    reconstruct: Annotated[bool, typer.Option(help="After each physical prune, re-fit every layer by least squares on "
                                              "up to 256 training images so it gives its pre-prune outputs.")] = True,
    max_prune_per_group: Annotated[Optional[float], typer.Option(
        help="At most this fraction of any group's channels is removed (default: 0.75, raised up to 0.9 "
             "only where the FLOPs target needs it; a value given is kept).")] = None,
    attention: Annotated[str, typer.Option(help="How attention is pruned: dims (the same head dimensions in every "
                                           "head; head_dim shrinks) or heads (whole heads; num_heads shrinks, "
                                           "head_dim stays).")] = "dims",
    round_to: Annotated[Optional[int], typer.Option(help="Kept channel counts are multiples of this, for hardware-friendly "
                                                    "widths (1 disables) [default: 16 on the CPU execution provider, "
                                                    "8 on CUDA].")] = None,
    val_fraction: Annotated[float, typer.Option(help="Share of the data held out for validation (stratified, seeded).")] = 0.2,
    mean: Annotated[Optional[str], typer.Option(help="Normalisation mean per channel in [0,1] pixel units, comma-separated "
                                                "[default: computed on the data].")] = None,
    std: Annotated[Optional[str], typer.Option(help="Normalisation std per channel, comma-separated [default: computed].")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the split and of fine-tuning.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda: fine-tuning device and onnxruntime provider (AMP on CUDA).")] = "auto",
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Output directory [default: runs/<model stem>].")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output directory.")] = False,
    trace_timeout: Annotated[float, typer.Option(help="Seconds the tracing of the model may take before the run "
                                                 "stops with an error (0: no limit).")] = 600.0,
    trace_memory: Annotated[Optional[float], typer.Option(help="GB of resident memory the process may reach while "
                                                          "tracing before the run stops with an error (0: no limit) "
                                                          "[default: what it holds then plus 90% of the memory "
                                                          "available].")] = None,
    latency_runs: Annotated[int, typer.Option(help="Timed runs per model at batch 1, at most (a third of that at batch 64); fewer once the speed-up is known to 1%.")] = 30,
    parity_tolerance: Annotated[Optional[float], typer.Option(help="Largest ONNX-vs-PyTorch logit difference accepted, "
                                                              "as a fraction of the largest logit [default: 1e-3 on "
                                                              "the CPU execution provider, 5e-3 on CUDA].")] = None,
    nproc_per_node: Annotated[int, typer.Option(help="Processes that fine-tune data-parallel (DDP: gloo on the CPU, "
                                                "NCCL on CUDA, one GPU each); --batch-size stays the global batch.")] = 1,
    schedule_opt: Annotated[Optional[List[str]], typer.Option(help="KEY=VALUE: an option of the schedule "
                                                              "(repeatable; `compressor schedules` lists them).")] = None,
    criterion_opt: Annotated[Optional[List[str]], typer.Option(help="KEY=VALUE: an option of the criterion "
                                                               "(repeatable; `compressor criteria` lists them).")] = None,
    val_data: Annotated[Optional[Path], typer.Option(help="A separate validation set, in the same form as --data, "
                                                     "instead of the seeded split.")] = None,
    input_size: Annotated[Optional[str], typer.Option(help="H or H,W the images are resized and center-cropped to "
                                                      "[default: the model's data config (timm), else the images' "
                                                      "own size when they all share one].")] = None,
    crop_pct: Annotated[Optional[float], typer.Option(help="Center-crop fraction: resize to input-size / crop-pct, "
                                                      "then crop [default: the model's, else 1 for images at the "
                                                      "input size, else 0.875].")] = None,
    interpolation: Annotated[Optional[str], typer.Option(help="bilinear, bicubic or nearest [default: the model's, "
                                                         "else bilinear].")] = None,
    augment: Annotated[Optional[str], typer.Option(help="Fine-tuning augmentation: none, light (random-resized crop "
                                                   "+ flip), strong (adds TrivialAugment and MixUp/CutMix) "
                                                   "[default: none; see BENCHMARKS.md].")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Data-loading worker processes for image folders and large "
                                                   "arrays [default: CPU count - 1, at most 8].")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print report.json to stdout instead of the table.")] = False,
    json_events: Annotated[Optional[str], typer.Option(help="Also write the run's progress events as JSON lines to "
                                                       "this file ('-': stderr, instead of the progress display).")] = None,
) -> None:
    """Prune MODEL structurally to a FLOPs and/or latency target, fine-tune it for one cycle, and export a smaller,
    validated ONNX model with a report."""
    quiet_library_warnings()

    def job():
        from compressor import CompressConfig, compress as run
        from compressor.options import parse_pairs

        config = CompressConfig(
            model_path=model, data_path=data, target_flops=target_flops, target_latency=target_latency,
            latency_batch=latency_batch, arch=arch, trust_pickle=trust_pickle,
            criterion=criterion, schedule=schedule, schedule_span=schedule_span, prune_steps=prune_steps,
            check_every=check_every, stability_threshold=stability_threshold, ocs_decay=ocs_decay, cycles=cycles,
            from_scratch=from_scratch, max_prune_per_group=max_prune_per_group, round_to=round_to,
            attention_pruning=attention, epochs=epochs, batch_size=batch_size,
            lr=lr, optimizer=optimizer, distill=distill, distill_alpha=distill_alpha,
            distill_temperature=distill_temperature, distill_features=distill_features, bn_recalibration=bn_recalibration,
            reconstruct=reconstruct, val_fraction=val_fraction, seed=seed,
            mean=_floats(mean, "--mean"), std=_floats(std, "--std"), device=device, out_dir=out_dir,
            overwrite=overwrite, trace_timeout=trace_timeout, trace_memory=trace_memory, latency_runs=latency_runs,
            parity_tolerance=parity_tolerance, nproc_per_node=nproc_per_node,
            schedule_options=parse_pairs(schedule_opt or (), flag="--schedule-opt"),
            criterion_options=parse_pairs(criterion_opt or (), flag="--criterion-opt"),
            val_data=val_data, input_size=_input_size(input_size), crop_pct=crop_pct, interpolation=interpolation,
            augment=augment, workers=workers)
        with _event_sink(json_events) as sink, cancel_on_sigint() as cancel:
            result = run(config, progress=sink, cancel=cancel)
        try:
            _render_result(result, model_name=model.name, json_output=json_output)
        except KeyboardInterrupt:
            from compressor.outputs import InterruptedAfterOutput

            raise InterruptedAfterOutput(result.out_dir) from None

    run_guarded(job)


@contextlib.contextmanager
def _event_sink(path: Optional[str]):
    """The rich display, and a JSON-lines writer where --json-events asks for one."""
    from compressor.events import JsonLines, Tee

    if path is None:
        yield RichProgress()
    elif path == "-":
        yield JsonLines(sys.stderr)
    else:
        try:
            stream = open(path, "w", encoding="utf-8")
        except OSError as exc:
            raise typer.BadParameter(f"--json-events {path}: {exc.strerror}") from None
        with stream:
            yield Tee(RichProgress(), JsonLines(stream))


def _render_result(result, *, model_name: str, json_output: bool) -> None:
    from compressor.report import alerts, table_rows, to_dict

    speed = alerts(result)
    if json_output:
        out.print_json(json.dumps(to_dict(result), allow_nan=False))
    else:
        out.print(before_after_table(table_rows(result), f"{model_name}: before / after"))
        for warning in result.warnings:  # the speed warnings are in result.speed_warnings, shown below
            err.print(f"[bold red]warning:[/] {literal(warning)}", highlight=False)
    if speed:
        err.print(alert_panel(speed))  # on stderr, so that --json output stays parseable
    if not json_output:
        out.print(f"Wrote {literal(result.out_dir)}/: model.onnx, original.onnx, model.pt, report.json, report.md, report.html, plots/",
                  highlight=False)


def main() -> None:
    app()
