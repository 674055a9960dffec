"""Render the BENCHMARKS.md tables from the raw rows in ``bench/results/`` (nothing is re-measured).

    python bench/tables.py recipe            # accuracy at a fixed budget: mean, spread, difference to the original
    python bench/tables.py flops             # requested vs achieved FLOPs ratio
    python bench/tables.py cost              # stage times, throughput and memory against a bare loop
    python bench/tables.py reconstruct       # accuracy after each step of a prune, and what reconstruction costs
    python bench/tables.py recipe --results bench/results/recipe.json bench/results/recipe_reconstruct.json
    python bench/tables.py pieces            # each piece of the default on or off alone, against the default
    python bench/tables.py pieces --results bench/results/recipe_nearest.json   # rounding to the nearest multiple
    python bench/tables.py timm              # timm's zoo: each family's outcome, ratio, parity or refusal
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def recipe(*paths: Path) -> str:
    rows = [r for path in paths or (RESULTS / "recipe.json",) for r in json.loads(path.read_text())]
    cells: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if "model" not in r:
            continue
        name = "plain torch-pruning" if r["method"] == "plain" else f"compress {r.get('variant', 'default')}"
        cells[(r["model"], r["train_size"], r["epochs"], r["target"], name)].append(r)
    originals = {r["model"]: r["test_original"] for r in rows if "test_original" in r}
    lines = ["| model | target | method | seeds | FLOPs ratio | test accuracy (mean ± sd) | min-max | vs original (pts) "
             "| vs plain (pts) | speed-up b1 / b64 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for key in sorted(cells, key=lambda k: (k[0], -k[3], k[4] != "plain torch-pruning", k[4])):
        model, _, _, target, name = key
        group = cells[key]
        tests = [r["test"] for r in group]
        mean = statistics.mean(tests)
        sd = statistics.stdev(tests) if len(tests) > 1 else 0.0
        plain = cells.get((*key[:4], "plain torch-pruning"))
        vs_plain = "" if not plain or name.startswith("plain") else f"{100 * (mean - statistics.mean(r['test'] for r in plain)):+.2f}"
        speed = [(r.get("speedup_b1"), r.get("speedup_b64")) for r in group]
        speed_cell = ("" if any(s is None for pair in speed for s in pair) else
                      f"{statistics.median(s[0] for s in speed):.2f}x / {statistics.median(s[1] for s in speed):.2f}x")
        flops = sorted({r["flops_ratio"] for r in group})
        lines.append(f"| {model} | {target:g} | {name} | {len(group)} | {', '.join(f'{f:.3f}' for f in flops)} "
                     f"| {_pct(mean)} ± {100 * sd:.2f} | {_pct(min(tests))}-{_pct(max(tests))} "
                     f"| {100 * (mean - originals[model]):+.2f} | {vs_plain} | {speed_cell} |")
    return "\n".join(lines)


def reconstruct(path: Path = RESULTS / "recipe_reconstruct.json") -> str:
    """Validation accuracy right after pruning, after batch-norm recalibration and after reconstruction, and
    the seconds reconstruction and the whole run took (means over seeds)."""
    rows = [r for r in json.loads(path.read_text()) if r.get("method") == "compress"]
    cells: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        cells[(r["model"], r["target"], r["variant"])].append(r)
    lines = ["| model | target | method | seeds | val right after prune | after BN recalibration | after reconstruction "
             "| after fine-tuning | reconstruction (s) | prune stage (s) | fine-tune stage (s) | whole run (s) | share of the run |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def mean(group, key, fmt):
        values = [r[key] for r in group if r.get(key) is not None]
        return fmt(statistics.mean(values)) if values else "-"

    for (model, target, variant), group in sorted(cells.items(), key=lambda kv: (kv[0][0], -kv[0][1], kv[0][2])):
        stages = [r.get("stages_seconds") or {} for r in group]
        share = [r["reconstruct_seconds"] / r["seconds"] for r in group if r.get("reconstruct_seconds") is not None]
        lines.append(f"| {model} | {target:g} | compress {variant} | {len(group)} | {mean(group, 'val_after_prune', _pct)} "
                     f"| {mean(group, 'val_after_bn_recal', _pct)} | {mean(group, 'val_after_reconstruct', _pct)} "
                     f"| {mean(group, 'val', _pct)} | {mean(group, 'reconstruct_seconds', lambda v: f'{v:.1f}')} "
                     f"| {statistics.mean(s.get('prune', 0) for s in stages):.1f} "
                     f"| {statistics.mean(s.get('fine-tune', 0) for s in stages):.1f} "
                     f"| {mean(group, 'seconds', lambda v: f'{v:.1f}')} "
                     f"| {f'{100 * statistics.mean(share):.1f}%' if share else '-'} |")
    return "\n".join(lines)


PIECES = {"default": "default (reconstruction, logit distillation, the provider's rounding, no augmentation)",
          "noreconstruct": "without reconstruction (--no-reconstruct)", "features": "+ feature distillation (--distill-features)",
          "criterion:auto": "--criterion auto", "augment:light": "+ augmentation (--augment light)",
          "round8": "round-to 8", "round1": "round-to 1 (no rounding)",
          "round-up": "widths rounded up, not to the nearest multiple (the rule until 2026-12-03)"}


def pieces(path: Path = RESULTS / "recipe_pieces.json", plain: Path = RESULTS / "recipe.json") -> str:
    """Each variant against the default of the same model, target and seeds: test accuracy (mean ± sd over
    seeds), the difference to the default, to the original and to the plain recipe, the speed-ups, and
    the whole run's seconds (mean, and the difference to the default's)."""
    rows = [r for r in json.loads(path.read_text()) if r.get("method") == "compress"]
    plains: dict[tuple, list[float]] = defaultdict(list)
    for r in json.loads(plain.read_text()):
        if r.get("method") == "plain":
            plains[(r["model"], r["target"])].append(r["test"])
    cells: dict[tuple, dict[int, dict]] = defaultdict(dict)
    for r in rows:
        cells[(r["model"], r["target"], r["variant"])][r["seed"]] = r
    lines = ["| model | target | variant | seeds | test accuracy (mean ± sd) | vs default (pts) | vs original (pts) "
             "| vs plain torch-pruning (pts) | speed-up b1 / b64 (median) | run (s) | vs default (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    order = list(PIECES)
    for (model, target, variant), by_seed in sorted(cells.items(), key=lambda kv: (kv[0][0], -kv[0][1], order.index(kv[0][2])
                                                                                  if kv[0][2] in order else 99)):
        default = cells.get((model, target, "default"), {})
        seeds = sorted(set(by_seed) & set(default)) if variant != "default" else sorted(by_seed)
        if not seeds:
            continue
        tests = [by_seed[s]["test"] for s in seeds]
        base = [default[s]["test"] for s in seeds]
        mean = statistics.mean(tests)
        sd = statistics.stdev(tests) if len(tests) > 1 else 0.0
        original = by_seed[seeds[0]]["test_original"]
        vs_plain = f"{100 * (mean - statistics.mean(plains[(model, target)])):+.2f}" if plains.get((model, target)) else ""
        seconds = statistics.mean(by_seed[s]["seconds"] for s in seeds)
        extra = seconds - statistics.mean(default[s]["seconds"] for s in seeds)
        speed = (f"{statistics.median(by_seed[s]['speedup_b1'] for s in seeds):.2f}x / "
                 f"{statistics.median(by_seed[s]['speedup_b64'] for s in seeds):.2f}x")
        lines.append(f"| {model} | {target:g} | {PIECES.get(variant, variant)} | {len(seeds)} | {_pct(mean)} ± {100 * sd:.2f} "
                     f"| {'' if variant == 'default' else f'{100 * (mean - statistics.mean(base)):+.2f}'} "
                     f"| {100 * (mean - original):+.2f} | {vs_plain} | {speed} | {seconds:.1f} "
                     f"| {'' if variant == 'default' else f'{extra:+.1f}'} |")
    return "\n".join(lines)


def flops(path: Path = RESULTS / "flops_accuracy.json") -> str:
    rows = json.loads(path.read_text())
    targets = sorted({r["requested"] for r in rows}, reverse=True)
    roundings = list(dict.fromkeys(r["rounding"] for r in rows))
    by = {(r["model"], r["rounding"], r["requested"]): r for r in rows}
    models = list(dict.fromkeys(r["model"] for r in rows))
    head = " | ".join(f"{t:g}, {'default rounding' if k == 'default' else f'--round-to {k}'}"
                      for k in roundings for t in targets)
    lines = [f"| model | input | {head} |", "|---|---|" + "---|" * (len(targets) * len(roundings))]
    for m in models:
        cells = []
        for k in roundings:
            for t in targets:
                r = by.get((m, k, t))
                if r is None:
                    cells.append("")
                elif "unreachable" in r:
                    cells.append("unreachable")
                else:
                    flag = " (*)" if r["off_multiple"] else ""
                    lowered = f" [{r['round_to']}]" if k == "default" and r["round_to"] != 16 else ""
                    cells.append(f"{r['achieved']:.4f}{flag}{lowered}")
        size = next(r["input"] for r in rows if r["model"] == m)
        lines.append(f"| {m} | {size} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cost(path: Path = RESULTS / "cost.json") -> str:
    rows = json.loads(path.read_text())
    stages = ["load", "trace", "prune", "fine-tune", "export", "validate"]
    lines = ["| model | " + " | ".join(f"{s} (s)" for s in stages) + " | total (s) |", "|---|" + "---|" * (len(stages) + 1)]
    for r in rows:
        sec = r["compress"]["stage_seconds"]
        lines.append(f"| {r['model']} | " + " | ".join(f"{sec.get(s, 0):.1f}" for s in stages)
                     + f" | {r['compress']['total_seconds']:.1f} |")
    lines += ["", "| model | images x epochs | compress fine-tune img/s | bare loop img/s (pruned model) | bare + distillation "
              "img/s | compress / bare | compress / bare + distillation | peak RSS compress (MB) | peak RSS bare loop, "
              "original model (MB) | ratio |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r["compress"]
        lines.append(f"| {r['model']} | {int(r['images'] * 0.8)} x {r['epochs']} | {c['finetune_images_per_second']:.1f} "
                     f"| {r['bare_pruned']['images_per_second']:.1f} | {r['bare-kd_pruned']['images_per_second']:.1f} "
                     f"| {r['throughput_ratio_vs_bare_pruned']:.2f} | {r['throughput_ratio_vs_bare_kd_pruned']:.2f} "
                     f"| {c['peak_rss_mb']} | {r['bare_original']['peak_rss_mb']} | {r['rss_ratio_vs_bare_original']:.2f} |")
    return "\n".join(lines)


def timm(path: Path = RESULTS / "timm_matrix.json") -> str:
    rows = sorted(json.loads(path.read_text()), key=lambda r: r["family"])
    passed = sum(r["outcome"] == "pass" for r in rows)
    lines = [f"{passed} of {len(rows)} families pass ({100 * passed / len(rows):.0f}%).", "",
             "| family | model | input | cap | achieved ratio | parity (max abs diff / max abs logit) | outcome, or why not |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['achieved_ratio']:.4f}" if r.get("achieved_ratio") is not None else ""
        parity = f"{r['max_abs_diff']:.1e} / {r['max_abs_logit']:.1f}" if r.get("max_abs_diff") is not None else ""
        why = r["outcome"] if r["outcome"] == "pass" else f"{r['outcome']}: {r.get('error', '')[:160]}".replace("|", "/")
        lines.append(f"| {r['family']} | {r['model']} | {r.get('input', '')} | {r.get('cap', '')} | {ratio} | {parity} | {why} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("table", choices=["recipe", "flops", "cost", "reconstruct", "pieces", "timm"])
    p.add_argument("--results", type=Path, nargs="+", help="the raw rows to render [default: the table's own file; "
                                                         "recipe takes several]")
    args = p.parse_args()
    table = {"recipe": recipe, "flops": flops, "cost": cost, "reconstruct": reconstruct, "pieces": pieces, "timm": timm}[args.table]
    print(table(*args.results) if args.results else table())


if __name__ == "__main__":
    main()
