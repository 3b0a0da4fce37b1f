"""Tests of the interactive demo (app.py): the function behind the page on a tiny model, the photos it accepts and
refuses, the model it starts with, and the real page in headless Chromium."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
import zlib
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, tiny_config
from PIL import Image
from skimage import data as sample_photos
from transformers import ViTMAEConfig, ViTMAEForPreTraining

from modeling_sgmae import SGMAEConfig, SGMAEForImageClassification, SGMAEForPreTraining
from modeling_sgmae.analysis import figure_panel, masking_position_mean

sys.path.insert(0, str(REPO_ROOT))
import app

PHOTO_SIZE = (90, 60)  # a landscape photo: the panels must come back at 3:2
OUTPUT_LINES = ("statistics", "reconstruction note", "status")  # the /mask endpoint's outputs after the panels
CONTROLS = dict(mask_ratio=0.6, hint_ratio=0.2, feature_layer=1, graph_edges="binary_mean", foreground_rule="smaller")
# A trained checkpoint for the screenshot: with it, the browser test writes docs/demo.png (see docs/demo.md).
SCREENSHOT_MODEL = os.environ.get("SGMAE_DEMO_SCREENSHOT")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_model")
    SGMAEForPreTraining(tiny_config()).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def photo_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("photos") / "chelsea.png"
    Image.fromarray(sample_photos.chelsea()).resize(PHOTO_SIZE).save(path)
    return str(path)


def png_declaring(width: int, height: int) -> bytes:
    """A PNG file whose header declares width x height pixels but which holds no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def model_resolution(panel: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """A panel stretched with nearest-neighbour resampling, read back at `size` (height, width): one sample per
    model pixel, at the display pixel that pixel landed on."""
    rows = ((np.arange(size[0]) + 0.5) * panel.height / size[0]).astype(int)
    columns = ((np.arange(size[1]) + 0.5) * panel.width / size[1]).astype(int)
    return np.asarray(panel)[rows[:, None], columns[None, :]]


def patches_changed(image: np.ndarray, reference: np.ndarray, patch_size: int) -> np.ndarray:
    """[N] bool, row-major: the patches in which `image` [H, W, 3] differs from `reference` anywhere."""
    differs = (image != reference).any(axis=-1)
    height, width = differs.shape
    return differs.reshape(height // patch_size, patch_size, width // patch_size, patch_size).any(axis=(1, 3)).ravel()


# ----- the function behind the page -------------------------------------------------------------------------------


def test_the_page_shows_six_titled_panels_at_the_photos_aspect_and_what_the_masking_saw(model_dir, photo_path):
    outputs = app.DemoServer("cpu").show(model_dir, photo_path, *CONTROLS.values(), seed=3)

    *panels, statistics, note, status = outputs
    assert len(panels) == 6 and status == ""
    for panel in panels:
        assert isinstance(panel, Image.Image) and panel.mode == "RGB"
        assert panel.size == (app.DISPLAY_SIDE, app.DISPLAY_SIDE * PHOTO_SIZE[1] // PHOTO_SIZE[0])
    assert ("Informed mask" in statistics and "object part" in statistics and "centre share" in statistics) or (
        "Fallback" in statistics
    )
    assert "edge density" in statistics
    assert "norm_pix_loss" in note and "visible patches" in note  # the tiny config trains with norm_pix_loss
    # no photo: the page asks for one
    assert app.DemoServer("cpu").show(model_dir, None, *CONTROLS.values(), seed=0)[-1] == app.WELCOME


def test_the_panels_shown_are_the_models_own_panel_and_masks_for_the_seed(model_dir, photo_path):
    server = app.DemoServer("cpu")
    *shown, _, _, _ = server.show(model_dir, photo_path, *CONTROLS.values(), seed=7)
    demo = server.model(model_dir)
    model, config = demo.model, demo.model.config
    before = config.to_dict()
    assert (config.mask_ratio, config.hint_ratio, config.mask_feature_layer) == (0.75, 0.06, None)

    pixel_values = demo.processor(app.load_photo(photo_path), return_tensors="pt")["pixel_values"]
    settings = dict(CONTROLS, mask_feature_layer=CONTROLS["feature_layer"])
    del settings["feature_layer"]
    config.update(settings)
    try:
        mean, std = tuple(demo.processor.image_mean), tuple(demo.processor.image_std)
        expected = figure_panel(model, pixel_values, mean, std, seed=7, visible_statistics=True)
        patch_tokens, cls_token, _ = model.vit.embeddings(pixel_values)
        masking = model.informed_masking(patch_tokens, cls_token, torch.Generator().manual_seed(7))
    finally:
        config.update({name: before[name] for name in settings})

    assert list(expected.columns) == list(app.PANEL_TITLES)
    seen = {}
    for title, panel in zip(app.PANEL_TITLES, shown, strict=True):
        seen[title] = model_resolution(panel, config.image_height_width)
        np.testing.assert_array_equal(seen[title], (expected.columns[title][0] * 255).round().astype(np.uint8))
    # greyed, dimmed, tinted or predicted patches are the ones the model's own masking chose (hints are tinted green)
    patch, informed, mask = config.patch_size, masking.informed_mask[0].numpy(), masking.mask[0].numpy()
    outside = ~masking.object_part[0].numpy()  # dimmed around the outlined object part, which keeps its pixels
    assert outside.any() and patches_changed(seen["NCut bi-partition"], seen["input"], patch)[outside].all()
    assert np.array_equal(patches_changed(seen["informed mask"], seen["input"], patch), informed)
    assert np.array_equal(patches_changed(seen["informed + hints"], seen["input"], patch), mask | informed)
    assert np.array_equal(patches_changed(seen["reconstruction"], seen["input"], patch), mask)
    assert config.to_dict() == before  # the controls held for that call only


def test_one_photo_is_centred_on_the_example_photos_mean(tmp_path, photo_path):
    """A photo's own mean at each position is the photo itself: with `feature_centring` the demo removes the mean
    over the example photos instead, so its cut is not the uncentred one."""
    folder = str(tmp_path / "centring")
    config = tiny_config(feature_centring="position_mean", foreground_rule="inner")
    SGMAEForPreTraining(config).save_pretrained(folder)
    server = app.DemoServer("cpu")
    *shown, statistics, _, status = server.show(folder, photo_path, 0.75, 0.0, 2, "similarity", "inner", seed=3)
    demo = server.model(folder)
    model = demo.model
    examples = [app.read_photo(path) for path in app.example_photos()]
    references = demo.processor(examples, return_tensors="pt")["pixel_values"]
    pixel_values = demo.processor(app.load_photo(photo_path), return_tensors="pt")["pixel_values"]
    mean, std = tuple(demo.processor.image_mean), tuple(demo.processor.image_std)
    centred = figure_panel(model, pixel_values, mean, std, 3, True, masking_position_mean(model, [references]))
    uncentred = figure_panel(model, pixel_values, mean, std, 3, True)

    cut = model_resolution(shown[app.PANEL_TITLES.index("NCut bi-partition")], model.config.image_height_width)
    expected = (centred.columns["NCut bi-partition"][0] * 255).round().astype(np.uint8)
    np.testing.assert_array_equal(cut, expected)
    assert not np.array_equal(centred.columns["NCut bi-partition"], uncentred.columns["NCut bi-partition"])
    assert status == "" and f"centred on the {len(examples)} example photos" in statistics


def test_loading_another_checkpoint_sets_the_controls_to_its_config(model_dir, tmp_path, photo_path):
    other = str(tmp_path / "other")
    SGMAEForPreTraining(
        tiny_config(num_hidden_layers=3, mask_ratio=0.6, hint_ratio=0.1, graph_edges="knn", foreground_rule="inner")
    ).save_pretrained(other)
    server = app.DemoServer("cpu")
    name, description, *controls = server.switch(f" {other} ", model_dir, photo_path, 4)
    shown, status = controls[app.CONFIG_CONTROLS : -1], controls[-1]

    assert name == other and other in description and status == ""
    values = [update["value"] for update in controls[: app.CONFIG_CONTROLS]]
    assert values == [0.6, 0.1, 3, "knn", "inner"] and controls[2]["maximum"] == 3
    assert shown == list(server.show(other, photo_path, 0.6, 0.1, 3, "knn", "inner", 4)[:-1])

    # a checkpoint that cannot be shown: a message, and the session keeps its model, controls and panels
    name, *unchanged, status = server.switch(str(tmp_path / "missing"), model_dir, photo_path, 4)
    assert name == model_dir and status.startswith("⚠️") and "missing" in status
    assert unchanged == [{"__type__": "update"}] * (1 + app.CONFIG_CONTROLS + len(app.PANEL_TITLES) + 2)


def test_a_control_value_the_config_refuses_is_a_message_and_changes_nothing(model_dir, photo_path):
    server = app.DemoServer("cpu")
    config = server.model(model_dir).model.config
    before = config.to_dict()
    controls = dict(CONTROLS, mask_ratio=0.999)  # would mask all 64 patches
    *panels, _, _, status = server.show(model_dir, photo_path, *controls.values(), seed=0)

    assert panels == [None] * 6 and status.startswith("⚠️") and "mask" in status
    assert config.to_dict() == before
    assert server.show(model_dir, photo_path, *CONTROLS.values(), seed=0)[-1] == ""


def test_the_page_choices_are_the_configs():
    import dataclasses
    import typing

    types = {field.name: field.type for field in dataclasses.fields(SGMAEConfig)}
    assert typing.get_args(types["graph_edges"]) == app.GRAPH_EDGES  # every choice, so a checkpoint's own is one
    assert typing.get_args(types["foreground_rule"]) == app.FOREGROUND_RULES


# ----- photos -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is empty (0 bytes)"),
        (b"these are words, not pixels", "is not an image"),
        (png_declaring(20_000, 20_000), "is too large"),
        (png_declaring(11_000, 11_000), "is 11000 x 11000 pixels"),  # over the demo's limit, under Pillow's
        (png_declaring(64, 48), "could not be decoded"),
    ],
)
def test_a_file_that_is_not_a_usable_photo_gets_a_message_in_the_page(model_dir, tmp_path, content, message):
    path = tmp_path / "upload.png"
    path.write_bytes(content)
    *panels, statistics, _, status = app.DemoServer("cpu").show(model_dir, str(path), *CONTROLS.values(), seed=0)

    assert status.startswith("⚠️ upload.png") and message in status
    assert panels == [None] * 6 and statistics == ""


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "1"])
def test_photos_of_any_mode_become_rgb(tmp_path, mode):
    path = tmp_path / "photo.tiff"
    Image.new(mode, (30, 20)).save(path)
    photo = app.read_photo(path)
    assert photo.mode == "RGB" and photo.size == (30, 20)


def test_photos_are_turned_upright_decoded_small_and_once(tmp_path):
    upright = tmp_path / "rotated.jpg"
    image = Image.new("RGB", (60, 40))
    exif = image.getexif()
    exif[0x0112] = 6  # EXIF orientation: rotate 90 degrees to display
    image.save(upright, exif=exif)
    assert app.read_photo(upright).size == (40, 60)

    big = tmp_path / "big.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (1500, 3000, 3), dtype=np.uint8)).save(big)
    photo = app.load_photo(big)
    assert photo.size == (app.WORKING_SIDE, app.WORKING_SIDE // 2)
    assert app.load_photo(big) is photo  # a moved control does not decode it again


# ----- models -----------------------------------------------------------------------------------------------------


def test_a_vit_mae_checkpoint_is_shown_and_a_classification_checkpoint_is_flagged(tmp_path, photo_path):
    fields = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32)
    fields.update(patch_size=4, decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_num_attention_heads=2)
    ViTMAEForPreTraining(ViTMAEConfig(**fields, decoder_intermediate_size=32)).save_pretrained(tmp_path / "vit_mae")
    SGMAEForImageClassification(tiny_config(num_labels=3)).save_pretrained(tmp_path / "classifier")
    server = app.DemoServer("cpu")

    *panels, _, note, status = server.show(str(tmp_path / "vit_mae"), photo_path, *CONTROLS.values(), seed=0)
    assert status == "" and all(panel is not None for panel in panels)
    assert not server.model(str(tmp_path / "vit_mae")).untrained_decoder
    *_, note, status = server.show(str(tmp_path / "classifier"), photo_path, *CONTROLS.values(), seed=0)
    assert status == "" and note.startswith("This checkpoint has no decoder weights")
    assert "untrained, random decoder and means nothing" in server.model(str(tmp_path / "classifier")).describe()


def test_a_checkpoint_without_a_decoder_is_named_at_startup(tmp_path, monkeypatch, capsys):
    """Before the page opens, the command line says that the reconstruction column will be noise."""
    SGMAEForImageClassification(tiny_config(num_labels=3)).save_pretrained(tmp_path / "classifier")
    monkeypatch.setattr(app.DemoServer, "page", lambda *args, **kwargs: mock.Mock())  # no server
    app.main(["--model", str(tmp_path / "classifier")])
    error = capsys.readouterr().err
    assert f"warning: {tmp_path / 'classifier'}: This checkpoint has no decoder weights" in error
    assert "LOAD REPORT" not in error  # transformers' table of missing keys: the one line says what it means


def test_a_bad_model_at_startup_is_one_line_and_exit_code_2(tmp_path, monkeypatch, capsys):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(SystemExit) as exit_info:
        app.main(["--model", str(tmp_path / "bert")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "'bert' checkpoint" in error and "\n" not in error

    monkeypatch.chdir(tmp_path)  # no outputs/sgmae-demo here
    with pytest.raises(SystemExit) as exit_info:
        app.main([])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert app.MAKE_DEFAULT_MODEL in error and "\n" not in error


# ----- the page in a browser --------------------------------------------------------------------------------------

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-component-update",
    "--disable-background-networking", "--disable-sync", "--window-size=1400,1000",
)  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def app_url(model_dir, tmp_path):
    """app.py serving the tiny model on a free local port, as a user starts it; stopped after the test."""
    port = free_port()
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(REPO_ROOT)
    log = tmp_path / "app.log"
    with log.open("w") as output:
        process = subprocess.Popen(
            [sys.executable, str(REPO_ROOT / "app.py"), "--model", SCREENSHOT_MODEL or model_dir, "--port", str(port)],
            env=env, cwd=REPO_ROOT, stdout=output, stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, f"app.py exited:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"app.py did not answer:\n{log.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(url, timeout=5):
                    break
            except OSError:
                time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    with tempfile.TemporaryDirectory() as profile:
        options.add_argument(f"--user-data-dir={profile}")  # a fresh profile: no state from another run
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        try:
            yield driver
        finally:
            driver.quit()


@pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs Chromium and chromedriver on PATH (Debian: apt-get install chromium chromium-driver)",
)
def test_the_page_in_a_browser(app_url, browser, model_dir, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 60)
    photos = {}
    for name in ("astronaut", "coffee"):
        photos[name] = tmp_path / f"{name}.jpg"
        Image.fromarray(getattr(sample_photos, name)()).save(photos[name])
    (tmp_path / "notes.png").write_text("a text file with an image's name")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')

    def status() -> str:
        return browser.find_element(By.ID, "status").text

    def panel_sources() -> dict[str, str | None]:
        sources = {}
        for title in app.PANEL_TITLES:
            slug = title.replace(" + ", "-").replace(" ", "-").lower()
            images = browser.find_elements(By.CSS_SELECTOR, f"#panel-{slug} img")
            sources[title] = images[0].get_attribute("src") if images else None
        return sources

    def upload(path: Path) -> None:
        browser.find_element(By.CSS_SELECTOR, "#photo input[type=file]").send_keys(str(path))

    browser.get(app_url)  # the page opens with the first example shown
    wait.until(lambda _: all(panel_sources().values()) and status().startswith("An example photo"))
    opening = panel_sources()
    upload(photos["astronaut"])  # a JPEG of it: other pixels, other panels
    wait.until(lambda _: all(panel_sources().values()) and panel_sources()["input"] != opening["input"])
    first = panel_sources()
    assert "edge density" in browser.find_element(By.ID, "statistics").text

    # a click in the middle of the hint slider sets 0.25: only the hints and the reconstruction change
    browser.find_element(By.CSS_SELECTOR, "#hint-ratio input[type=range]").click()
    wait.until(lambda _: panel_sources()["informed + hints"] != first["informed + hints"])
    wait.until(lambda _: panel_sources()["reconstruction"] != first["reconstruction"])
    assert browser.find_element(By.CSS_SELECTOR, "#hint-ratio input[type=number]").get_attribute("value") == "0.25"
    moved = panel_sources()
    assert {title for title in app.PANEL_TITLES if moved[title] != first[title]} == {
        "informed + hints",
        "reconstruction",
    }

    # a file that is not an image: a message, no panels; the next upload works again
    upload(tmp_path / "notes.png")
    wait.until(lambda _: "notes.png is not an image" in status())
    assert not any(panel_sources().values())
    upload(photos["coffee"])
    wait.until(lambda _: all(panel_sources().values()) and status() == "")

    # a model that is not SG-MAE or ViTMAE: a message, the page keeps its model and panels
    shown = panel_sources()
    model_box = browser.find_element(By.CSS_SELECTOR, "#model input, #model textarea")
    model_box.clear()
    model_box.send_keys(str(tmp_path / "bert"))
    browser.find_element(By.ID, "load-model").click()
    wait.until(lambda _: "'bert' checkpoint" in status())
    assert (
        panel_sources() == shown and (SCREENSHOT_MODEL or model_dir) in browser.find_element(By.ID, "model-info").text
    )

    # another checkpoint: its own controls and its panels
    other = tmp_path / "other"
    SGMAEForPreTraining(tiny_config(mask_ratio=0.6, graph_edges="knn")).save_pretrained(other)
    model_box.clear()
    model_box.send_keys(str(other))
    browser.find_element(By.ID, "load-model").click()
    wait.until(lambda _: str(other) in browser.find_element(By.ID, "model-info").text and status() == "")
    wait.until(lambda _: all(panel_sources().values()) and panel_sources()["input"] == shown["input"])
    ratio = browser.find_element(By.CSS_SELECTOR, "#mask-ratio input[type=number]")
    wait.until(lambda _: ratio.get_attribute("value") == "0.6")
    assert browser.find_element(By.CSS_SELECTOR, "#graph input[value=knn]").is_selected()

    # the screenshot: the page as `python app.py` opens it (docs/demo.png: SGMAE_DEMO_SCREENSHOT=outputs/sgmae-demo)
    browser.get(app_url)
    wait.until(lambda _: all(panel_sources().values()) and status().startswith("An example photo"))
    browser.set_window_size(1400, 1650)  # the whole page, controls included
    screenshot = REPO_ROOT / "docs" / "demo.png" if SCREENSHOT_MODEL else tmp_path / "demo.png"
    assert browser.save_screenshot(str(screenshot))
    Image.open(screenshot).convert("RGB").quantize(256).save(screenshot, optimize=True)  # a small file to commit
    assert Image.open(screenshot).size[0] >= 1000 and screenshot.stat().st_size <= 300_000


def test_the_page_has_one_api_endpoint_that_masks_a_photo(app_url, tmp_path, photo_path):
    """The page's "Use via API": /mask takes a photo and the controls and returns the named panels and lines; a file
    that is not a photo gets a one-line status and the next call works; the page opens with an example shown."""
    import json

    from gradio_client import Client, handle_file

    client = Client(app_url, verbose=False)
    endpoints = client.view_api(print_info=False, return_format="dict")
    assert list(endpoints["named_endpoints"]) == ["/mask"] and not endpoints["unnamed_endpoints"]
    described = endpoints["named_endpoints"]["/mask"]
    assert [item["parameter_name"] for item in described["parameters"]] == [
        "photo", "mask_ratio", "hint_ratio", "mask_feature_layer", "graph_edges", "foreground_rule", "seed",
    ]  # fmt: skip
    assert [item["label"] for item in described["returns"]] == [*app.PANEL_TITLES, *OUTPUT_LINES]

    controls = (0.6, 0.2, 1, "binary_mean", "smaller", 3)
    *panels, statistics, note, status = client.predict(handle_file(photo_path), *controls, api_name="/mask")
    assert all(Path(panel).is_file() for panel in panels) and status == ""
    assert Image.open(panels[0]).size == app.display_size(PHOTO_SIZE)
    assert "edge density" in statistics and note.startswith("Masked patches")

    (tmp_path / "notes.png").write_text("a text file with an image's name")
    *panels, _, _, status = client.predict(handle_file(str(tmp_path / "notes.png")), *controls, api_name="/mask")
    assert panels == [None] * 6 and status.startswith("⚠️ notes.png is not an image") and "\n" not in status
    *panels, _, _, status = client.predict(handle_file(photo_path), *controls, api_name="/mask")
    assert all(panels) and status == ""

    with urllib.request.urlopen(app_url + "config", timeout=30) as response:  # what the page opens with
        props = {item["props"].get("elem_id"): item["props"] for item in json.load(response)["components"]}
    assert Path(props["photo"]["value"]["path"]).name == f"{app.DEMO_PHOTOS[0]}.png"
    assert all(props[f"panel-{slug}"]["value"] for slug in ("input", "ncut-bi-partition", "reconstruction"))
    assert props["status"]["value"] == app.OPENING and "edge density" in props["statistics"]["value"]

    # the command line's start-up lines are the app's: its --share, not Gradio's `share=True` in `launch()`
    log = tmp_path / "app.log"
    deadline = time.monotonic() + 30
    while "--share" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert f"Running on local URL:  {app_url}" in log.read_text()
    assert "start it with --share" in log.read_text() and "share=True" not in log.read_text()
