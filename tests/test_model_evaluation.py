"""A model's evaluation at toy size, one chain: scripts/guidance_search.py over three guidance scales with the tiny
random generator, killed in the middle of the second point and run again (the table, the best point and the samples
checked against the 50k sampler run by hand at each scale and against the ADM evaluator on each point's file); then
`python -m evaluator.report` on its best point with the search and a reconstruction included, and
`python -m evaluator.compare` over two results folders."""

import json
import os
import re
import subprocess
from unittest import mock

import numpy as np
import pytest

from conftest import load_script
from evaluator import compare, guidance_search, reconstruction, report
from evaluator.evaluation import AdmScorer
from tiny_models import ROOT, TINY_CONFIG, one_thread, write_tiny_weights
from utils.cli import parse
from utils.errors import DataError, OutputError, UsageError

SEARCH = "scripts/guidance_search.py"
SCALES = ("1.5", "3", "6")
# Two classes, so that a point needs only 4 samples (precision / recall take more than k = 3): Inception's forward
# pass at 299² is what costs here.
TWO_CLASSES = "model.generator.condition_num_classes=2"
NUM_SAMPLES, FINAL_SAMPLES, BATCH = 4, 8, 2
# scipy's sqrtm of a 2048² matrix takes ~20 s on a 2-core CPU (the Fréchet distance is tested in test_evaluator.py):
# here FID = ||mu1 - mu2||² + Tr(sigma1) + Tr(sigma2), as in test_evaluator's end-to-end tests.
ZERO_SQRTM = {"target": "scipy.linalg:sqrtm", "action": "replace", "with": "numpy:zeros_like"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("search")
    generator, tokenizer = write_tiny_weights(folder, [TWO_CLASSES])
    ref = folder / "ref.npz"
    np.savez(ref, arr_0=np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8))
    return folder, generator, tokenizer, str(ref)


def model_arguments(files, output_dir):
    _, generator, tokenizer, _ = files
    return [f"config={TINY_CONFIG}", f"experiment.generator_checkpoint={generator}",
            f"experiment.tokenizer_checkpoint={tokenizer}", f"experiment.output_dir={output_dir}",
            f"sampling.per_proc_batch_size={BATCH}", "sampling.seed=3", TWO_CLASSES]


def search_arguments(files, output_dir, weights):
    return [SEARCH, *model_arguments(files, output_dir), "--ref", files[3], "--grid",
            f"sampling.guidance_scale={','.join(SCALES)}", "--num-samples", str(NUM_SAMPLES), "--final-samples",
            str(FINAL_SAMPLES), "--inception-weights", weights, "--allow-few-samples", "--batch-size", "8"]


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
    kill = {"target": "os:replace", "match": r"guidance_scale_3\.0/shards/batch_000000\.npz$", "action": "after"}
    killed = server.run(argv, faults=[ZERO_SQRTM, kill])
    state_after_kill = json.loads((out / "search.json").read_text())
    first_npz_written = (out / "points" / "guidance_scale_1.5.npz").stat().st_mtime_ns
    shards_after_kill = sorted(os.listdir(out / "points" / "guidance_scale_3.0" / "shards"))
    resumed = server.run(argv, faults=[ZERO_SQRTM])
    return {"out": out, "killed": killed, "state_after_kill": state_after_kill, "resumed": resumed,
            "first_npz_written": first_npz_written, "shards_after_kill": shards_after_kill,
            "state": json.loads((out / "search.json").read_text())}


def test_a_killed_search_resumes_at_the_point_it_was_on(search):
    assert search["killed"].returncode == -9
    scored = [point["metrics"] is not None for point in search["state_after_kill"]["points"]]
    assert scored == [True, False, False]
    assert search["shards_after_kill"] == ["batch_000000.npz"]  # of 2
    resumed = search["resumed"]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "[1/3] sampling.guidance_scale=1.5: scored already" in resumed.stdout
    assert (search["out"] / "points" / "guidance_scale_1.5.npz").stat().st_mtime_ns == search["first_npz_written"]
    assert not (search["out"] / "points" / "guidance_scale_3.0" / "shards").exists()


def test_the_table_holds_each_points_adm_metrics_and_the_best_has_the_lowest_fid(search, files,
                                                                                random_inception_weights):
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
    with pytest.raises(UsageError, match=message):
        guidance_search.parse_grid([grid])


def test_list_values_keep_their_commas():
    assert guidance_search.split_values("[0.1,1.0],[0.2, 0.9]") == ["[0.1,1.0]", "[0.2, 0.9]"]
    assert guidance_search.parse_grid(["model.generator.guidance_window=[0.1,1.0],[0.2,0.9]"]) == [
        ("model.generator.guidance_window", ["[0.1,1.0]", "[0.2,0.9]"])]


# ----------------------------------------------------------------------------------------- the report
@pytest.fixture(scope="module")
def held_out(files):
    rng = np.random.default_rng(4)
    lines = [json.dumps({"class_id": i % 2, "tokens": rng.integers(0, 32, 16).tolist()}) for i in range(8)]
    (files[0] / "held_out.jsonl").write_text("\n".join(lines) + "\n")
    return str(files[0] / "held_out.jsonl")


def report_arguments(files, samples, output, *extra):
    return [str(samples), *model_arguments(files, files[0] / "unused"), "--output", str(output), *extra]


@pytest.fixture(scope="module")
def results(search, files, held_out, random_inception_weights):
    """evaluator.report on the search's full-count samples, with the search and a reconstruction included."""
    recon = files[0] / "recon"
    with one_thread():
        reconstruction.main(*parse([f"config={TINY_CONFIG}", f"experiment.tokenizer_checkpoint={files[2]}", "--data",
                                    files[3], "--output", str(recon)], reconstruction.SCRIPT))
        with mock.patch("scipy.linalg.sqrtm", np.zeros_like):
            out = files[0] / "results"
            made = report.main(*parse(report_arguments(
                files, search["out"] / "final.npz", out, "--ref", files[3], "--held-out", held_out, "--search",
                str(search["out"]), "--reconstruction", str(recon), "--inception-weights", random_inception_weights,
                "--allow-few-samples"), report.SCRIPT))
    return out, made


def test_the_report_holds_the_numbers_settings_and_commit(results, search):
    out, made = results
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(made))
    assert made["adm"] == search["state"]["final"]["metrics"]  # the same samples against the same reference
    metrics = json.loads((out / "metrics.json").read_text())
    assert {k: metrics[k] for k in made["adm"]} == made["adm"]
    assert metrics["precision_recall"] == {"k": 3, "reference_images": 4, "sample_images": FINAL_SAMPLES}
    assert made["consistency"] == json.loads((out / "consistency.json").read_text())
    assert made["exposure"]["rates"] == [0.0, 0.1, 0.3, 0.5] and (out / "exposure.json").is_file()
    assert made["sampling_record"] == json.loads((search["out"] / "final" / "sampling.json").read_text())
    assert made["sampling_record"]["guidance_scale"] == search["state"]["final"]["values"]["sampling.guidance_scale"]
    assert made["settings"]["config"]["model"]["generator"]["hidden_size"] == 64
    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    assert made["code"]["commit"] == (git.stdout.strip() if git.returncode == 0 else "unknown")
    page = (out / "report.md").read_text()
    assert f"| {made['adm']['FID']:.4f} | {made['adm']['sFID']:.4f} |" in page
    assert "## Guidance search" in page and "| best |" in page and "## Tokenizer reconstruction" in page


def test_the_report_lists_every_figure(results):
    out, made = results
    figures = {"samples.png", "consistency.png", "exposure.png", "search.png", "reconstruction.png"}
    assert set(made["figures"]) == figures == {p.name for p in out.glob("*.png")}
    assert set(re.findall(r"!\[[^\]]*\]\(([^)]+)\)", (out / "report.md").read_text())) == figures
    assert all((out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for name in figures)


def test_compare_puts_results_folders_side_by_side(results, search, files, capsys):
    first, made = results
    second = files[0] / "results_without_reference"
    with one_thread():  # no reference batch, no held-out tokens: consistency alone
        report.main(*parse(report_arguments(files, search["out"] / "points" / "guidance_scale_6.0.npz", second),
                           report.SCRIPT))
    capsys.readouterr()
    text = compare.main(*parse(["--run", f"searched={first}", "--run", f"plain={second}"], compare.SCRIPT))
    adm, consistency, exposure = text.split("\n\n")[1], text.split("\n\n")[3], text.split("\n\n")[5]
    assert adm.splitlines()[2].startswith(f"| searched | {made['adm']['FID']:.4f} |") and "plain" not in adm
    assert [line.split(" | ")[0] for line in consistency.splitlines()[2:]] == ["| searched", "| plain"]
    assert "searched" in exposure and "plain" not in exposure


def test_a_folder_that_is_not_a_search_is_refused_before_any_work(files, search, tmp_path):
    with pytest.raises(DataError, match=r"--search .*: no search.json there"):
        report.main(*parse(report_arguments(files, search["out"] / "final.npz", tmp_path / "out", "--search",
                                            str(tmp_path)), report.SCRIPT))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command, code, line", [
    (["scripts/guidance_search.py", "--ref", "{ref}", "--grid", "model.generator.hidden_size=32,64"], 2,
     "--grid model.generator.hidden_size=32,64: expected KEY=V1,V2,... with KEY one of sampling.guidance_scale, "
     "sampling.guidance_scale_pow, sampling.temperature, sampling.top_k, sampling.top_p, "
     "model.generator.guidance_schedule, model.generator.guidance_window, model.generator.cfg_interval"),
    (["scripts/guidance_search.py", "--ref", "{ref}", "--grid", "sampling.guidance_scale=2,x"], 2,
     "bad value for config key 'sampling.guidance_scale' in --grid: Value 'x' of type 'str' could not be converted "
     "to Float"),
    (["-m", "evaluator.report", "{ref}"], 2, "give --output DIR: the folder of the report"),
    (["-m", "evaluator.reconstruction", "--data", "{out}/none", "--output", "{out}/recon"], 1,
     "--data {out}/none: no such file or folder"),
])
def test_bad_input_is_one_line(server, files, tmp_path, command, code, line):
    def filled(text):
        return text.format(ref=files[3], out=tmp_path)

    entry = 2 if command[0] == "-m" else 1
    result = server.run([*command[:entry], *model_arguments(files, tmp_path / "run"), *map(filled, command[entry:])])
    assert (result.returncode, result.stderr) == (code, f"error: {filled(line)}\n")
    assert list(tmp_path.iterdir()) == []
