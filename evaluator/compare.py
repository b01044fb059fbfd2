"""Runs side by side: the ADM metrics, re-tokenization consistency and exposure-bias figures of each run as Markdown
tables.

    python -m evaluator.compare --run ar_toy=runs/toy_ablation/ar_toy --run rear_toy=runs/toy_ablation/rear_toy

Each run folder holds the reports of `python -m evaluator.consistency ... --output DIR/consistency` and
`python -m evaluator.exposure ... --output DIR/exposure` (scripts_bash/toy_ablation.sh writes both). A results
folder of `python -m evaluator.report` (report.json; scripts_bash/rear_test.sh) also gives its ADM metrics
(metrics.json), and holds exposure.json only where held-out tokens were given: a table leaves out the runs without it.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Tuple

from utils.cli import Script, flag_parser, run
from utils.errors import DataError, UsageError

ADM_METRICS = ("FID", "sFID", "Inception Score", "Precision", "Recall")

FLAGS = flag_parser()
FLAGS.add_argument("--run", action="append", required=True, metavar="NAME=DIR",
                   help="a run's name and the folder with its consistency.json and exposure.json, or a results "
                        "folder of evaluator.report (repeat)")

SCRIPT = Script(
    usage="python -m evaluator.compare --run NAME=DIR [--run NAME=DIR ...]",
    summary="Print the ADM metrics, consistency and exposure-bias figures of several runs as Markdown tables.",
    example="python -m evaluator.compare --run ar_toy=runs/toy_ablation/ar_toy "
            "--run rear_toy=runs/toy_ablation/rear_toy",
    flags=FLAGS,
    takes_config=False,
)


def read_report(folder: str, name: str) -> dict:
    path = os.path.join(folder, f"{name}.json")
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file (write it with python -m evaluator.{name} ... --output "
                        f"{os.path.join(folder, name)})")
    with open(path) as f:
        return json.load(f)


def row(cells: List[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def adm_table(reports: Dict[str, dict]) -> List[str]:
    """ADM's five numbers, as `python -m evaluator --json` wrote them."""
    lines = [row(["run", *ADM_METRICS, "samples"]), row(["---"] * (len(ADM_METRICS) + 2))]
    for name, report in reports.items():
        samples = report.get("precision_recall", {}).get("sample_images", "–")
        lines.append(row([name, *[f"{report[m]:.4f}" for m in ADM_METRICS], str(samples)]))
    return lines


def consistency_table(reports: Dict[str, dict]) -> List[str]:
    """Share of tokens back and codebook distance, generated vs dataset tokens, and the gap."""
    lines = [row(["run", "tokens back: generated", "dataset", "gap", "by quarter (generated: first/middle/last)",
                  "codebook distance: generated", "dataset"]), row(["---"] * 7)]
    for name, report in reports.items():
        generated, dataset = report["generated"], report.get("dataset")
        match = generated["token_match"]
        quarters = "/".join(f"{match[k]:.4f}" for k in ("first_quarter", "middle_half", "last_quarter"))
        lines.append(row([
            name, f"{match['mean']:.4f}", f"{dataset['token_match']['mean']:.4f}" if dataset else "–",
            f"{report['gap']['token_match']:+.4f}" if dataset else "–", quarters,
            f"{generated['codebook_distance']['mean']:.4f}",
            f"{dataset['codebook_distance']['mean']:.4f}" if dataset else "–",
        ]))
    return lines


def exposure_table(reports: Dict[str, dict]) -> List[str]:
    """Accuracy and NLL at each corruption rate, and the slope of accuracy against the rate."""
    rates = next(iter(reports.values()))["rates"]
    header = ["run", *[f"accuracy @ {r}" for r in rates], *[f"NLL @ {r}" for r in rates], "accuracy slope",
              "slope (first/middle/last)"]
    lines = [row(header), row(["---"] * len(header))]
    for name, report in reports.items():
        if report["rates"] != rates:
            raise DataError(f"run {name} was measured at rates {report['rates']}, the first run at {rates}")
        slopes = report["slopes"]["accuracy"]
        lines.append(row([
            name, *[f"{e['accuracy']['mean']:.4f}" for e in report["by_rate"]],
            *[f"{e['nll']['mean']:.4f}" for e in report["by_rate"]], f"{slopes['mean']:+.4f}",
            "/".join(f"{slopes[k]:+.3f}" for k in ("first_quarter", "middle_half", "last_quarter")),
        ]))
    return lines


def parse_runs(specs: List[str]) -> List[Tuple[str, str]]:
    runs = []
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            raise UsageError(f"--run {spec}: expected NAME=DIR")
        runs.append((name, folder))
    return runs


def reports_of(runs: List[Tuple[str, str]], name: str) -> Dict[str, dict]:
    """NAME.json of every run; a results folder of evaluator.report (report.json) without one is left out."""
    return {run: read_report(folder, name) for run, folder in runs
            if os.path.isfile(os.path.join(folder, f"{name}.json"))
            or not os.path.isfile(os.path.join(folder, "report.json"))}


def main(config, flags) -> str:
    runs = parse_runs(flags.run)
    adm = {name: read_report(folder, "metrics") for name, folder in runs
           if os.path.isfile(os.path.join(folder, "metrics.json"))}
    consistency, exposure = reports_of(runs, "consistency"), reports_of(runs, "exposure")
    sections = []
    if adm:
        sections += ["ADM metrics (python -m evaluator):", "", *adm_table(adm), ""]
    if consistency:
        sections += ["Re-tokenization consistency (share of tokens that come back after decode → 8-bit image → "
                     "encode):", "", *consistency_table(consistency), ""]
    if exposure:
        sections += ["Exposure bias (teacher-forced on held-out data, context corrupted at each rate):", "",
                     *exposure_table(exposure)]
    text = "\n".join(sections).rstrip("\n")
    print(text)
    return text


if __name__ == "__main__":
    run(SCRIPT, main)
