"""`minidiffseg explore`: a local web page (Gradio, the optional `explore` extra) to look at the attention
of a segmentation run: the result, any token's cross-attention per layer / level / fused, and the
self-attention of a clicked pixel beside M = S·A (docs/explore.md). The computation is
`minidiffseg.method.explore.Exploration`; this module is only the page.

Each browser session keeps its own last run (a `gr.State`); runs are queued on the one model (one at a
time, the others see their place in the queue); changing only a view reads the stored run.
"""

# no `from __future__ import annotations`: Gradio reads the gr.Request / gr.SelectData annotations of the
# handlers at run time, and `gr` is only bound inside build_app (gradio is an optional extra)
import atexit
import dataclasses
import functools
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import NoReturn

import torch
from PIL import Image, ImageDraw

from ..errors import UserError
from ..image import SAMPLE_PHOTO, load_image  # the sample: a CC0 cat photo (minidiffseg/data/README.md)
from ..method.explore import MAX_CLASSES, Exploration
from ..method.segmenter import SegmentationResult, Segmenter
from ..sd import load_sd
from ..viz import heatmap
from .options import add_model_args, device_of, precision_of
from .segment import _safe, outputs, write_result

INSTALL = 'pip install "minidiffseg[explore]"'
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
DISPLAY = 384  # px: the longer side of the map pictures (cells drawn as blocks, so 16² and 64² grids both show)
MAX_UPLOAD = "50mb"  # a photo is a few MB; the model reads 512×512 anyway
MAX_CLASS_TEXT = 1000  # characters in the class box: 16 classes of long names fit easily


def register(subparsers) -> None:
    p = subparsers.add_parser("explore", help="a local web page to explore the attention maps of a run "
                              f"(needs the explore extra: {INSTALL})")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                   "only; 0.0.0.0 shares the page with the network)")
    p.add_argument("--port", type=int, help="port (default: the first free one from 7860)")
    p.add_argument("--resolution", type=int, help="square side the image is stretched to (÷64; default: the "
                   "segmenter's, the size the model was trained at)")
    p.set_defaults(func=run_explore)


def gradio():
    """The gradio module, or a UserError that says how to install the extra."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no usage pings from a local tool
    try:
        import gradio as gr
    except ImportError:
        raise UserError(f"explore needs the optional web-page extra, which is not installed: {INSTALL}") from None
    return gr


def check_address(host: str, port: int | None) -> None:
    """One-line errors now, rather than the web server's, for a --host that is not an address of this machine
    and a --port that is taken (or not a port)."""
    if port is not None and not 0 < port < 65536:
        raise UserError(f"--port {port}: give a port in 1..65535")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family) as s:
            s.bind((host, 0))
    except OSError as e:
        raise UserError(f"--host {host} is not an address of this machine ({e.strerror or e}): use 127.0.0.1 "
                        "(this machine only) or 0.0.0.0 (every network)") from None
    if port is not None:
        try:
            with socket.socket(family) as s:
                s.bind((host, port))
        except OSError as e:
            raise UserError(f"--port {port} on {host} cannot be used ({e.strerror or e}): another program listens "
                            "there; give another --port or leave it out to take a free one") from None


def run_explore(args) -> int:
    """Serve the page until Ctrl-C, which ends the command with 0 within a few seconds at any point: while
    gradio imports or the model loads (nothing is served yet), or while serving (see `serve`)."""
    try:
        return serve(args)
    except KeyboardInterrupt:  # before the page was served
        leave(0)


def serve(args) -> int:
    gradio()  # fail before loading any weights
    check_address(args.host, args.port)
    device = device_of(args)
    options = {} if args.resolution is None else {"resolution": args.resolution}
    stream = bool(getattr(args, "stream", False))  # --stream, where the shared model options have it
    p = precision_of(args, device)  # half precision on a CPU without fast half arithmetic: fp32, weights kept half
    seg = Segmenter(load_sd(args.weights, device=device, dtype=p.compute, stream=stream,
                            keep=None if stream else p.keep), **options)
    app = build_app(seg, title=f"weights {args.weights} · {seg.device.type} · {str(seg.dtype).replace('torch.', '')} "
                    f"· images stretched to {seg.resolution}²")
    if args.host not in LOCAL_HOSTS:
        print(f"minidiffseg: warning: listening on {args.host}, not only 127.0.0.1: anyone who can reach this "
              "machine can use the page and run the model", file=sys.stderr)
    # from here on Ctrl-C only asks to stop: no KeyboardInterrupt lands inside Gradio's launch or close
    ctrl_c: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda number, frame: ctrl_c.append(number))
    try:
        try:
            url = launch(app, args.host, args.port)
        except OSError as e:  # no free port from 7860 on
            raise UserError(f"cannot serve on {args.host}{'' if args.port is None else f':{args.port}'}: "
                            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        print(f"minidiffseg explore: {url} (Ctrl-C stops)", file=sys.stderr)
        while not ctrl_c and app.is_running:
            time.sleep(0.1)
    finally:
        app.close()  # the queue, then the web server: Gradio joins its thread for at most 5 s
        signal.signal(signal.SIGINT, previous)
    if ctrl_c:
        leave(0)
    return 0


def leave(code: int) -> NoReturn:
    """End the process now with `code`, after what a normal exit runs (the atexit functions: the page's
    temporary folders, logging) but without tearing down the interpreter: freeing torch's, Gradio's and the
    model libraries' ~340 k objects with full garbage collections costs ~1 s of CPU, which on a loaded
    2-core machine took 3-16 s after Ctrl-C (over 30 s once); and no thread of the web server (an open
    connection, a run still on the model) can hold the exit up. Only for the command's own process."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more to say
            pass
    os._exit(code)


def launch(app, host: str = "127.0.0.1", port: int | None = None) -> str:
    """Start serving `app` in the background; returns its URL."""
    app.queue(default_concurrency_limit=1)
    allowed = [str(SAMPLE_PHOTO.parent)] if SAMPLE_PHOTO.is_file() else []
    _, url, _ = app.launch(server_name=host, server_port=port, prevent_thread_lock=True, quiet=True,
                           max_file_size=MAX_UPLOAD, allowed_paths=allowed)
    return url or f"http://{host}:{app.server_port}/"


# ---- the page ---------------------------------------------------------------------------------


def build_app(seg: Segmenter, title: str = ""):
    """The Gradio Blocks of the explorer over a loaded segmenter (not yet launched)."""
    gr = gradio()
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

    def need(ex: Exploration | None) -> Exploration:
        if ex is None:
            raise UserError("nothing to show yet: upload an image, give classes and press Run")
        return ex

    @page_errors
    def preview(path):
        if not path:
            return None
        im = load_image(path)
        im.thumbnail((DISPLAY, DISPLAY))
        return im

    @page_errors
    def run(path, classes, prompts, timesteps, seed, tau, mode, request: gr.Request, progress=gr.Progress()):
        if not path:
            raise UserError("no image: upload one (PNG, JPEG, ...) or press the sample photo button")
        if len(classes or "") > MAX_CLASS_TEXT:
            raise UserError(f"the class list is {len(classes)} characters long: give at most {MAX_CLASSES} "
                            f"classes in {MAX_CLASS_TEXT} characters")
        names = [c.strip() for c in (classes or "").split(",")]
        if not any(names):
            raise UserError("the class list is empty: give at least one class name, e.g. cat, sofa")
        lines = [p.strip() for p in (prompts or "").splitlines() if p.strip()]
        ex = Exploration.run(seg, path, names, prompts=lines or None, seed=int(seed or 0), tau=tau,
                             joint=mode == "joint", timesteps=timesteps,
                             progress=lambda f, what: progress(f, desc=what))
        folder = Path(files.name) / (request.session_hash or "session")
        stem = _safe(Path(path).stem)
        x, y = ex.image.width // 2, ex.image.height // 2  # the first pixel shown: the centre
        heads = [("mean", "mean")] + [(str(h), str(h)) for h in range(ex.heads())]
        return (ex, *result_outputs(ex, tau, folder, stem), *row_outputs(ex, 0),
                *cross_outputs(ex, 0, 0, "fused", True), gr.update(choices=self_layer_choices(ex), value="mean"),
                gr.update(choices=heads, value="mean"), *self_outputs(ex, 0, 0, x, y, "mean", "mean"), x, y)

    def result_outputs(ex: Exploration, tau, folder: Path, stem: str):
        r = on_cpu(ex.segmentation(tau))  # pictures and files are made on the CPU, whatever --device
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        write_result(folder, stem, ex.image, r)  # the files `segment` writes, by its own writer
        area = [[name, round(100 * share, 2)] for name, share in r.area().items()]
        heat = sorted(folder.glob(f"{stem}_heat_*.png"), key=lambda p: int(p.name[len(stem) + 6:].split("_")[0]))
        gallery = [(str(p), f"{c}: score map") for p, c in zip(heat, r.classes)]
        prompts = "; ".join(f"`{p}`" for p in r.prompts)
        return (str(folder / f"{stem}_overlay.png"), area, gallery,
                [str(folder / f"{stem}_mask.png"), str(outputs(folder, stem))],
                f"**{len(r.classes)} class(es)**, τ = {r.tau:.2f}; prompts: {prompts}")

    @page_errors
    def retau(ex, tau, path, request: gr.Request):
        if ex is None:  # τ moved before any run: nothing to redo
            return (gr.update(),) * 5
        folder = Path(files.name) / (request.session_hash or "session")
        return result_outputs(ex, tau, folder, _safe(Path(path).stem) if path else "image")

    def row_outputs(ex: Exploration, row: int):
        rows = [(f"row {i}: {r.text}", i) for i, r in enumerate(ex.rows)]
        layers = sorted(ex.layers, key=lambda n: (ex.level_of[n], n))
        views = ([("fused A (all levels)", "fused")] + [(f"level 1/{lvl} mean", str(lvl)) for lvl in sorted(ex.levels)]
                 + [(f"{_short(n)} (1/{ex.level_of[n]})", n) for n in layers])
        return (gr.update(choices=rows, value=row), gr.update(choices=ex.columns(row), value=ex.columns(row)[0][1]),
                gr.update(choices=views, value="fused"))

    @page_errors
    def choose_row(ex, row, view, blend, layer, head, x, y):
        ex = need(ex)
        row = int(row)
        column = ex.columns(row)[0][1]
        return (gr.update(choices=ex.columns(row), value=column), *cross_outputs(ex, row, column, view, blend),
                *self_outputs(ex, row, column, x, y, layer, head))

    def cross_outputs(ex: Exploration, row: int, column: int, view: str, blend: bool):
        m = ex.cross(row, int(column), view)
        label = next(name for name, c in ex.columns(row) if c == int(column))
        h, w = m.shape
        weights = ", ".join(f"1/{lvl}: {wt}" for lvl, wt in seg.level_weights.items())
        what = (f"fused A (levels weighted {weights})" if view == "fused"
                else f"level 1/{view}: mean of its layers" if str(view).isdigit() else f"layer {view}")
        return (picture(ex.image, m, blend), f"`{label}` · {what} · {h}×{w}, heads averaged · min "
                f"{m.min().item():.3g}, max {m.max().item():.3g} (colours: min → max of this map)")

    @page_errors
    def cross_view(ex, row, column, view, blend, layer, head, x, y):
        ex = need(ex)
        return (*cross_outputs(ex, int(row), int(column), view, blend),
                *self_outputs(ex, int(row), int(column), x, y, layer, head))

    def self_outputs(ex: Exploration, row: int, column: int, x, y, layer: str, head: str):
        if x is None or y is None:
            raise UserError("give the pixel: click the image or type x and y")
        gy, gx = ex.pixel(float(x), float(y))
        s = ex.self_attention(int(row), gy, gx, None if layer == "mean" else layer,
                              None if head in (None, "mean") else int(head))
        a = ex.cross(int(row), int(column), "fused")
        m = ex.refined_map(int(row), int(column))
        h, w = ex.size
        text = (f"pixel (x {int(x)}, y {int(y)}) → latent cell (row {gy}, col {gx}) of {h}×{w}; S row: "
                f"{'mean of the refinement layers' if layer == 'mean' else layer}, head {head}; "
                f"sum {s.sum().item():.4f}, max {s.max().item():.3g}; "
                f"M at the cell = (S·A)(p) = {m[gy, gx].item():.4g}")
        return (marked(ex.image, float(x), float(y), ex.size), picture(ex.image, s, False, (gy, gx)),
                picture(ex.image, a, False), picture(ex.image, m, False), text)

    @page_errors
    def self_view(ex, row, column, layer, head, x, y):
        return self_outputs(need(ex), int(row), int(column), x, y, layer, head)

    @page_errors
    def click(ex, row, column, layer, head, evt: gr.SelectData):
        ex = need(ex)
        shown = _display_size(ex.image)  # the picture clicked; evt.index is in its pixels
        x = evt.index[0] * ex.image.width / shown[0]
        y = evt.index[1] * ex.image.height / shown[1]
        return (*self_outputs(ex, int(row), int(column), x, y, layer, head), int(x), int(y))

    def self_layer_choices(ex: Exploration):
        return [("mean of the refinement layers (S)", "mean")] + [(_short(n), n) for n in ex.self_layers]

    def fill_prompts(classes, mode):
        if mode == "joint":
            return ""
        return "\n".join(seg.template.format(c.strip()) for c in (classes or "").split(",") if c.strip())

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
        fill.click(fill_prompts, [classes, mode], prompts, api_name=False)
        go.click(run, [file, classes, prompts, timesteps, seed, tau, mode],
                 [state, overlay, area, gallery, downloads, summary, row, column, view, cross, cross_info,
                  layer, head, *self_out, x, y], api_name="run", concurrency_id="model", concurrency_limit=1)
        tau.input(retau, [state, tau, file], [overlay, area, gallery, downloads, summary], api_name="tau",
                  trigger_mode="always_last")  # while dragging: only the latest value waiting is redone
        row.input(choose_row, [state, row, view, blend, layer, head, x, y], [column, cross, cross_info, *self_out],
                  api_name="row")
        for trigger in (column.input, view.input, blend.input):
            trigger(cross_view, [state, row, column, view, blend, layer, head, x, y], [cross, cross_info, *self_out],
                    api_name="cross" if trigger == column.input else False)
        for trigger in (layer.input, head.input, x.submit, y.submit):
            trigger(self_view, [state, row, column, layer, head, x, y], self_out,
                    api_name="self_attention" if trigger == layer.input else False)
        clicked.select(click, [state, row, column, layer, head], [*self_out, x, y], api_name=False)

        def forget(request: gr.Request):  # the page was closed: its download folder goes (its State after 1 h)
            if request is not None and request.session_hash:
                shutil.rmtree(Path(files.name) / request.session_hash, ignore_errors=True)

        app.unload(forget)
    app._minidiffseg_files = files  # removed with the app's temporary folders at exit
    return app


# ---- pictures ---------------------------------------------------------------------------------


def picture(image: Image.Image, m: torch.Tensor, blend: bool, cell: tuple[int, int] | None = None) -> Image.Image:
    """An (h, w) map as a heat map at the image's aspect, DISPLAY px on its longer side, cells as blocks;
    `blend`: 45 % image under 55 % map; `cell`: the (row, col) cell outlined."""
    size = _display_size(image)
    out = heatmap(m.detach().float().cpu()).resize(size, Image.NEAREST)
    if blend:
        out = Image.blend(image.convert("RGB").resize(size, Image.BILINEAR), out, 0.55)
    if cell is not None:
        h, w = m.shape
        sx, sy = size[0] / w, size[1] / h
        ImageDraw.Draw(out).rectangle((cell[1] * sx, cell[0] * sy, (cell[1] + 1) * sx, (cell[0] + 1) * sy),
                                      outline=(0, 255, 255), width=2)
    return out


def on_cpu(r: SegmentationResult) -> SegmentationResult:
    """The result's tensors on the CPU (PIL pictures and files are made from CPU tensors)."""
    return dataclasses.replace(r, scores=r.scores.cpu(), mask=r.mask.cpu(), fused=r.fused.cpu(),
                               refined=r.refined.cpu(), levels={k: v.cpu() for k, v in r.levels.items()},
                               layers={k: v.cpu() for k, v in r.layers.items()})


def marked(image: Image.Image, x: float, y: float, grid: tuple[int, int]) -> Image.Image:
    """The image at display size with a cross at image pixel (x, y) and its latent cell outlined."""
    size = _display_size(image)
    out = image.convert("RGB").resize(size, Image.BILINEAR)
    px, py = x * size[0] / image.width, y * size[1] / image.height
    h, w = grid
    cw, ch = size[0] / w, size[1] / h
    gx, gy = min(int(px / cw), w - 1), min(int(py / ch), h - 1)
    draw = ImageDraw.Draw(out)
    draw.rectangle((gx * cw, gy * ch, (gx + 1) * cw, (gy + 1) * ch), outline=(0, 255, 255), width=2)
    for colour, width in (((255, 255, 255), 5), ((255, 0, 0), 2)):  # a red cross, outlined in white
        draw.line((px - 10, py, px + 10, py), fill=colour, width=width)
        draw.line((px, py - 10, px, py + 10), fill=colour, width=width)
    return out


def _display_size(image: Image.Image) -> tuple[int, int]:
    scale = DISPLAY / max(image.width, image.height)
    return max(1, round(image.width * scale)), max(1, round(image.height * scale))


def _short(name: str) -> str:
    """'up_blocks.1.attentions.2.transformer_blocks.0.attn2' -> 'up1.2 attn2'; mid block -> 'mid attn2'."""
    parts = name.split(".")
    if parts[0] == "mid_block":
        return f"mid.{parts[2]} {parts[-1]}"
    return f"{parts[0].split('_')[0]}{parts[1]}.{parts[3]} {parts[-1]}"
