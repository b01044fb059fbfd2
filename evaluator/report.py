"""One report of a model's numbers: a samples .npz of the 50k sampler → a results folder with ADM's metrics,
re-tokenization consistency, exposure bias (with held-out tokens), the settings and the project's commit, as
report.json and one Markdown page (report.md) with the sample grid and every plot embedded.

    python -m evaluator.report runs/eval/rear_s/samples.npz config=configs/rear_s.yaml \\
        experiment.generator_checkpoint=reAR-S.safetensors --ref VIRTUAL_imagenet256_labeled.npz \\
        --held-out data/val_256.npz --output runs/eval/rear_s

scripts_bash/rear_test.sh samples a checkpoint and runs this. The folder holds metrics.json (as `python -m evaluator
--json` writes it), consistency.{json,png} and exposure.{json,png} (as `python -m evaluator.consistency` and
`evaluator.exposure` write them), samples.png, and, when given, a guidance search's table and plot (`--search DIR`
of scripts/guidance_search.py) and the tokenizer's reconstruction figures (`--reconstruction DIR` of
`python -m evaluator.reconstruction`), so that gFID sits beside rFID. `python -m evaluator.compare` puts several
such folders side by side.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from typing import List, Optional

import numpy as np
import torch

from evaluator import consistency, exposure
from evaluator.evaluation import PRECISION_RECALL_K, AdmScorer
from evaluator.measurement import add_inception_flags, measurement_flags, resolve_device
from evaluator.npz import NpzImages
from evaluator.token_sets import evenly_spaced, load_token_set
from utils import grids
from utils.cli import Script, run
from utils.config import canonical_choice, to_container
from utils.data.toy import TOY_CLASS_NAMES, toy_class_share
from utils.errors import DataError, UsageError
from utils.files import atomic_open, atomic_path, read_record, write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS = ("FID", "sFID", "Inception Score", "Precision", "Recall")
GRID_CLASSES, GRID_PER_CLASS = 8, 4

FLAGS = measurement_flags()
FLAGS.add_argument("--ref", default=None, help="ADM reference batch .npz (without it: no ADM metrics)")
FLAGS.add_argument("--held-out", default=None,
                   help="held-out tokens (.jsonl, or a reference .npz with tokens and labels): the consistency "
                        "baseline and exposure bias")
FLAGS.add_argument("--search", default=None, help="a guidance search's folder (scripts/guidance_search.py) to include")
FLAGS.add_argument("--reconstruction", default=None,
                   help="a tokenizer reconstruction's folder (python -m evaluator.reconstruction) to include")
add_inception_flags(FLAGS)

SCRIPT = Script(
    usage="python -m evaluator.report SAMPLES.npz config=FILE.yaml experiment.generator_checkpoint=W --output DIR "
          "[--ref REF.npz] [--held-out DATA] [--search DIR] [--reconstruction DIR] [--limit N] [--device D]",
    summary="A model's numbers in one folder: ADM's metrics of SAMPLES (the 50k sampler's .npz) against REF, "
            "re-tokenization consistency, exposure bias on held-out tokens, the settings and the project's commit, "
            "as DIR/report.json and DIR/report.md with the sample grid and every plot embedded.",
    example="python -m evaluator.report runs/eval/rear_s/samples.npz config=configs/rear_s.yaml "
            "experiment.generator_checkpoint=reAR-S.safetensors --ref VIRTUAL_imagenet256_labeled.npz "
            "--held-out data/val_256.npz --output runs/eval/rear_s",
    sections=("experiment.generator_checkpoint", "experiment.tokenizer_checkpoint", "model.vq_model.model_type",
              "model.generator.backbone"),
    flags=FLAGS,
    positional="samples",
)


# ----------------------------------------------------------------------------------------- what the run was
def project_commit() -> dict:
    """The commit of the code that made the report, and whether tracked files differ from it ('unknown' outside a
    git checkout or without git)."""
    def git(*args) -> Optional[str]:
        try:
            result = subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return result.stdout.strip() if result.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": "unknown", "modified": None}
    return {"commit": commit, "modified": bool(git("status", "--porcelain", "--untracked-files=no"))}


def sampling_record(samples: str) -> Optional[dict]:
    """The settings the 50k sampler recorded beside SAMPLES.npz (DIR/sampling.json), if it is there."""
    path = os.path.join(samples.removesuffix(".npz"), "sampling.json")
    return read_record(path) if os.path.isfile(path) else None


# ----------------------------------------------------------------------------------------- the parts
def sample_grid(samples: NpzImages, config, path: str) -> None:
    """GRID_PER_CLASS samples of each of GRID_CLASSES classes spread over the labels, captioned with the class."""
    with np.load(samples.path) as npz:
        labels = npz["labels"] if "labels" in npz.files else np.zeros(len(samples), np.int64)
    present = np.unique(labels)
    classes = present[evenly_spaced(len(present), GRID_CLASSES)]
    indices = np.sort(np.concatenate([np.flatnonzero(labels == c)[:GRID_PER_CLASS] for c in classes]))
    images = np.concatenate(list(samples.select(indices, len(indices))))
    num_classes = config.model.generator.condition_num_classes
    names = TOY_CLASS_NAMES if config.dataset.name == "toy" else None
    captions = [names[c] if names else grids.class_caption(int(c), num_classes) for c in labels[indices]]
    grids.save_png(grids.labelled_grid(images, captions, columns=GRID_PER_CLASS * 2), path)


def adm_metrics(flags, out: str, device) -> dict:
    """ADM's five numbers of SAMPLES against --ref, also written to OUT/metrics.json as `python -m evaluator --json`
    writes them."""
    metrics = AdmScorer(flags.ref, flags.batch_size, str(device), flags.inception_weights,
                        flags.allow_few_samples)(flags.samples)
    counts = {"reference_images": len(NpzImages(flags.ref)), "sample_images": len(NpzImages(flags.samples))}
    write_json(os.path.join(out, "metrics.json"), {**metrics, "precision_recall": {"k": PRECISION_RECALL_K, **counts}})
    return metrics


def measure(module, config, flags, out: str, argv: List[str]) -> dict:
    """`python -m evaluator.<consistency|exposure>` in this process, writing OUT/<name>.{json,png}."""
    name = module.__name__.rsplit(".", 1)[1]
    common = ["--batch-size", str(flags.batch_size), "--output", os.path.join(out, name)]
    common += ["--limit", str(flags.limit)] if flags.limit else []
    common += ["--device", flags.device] if flags.device else []
    measurement = module.FLAGS.parse_args([*argv, *common])
    measurement.tokens = flags.samples
    return module.main(config, measurement)


def include(folder: str, name: str, out: str) -> dict:
    """A search's or a reconstruction's results (FOLDER/<name>.json) and its table (<name>.md), its figure copied
    into OUT."""
    with open(os.path.join(folder, f"{name}.json")) as f:
        results = json.load(f)
    with open(os.path.join(folder, f"{name}.md")) as f:
        results["markdown"] = f.read().splitlines()
    with atomic_path(os.path.join(out, f"{name}.png")) as copy:
        shutil.copyfile(os.path.join(folder, f"{name}.png"), copy)
    return results


# ----------------------------------------------------------------------------------------- the page
def table(header: List[str], rows: List[List[str]]) -> List[str]:
    return ["| " + " | ".join(row) + " |" for row in [header, ["---"] * len(header), *rows]]


def markdown(report: dict) -> List[str]:
    s, code = report["settings"], report["code"]
    modified = " (with uncommitted changes)" if code["modified"] else ""
    lines = [f"# Evaluation: {report['name']}", "",
             f"Generator {report['generator_checkpoint']} ({s['backbone']}), tokenizer "
             f"{report['tokenizer_checkpoint']} ({s['tokenizer']}); {report['num_samples']} samples from "
             f"{report['samples']}. Code: commit {code['commit']}{modified}.", ""]
    sampling = report.get("sampling_record") or {}
    if sampling:
        keys = ("guidance_scale", "guidance_scale_pow", "temperature", "top_k", "top_p", "seed", "per_proc_batch_size",
                "precision", "sampler")
        lines += table(list(keys), [[str(sampling.get(k)) for k in keys]]) + [""]
    rfid = (report.get("reconstruction") or {}).get("by_prefix", [{}])[-1].get("rFID")
    if "adm" in report:
        header = [*METRICS, *(["rFID (tokenizer)"] if rfid is not None else [])]
        row = [f"{report['adm'][m]:.4f}" for m in METRICS] + ([f"{rfid:.4f}"] if rfid is not None else [])
        lines += ["## ADM metrics", "", f"Against {report['reference']}.", ""] + table(header, [row]) + [""]
    if "toy_class_share" in report:
        lines += [f"Toy classifier: {report['toy_class_share']:.3f} of the samples show the requested class.", ""]
    lines += ["## Samples", "", "![samples](samples.png)", ""]
    c = report["consistency"]
    back = [["generated", f"{c['generated']['token_match']['mean']:.4f}",
             f"{c['generated']['codebook_distance']['mean']:.4f}"]]
    if "dataset" in c:
        back += [["held-out", f"{c['dataset']['token_match']['mean']:.4f}",
                  f"{c['dataset']['codebook_distance']['mean']:.4f}"],
                 ["gap", f"{c['gap']['token_match']:+.4f}", f"{c['gap']['codebook_distance']:+.4f}"]]
    lines += ["## Re-tokenization consistency", ""] + table(["tokens", "share back", "codebook distance"], back)
    lines += ["", "![consistency](consistency.png)", ""]
    if "exposure" in report:
        e = report["exposure"]
        lines += ["## Exposure bias", ""] + table(
            ["corruption rate", "accuracy", "NLL"],
            [[str(x["rate"]), f"{x['accuracy']['mean']:.4f}", f"{x['nll']['mean']:.4f}"] for x in e["by_rate"]])
        lines += ["", f"Accuracy slope: {e['slopes']['accuracy']['mean']:+.4f} per unit of rate.", "",
                  "![exposure](exposure.png)", ""]
    for part, title in (("search", "Guidance search"), ("reconstruction", "Tokenizer reconstruction")):
        if part in report:
            lines += [f"## {title}", "", *report[part]["markdown"], ""]
    return lines


def main(config, flags) -> dict:
    if not flags.output:
        raise UsageError("give --output DIR: the folder of the report")
    if flags.held_out and not config.experiment.generator_checkpoint:
        raise UsageError("--held-out measures exposure bias: set experiment.generator_checkpoint=PATH")
    samples = NpzImages(flags.samples)  # bad input fails before any work
    if flags.ref:
        NpzImages(flags.ref)
    if flags.held_out:
        load_token_set(flags.held_out, 1)
    for folder, name in ((flags.search, "search"), (flags.reconstruction, "reconstruction")):
        if folder and not os.path.isfile(os.path.join(folder, f"{name}.json")):
            raise DataError(f"--{name} {folder}: no {name}.json there (is it the --output of the {name} command?)")
    out, device = flags.output, resolve_device(flags.device)
    os.makedirs(out, exist_ok=True)
    g, e = config.model.generator, config.experiment
    report = {
        "name": os.path.basename(os.path.abspath(out)),
        "samples": flags.samples, "num_samples": len(samples), "reference": flags.ref,
        "generator_checkpoint": e.generator_checkpoint,
        "tokenizer_checkpoint": e.tokenizer_checkpoint or config.model.vq_model.pretrained_tokenizer_weight,
        "code": project_commit(),
        "settings": {"backbone": canonical_choice(config, "model.generator.backbone"),
                     "tokenizer": canonical_choice(config, "model.vq_model.model_type"),
                     "image_seq_len": g.image_seq_len, "config": to_container(config)},
        "sampling_record": sampling_record(flags.samples),
    }
    sample_grid(samples, config, os.path.join(out, "samples.png"))
    if flags.ref:
        report["adm"] = adm_metrics(flags, out, device)
    if config.dataset.name == "toy":
        with np.load(flags.samples) as npz:
            images, labels = npz["arr_0"], npz["labels"]
        report["toy_class_share"] = toy_class_share(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255,
                                                    torch.from_numpy(labels), config)
    report["consistency"] = measure(consistency, config, flags, out,
                                    ["--reference", flags.held_out] if flags.held_out else [])
    if flags.held_out:
        report["exposure"] = measure(exposure, config, flags, out, ["--data", flags.held_out])
    if flags.search:
        report["search"] = include(flags.search, "search", out)
    if flags.reconstruction:
        report["reconstruction"] = include(flags.reconstruction, "reconstruction", out)
    report["figures"] = sorted(name for name in os.listdir(out) if name.endswith(".png"))
    write_json(os.path.join(out, "report.json"), report)
    with atomic_open(os.path.join(out, "report.md")) as f:
        f.write("\n".join(markdown(report)) + "\n")
    if "adm" in report:
        print(", ".join(f"{m} {report['adm'][m]:.4f}" for m in METRICS))
    print(f"wrote {os.path.join(out, 'report.md')} and report.json ({len(report['figures'])} figures)")
    return report


if __name__ == "__main__":
    run(SCRIPT, main)
