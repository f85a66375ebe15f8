"""app.py in a real headless browser: type a prompt, press Generate, and get the images generate.py's pipeline makes.

Needs playwright (requirements-dev.txt) and a Chromium-family browser on the machine; playwright's own browser
download is not used: the test drives the installed one (`chromium`, `google-chrome`, or $OMEGADIT_BROWSER). Where
no browser is installed the test is skipped with that message."""
import io
import os
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import free_port
from test_export_diffusers import text_ckpt  # noqa: F401  (fixture)

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
pytest.importorskip("gradio")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is missing: pip install -r requirements-dev.txt")

import app  # noqa: E402

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def installed_browser():
    """Path of a Chromium-family browser: $OMEGADIT_BROWSER, else the first of BROWSERS on PATH."""
    if os.environ.get("OMEGADIT_BROWSER"):
        return os.environ["OMEGADIT_BROWSER"]
    return next((shutil.which(name) for name in BROWSERS if shutil.which(name)), None)


def test_generate_button_in_a_headless_browser(text_ckpt):  # noqa: F811
    browser_path = installed_browser()
    if browser_path is None:
        pytest.skip(f"no headless browser found (looked for {', '.join(BROWSERS)}; set OMEGADIT_BROWSER)")
    pipe = app.load_pipeline(app.parse_args(["--ckpt", str(text_ckpt), "--device", "cpu"]))
    demo = app.build_app(pipe, max_images=2)
    port = free_port()
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    prompt = "a small blue square at the top"
    try:
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/", timeout=60_000)
            page.get_by_label("Prompt").fill(prompt)
            page.get_by_role("button", name="Generate").click()
            timing = page.get_by_label("Time")
            sync_api.expect(timing).to_have_value(re.compile(r"2 image\(s\) in "), timeout=120_000)
            sources = [img.get_attribute("src") for img in page.locator("img[src*='gradio_api/file=']").all()]
            shown = [np.asarray(Image.open(io.BytesIO(page.request.get(src).body())).convert("RGB"))
                     for src in dict.fromkeys(sources)]
            browser.close()
    finally:
        demo.close()
    assert app.sampler_choices(pipe)[0] == app.SCHEDULER_CHOICE  # the page's default sampler: the scheduler
    defaults = pipe.sampling_defaults
    expected = pipe([prompt] * 2, num_inference_steps=int(defaults["num_steps"]),
                    guidance_scale=float(defaults["cfg_scale"]), seed=0, sampler=None).images
    assert len(shown) == 2
    for got, want in zip(shown, expected):
        np.testing.assert_array_equal(got, np.asarray(want))
