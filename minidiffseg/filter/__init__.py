"""The category filter (which classes of a vocabulary are in an image) and BLIP caption prompts
(docs/design.md §5 "filter" and "BLIP" rows): a hand-written CLIP image tower, a BLIP captioner,
caption-to-class matching, readers of precomputed label files, and the `minidiffseg filter` command.
Models are loaded only when a filter that needs them is built."""

from .blip import Captioner
from .filters import KINDS, Filter, make_filter
from .labels import read_labels
from .matching import CaptionMatcher

__all__ = ["Captioner", "CaptionMatcher", "Filter", "KINDS", "make_filter", "read_labels"]
