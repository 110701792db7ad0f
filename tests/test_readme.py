"""The README's set-up stays true: the first command names only files a newcomer has, and every
`minidiffseg` command in it parses with today's options."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from minidiffseg.cli import build_parser
from minidiffseg.image import SAMPLE_PHOTO, load_image

REPO = Path(__file__).resolve().parents[1]


def setup_commands() -> list[list[str]]:
    """The `minidiffseg ...` commands of the README's first ```bash block (the one that segments a photo)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = re.search(r"## Set-up.*?```bash\n(.*?)```", text, re.S).group(1)
    return [shlex.split(part)[1:] for part in block.replace("\n", " ").split("&&") if part.strip().startswith("minidiffseg")]


def test_first_command_segments_a_file_that_ships_with_the_repo():
    commands = setup_commands()
    segment = next(c for c in commands if c[0] == "segment")
    images = [a for a in segment[1:] if not a.startswith("-") and Path(a).suffix.lower() in (".jpg", ".jpeg", ".png")]
    assert images, f"no image in the README's segment command {segment}"
    for image in images:
        assert (REPO / image).is_file(), f"the README segments {image}, which is not in the repo"
    assert SAMPLE_PHOTO.is_file() and SAMPLE_PHOTO.resolve() == (REPO / images[0]).resolve()
    im = load_image(SAMPLE_PHOTO)
    assert im.size == (451, 300) and len(set(im.resize((8, 8)).tobytes())) > 8  # a real photo, not a flat image


def test_every_setup_command_parses():
    parser = build_parser()
    commands = setup_commands()
    assert [c[0] for c in commands] == ["download", "segment"], commands
    for argv in commands:
        args = parser.parse_args(argv)  # SystemExit (a failure) on an unknown option
        assert callable(args.func)
