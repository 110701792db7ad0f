"""The attention explorer behind `minidiffseg explore` (docs/explore.md): `state.py` keeps one run's
attention for views without running the U-Net again (`Exploration`), `views.py` computes what the page
shows for each input as plain values, and `app.py` is the Gradio page over them (Gradio, the optional
`explore` extra, is imported only when the page is built). Only the command line imports this package
(tests/test_layout.py)."""

from .state import MAX_CLASSES, Exploration

__all__ = ["Exploration", "MAX_CLASSES"]
