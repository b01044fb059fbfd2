"""Guidance search: the 50k sampler over a grid of guidance settings at a smaller count, each point scored with ADM's
metrics against one reference batch, the best point picked, and optionally sampled again at the full count.

    torchrun --nproc_per_node=8 scripts/guidance_search.py config=configs/rear_s.yaml \\
        experiment.generator_checkpoint=reAR-S.safetensors experiment.output_dir=runs/search/rear_s \\
        --ref VIRTUAL_imagenet256_labeled.npz --grid sampling.guidance_scale=16,19,22,25 \\
        --grid sampling.guidance_scale_pow=2.5,2.75 --num-samples 10000 --final-samples 50000

Each point is a folder of scripts/sample_imagenet_rear.py (OUTPUT_DIR/points/<point> → <point>.npz), sampled by that
very code with the point's settings: resumable, the same bytes for any number of processes, and the same bytes as
the sampler run by hand with those settings. The reference batch's Inception statistics are computed once. After
every point, OUTPUT_DIR/search.json (the table and the state of the search), search.md and search.png (FID and IS
against the first grid key) are rewritten, each atomically. The same command run again after an interruption skips
the points already scored and resumes the one it was on; with `--final-samples` added it goes on to the full count
at the best point (OUTPUT_DIR/final.npz).
"""

from __future__ import annotations

import itertools
import os
import re
import sys
from typing import Dict, List, Sequence, Tuple

import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a clone, uninstalled

from omegaconf import ListConfig, OmegaConf  # noqa: E402

from evaluator.evaluation import AdmScorer  # noqa: E402
from evaluator.features import inception_weights_path  # noqa: E402
from evaluator.measurement import add_inception_flags, new_figure, write_report  # noqa: E402
from evaluator.npz import NpzImages  # noqa: E402
from modeling.sampler import SamplingOptions  # noqa: E402
from scripts.sample_imagenet_rear import finish, on_rank0_first, settings_of, start, write_samples  # noqa: E402
from utils.cli import Script, flag_parser, positive_int, run  # noqa: E402
from utils.config import with_overrides  # noqa: E402
from utils.errors import OutputError, UsageError  # noqa: E402
from utils.files import atomic_open, changed_settings, read_record, remove_temporaries  # noqa: E402
from utils.fid_samples.run import class_labels  # noqa: E402
from utils.weights import describe_file  # noqa: E402

# What a point may set: how tokens are drawn, never the model (which is loaded once for every point).
SEARCHABLE = ("sampling.guidance_scale", "sampling.guidance_scale_pow", "sampling.temperature", "sampling.top_k",
              "sampling.top_p", "model.generator.guidance_schedule", "model.generator.guidance_window",
              "model.generator.cfg_interval")
METRICS = ("FID", "sFID", "Inception Score", "Precision", "Recall")
SELECT = {"FID": ("FID", min), "sFID": ("sFID", min), "IS": ("Inception Score", max)}

FLAGS = flag_parser()
FLAGS.add_argument("--ref", required=True, help="ADM reference batch .npz, e.g. VIRTUAL_imagenet256_labeled.npz")
FLAGS.add_argument("--grid", action="append", required=True, metavar="KEY=V1,V2,...",
                   help=f"values of one sampling key (repeat for a grid over several): {', '.join(SEARCHABLE)}")
FLAGS.add_argument("--num-samples", type=positive_int, default=10_000, help="samples per point (default 10000)")
FLAGS.add_argument("--final-samples", type=positive_int, default=None,
                   help="then sample this many at the best point (e.g. 50000) into OUTPUT_DIR/final.npz")
FLAGS.add_argument("--select", choices=sorted(SELECT), default="FID", help="what 'best' means (default FID)")
FLAGS.add_argument("--batch-size", type=positive_int, default=64, help="images per Inception forward pass")
add_inception_flags(FLAGS)

SCRIPT = Script(
    usage="torchrun --nproc_per_node=K scripts/guidance_search.py config=FILE.yaml experiment.generator_checkpoint=W "
          "experiment.output_dir=DIR --ref REF.npz --grid KEY=V1,V2,... [--grid ...] [--num-samples 10000] "
          "[--final-samples 50000] [--select FID|sFID|IS]   (or plain python)",
    summary="Sample a grid of guidance settings with the 50k sampler (resumable, the same bytes for any number of "
            "processes), score each point with ADM's metrics, write the table (DIR/search.json, search.md) and a "
            "plot of FID and IS (search.png), and optionally sample the best point at the full count.",
    example="python scripts/guidance_search.py config=configs/rear_s.yaml experiment.generator_checkpoint="
            "reAR-S.safetensors experiment.output_dir=runs/search/rear_s --ref VIRTUAL_imagenet256_labeled.npz "
            "--grid sampling.guidance_scale=16,19,22,25 --final-samples 50000",
    sections=("experiment.generator_checkpoint", "experiment.output_dir", "sampling"),
    flags=FLAGS,
)


# ----------------------------------------------------------------------------------------- the grid
def split_values(text: str) -> List[str]:
    """'10,12,[0.1,1.0]' → ['10', '12', '[0.1,1.0]']: commas inside brackets belong to a list value."""
    values, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            values.append(current)
            current = ""
        else:
            current += char
    return [value.strip() for value in values + [current]]


def parse_grid(specs: Sequence[str]) -> List[Tuple[str, List[str]]]:
    """--grid KEY=V1,V2 ... → [(key, [values])], in the order given."""
    grid = []
    for spec in specs:
        key, sep, text = spec.partition("=")
        if not sep or key not in SEARCHABLE:
            raise UsageError(f"--grid {spec}: expected KEY=V1,V2,... with KEY one of {', '.join(SEARCHABLE)}")
        values = split_values(text)
        if "" in values or len(set(values)) != len(values):
            raise UsageError(f"--grid {spec}: give distinct, non-empty values, e.g. {key}=10,12,14")
        if key in dict(grid):
            raise UsageError(f"--grid {key} is given twice; list all its values in one --grid")
        grid.append((key, values))
    return grid


def point_name(point: Dict[str, object]) -> str:
    """The point's folder name: 'guidance_scale_12.0,guidance_scale_pow_2.5' (no '=': a command line would read the
    .npz path as a config override)."""
    name = ",".join(f"{key.rsplit('.', 1)[1]}_{value}" for key, value in point.items())
    return re.sub(r"[^A-Za-z0-9._,-]", "_", name)


# ----------------------------------------------------------------------------------------- the state
def read_state(out: str, settings: dict, points: List[dict]) -> dict:
    """The search recorded in OUT/search.json (its scored points are kept), or a new one; a record made with other
    settings is refused rather than mixed with this search's points."""
    path = os.path.join(out, "search.json")
    if os.path.isdir(out):
        remove_temporaries(out)  # what a search killed while writing search.{json,png,md} left
    if not os.path.isfile(path):
        return {"settings": settings, "points": [{**p, "metrics": None} for p in points], "best": None, "final": None}
    try:
        state = read_record(path)
    except ValueError as error:
        raise OutputError(f"{path} is damaged ({error}); delete it to score the points again "
                          "(their samples are kept and not redrawn)") from None
    changes = changed_settings(state.get("settings", {}), settings)
    if changes:
        raise OutputError(f"{out} holds a search with other settings ({changes}); use another "
                          "experiment.output_dir, or delete that folder to start again")
    return state


def best_point(state: dict, select: str):
    """Index of the best scored point by `select`, or None before any point is scored."""
    metric, pick = SELECT[select]
    scored = [i for i, p in enumerate(state["points"]) if p["metrics"] is not None]
    return pick(scored, key=lambda i: state["points"][i]["metrics"][metric]) if scored else None


def save_state(out: str, state: dict, grid_keys: List[str]) -> None:
    """search.json (the state: the same command continues from it), search.png and search.md, each atomically."""
    write_report(os.path.join(out, "search"), state, figure_of(state, grid_keys))
    with atomic_open(os.path.join(out, "search.md")) as f:
        f.write("\n".join(markdown(state, grid_keys)) + "\n")


def markdown(state: dict, grid_keys: List[str]) -> List[str]:
    """The table: a row per point, the best marked, and the full-count result when there is one."""
    s = state["settings"]
    lines = [f"Guidance search: {s['num_samples']} samples a point, ADM metrics against {s['reference']}; best by "
             f"{state.get('select', 'FID')}.", "", "![FID and IS against the guidance](search.png)", "",
             "| " + " | ".join([*grid_keys, *METRICS, ""]) + " |", "|" + " --- |" * (len(grid_keys) + len(METRICS) + 1)]
    for index, point in enumerate(state["points"]):
        scores = point["metrics"] or {}
        cells = [str(point["values"][k]) for k in grid_keys]
        cells += [f"{scores[m]:.4f}" if m in scores else "…" for m in METRICS]
        lines.append("| " + " | ".join([*cells, "best" if index == state["best"] else ""]) + " |")
    final = state.get("final")
    if final:
        lines += ["", f"At the best point with {final['num_samples']} samples ({final['npz']}): "
                      f"{scores_text(final['metrics'])}."]
    return lines


def figure_of(state: dict, grid_keys: List[str]):
    """FID and IS against the first grid key, a line for each setting of the others; the best point starred."""
    figure, (fid_axes, is_axes) = new_figure(2)
    first, rest = grid_keys[0], grid_keys[1:]
    values = [p["values"][first] for p in state["points"]]
    numeric = all(isinstance(x, (int, float)) for x in values)
    xs = sorted(set(values)) if numeric else list(dict.fromkeys(map(str, values)))  # names, lists: as given

    def position(x):
        return x if numeric else xs.index(str(x))

    series: Dict[str, List[dict]] = {}
    for point in state["points"]:
        series.setdefault(", ".join(f"{k.rsplit('.', 1)[1]}={point['values'][k]}" for k in rest), []).append(point)
    for axes, metric in ((fid_axes, "FID"), (is_axes, "Inception Score")):
        for label, points in series.items():
            scored = sorted((position(p["values"][first]), p["metrics"][metric]) for p in points if p["metrics"])
            if scored:
                axes.plot(*zip(*scored), marker="o", label=label or None, linewidth=1.2)
        if state["best"] is not None:
            best = state["points"][state["best"]]
            axes.plot(position(best["values"][first]), best["metrics"][metric], marker="*", markersize=14,
                      color="gold", markeredgecolor="black", linestyle="none", label="best")
        if not numeric:
            axes.set_xticks(range(len(xs)), xs)
        axes.set_xlabel(first)
        axes.set_ylabel(metric)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    figure.suptitle(f"guidance search, {state['settings']['num_samples']} samples a point", fontsize=10)
    return figure


# ----------------------------------------------------------------------------------------- the run
def from_rank0(fn, rank: int):
    """`fn()` on rank 0 (an error there stops every rank), its result given to every rank."""
    box = [on_rank0_first(fn if rank == 0 else (lambda: None), rank)]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    return box[0]


def value_of(config, key: str):
    """A config value as plain Python (a list for a list key), for the table and the folder name."""
    value = OmegaConf.select(config, key)
    return OmegaConf.to_container(value) if isinstance(value, ListConfig) else value


def point_configs(config, grid, out: str, num_samples: int):
    """(points, configs): every combination of the grid's values, as a table row and as the sampler's config (its
    folder OUT/points/<name>), each checked as the command line is."""
    points, configs = [], []
    for combination in itertools.product(*[[f"{key}={value}" for value in values] for key, values in grid]):
        conf = with_overrides(config, [*combination, f"sampling.num_samples={num_samples}"], "--grid")
        point = {"values": {key: value_of(conf, key) for key, _ in grid}, "overrides": list(combination)}
        point["folder"] = os.path.join("points", point_name(point["values"]))
        conf.experiment.output_dir = os.path.join(out, point["folder"])
        points.append(point)
        configs.append(conf)
    return points, configs


def search_settings(grid, flags, config, device, inception_weights: str) -> dict:
    """What every point's scores depend on besides its own values: a rerun with other settings is refused."""
    sampling = settings_of(config, SamplingOptions.from_config(config), device)
    for key, _ in grid:  # the points differ in these
        sampling.pop(key.rsplit(".", 1)[1], None)
    return {"grid": [[key, values] for key, values in grid], "num_samples": flags.num_samples,
            "reference": describe_file(flags.ref), "inception_weights": describe_file(inception_weights),
            "sampling": sampling}


def main(config, flags) -> dict:
    grid = parse_grid(flags.grid)
    keys, out = [key for key, _ in grid], config.experiment.output_dir
    points, configs = point_configs(config, grid, out, flags.num_samples)  # a bad value fails now, not hours in
    if flags.final_samples:
        class_labels(flags.final_samples, config.model.generator.condition_num_classes)
    NpzImages(flags.ref)  # a bad reference or missing Inception weights fail before the models load
    weights = inception_weights_path(flags.inception_weights)
    rank, world_size, device, generator, tokenizer = start(configs[0])
    settings = search_settings(grid, flags, configs[0], device, weights)
    state = from_rank0(lambda: read_state(out, settings, points), rank)
    state["select"] = flags.select
    scorer = []  # rank 0's, made at the first score: the reference batch's statistics, computed once

    def score(npz: str) -> dict:
        if not scorer:
            scorer.append(AdmScorer(flags.ref, flags.batch_size, str(device), weights, flags.allow_few_samples))
        return scorer[0](npz)

    for index, (point, conf) in enumerate(zip(state["points"], configs)):
        label = f"[{index + 1}/{len(configs)}] " + ", ".join(f"{k}={v}" for k, v in point["values"].items())
        if point["metrics"] is not None:
            if rank == 0:
                print(f"{label}: scored already, {scores_text(point['metrics'])}")
            continue
        if rank == 0:
            print(f"{label}: sampling {flags.num_samples} images into {conf.experiment.output_dir}.npz")
        npz = write_samples(conf, generator, tokenizer, rank, world_size, device)
        if rank == 0:
            point["metrics"] = score(npz)
            state["best"] = best_point(state, flags.select)
            save_state(out, state, keys)
            print(f"{label}: {scores_text(point['metrics'])}")
    best = from_rank0(lambda: best_point(state, flags.select), rank)
    if rank == 0:
        state["best"] = best
        save_state(out, state, keys)
        values = state["points"][best]["values"]
        print(f"best by {flags.select}: {', '.join(f'{k}={v}' for k, v in values.items())} "
              f"(table: {os.path.join(out, 'search.md')})")
    if flags.final_samples:
        final = with_overrides(config, [*points[best]["overrides"], f"sampling.num_samples={flags.final_samples}",
                                        f"experiment.output_dir={os.path.join(out, 'final')}"], "--final-samples")
        npz = write_samples(final, generator, tokenizer, rank, world_size, device)
        if rank == 0:
            if (state.get("final") or {}).get("num_samples") != flags.final_samples:
                state["final"] = {"values": state["points"][best]["values"], "num_samples": flags.final_samples,
                                  "npz": npz, "metrics": score(npz)}
                save_state(out, state, keys)
            print(f"at the best point with {flags.final_samples} samples: {scores_text(state['final']['metrics'])}")
    finish()
    return state


def scores_text(metrics: dict) -> str:
    return ", ".join(f"{m} {metrics[m]:.4f}" for m in METRICS)


if __name__ == "__main__":
    run(SCRIPT, main)
