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

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a clone, uninstalled
from utils.threads import use_thread_defaults  # noqa: E402

use_thread_defaults()  # before torch loads

from evaluator.evaluation import AdmScorer  # noqa: E402
from evaluator.features import inception_weights_path  # noqa: E402
from evaluator.guidance_search import (  # noqa: E402
    SEARCHABLE,
    SELECT,
    best_point,
    parse_grid,
    point_configs,
    read_state,
    save_state,
    scores_text,
)
from evaluator.measurement import add_inception_flags  # noqa: E402
from evaluator.npz import NpzImages  # noqa: E402
from modeling.sampler import SamplingOptions  # noqa: E402
from scripts.sample_imagenet_rear import on_rank0, settings_of, start, with_process_group_closed, write_samples  # noqa: E402
from utils.cli import Script, flag_parser, positive_int, run  # noqa: E402
from utils.config import with_overrides  # noqa: E402
from utils.fid_samples.run import class_labels  # noqa: E402
from utils.weights import describe_file  # noqa: E402

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
    state = on_rank0(lambda: read_state(out, settings, points), rank)
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
    best = on_rank0(lambda: best_point(state, flags.select), rank)
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
    return state


if __name__ == "__main__":
    run(SCRIPT, with_process_group_closed(main))
