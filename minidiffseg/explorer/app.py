"""The explorer's web page (Gradio, the optional `explore` extra; docs/explore.md): its layout, and which
function of views.py each control calls with which inputs. What the page shows is computed by views.py
from the session's `Exploration` (state.py); this module only converts it for Gradio (a dropdown's
`Choices` to `gr.update`, a `UserError` to a message in the page).

Each browser session keeps its own last run (a `gr.State`); runs are queued on the one model (one at a
time, the others see their place in the queue); changing only a view reads the stored run.
"""

# no `from __future__ import annotations`: Gradio reads the gr.Request / gr.SelectData annotations of the
# handlers at run time, and `gr` is only bound inside build_app (gradio is an optional extra)
import functools
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import UserError
from ..image import SAMPLE_PHOTO  # the sample: a CC0 cat photo (minidiffseg/data/README.md)
from ..method.segmenter import Segmenter
from . import views
from .state import MAX_CLASSES

INSTALL = 'pip install "minidiffseg[explore]"'
MAX_UPLOAD = "50mb"  # a photo is a few MB; the model reads 512×512 anyway


def gradio():
    """The gradio module, or a UserError that says how to install the extra."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no usage pings from a local tool
    try:
        import gradio as gr
    except ImportError:
        raise UserError(f"explore needs the optional web-page extra, which is not installed: {INSTALL}") from None
    return gr


def launch(app, host: str = "127.0.0.1", port: int | None = None) -> str:
    """Start serving `app` in the background; returns its URL."""
    app.queue(default_concurrency_limit=1)
    allowed = [str(SAMPLE_PHOTO.parent)] if SAMPLE_PHOTO.is_file() else []
    _, url, _ = app.launch(server_name=host, server_port=port, prevent_thread_lock=True, quiet=True,
                           max_file_size=MAX_UPLOAD, allowed_paths=allowed)
    return url or f"http://{host}:{app.server_port}/"


def build_app(seg: Segmenter, title: str = ""):
    """The Gradio Blocks of the explorer over a loaded segmenter (not yet launched)."""
    gradio()  # a UserError naming the extra when it is not installed
    import gradio as gr  # the module gradio() imported, bound by an import so that gr.Request is a type to mypy
    files = tempfile.TemporaryDirectory(prefix="minidiffseg-explore-")  # per-session download folders

    def page_errors(fn):
        """A UserError becomes a message in the page (the server keeps serving); an uploaded file is named
        by its own name, not by the server's copy."""
        @functools.wraps(fn)  # Gradio reads the signature: gr.Request, gr.Progress, gr.SelectData
        def wrapped(*a, **kw):
            try:
                return fn(*a, **kw)
            except UserError as e:
                message = str(e)
                for path in (v for v in a if isinstance(v, str) and os.sep in v and os.path.isfile(v)):
                    message = message.replace(path, Path(path).name)
                raise gr.Error(message, print_exception=False) from None
        return wrapped

    def folder(request) -> Path:  # the session's download folder
        return Path(files.name) / (request.session_hash or "session")

    def update(c: views.Choices):
        return gr.update(choices=c.choices, value=c.value)

    def shown_row(v: views.RowView):
        return update(v.rows), update(v.columns), update(v.views)

    # the page's handlers: each calls its views.on_* function and passes on what it returns

    @page_errors
    def preview(path):
        return views.preview(path)

    @page_errors
    def run(path, classes, prompts, timesteps, seed, tau, mode, request: gr.Request, progress=gr.Progress()):
        ex, v = views.on_run(seg, path, classes, prompts, timesteps, seed, tau, mode, folder(request),
                             progress=lambda f, what: progress(f, desc=what))
        return (ex, *v.result, *shown_row(v.row), *v.cross, update(v.layers), update(v.heads), *v.pixel, v.x, v.y)

    @page_errors
    def retau(ex, tau, path, request: gr.Request):
        v = views.on_tau(ex, tau, folder(request), path)
        return (gr.update(),) * 5 if v is None else tuple(v)  # τ moved before any run: nothing to redo

    @page_errors
    def choose_row(ex, row, view, blend, layer, head, x, y):
        columns, cross, pixel = views.on_row(ex, row, view, blend, layer, head, x, y, seg.level_weights)
        return (update(columns), *cross, *pixel)

    @page_errors
    def cross_view(ex, row, column, view, blend, layer, head, x, y):
        cross, pixel = views.on_cross(ex, row, column, view, blend, layer, head, x, y, seg.level_weights)
        return (*cross, *pixel)

    @page_errors
    def self_view(ex, row, column, layer, head, x, y):
        return tuple(views.on_self(ex, row, column, layer, head, x, y))

    @page_errors
    def click(ex, row, column, layer, head, evt: gr.SelectData):
        pixel, x, y = views.on_click(ex, row, column, layer, head, evt.index)  # evt.index: in the shown picture
        return (*pixel, x, y)

    def fill_prompts(classes, mode):
        return views.fill_prompts(seg.template, classes, mode)

    def picture_box(caption: str, elem_id: str, **kw):
        """An output picture under a caption (Gradio's own label would sit over the picture's corner)."""
        with gr.Column(min_width=200):
            gr.Markdown(caption)
            return gr.Image(show_label=False, interactive=False, format="png", elem_id=elem_id, **kw)

    with gr.Blocks(title="minidiffseg explore", delete_cache=(600, 3600)) as app:
        state = gr.State(None)
        gr.Markdown(f"## minidiffseg explore\n{title}  \nDiffSegmenter's attention, one run at a time: the U-Net "
                    "runs on **Run**; every other control only changes the view of the stored run.")
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                file = gr.File(label="Image", file_types=["image"], type="filepath", elem_id="image-file")
                if SAMPLE_PHOTO.is_file():
                    sample = gr.Button("Use the sample photo (a cat; CC0)", size="sm")
                shown = gr.Image(label="Preview", interactive=False, height=180, format="png")
                classes = gr.Textbox(label=f"Classes, comma-separated (at most {MAX_CLASSES})", value="cat, sofa",
                                     elem_id="classes")
                prompts = gr.Textbox(label="Prompts, one line per class (empty: the template). Marks: word++ "
                                     "(×1.21), word+, word-, word--", lines=3, elem_id="prompts")
                fill = gr.Button("Fill the prompts from the template", size="sm")
                with gr.Row():
                    timesteps = gr.Textbox(label="Timestep(s)", value=",".join(map(str, seg.timesteps)), min_width=80)
                    seed = gr.Number(label="Seed", value=0, precision=0, min_width=80)
                    mode = gr.Radio(["batched", "joint"], value="joint" if seg.joint else "batched", label="Mode",
                                    min_width=140)
                tau = gr.Slider(0, 1, value=seg.default_tau, step=0.01, label="Background τ (view only)", elem_id="tau")
                go = gr.Button("Run", variant="primary", elem_id="run")
            with gr.Column(scale=2):
                summary = gr.Markdown()
                with gr.Row():
                    overlay = picture_box("**Mask overlay** (legend: class, area)", "overlay")
                    with gr.Column():
                        area = gr.Dataframe(headers=["class", "area %"], label="Area per class", interactive=False)
                        downloads = gr.File(label="Downloads (as `segment` writes them)", file_count="multiple",
                                            interactive=False)
                gallery = gr.Gallery(label="Score maps per class (M upsampled, min-max)", columns=4, height=240,
                                     object_fit="contain", format="png")
        gr.Markdown("### Cross-attention: any token of any prompt")
        with gr.Row():
            row = gr.Dropdown(label="Prompt row", choices=[], elem_id="row")
            column = gr.Dropdown(label="Token (or the class map)", choices=[], elem_id="token")
            view = gr.Dropdown(label="Layer / level / fused", choices=[], elem_id="view")
            blend = gr.Checkbox(label="over the image", value=True)
        with gr.Row():
            cross = picture_box("**Cross-attention map** (dark → bright: this map's min → max)", "cross")
            cross_info = gr.Markdown()
        gr.Markdown("### Self-attention at a pixel (click the image) and M = S·A")
        with gr.Row():
            layer = gr.Dropdown(label="Self-attention layer", choices=[], elem_id="layer")
            head = gr.Dropdown(label="Head", choices=[], elem_id="head")
            x = gr.Number(label="x (image pixels)", precision=0)
            y = gr.Number(label="y (image pixels)", precision=0)
        with gr.Row():
            clicked = picture_box("**Click a pixel** (its latent cell outlined)", "click")
            s_map = picture_box("**S row**: where that pixel attends", "s-row")
            a_map = picture_box("**A**: the token's fused cross-attention", "a-map")
            m_map = picture_box("**M = S·A**: the refined map", "m-map")
        self_info = gr.Markdown()

        self_out = [clicked, s_map, a_map, m_map, self_info]
        file.upload(preview, file, shown, api_name="preview")
        if SAMPLE_PHOTO.is_file():
            sample.click(lambda: (str(SAMPLE_PHOTO), preview(str(SAMPLE_PHOTO))), None, [file, shown],
                         api_name="sample")
        # api_name=False: no API endpoint. Gradio 6 still takes it (Blocks.set_event_trigger makes the endpoint
        # private) but annotates api_name as str | None: hence the `type: ignore[arg-type]`s below
        fill.click(fill_prompts, [classes, mode], prompts, api_name=False)  # type: ignore[arg-type]
        go.click(run, [file, classes, prompts, timesteps, seed, tau, mode],
                 [state, overlay, area, gallery, downloads, summary, row, column, view, cross, cross_info,
                  layer, head, *self_out, x, y], api_name="run", concurrency_id="model", concurrency_limit=1)
        tau.input(retau, [state, tau, file], [overlay, area, gallery, downloads, summary], api_name="tau",
                  trigger_mode="always_last")  # while dragging: only the latest value waiting is redone
        row.input(choose_row, [state, row, view, blend, layer, head, x, y], [column, cross, cross_info, *self_out],
                  api_name="row")
        for trigger in (column.input, view.input, blend.input):
            trigger(cross_view, [state, row, column, view, blend, layer, head, x, y], [cross, cross_info, *self_out],
                    api_name="cross" if trigger == column.input else False)  # type: ignore[arg-type]
        for trigger in (layer.input, head.input, x.submit, y.submit):
            trigger(self_view, [state, row, column, layer, head, x, y], self_out,
                    api_name="self_attention" if trigger == layer.input else False)  # type: ignore[arg-type]
        clicked.select(click, [state, row, column, layer, head], [*self_out, x, y], api_name=False)

        def forget(request: gr.Request):  # the page was closed: its download folder goes (its State after 1 h)
            if request is not None and request.session_hash:
                shutil.rmtree(Path(files.name) / request.session_hash, ignore_errors=True)

        app.unload(forget)
    app._minidiffseg_files = files  # removed with the app's temporary folders at exit
    return app
