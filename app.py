#!/usr/bin/env python
"""What self-guided masking does to a photo: an interactive SG-MAE demo in the browser (Gradio).

    python app.py --model outputs/sgmae-demo [--port 7860] [--share]

A photo (uploaded, or one of scikit-image's) goes through the model's own masking: the six panels are those of
`modeling_sgmae.analysis.figure_panel` (masks from `SGMAEForPreTraining.informed_masking`), stretched back to the
photo's aspect, with a line on what the masking saw. The controls set masking fields of the model's config for one
call. The page opens with an example photo shown; its one API endpoint, `/mask`, takes a photo and the controls and
returns the panels and lines (docs/demo.md shows a `gradio_client` call). Needs `pip install .[demo]`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import astuple, dataclass, field, fields
from functools import cached_property, lru_cache
from pathlib import Path

import gradio as gr
import numpy as np
import torch
import transformers
from huggingface_hub.errors import StrictDataclassError
from PIL import Image, ImageOps, UnidentifiedImageError
from skimage import data as sample_photos
from transformers import ViTImageProcessor

from modeling_sgmae import MaskType, SGMAEConfig, SGMAEForPreTraining
from modeling_sgmae.analysis import FigurePanel, figure_panel, masking_position_mean
from sgmae_training.analyze import load_image_processor
from sgmae_training.data.loading import DEMO_PHOTOS
from sgmae_training.hub import check_checkpoint_kind

DEFAULT_MODEL = "outputs/sgmae-demo"  # the folder the README's first command leaves
MAKE_DEFAULT_MODEL = (  # the README's first command
    "accelerate launch -q --config_file configuration/accelerate/default.yaml run_pretraining.py "
    f"--output_dir {DEFAULT_MODEL}"
)
# SGMAEConfig's choices, all of them (tests/test_app.py checks): a checkpoint's own setting is always one of them
GRAPH_EDGES = ("similarity", "binary_fixed", "binary_mean", "binary_quantile", "knn")
FOREGROUND_RULES = ("max_abs", "smaller", "inner")
PANEL_TITLES = ("input", "random mask", "NCut bi-partition", "informed mask", "informed + hints", "reconstruction")
MAX_PHOTO_PIXELS = 100_000_000  # refused before decoding: a bigger upload would take seconds and gigabytes
WORKING_SIDE = 1024  # photos are decoded (and cached) at most this long: the model sees far fewer pixels
DISPLAY_SIDE = 480  # long side of a panel in pixels: an 8 x 8 grid shows 60-pixel patches
UNTRAINED_DECODER = (
    "This checkpoint has no decoder weights (a classifier?): the reconstruction comes from an untrained, random "
    "decoder and means nothing; the masks are the encoder's own"
)
MODELS_KEPT = 2  # checkpoints kept loaded for the sessions that show them
WELCOME = "Drop a photo in *Your photo*, or pick one of the examples under the panels."
OPENING = "An example photo. Drop your own in *Your photo*, or pick another example under the panels."
API_NAME = "mask"  # the page's one API endpoint: a photo and the masking controls in, the panels and statistics out
API_DESCRIPTION = (
    "The model's Figure-1 panels of a photo under the masking controls: six images, the statistics line, the note on "
    "the reconstruction and a status line (empty, or a one-line message for a file that is not a usable photo)."
)
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


class PhotoError(Exception):
    """A file the demo cannot use as a photo; the message is for the page."""


class ModelError(Exception):
    """A checkpoint the demo cannot show; the message (one line) is for the page or the command line."""


# ----- photos -----------------------------------------------------------------------------------------------------


def read_photo(path: str | Path) -> Image.Image:
    """The photo at `path` as an upright RGB image (EXIF orientation applied), at most WORKING_SIDE pixels long.

    Greyscale, palette, RGBA (alpha dropped, as in training) and CMYK images are converted. An empty file, a file
    that is not an image, or one over MAX_PHOTO_PIXELS raises PhotoError, a big one before it is decoded.
    """
    name = Path(path).name
    if os.path.getsize(path) == 0:
        raise PhotoError(f"{name} is empty (0 bytes)")
    too_large = f"this demo takes photos of up to {MAX_PHOTO_PIXELS // 10**6} megapixels"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size is checked just below
            image = Image.open(path)
        with image:
            if image.width * image.height > MAX_PHOTO_PIXELS:
                raise PhotoError(f"{name} is {image.width} x {image.height} pixels; {too_large}")
            image.draft("RGB", (WORKING_SIDE, WORKING_SIDE))  # a JPEG decodes at a reduced scale: far faster
            photo = ImageOps.exif_transpose(image).convert("RGB")
    except Image.DecompressionBombError as error:  # Pillow refuses to open the largest ones itself
        raise PhotoError(f"{name} is too large; {too_large}") from error
    except UnidentifiedImageError as error:
        raise PhotoError(f"{name} is not an image (or not in a format Pillow reads)") from error
    except (OSError, ValueError, SyntaxError) as error:  # truncated or corrupt data
        raise PhotoError(f"{name} could not be decoded: {error}") from error
    photo.thumbnail((WORKING_SIDE, WORKING_SIDE))
    return photo


@lru_cache(maxsize=16)
def _cached_photo(path: str, modified_ns: int, size: int) -> Image.Image:
    return read_photo(path)


def load_photo(path: str | Path) -> Image.Image:
    """`read_photo`, decoded once per file version: moving a control does not decode the photo again."""
    try:
        status = os.stat(path)
    except OSError as error:  # e.g. an upload that Gradio's cache no longer holds
        raise PhotoError(f"{Path(path).name} is no longer on the server; upload it again") from error
    return _cached_photo(str(path), status.st_mtime_ns, status.st_size)


def example_photos() -> list[str]:
    """scikit-image's sample photographs (those of the pre-training demo) as PNG files, written once per machine."""
    folder = Path(tempfile.gettempdir()) / "sgmae-demo-examples"  # Gradio serves examples from the temp dir
    folder.mkdir(exist_ok=True)
    paths = []
    for name in DEMO_PHOTOS:
        path = folder / f"{name}.png"
        if not path.exists():
            partial = path.with_suffix(f".{os.getpid()}.png")  # two apps starting at once never see half a file
            Image.fromarray(getattr(sample_photos, name)()).save(partial)
            os.replace(partial, path)
        paths.append(str(path))
    return paths


def display_size(photo_size: tuple[int, int]) -> tuple[int, int]:
    """(width, height) of a panel: the photo's aspect, DISPLAY_SIDE pixels on the long side."""
    width, height = photo_size
    scale = DISPLAY_SIDE / max(width, height)
    return max(round(width * scale), 1), max(round(height * scale), 1)


# ----- model ------------------------------------------------------------------------------------------------------


@dataclass
class DemoModel:
    """A pre-training checkpoint loaded for the demo, with the image processor that prepares its input."""

    name: str
    model: SGMAEForPreTraining
    processor: ViTImageProcessor
    untrained_decoder: bool  # the checkpoint had no decoder weights (e.g. a classification checkpoint)
    lock: threading.Lock = field(default_factory=threading.Lock)  # the controls change the config: one call at once
    _position_means: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)

    def position_mean(self) -> torch.Tensor | None:
        """[N, D] each grid position's mean masking feature over the example photos under the config's current
        feature layer, computed once per layer; None when the config does not centre."""
        config = self.model.config
        if config.feature_centring != "position_mean":
            return None
        key = (config.feature_layer, config.mask_feature_source)
        if key not in self._position_means:
            self._position_means[key] = masking_position_mean(self.model, [self.reference_pixels])
        return self._position_means[key]

    @cached_property
    def reference_pixels(self) -> torch.Tensor:
        """The example photos as the model sees them [B, C, H, W]: with `feature_centring`, each grid position's
        mean feature over them is what is removed (one photo's own mean is the photo itself, so it cannot centre
        itself). Prepared on first use, from the decoded photos `load_photo` keeps."""
        photos = [load_photo(path) for path in example_photos()]
        return self.processor(photos, return_tensors="pt")["pixel_values"].to(self.model.device)

    def describe(self) -> str:
        """One line of Markdown: the checkpoint and its geometry."""
        config = self.model.config
        (height, width), (rows, columns) = config.image_height_width, config.grid_size
        description = (
            f"`{self.name}`: {height}x{width} px input, {config.patch_size} px patches ({rows}x{columns}), "
            f"{config.num_hidden_layers} blocks, on {self.model.device.type}"
        )
        if self.untrained_decoder:
            description += f" · **{UNTRAINED_DECODER}**"
        return description

    def reconstruction_note(self) -> str:
        """How the reconstruction panel is made, for the line under it."""
        note = "Masked patches: the decoder's prediction; visible patches: the input."
        if self.model.config.norm_pix_loss:  # the prediction is a normalised patch: its mean and std are not in it
            note = (
                "Masked patches: the decoder's prediction, with brightness and contrast taken from the nearest "
                "visible patches (`norm_pix_loss`), not from the hidden ones; visible patches: the input."
            )
        if self.untrained_decoder:
            note = f"{UNTRAINED_DECODER}. " + note
        return note


def load_model(name: str, device: str) -> DemoModel:
    """An SG-MAE or transformers ViTMAE pre-training checkpoint (folder or Hub id) on `device`, in eval mode."""
    try:
        check_checkpoint_kind(name, argument="--model")
    except SystemExit as error:  # the scripts' check ends a script with its one-line reason
        raise ModelError(str(error).removeprefix("error: ")) from None
    try:
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()  # its table of missing keys: the demo says what they mean
        try:
            model, info = SGMAEForPreTraining.from_pretrained(name, output_loading_info=True)
        finally:
            transformers.logging.set_verbosity(verbosity)
    except Exception as error:  # whatever the checkpoint gets wrong (files, weights, config values): one line
        raise ModelError(f"cannot load {name!r}: {' '.join(str(error).split())}") from error
    if model.config.num_channels != 3:
        raise ModelError(f"{name!r} takes {model.config.num_channels}-channel images; this demo shows RGB photos")
    untrained_decoder = any(key.startswith("decoder.") for key in info["missing_keys"])
    processor = load_image_processor(name, model.config)
    return DemoModel(name, model.to(device).eval(), processor, untrained_decoder)


# ----- one view ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MaskingControls:
    """The page's controls: masking fields of SGMAEConfig (same names), and the seed of random masks and hints."""

    mask_ratio: float
    hint_ratio: float
    mask_feature_layer: int
    graph_edges: str
    foreground_rule: str
    seed: int = 0

    @classmethod
    def of(cls, config: SGMAEConfig) -> MaskingControls:
        """The controls as the checkpoint's config sets them."""
        return cls(
            config.mask_ratio, config.hint_ratio, config.feature_layer, config.graph_edges, config.foreground_rule
        )


CONFIG_CONTROLS = len(fields(MaskingControls)) - 1  # the controls that are config fields: all but the seed, the last


@contextmanager
def masking_settings(config: SGMAEConfig, controls: MaskingControls) -> Iterator[None]:
    """Set the controls' fields on `config` for the duration, then put the previous values back (also when the
    config refuses a value, with a ValueError)."""
    settings = {item.name: getattr(controls, item.name) for item in fields(controls) if item.name != "seed"}
    previous = {name: getattr(config, name) for name in settings}
    try:
        config.update(settings)
        yield
    finally:
        config.update(previous)


@dataclass
class MaskingView:
    """What the page shows for one photo under one setting of the controls."""

    panels: dict[str, Image.Image]  # figure_panel's column title -> that column at the photo's aspect
    statistics: str  # one line of Markdown: the mask type and what the masking saw
    reconstruction_note: str  # how the reconstruction panel is made


def statistics_line(panel: FigurePanel, config: SGMAEConfig) -> str:
    """Mask type, object-part size, edge density and centre share of the panel's (single) image, as Markdown."""
    density = f"edge density {panel.edge_density[0]:.2f}"
    if panel.mask_type[0] != MaskType.INFORMED:
        return f"**Fallback: a random mask**, as in training (these features have no usable cut) · {density}"
    num_patches = config.grid_size[0] * config.grid_size[1]
    part = int(panel.object_part_size[0])
    return (
        f"**Informed mask** · object part {part} of {num_patches} patches ({part / num_patches:.0%}) · {density} · "
        f"centre share {panel.centre_masked_share[0]:.0%} of the middle patches hidden before hints "
        f"(a random mask: {config.mask_ratio:.0%})"
    )


def masking_view(demo: DemoModel, photo: Image.Image, controls: MaskingControls) -> MaskingView:
    """The model's Figure-1 panel of `photo` under `controls` (ValueError for a setting the config refuses)."""
    processor = demo.processor
    pixel_values = processor(photo, return_tensors="pt")["pixel_values"]
    with demo.lock, masking_settings(demo.model.config, controls):
        position_mean = demo.position_mean()
        panel = figure_panel(
            demo.model,
            pixel_values,
            tuple(processor.image_mean),
            tuple(processor.image_std),
            controls.seed,
            visible_statistics=True,  # the reconstruction does not peek at the hidden patches
            position_mean=position_mean,
        )
        statistics = statistics_line(panel, demo.model.config)
    if position_mean is not None:
        statistics += f" · features centred on the {len(demo.reference_pixels)} example photos' mean at each position"
    # The model saw a resized square: each column is stretched back to the photo's aspect, patches kept sharp.
    size = display_size(photo.size)
    columns = np.split(panel.grid(), len(panel.columns), axis=1)
    panels = {
        title: Image.fromarray(column).resize(size, Image.Resampling.NEAREST)
        for title, column in zip(panel.columns, columns, strict=True)
    }
    return MaskingView(panels, statistics, demo.reconstruction_note())


# ----- the page ---------------------------------------------------------------------------------------------------


def uploaded_path(payload: dict | str | None) -> str | None:
    """The path of the file in gr.Image's raw (unprocessed) value: Gradio does not decode it, so a file that is not a
    usable photo reaches `read_photo` and gets the page's message (gr.Image's own decoding fails silently there)."""
    return payload.get("path") if isinstance(payload, dict) else payload


def masking_controls(start: MaskingControls, num_layers: int) -> list[gr.components.Component]:
    """The controls, in MaskingControls' order, set as `start` says (inside the page's Blocks)."""
    return [
        gr.Slider(0.05, 0.95, start.mask_ratio, step=0.01, label="Mask ratio", elem_id="mask-ratio"),
        gr.Slider(
            0.0, 0.5, start.hint_ratio, step=0.01, label="Hint ratio", elem_id="hint-ratio",
            info="share of the masked patches shown again as hints",
        ),
        gr.Slider(
            1, num_layers, start.mask_feature_layer, step=1, precision=0, label="Mask feature layer",
            elem_id="feature-layer", info="encoder blocks run on the full image before its patches are cut",
        ),
        gr.Radio(list(GRAPH_EDGES), value=start.graph_edges, label="Graph", elem_id="graph"),
        gr.Radio(
            list(FOREGROUND_RULES), value=start.foreground_rule, label="Object part", elem_id="foreground-rule",
            info="max_abs: the part holding the Fiedler vector's extreme; inner: the part with fewer border patches",
        ),
        gr.Number(start.seed, precision=0, minimum=0, label="Seed (random mask, hints)", elem_id="seed"),
    ]  # fmt: skip


def panel_grid(opening: tuple) -> tuple[list[gr.Image], gr.Markdown]:
    """The six panels in two rows of three (PANEL_TITLES' order), and the note under the reconstruction, showing
    `opening` (what `DemoServer.show` returns for the example photo the page opens with)."""
    panels = []
    for row in (PANEL_TITLES[:3], PANEL_TITLES[3:]):
        with gr.Row():
            for title in row:
                with gr.Column(min_width=200):
                    slug = title.replace(" + ", "-").replace(" ", "-").lower()
                    panels.append(
                        gr.Image(
                            opening[len(panels)], label=title, format="png", interactive=False,
                            elem_id=f"panel-{slug}", buttons=["download", "fullscreen"],
                        )
                    )  # fmt: skip
                    if title == "reconstruction":
                        note = gr.Markdown(opening[-2], label="reconstruction note", elem_id="reconstruction-note")
    return panels, note


class DemoServer:
    """The page's handlers over the checkpoints loaded on one device (the MODELS_KEPT last used stay loaded)."""

    def __init__(self, device: str):
        self.device = device
        self._models: OrderedDict[str, DemoModel] = OrderedDict()
        self._loading = threading.Lock()

    def model(self, name: str) -> DemoModel:
        """The loaded checkpoint `name`, loading it if needed (ModelError if it cannot be shown)."""
        with self._loading:
            if name not in self._models:
                self._models[name] = load_model(name, self.device)
                while len(self._models) > MODELS_KEPT:
                    self._models.popitem(last=False)
            self._models.move_to_end(name)
            return self._models[name]

    def show(
        self,
        model_name: str,
        photo_path: str | None,
        mask_ratio: float,
        hint_ratio: float,
        feature_layer: float,
        graph_edges: str,
        foreground_rule: str,
        seed: float | None,
    ) -> tuple:
        """The page's outputs for a photo and the controls: six panels, statistics, reconstruction note, status."""
        nothing = (None,) * len(PANEL_TITLES) + ("", "")
        if photo_path is None:
            return (*nothing, WELCOME)
        try:
            controls = MaskingControls(
                mask_ratio, hint_ratio, int(feature_layer), graph_edges, foreground_rule, int(seed or 0)
            )
            view = masking_view(self.model(model_name), load_photo(photo_path), controls)
        except (PhotoError, ModelError, ValueError, TypeError, StrictDataclassError) as error:
            return (*nothing, f"⚠️ {' '.join(str(error).split())}")  # controls the config or masking refuse, too
        return (*(view.panels[title] for title in PANEL_TITLES), view.statistics, view.reconstruction_note, "")

    def mask(
        self,
        model_name: str,
        photo: dict | str | None,
        mask_ratio: float,
        hint_ratio: float,
        mask_feature_layer: float,
        graph_edges: str,
        foreground_rule: str,
        seed: float | None,
    ) -> tuple:
        """The page's one event and API endpoint (`/mask`): `show` for a photo as Gradio passes it unprocessed (a file
        payload, so that a file that is not a photo gets the page's message rather than Gradio's decoding error)."""
        controls = (mask_ratio, hint_ratio, mask_feature_layer, graph_edges, foreground_rule, seed)
        return self.show(model_name, uploaded_path(photo), *controls)

    def switch(self, requested: str, current: str, photo: dict | str | None, seed: float | None) -> tuple:
        """Load another checkpoint for this session: its name, description and controls as its config sets them
        (the feature layer's range too; the seed stays), then `show` (the photo unprocessed, as `mask` takes it)."""
        name = requested.strip()
        try:
            demo = self.model(name)
        except ModelError as error:  # the session keeps its model, controls and what it shows
            unchanged = (gr.update(),) * (1 + CONFIG_CONTROLS + len(PANEL_TITLES) + 2)  # description ... two lines
            return (current, *unchanged, f"⚠️ {error}")
        start = MaskingControls.of(demo.model.config)
        controls = [gr.update(value=value) for value in astuple(start)[:CONFIG_CONTROLS]]
        controls[2] = gr.update(maximum=demo.model.config.num_hidden_layers, value=start.mask_feature_layer)
        shown = self.show(name, uploaded_path(photo), *astuple(start)[:CONFIG_CONTROLS], seed)
        return (name, demo.describe(), *controls, *shown)

    def page(self, model_name: str, choose_model: bool = True) -> gr.Blocks:
        """The Gradio page, starting with checkpoint `model_name` and the first example photo shown; `choose_model`
        adds a box to load another."""
        demo = self.model(model_name)
        start = MaskingControls.of(demo.model.config)
        examples = example_photos()
        opening = self.show(model_name, examples[0], *astuple(start))
        with gr.Blocks(title="SG-MAE: self-guided masking on your photo", analytics_enabled=False) as page:
            gr.Markdown(
                "# What self-guided masking does to your photo\n"
                "SG-MAE cuts the patches of an image in two with a Normalized Cut of its own features, masks the "
                "object part and the patches most like it, and reveals a few hints. These are the model's own "
                "masks, as training builds them."
            )
            session_model = gr.State(model_name)
            with gr.Row():
                with gr.Column(scale=1, min_width=300):
                    model_box, load_button = model_chooser(model_name) if choose_model else (None, None)
                    model_info = gr.Markdown(demo.describe(), elem_id="model-info")
                    photo = gr.Image(examples[0], label="Your photo", type="filepath", height=240, elem_id="photo")
                    controls = masking_controls(start, demo.model.config.num_hidden_layers)
                with gr.Column(scale=3):
                    status = gr.Markdown(opening[-1] or OPENING, label="status", elem_id="status")
                    panels, note = panel_grid(opening)
                    statistics = gr.Markdown(opening[-3], label="statistics", elem_id="statistics")
                    gr.Examples(
                        [[path] for path in examples], inputs=photo, label="Examples: scikit-image photographs",
                        api_visibility="private",
                    )  # fmt: skip
            outputs = [*panels, statistics, note, status]
            self.connect(session_model, photo, controls, outputs)
            if choose_model:
                gr.on(
                    [load_button.click, model_box.submit],
                    self.switch,
                    inputs=[model_box, session_model, photo, controls[-1]],
                    outputs=[session_model, model_info, *controls[:CONFIG_CONTROLS], *outputs],
                    preprocess=False,
                    api_visibility="private",
                )
        return page

    def connect(self, session_model: gr.State, photo: gr.Image, controls: list, outputs: list) -> None:
        """One function for the photo and every control (inside the page's Blocks): the photo's change is the API
        endpoint; preprocess=False passes the photo's file unprocessed."""
        shown = dict(fn=self.mask, inputs=[session_model, photo, *controls], outputs=outputs, preprocess=False)
        photo.change(**shown, api_name=API_NAME, api_description=API_DESCRIPTION)
        # always_last: a dragged slider ends on its last value
        gr.on([control.change for control in controls], **shown, trigger_mode="always_last", api_visibility="private")


def model_chooser(model_name: str) -> tuple[gr.Textbox, gr.Button]:
    """The box and button that load another checkpoint for the session (inside the page's Blocks)."""
    with gr.Row(equal_height=True):
        model_box = gr.Textbox(model_name, label="Model (folder or Hub id)", scale=4, elem_id="model")
        load_button = gr.Button("Load", scale=1, elem_id="load-model")
    return model_box, load_button


def serve(page: gr.Blocks, port: int | None, share: bool) -> None:
    """Serve the page until interrupted. Gradio's own start-up lines are replaced by ours: its hint names its Python
    argument (`share=True` in `launch()`), where this command takes --share."""
    page.launch(
        server_port=port, share=share, theme=THEME, footer_links=["gradio"], quiet=True, prevent_thread_lock=True
    )
    print(f"* Running on local URL:  {page.local_url}", flush=True)
    if not share:  # with it, Gradio prints the public link (or why it could not make one) itself
        print("* For a public link as well, start it with --share", flush=True)
    page.block_thread()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"SG-MAE or ViTMAE pre-training checkpoint (default: {DEFAULT_MODEL})"
    )
    parser.add_argument("--port", type=int, default=None, help="local port (default: 7860 or $GRADIO_SERVER_PORT)")
    parser.add_argument(
        "--share", action="store_true", help="also serve a public gradio.live link (its page cannot load other models)"
    )
    args = parser.parse_args(argv)
    server = DemoServer("cuda" if torch.cuda.is_available() else "cpu")
    try:
        if args.model == DEFAULT_MODEL and not Path(DEFAULT_MODEL).is_dir():
            raise ModelError(f"no model at {DEFAULT_MODEL}; make one with `{MAKE_DEFAULT_MODEL}`, or pass --model")
        if server.model(args.model).untrained_decoder:
            print(f"warning: {args.model}: {UNTRAINED_DECODER}", file=sys.stderr)
    except ModelError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    # A public link is anyone's page: there, the model stays the one chosen here.
    serve(server.page(args.model, choose_model=not args.share), args.port, args.share)


if __name__ == "__main__":
    main()
