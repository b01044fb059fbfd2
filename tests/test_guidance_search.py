"""scripts/guidance_search.py at toy size: three guidance scales with the tiny random generator, killed in the middle of
the second point and run again; the table, the best point and the samples checked against the 50k sampler run by
hand at each scale and against the ADM evaluator on each point's file."""

import json
import os
from unittest import mock

import numpy as np
import pytest

from conftest import load_script
from evaluator.evaluation import AdmScorer
from tiny_models import TINY_CONFIG, one_thread, write_tiny_weights
from utils.cli import parse
from utils.errors import OutputError, UsageError

SEARCH = "scripts/guidance_search.py"
SCALES = ("1.5", "3", "6")
NUM_SAMPLES, FINAL_SAMPLES, BATCH = 10, 20, 5
# scipy's sqrtm of a 2048² matrix takes ~20 s on a 2-core CPU (the Fréchet distance is tested in test_evaluator.py):
# here FID = ||mu1 - mu2||² + Tr(sigma1) + Tr(sigma2), as in test_evaluator's end-to-end tests.
ZERO_SQRTM = {"target": "scipy.linalg:sqrtm", "action": "replace", "with": "numpy:zeros_like"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("search")
    generator, tokenizer = write_tiny_weights(folder)
    ref = folder / "ref.npz"
    np.savez(ref, arr_0=np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8))
    return folder, generator, tokenizer, str(ref)


def model_arguments(files, output_dir):
    _, generator, tokenizer, _ = files
    return [f"config={TINY_CONFIG}", f"experiment.generator_checkpoint={generator}",
            f"experiment.tokenizer_checkpoint={tokenizer}", f"experiment.output_dir={output_dir}",
            f"sampling.per_proc_batch_size={BATCH}", "sampling.seed=3"]


def search_arguments(files, output_dir, weights):
    return [SEARCH, *model_arguments(files, output_dir), "--ref", files[3], "--grid",
            f"sampling.guidance_scale={','.join(SCALES)}", "--num-samples", str(NUM_SAMPLES), "--final-samples",
            str(FINAL_SAMPLES), "--inception-weights", weights, "--allow-few-samples", "--batch-size", "10"]


def sampler_npz(files, output_dir, scale, num_samples):
    """The 50k sampler, run by hand at one scale."""
    script = load_script("sample_imagenet_rear")
    with one_thread():
        script.main(*parse([*model_arguments(files, output_dir), f"sampling.guidance_scale={scale}",
                            f"sampling.num_samples={num_samples}"], script.SCRIPT))
    return (output_dir.parent / f"{output_dir.name}.npz").read_bytes()


@pytest.fixture(scope="module")
def search(files, server, random_inception_weights):
    """A search killed after the first image batch of its second point, then run again to the end."""
    out = files[0] / "out"
    argv = search_arguments(files, out, random_inception_weights)
    kill = {"target": "os:replace", "match": r"guidance_scale=3\.0/shards/batch_000000\.npz$", "action": "after"}
    killed = server.run(argv, faults=[ZERO_SQRTM, kill])
    state_after_kill = json.loads((out / "search.json").read_text())
    first_npz_written = (out / "points" / "guidance_scale=1.5.npz").stat().st_mtime_ns
    shards_after_kill = sorted(os.listdir(out / "points" / "guidance_scale=3.0" / "shards"))
    resumed = server.run(argv, faults=[ZERO_SQRTM])
    return {"out": out, "killed": killed, "state_after_kill": state_after_kill, "resumed": resumed,
            "first_npz_written": first_npz_written, "shards_after_kill": shards_after_kill,
            "state": json.loads((out / "search.json").read_text())}


def test_a_killed_search_resumes_at_the_point_it_was_on(search):
    assert search["killed"].returncode == -9
    scored = [point["metrics"] is not None for point in search["state_after_kill"]["points"]]
    assert scored == [True, False, False]
    assert search["shards_after_kill"] == ["batch_000000.npz"]
    resumed = search["resumed"]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "[1/3] sampling.guidance_scale=1.5: scored already" in resumed.stdout
    assert (search["out"] / "points" / "guidance_scale=1.5.npz").stat().st_mtime_ns == search["first_npz_written"]
    assert not (search["out"] / "points" / "guidance_scale=3.0" / "shards").exists()


def test_the_table_holds_each_points_adm_metrics_and_the_best_is_the_lowest_fid(search, files, random_inception_weights):
    state, out = search["state"], search["out"]
    assert [point["values"] for point in state["points"]] == [{"sampling.guidance_scale": float(s)} for s in SCALES]
    with mock.patch("scipy.linalg.sqrtm", np.zeros_like):  # each point's activations are cached: no Inception run
        score = AdmScorer(files[3], inception_weights=random_inception_weights, allow_few_samples=True)
        for point in state["points"]:
            assert point["metrics"] == score(str(out / f"{point['folder']}.npz"))
    fids = [point["metrics"]["FID"] for point in state["points"]]
    assert len(set(fids)) == 3  # the scale changes the samples, and so the score
    assert state["best"] == int(np.argmin(fids))
    table = (out / "search.md").read_text().splitlines()
    rows = [line for line in table if line.startswith(("| 1.5 ", "| 3.0 ", "| 6.0 "))]
    assert [row.endswith("| best |") for row in rows] == [i == state["best"] for i in range(3)]
    assert f"| {fids[0]:.4f} |" in rows[0] and "![FID and IS against the guidance](search.png)" in table
    assert (out / "search.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    best = SCALES[state["best"]]
    assert f"best by FID: sampling.guidance_scale={float(best)}" in search["resumed"].stdout


def test_every_point_and_the_final_run_are_the_50k_samplers_bytes(search, files, tmp_path):
    state, out = search["state"], search["out"]
    for scale, point in zip(SCALES, state["points"]):
        by_hand = sampler_npz(files, tmp_path / f"scale_{scale}", scale, NUM_SAMPLES)
        assert (out / f"{point['folder']}.npz").read_bytes() == by_hand
    best = SCALES[state["best"]]
    assert (out / "final.npz").read_bytes() == sampler_npz(files, tmp_path / "final", best, FINAL_SAMPLES)
    assert state["final"]["num_samples"] == FINAL_SAMPLES and state["final"]["values"] == {
        "sampling.guidance_scale": float(best)}


def test_a_search_with_another_grid_is_refused_in_its_folder(search, files, random_inception_weights):
    script = load_script("guidance_search")
    argv = search_arguments(files, search["out"], random_inception_weights)[1:]
    argv[argv.index(f"sampling.guidance_scale={','.join(SCALES)}")] = "sampling.guidance_scale=1.5,3"
    before = (search["out"] / "search.json").read_bytes()
    with pytest.raises(OutputError, match=r"holds a search with other settings \(grid: .*'6'.* \(there\)"):
        script.main(*parse(argv, script.SCRIPT))
    assert (search["out"] / "search.json").read_bytes() == before


@pytest.mark.parametrize("grid, message", [
    ("model.generator.hidden_size=64,128", "KEY one of sampling.guidance_scale, "),
    ("sampling.guidance_scale=3,3", "give distinct, non-empty values"),
    ("sampling.guidance_scale", "expected KEY=V1,V2,..."),
])
def test_a_bad_grid_is_one_line(grid, message):
    script = load_script("guidance_search")
    with pytest.raises(UsageError, match=message):
        script.parse_grid([grid])


def test_list_values_keep_their_commas():
    script = load_script("guidance_search")
    assert script.split_values("[0.1,1.0],[0.2, 0.9]") == ["[0.1,1.0]", "[0.2, 0.9]"]
    assert script.parse_grid(["model.generator.guidance_window=[0.1,1.0],[0.2,0.9]"]) == [
        ("model.generator.guidance_window", ["[0.1,1.0]", "[0.2,0.9]"])]
