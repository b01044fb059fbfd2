"""The guidance search's grid, state and table (scripts/guidance_search.py runs the sampler and the scorer over it).

A grid is a list of (config key, values); a point is one value of each key, sampled into its own sampler folder
OUTPUT_DIR/points/<name>. The search's state, OUTPUT_DIR/search.json, holds the settings every score depends on, a row
per point (its values, overrides, folder and ADM metrics once scored), the index of the best row and the full-count
run at it; search.md is its table and search.png plots FID and IS against the first key.
"""

from __future__ import annotations

import itertools
import os
import re
from typing import Dict, List, Sequence, Tuple

from omegaconf import ListConfig, OmegaConf

from evaluator.measurement import new_figure, write_report
from utils.config import with_overrides
from utils.errors import OutputError, UsageError
from utils.files import atomic_open, changed_settings, read_record, remove_temporaries

# What a point may set: how tokens are drawn, never the model (which is loaded once for every point).
SEARCHABLE = ("sampling.guidance_scale", "sampling.guidance_scale_pow", "sampling.temperature", "sampling.top_k",
              "sampling.top_p", "model.generator.guidance_schedule", "model.generator.guidance_window",
              "model.generator.cfg_interval")
METRICS = ("FID", "sFID", "Inception Score", "Precision", "Recall")
SELECT = {"FID": ("FID", min), "sFID": ("sFID", min), "IS": ("Inception Score", max)}

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


# ----------------------------------------------------------------------------------------- the points
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


def scores_text(metrics: dict) -> str:
    return ", ".join(f"{m} {metrics[m]:.4f}" for m in METRICS)


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
