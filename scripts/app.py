"""The demo on a web page: pick classes by name, set the sampling, watch the tokens being drawn, download the grid.

    python scripts/app.py                                   # the toy run in runs/rear_toy (train it first)
    python scripts/app.py config=configs/rear_s.yaml        # reAR-S, released weights (as scripts/demo.py fetches)
    python scripts/app.py config=FILE.yaml experiment.generator_checkpoint=G experiment.tokenizer_checkpoint=T

A Gradio page served on this machine (http://127.0.0.1:7860 by default; no public link). The model is loaded once,
before the server starts, and stays loaded; requests are served one at a time (Gradio's queue, concurrency 1), each
with `scripts/demo.py`'s `draw`: the same seed and settings give the same tokens and the same grid as the demo.
Bad input on the page is a message there. `--screenshot PATH` serves, generates once in headless Chromium
(/usr/bin/chromium, driven by Playwright), saves a picture of the page and exits: docs/demo.png is made so.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import signal
import socket
import sys
import tempfile
import time
from typing import Iterator, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a clone, uninstalled
from utils.threads import use_thread_defaults  # noqa: E402

use_thread_defaults()  # before torch loads

import numpy as np  # noqa: E402
from modeling.next_token import GUIDANCE_SCHEDULES  # noqa: E402
from modeling.sampler import SamplingOptions, why_not_fast  # noqa: E402
from scripts.demo import apply_flags, chosen_classes, draw, load_models, model_flags, set_sampling  # noqa: E402
from utils.cli import Script, one_line, run  # noqa: E402
from utils.errors import UsageError, UserError  # noqa: E402
from utils.files import atomic_open  # noqa: E402
from utils.grids import class_names, save_png  # noqa: E402

TOY_RUN = "runs/rear_toy"
TOY_TRAINING = "python scripts/train_rear.py config=configs/rear_toy.yaml"
MAX_IMAGES = 64  # per request: the page waits for the whole batch
GALLERY_COLUMNS = 5  # more overflow Gradio's gallery on a laptop's screen (the PNG has --columns)
CHROMIUM = "/usr/bin/chromium"  # Debian's package (apt-get install chromium); Playwright drives it, downloads none
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]

FLAGS = model_flags()
FLAGS.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
FLAGS.add_argument("--port", type=int, default=7860, help="port to serve on")
FLAGS.add_argument("--screenshot", metavar="PATH",
                   help="generate once in headless Chromium, save a PNG of the page to PATH and exit")


def toy_run(flags) -> str:
    """Without config=: the toy run's config, and its weights by the names training gives them."""
    files = [os.path.join(TOY_RUN, name) for name in ("config.yaml", "generator.safetensors", "tokenizer.safetensors")]
    missing = next((path for path in files if not os.path.isfile(path)), None)
    if missing is not None:
        raise UsageError(f"no model to serve: {missing} does not exist; train the toy model first ({TOY_TRAINING}, "
                         "minutes on a CPU), or pass config=FILE.yaml")
    flags.generator = flags.generator or files[1]
    flags.tokenizer = flags.tokenizer or files[2]
    return files[0]


SCRIPT = Script(
    usage="python scripts/app.py [config=FILE.yaml] [key.sub=value ...] [--generator PATH --tokenizer PATH] "
          "[--host 127.0.0.1] [--port 7860] [--screenshot PATH]",
    summary="The demo on a local web page (Gradio): classes by name, guidance, temperature, top-k / top-p and seed; "
            f"a labelled grid and its tokens to download. Without config= it serves the toy run in {TOY_RUN}.",
    example="python scripts/app.py config=configs/rear_s.yaml",
    sections=("sampling.guidance_scale", "sampling.guidance_scale_pow", "sampling.temperature", "sampling.top_k",
              "sampling.top_p", "sampling.precision"),
    flags=FLAGS,
    default_config=toy_run,
)


# ----------------------------------------------------------------------------------------- a request from the page
def class_ids(picked: Sequence[str], names: List[str]) -> List[int]:
    """The page's class choices (names from the list, or ids typed in) as class ids."""
    if not picked:
        raise UsageError("pick at least one class")
    ids = []
    for choice in picked:
        text = str(choice).strip()
        if text in names:
            ids.append(names.index(text))
        elif text.isdigit() and int(text) < len(names):
            ids.append(int(text))
        else:
            raise UsageError(f"'{text}' is not a class of this model: pick one from the list (ids 0..{len(names) - 1})")
    return ids


def whole_number(value, low: int, high: int, what: str) -> int:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value == int(value) and low <= value <= high):
        raise UsageError(f"{what} must be a whole number from {low} to {high}, got {value}")
    return int(value)


def request_config(config, schedule: str, scale: float, power: float, temperature: float, top_k: Optional[float],
                   top_p: Optional[float]):
    """A copy of the config with the page's sampling settings, checked as a config's are (top-k 0 and top-p 1 are
    off: every token)."""
    if any(value is None for value in (scale, power, temperature)):
        raise UsageError("guidance scale, power and temperature need a value")
    if schedule not in GUIDANCE_SCHEDULES:
        raise UsageError(f"guidance schedule '{schedule}' is not one of {', '.join(sorted(GUIDANCE_SCHEDULES))}")
    if top_k and top_k != int(top_k):
        raise UsageError(f"top-k must be a whole number, got {top_k}")
    config = copy.deepcopy(config)
    config.model.generator.guidance_schedule = schedule
    values = {"guidance_scale": float(scale), "guidance_scale_pow": float(power), "temperature": float(temperature),
              "top_k": int(top_k) if top_k else None, "top_p": None if top_p is None or top_p == 1 else float(top_p)}
    return set_sampling(config, values, "the page's settings")


def read_request(config, names: List[str], picked, per_class, scale, schedule, power, temperature, top_k, top_p,
                 seed) -> Tuple[List[int], object, int]:
    """(class id of each image, the config to sample with, seed) from the page's fields; bad input: a UserError."""
    ids = class_ids(picked, names)
    count = whole_number(per_class, 1, max(MAX_IMAGES // len(ids), 1), f"images per class (at most {MAX_IMAGES} images in all)")
    settings = request_config(config, schedule, scale, power, temperature, top_k, top_p)
    return [c for c in ids for _ in range(count)], settings, whole_number(seed, 0, 2**63 - 1, "the seed")


def save_downloads(folder: str, name: str, tokens, classes: List[int], seed: int, grid) -> Tuple[str, str]:
    """The grid (PNG) and the tokens (npz: tokens, class_ids, seed) in a new subfolder of `folder`."""
    out = tempfile.mkdtemp(dir=folder)
    stem = os.path.join(out, f"{name}_seed{seed}")
    save_png(grid, stem + ".png")
    with atomic_open(stem + ".npz", "wb") as f:
        np.savez(f, tokens=tokens.cpu().numpy(), class_ids=np.array(classes), seed=seed)
    return stem + ".png", stem + ".npz"


def describe(settings, generator, count: int, seed: int, seconds: float) -> str:
    """The status line under the images: what was sampled, how, and with which settings."""
    used = SamplingOptions.from_config(settings)
    loop = why_not_fast(generator, used)
    return (f"{count} images, seed {seed}, {seconds:.1f} s ({'fast sampler' if loop is None else loop}); guidance "
            f"{used.guidance_scale} ({used.guidance_schedule}, power {used.guidance_scale_pow}), temperature "
            f"{used.temperature}, top-k {used.top_k or 'off'}, top-p {used.top_p or 'off'}")


# ----------------------------------------------------------------------------------------- the page
def build_page(config, generator, tokenizer, flags, folder: str):
    """The Gradio page over a loaded generator and tokenizer; files to download are written under `folder`."""
    import gradio as gr

    names = class_names(config)
    options = SamplingOptions.from_config(config)

    def generate(*fields, progress=gr.Progress()):
        try:
            classes, settings, seed = read_request(config, names, *fields)
        except UserError as err:
            raise gr.Error(one_line(err), print_exception=False) from None
        start = time.perf_counter()
        tokens, images, grid = draw(generator, tokenizer, settings, classes, seed, flags.columns,
                                    lambda t, n: progress((t, n), desc="drawing tokens", unit="tokens"))
        status = describe(settings, generator, len(classes), seed, time.perf_counter() - start)
        png, npz = save_downloads(folder, config.experiment.name, tokens, classes, seed, grid)
        return (gr.Gallery(value=[(image, names[c]) for image, c in zip(images, classes)],
                           columns=min(len(classes), GALLERY_COLUMNS)),
                gr.DownloadButton(value=png, visible=True), gr.DownloadButton(value=npz, visible=True), status)

    g = config.model.generator
    with gr.Blocks(title=f"reAR demo: {config.experiment.name}", analytics_enabled=False,
                   delete_cache=(600, 3600)) as page:
        gr.Markdown(f"## reAR: {config.experiment.name}\n{g.backbone} generator, {generator.num_parameters() / 1e6:.1f}M "
                    f"parameters, {len(names)} classes, {generator.image_seq_len} tokens per image; {flags.device}")
        with gr.Row():
            with gr.Column(scale=1):
                fields = [
                    gr.Dropdown(names, value=[names[c] for c in chosen_classes(config, flags)], multiselect=True,
                                allow_custom_value=True, label="Classes", elem_id="classes",
                                info="type to search; one row of images each"),
                    gr.Number(1, precision=0, label="Images per class", elem_id="per-class"),
                    gr.Number(options.guidance_scale, label="Guidance scale", info="0: no guidance", step=0.5,
                              elem_id="guidance-scale"),
                ]
                with gr.Row():
                    fields += [
                        gr.Dropdown(sorted(GUIDANCE_SCHEDULES), label="Guidance schedule", elem_id="schedule",
                                    value=options.guidance_schedule or generator.guidance_schedule),
                        gr.Number(options.guidance_scale_pow, label="Power", info="of cosine_power", step=0.25,
                                  elem_id="power"),
                    ]
                fields.append(gr.Number(options.temperature, label="Temperature", step=0.05, elem_id="temperature"))
                with gr.Row():
                    fields += [
                        gr.Number(options.top_k or 0, precision=0, label="Top-k", info="0: every token",
                                  elem_id="top-k"),
                        gr.Number(options.top_p or 1.0, label="Top-p", info="1: every token", step=0.05,
                                  elem_id="top-p"),
                    ]
                fields.append(gr.Number(flags.seed, precision=0, label="Seed", elem_id="seed"))
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=2):
                gallery = gr.Gallery(label="Samples", format="png", columns=GALLERY_COLUMNS, elem_id="samples",
                                     object_fit="contain", height="auto")
                status = gr.Markdown(elem_id="status")
                with gr.Row():
                    grid_file = gr.DownloadButton("Grid (PNG)", visible=False, elem_id="grid-download")
                    tokens_file = gr.DownloadButton("Tokens (npz)", visible=False, elem_id="tokens-download")
        button.click(generate, fields, [gallery, grid_file, tokens_file, status], api_name="generate")
    return page.queue(default_concurrency_limit=1, max_size=32)  # one request at a time: the random stream is global


PAGE_CSS = "#samples img { image-rendering: pixelated; }"  # small images enlarged: sharp pixels, as in the PNG
PAGE_THEME_FONTS = dict(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def check_address(host: str, port: int) -> None:
    """The server's address can be taken (asked before the model loads, which may take minutes)."""
    try:
        with socket.socket() as probe:
            probe.bind((host, port))
    except OSError as err:
        raise UsageError(f"cannot serve on {host}:{port} ({err.strerror or err}): pass another --port or --host") from None


def launch(page, flags, block: bool):
    """Serve the page (fonts from this machine, no public link); returns its local URL."""
    import gradio as gr

    page.launch(server_name=flags.host, server_port=flags.port, share=False, prevent_thread_lock=not block,
                quiet=not block, css=PAGE_CSS, theme=gr.themes.Default(**PAGE_THEME_FONTS))
    return page.local_url


# ----------------------------------------------------------------------------------------- the browser
@contextlib.contextmanager
def chromium() -> Iterator:
    """Headless Chromium from the system's packages, under Playwright."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise UsageError("--screenshot needs Playwright: pip install playwright (it drives the system's Chromium; "
                         "no `playwright install` needed)") from None
    if not os.path.isfile(CHROMIUM):
        raise UsageError(f"--screenshot needs Chromium at {CHROMIUM}: apt-get install chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def screenshot(url: str, path: str) -> None:
    """Open the page, generate with its defaults, and save a picture of the whole page (atomically)."""
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(url)
        page.click("#generate")
        page.wait_for_selector("#grid-download", state="visible", timeout=600_000)
        page.wait_for_function("[...document.querySelectorAll('#samples img')].every(i => i.complete)")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with atomic_open(path, "wb") as f:
            f.write(page.screenshot(full_page=True))


def main(config, flags) -> None:
    chosen_classes(config, flags)
    apply_flags(config, flags)
    check_address(flags.host, flags.port)
    generator, tokenizer = load_models(config, flags)  # before the server: a missing file is the demo's one line
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` stops the server as Ctrl-C does: cleaned up
    with tempfile.TemporaryDirectory(prefix="rear_app_") as folder:
        os.environ.setdefault("GRADIO_TEMP_DIR", os.path.join(folder, "gradio"))  # Gradio's copies go with ours
        page = build_page(config, generator, tokenizer, flags, folder)
        if flags.screenshot is None:
            launch(page, flags, block=True)
            return
        try:
            screenshot(launch(page, flags, block=False), flags.screenshot)
        finally:
            page.close()
        print(f"wrote {flags.screenshot}")


if __name__ == "__main__":
    run(SCRIPT, main)
