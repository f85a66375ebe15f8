"""app.py: the gradio app on 127.0.0.1, driven through gradio_client against a tiny text model (skipped when
gradio is not installed: it is optional, `pip install gradio`)."""
import os
import re

import numpy as np
import pytest
from PIL import Image

from conftest import free_port
from test_export_diffusers import exported, text_ckpt  # noqa: F401  (fixtures)

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
gr = pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

import app  # noqa: E402


def gallery_files(gallery) -> list:
    """Local file paths of a gallery result (gradio_client gives dicts with an 'image' path, or paths)."""
    paths = []
    for item in gallery:
        image = item.get("image", item) if isinstance(item, dict) else item
        paths.append(image.get("path", image) if isinstance(image, dict) else image)
    return paths


def test_app_samples_through_gradio_client(text_ckpt, monkeypatch):  # noqa: F811
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    pipe = app.load_pipeline(app.parse_args(["--ckpt", str(text_ckpt), "--device", "cpu"]))
    assert app.sampler_choices(pipe) == [app.SCHEDULER_CHOICE, "euler", "heun", "sde"]
    demo = app.build_app(pipe, max_images=4)
    port = free_port()
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                        show_error=True)
    try:
        client = gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False)
        job = client.submit("a red circle on the left", 3, 2.0, 5, "sde", 2, api_name="/generate")
        gallery, timing = job.result(timeout=120)
        job = client.submit("a red circle on the left", 3, 2.0, 5, app.SCHEDULER_CHOICE, 1, api_name="/generate")
        scheduler_gallery, _ = job.result(timeout=120)
    finally:
        demo.close()
    assert re.fullmatch(r"2 image\(s\) in [0-9.]+ s \([0-9.]+ s per image\)", timing)
    received = [np.asarray(Image.open(p).convert("RGB")) for p in gallery_files(gallery)]
    expected = pipe(["a red circle on the left"] * 2, num_inference_steps=3, guidance_scale=2.0, seed=5,
                    sampler="sde").images
    assert len(received) == 2
    for got, want in zip(received, expected):
        np.testing.assert_array_equal(got, np.asarray(want))  # PNG: lossless
    first = np.asarray(Image.open(gallery_files(scheduler_gallery)[0]).convert("RGB"))
    want = pipe(["a red circle on the left"], num_inference_steps=3, guidance_scale=2.0, seed=5).images[0]
    np.testing.assert_array_equal(first, np.asarray(want))


def test_sampler_refuses_bad_requests(text_ckpt):  # noqa: F811
    pipe = app.load_pipeline(app.parse_args(["--ckpt", str(text_ckpt), "--device", "cpu"]))
    sample = app.Sampler(pipe, max_images=2)
    with pytest.raises(ValueError, match="1 to 2 images"):
        sample("a red circle", 2, 1.0, 0, "euler", 3)
    with pytest.raises(ValueError, match="prompt"):
        sample("  ", 2, 1.0, 0, "euler", 1)


def test_app_loads_an_exported_diffusers_folder(exported):  # noqa: F811
    from omegadit.export.diffusers_pipeline import OmegaDiTPipeline

    pipe = app.load_pipeline(app.parse_args(["--ckpt", str(exported), "--device", "cpu"]))
    assert isinstance(pipe, OmegaDiTPipeline)
    images, timing = app.Sampler(pipe)("a blue square", 2, 1.0, 3, "euler", 2)
    assert len(images) == 2 and images[0].size == (32, 32) and "2 image(s)" in timing
