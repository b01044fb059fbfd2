"""scripts/app.py: the demo's page, served as a user starts it (no arguments, a toy run in runs/rear_toy) and driven
in headless Chromium as a person uses it; what it draws is what scripts/demo.py draws, and bad input is a message."""

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import load_script
from modeling.rear import ReAR
from tiny_models import ROOT, one_thread, write_tiny_toy_run
from utils.config import load_config
from utils.errors import UserError

APP = ROOT / "scripts" / "app.py"


@pytest.fixture(scope="module")
def toy_app(tmp_path_factory):
    """`python scripts/app.py` in a folder holding a (tiny) toy run: its URL and the run's folder. At the end it is
    stopped with SIGTERM, and must leave nothing in its temporary folder."""
    folder = tmp_path_factory.mktemp("app")
    run = write_tiny_toy_run(folder)
    temporary = folder / "tmp"
    temporary.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(temporary)}
    log = open(folder / "app.log", "w+")
    process = subprocess.Popen([sys.executable, str(APP), "--port", str(port), "--device", "cpu"], cwd=folder,
                               env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_served(url, process, log)
        assert len(list(temporary.glob("rear_app_*"))) == 1
        yield url, run
    finally:
        process.send_signal(signal.SIGTERM)
        returncode = process.wait(timeout=60)
        log.seek(0)
        output = log.read()
        log.close()
    assert returncode == 0, output
    assert "Traceback" not in output, output
    assert list(temporary.glob("rear_app_*")) == [], "the page's files (and Gradio's copies) go when it stops"


def wait_until_served(url, process, log, timeout=120):
    start = time.time()
    while time.time() - start < timeout:
        if process.poll() is not None:
            log.seek(0)
            raise AssertionError(f"the app ended (status {process.returncode}): {log.read()}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} not served after {timeout} s")


# What the progress bar over the images says, as it changes: "12/64 tokens | 0.2s drawing tokens - 18.8%", ...
WATCH_PROGRESS = """() => {
    window.progress = [];
    new MutationObserver(() => {
        const text = document.querySelector('#samples').innerText;
        const shown = text.match(/\\d+\\/\\d+ tokens/);
        if (shown) window.progress.push(shown[0]);
    }).observe(document.querySelector('#samples'), {subtree: true, childList: true, characterData: true});
}"""


def demo_grid(run, classes, seed, out):
    """scripts/demo.py's grid for the toy run's weights, as the user would run it."""
    demo = load_script("demo")
    with one_thread():
        demo.run(demo.SCRIPT, demo.main, [
            f"config={run}/config.yaml", "--generator", f"{run}/generator.safetensors", "--tokenizer",
            f"{run}/tokenizer.safetensors", "--classes", *map(str, classes), "--seed", str(seed), "--out", str(out),
            "--device", "cpu",
        ])
    return np.asarray(Image.open(out).convert("RGB"))


def generated_tokens(run, classes, seed):
    """ReAR.generate's tokens for the toy run at its released settings (guidance 3.0, power 1.0)."""
    config = load_config(str(run / "config.yaml"))
    generator = ReAR.from_pretrained(config, str(run / "generator.safetensors"))
    with one_thread():
        torch.manual_seed(seed)
        return generator.generate(torch.tensor(classes), guidance_scale=3.0, guidance_scale_pow=1.0).numpy()


def test_the_page_draws_what_the_demo_draws_and_says_what_is_wrong(toy_app, tmp_path):
    """One browser session: two classes picked by name, two images each, seed 5; then out-of-range inputs."""
    from playwright.sync_api import expect

    app = load_script("app")
    url, run = toy_app
    assert os.path.isfile(app.CHROMIUM), (f"the browser test drives Debian's Chromium at {app.CHROMIUM}, which is "
                                          "missing: apt-get install chromium (.ci/run installs it)")
    with app.chromium() as browser:
        page = browser.new_page(accept_downloads=True)
        page.goto(url)
        page.click("#classes [title=Clear]")
        for search, name in (("cross", "3 red cross"), ("blue tri", "7 blue triangle")):
            page.fill("#classes input", search)
            page.get_by_role("option", name=name).click()
        page.fill("#per-class input", "2")
        page.fill("#seed input", "5")
        page.evaluate(WATCH_PROGRESS)
        page.click("#generate")
        page.wait_for_selector("#grid-download", state="visible", timeout=60_000)
        captions = page.locator("#samples .caption-label").all_inner_texts()
        assert captions == ["3 red cross", "3 red cross", "7 blue triangle", "7 blue triangle"]
        assert page.locator("#samples img").count() == 4
        assert page.inner_text("#status").startswith("4 images, seed 5, ")
        assert "(fast sampler)" in page.inner_text("#status")
        shown = page.evaluate("window.progress")  # the steps the page rendered (updates that come together merge)
        assert shown and all(re.fullmatch(r"([1-9]|[1-5]\d|6[0-4])/64 tokens", step) for step in shown), shown
        downloads = {}
        for button in ("grid", "tokens"):
            with page.expect_download() as download:
                page.click(f"#{button}-download")
            downloads[button] = tmp_path / download.value.suggested_filename
            download.value.save_as(downloads[button])

        def message_for(selector, value):
            """The page's message when the field `selector` holds `value` (then set back and the message closed)."""
            before = page.input_value(selector)
            page.fill(selector, value)
            page.click("#generate")
            text = page.get_by_test_id("toast-text").inner_text(timeout=30_000)
            page.fill(selector, before)
            page.get_by_test_id("toast-close").click()
            expect(page.get_by_test_id("toast-text")).to_have_count(0)
            return text

        too_many = message_for("#per-class input", "40")
        negative = message_for("#guidance-scale input", "-2")
        top_p = message_for("#top-p input", "1.5")

    assert downloads["grid"].name == "rear_toy_seed5.png"
    assert np.array_equal(np.asarray(Image.open(downloads["grid"]).convert("RGB")),
                          demo_grid(run, [3, 3, 7, 7], 5, tmp_path / "demo.png"))
    with np.load(downloads["tokens"]) as saved:
        assert saved["class_ids"].tolist() == [3, 3, 7, 7] and int(saved["seed"]) == 5
        assert np.array_equal(saved["tokens"], generated_tokens(run, [3, 3, 7, 7], 5))
    assert too_many == "images per class (at most 64 images in all) must be a whole number from 1 to 32, got 40"
    assert negative == "bad config value in the page's settings: 'sampling.guidance_scale' is -2.0 (must be >= 0)"
    assert top_p == "bad config value in the page's settings: 'sampling.top_p' is 1.5 (must be in (0, 1])"


def test_two_requests_at_once_are_served_one_after_the_other(toy_app, tmp_path):
    """Two clients at once, each its own seed: each gets the tokens of its seed (the random stream is global, so
    requests run in turn)."""
    from gradio_client import Client

    url, run = toy_app
    client = Client(url, verbose=False, download_files=str(tmp_path), analytics_enabled=False)
    with ThreadPoolExecutor(2) as pool:
        jobs = {seed: pool.submit(client.predict, ["1 red square", "6 blue square"], 8, 3.0, "cosine_power", 1.0, 1.0,
                                  0, 1.0, seed, api_name="/generate") for seed in (11, 12)}
        results = {seed: job.result(timeout=120) for seed, job in jobs.items()}
    for seed, (gallery, _, tokens, status) in results.items():
        assert len(gallery["value"]) == 16 and status.startswith(f"16 images, seed {seed}, ")
        with np.load(tokens["value"]) as saved:
            assert np.array_equal(saved["tokens"], generated_tokens(run, [1] * 8 + [6] * 8, seed))


GOOD = (3.0, "cosine_power", 1.0, 1.0, 0, 1.0, 0)  # guidance scale, schedule, power, temperature, top-k, top-p, seed


def test_page_inputs_are_checked_in_the_configs_domains():
    """What the page sends is read as a config's values are; every bad value is a UserError (a message there)."""
    app = load_script("app")
    config = load_config(str(ROOT / "configs" / "rear_toy.yaml"))
    names = [f"class {c}" for c in range(10)]
    assert app.class_ids(["class 3", " 7 ", "class 0"], names) == [3, 7, 0]
    wrong = [
        (lambda: app.class_ids([], names), "pick at least one class"),
        (lambda: app.class_ids(["class 10"], names),
         "'class 10' is not a class of this model: pick one from the list (ids 0..9)"),
        (lambda: app.class_ids(["12"], names), "'12' is not a class of this model: pick one from the list (ids 0..9)"),
        (lambda: app.read_request(config, names, ["class 1", "class 2", "class 3"], 0, *GOOD),
         "images per class (at most 64 images in all) must be a whole number from 1 to 21, got 0"),
        (lambda: app.read_request(config, names, ["class 1"], None, *GOOD),
         "images per class (at most 64 images in all) must be a whole number from 1 to 64, got None"),
        (lambda: app.read_request(config, names, ["class 1"], 1.5, *GOOD),
         "images per class (at most 64 images in all) must be a whole number from 1 to 64, got 1.5"),
        (lambda: app.read_request(config, names, ["class 1"], 1, *GOOD[:-1], -1),
         "the seed must be a whole number from 0 to 9223372036854775807, got -1"),
        (lambda: app.request_config(config, "cosine_power", 3.0, 1.0, 1.0, 2.5, 1.0), "top-k must be a whole number, got 2.5"),
        (lambda: app.request_config(config, "cosine_power", 3.0, -1.0, 1.0, 0, 1.0),
         "bad config value in the page's settings: 'sampling.guidance_scale_pow' is -1.0 (must be >= 0)"),
        (lambda: app.request_config(config, "cosine_power", 3.0, 1.0, None, 0, 1.0),
         "guidance scale, power and temperature need a value"),
        (lambda: app.request_config(config, "cosine_power", 3.0, 1.0, 0.0, 0, 1.0),
         "bad config value in the page's settings: 'sampling.temperature' is 0.0 (must be > 0)"),
        (lambda: app.request_config(config, "cosine_power", 3.0, 1.0, 1.0, -2, 1.0),
         "bad config value in the page's settings: 'sampling.top_k' is -2 (must be > 0)"),
        (lambda: app.request_config(config, "cosine", 3.0, 1.0, 1.0, 0, 1.0),
         "guidance schedule 'cosine' is not one of constant, cosine_power, linear, linear_re, rectangular, step, "
         "triangular"),
    ]
    for call, message in wrong:
        with pytest.raises(UserError) as err:
            call()
        assert str(err.value) == message
    classes, settings, seed = app.read_request(config, names, ["class 4", "2"], 3, 2, "constant", 0.5, 0.9, 5, 1, 7)
    assert classes == [4, 4, 4, 2, 2, 2] and seed == 7
    assert (settings.sampling.guidance_scale, settings.sampling.top_k, settings.sampling.top_p) == (2.0, 5, None)
    assert settings.model.generator.guidance_schedule == "constant" and config.model.generator.guidance_schedule is None


@pytest.mark.parametrize("sampler", ["fast", "plain"])
def test_the_page_sees_every_token_drawn(sampler, tmp_path):
    """draw() reports each token to the page's progress bar, from the fast sampler and from the readable loop."""
    demo = load_script("demo")
    run = write_tiny_toy_run(tmp_path)
    config = load_config(str(run / "config.yaml"), [f"sampling.sampler={sampler}"])
    config.experiment.tokenizer_checkpoint = str(run / "tokenizer.safetensors")
    generator = ReAR.from_pretrained(config, str(run / "generator.safetensors"))
    tokenizer = demo.build_tokenizer(config)
    seen = []
    with one_thread():
        tokens, images, _ = demo.draw(generator, tokenizer, config, [2, 5], 0, 8, lambda t, n: seen.append((t, n)))
    assert seen == [(t, 64) for t in range(1, 65)]
    assert tokens.shape == (2, 64) and images.shape == (2, 32, 32, 3)
    assert np.array_equal(tokens.numpy(), generated_tokens(run, [2, 5], 0))


def test_without_a_toy_run_it_says_how_to_make_one(server, tmp_path):
    result = server.run([str(APP)], cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == ("error: no model to serve: runs/rear_toy/config.yaml does not exist; train the toy model "
                             "first (python scripts/train_rear.py config=configs/rear_toy.yaml, minutes on a CPU), or "
                             "pass config=FILE.yaml\n")


def test_a_taken_port_is_one_line_before_the_model_loads(server, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = server.run([str(APP), "config=configs/rear_tiny.yaml", "--port", str(port)])  # no weights named
    assert result.returncode == 2
    assert result.stderr == (f"error: cannot serve on 127.0.0.1:{port} (Address already in use): pass another --port "
                             "or --host\n")
