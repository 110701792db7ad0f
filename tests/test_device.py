"""Device and dtype selection of the model commands, on a CPU-only machine: torch.cuda's queries
(is_available, device_count, set_device, current_device) are substituted by a fake GPU machine whose
set_device refuses what torch's refuses (an index-less device: torch.cuda._utils._get_device_index).

- `device_of`: the default and a bare `cuda` are cuda:0 (cuda:LOCAL_RANK under torchrun), `cuda:N` is
  honoured except under torchrun with several processes on the machine; a GPU that is not there is one line.
- the class filter's models (CLIP, BLIP) run in fp32 unless --dtype is given, whatever SD's dtype.
- `Ranks` under torchrun: NCCL with a long timeout and device_id (eager init) on CUDA, gloo on CPU."""

from __future__ import annotations

import argparse
import sys
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from assets import sample_image_paths
from test_eval_datasets import write_dataset

from minidiffseg.cli import main
from minidiffseg.cli.options import device_of
from minidiffseg.errors import UserError
from minidiffseg.evaluation import runner

TORCHRUN = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


class SetDevice(list):
    """The fake GPU machine's set_device: records the index, refusing what torch.cuda.set_device refuses."""

    count = 2

    def __call__(self, device):
        self.append(torch.cuda._utils._get_device_index(device))  # torch's own check, before the driver


@pytest.fixture
def gpus(monkeypatch):
    """A machine with `gpus.count` GPUs (2); the value is the list of set_device calls."""
    for name in TORCHRUN:
        monkeypatch.delenv(name, raising=False)
    calls = SetDevice()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: calls.count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: calls.count)
    monkeypatch.setattr(torch.cuda, "set_device", calls)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: calls[-1] if calls else 0)
    return calls


def torchrun(monkeypatch, local_rank: int, local_world: int, world: int | None = None):
    world = world or local_world
    for name, value in zip(TORCHRUN, (local_rank, world, local_rank, local_world)):
        monkeypatch.setenv(name, str(value))


def device(name=None):
    return device_of(argparse.Namespace(device=name))


@pytest.mark.parametrize("name", [None, "cuda"])
def test_default_and_bare_cuda_are_the_first_gpu(gpus, name):
    assert device(name) == torch.device("cuda", 0) and gpus == [0]


def test_explicit_gpu_is_honoured(gpus):
    assert device("cuda:1") == torch.device("cuda", 1) and gpus == [1]


@pytest.mark.parametrize("name", [None, "cuda"])
def test_under_torchrun_each_process_takes_its_local_rank(gpus, monkeypatch, name):
    torchrun(monkeypatch, local_rank=1, local_world=2)
    assert device(name) == torch.device("cuda", 1) and gpus == [1]


def test_explicit_gpu_under_torchrun_with_several_local_processes_is_refused(gpus, monkeypatch):
    torchrun(monkeypatch, local_rank=1, local_world=2)
    with pytest.raises(UserError, match=r"--device cuda:0 under torchrun with 2 processes .* one GPU: give "
                                        r"--device cuda") as e:
        device("cuda:0")
    assert "\n" not in str(e.value) and gpus == []


def test_explicit_gpu_under_torchrun_with_one_process_per_machine_is_honoured(gpus, monkeypatch):
    torchrun(monkeypatch, local_rank=0, local_world=1, world=4)  # 4 machines, one process each
    assert device("cuda:1") == torch.device("cuda", 1) and gpus == [1]


def test_a_gpu_that_is_not_there_is_one_line(gpus, monkeypatch):
    with pytest.raises(UserError, match=r"--device cuda:2: 2 CUDA device\(s\) are visible \(cuda:0 to cuda:1\)"):
        device("cuda:2")
    torchrun(monkeypatch, local_rank=2, local_world=3)
    with pytest.raises(UserError, match=r"LOCAL_RANK=2 needs a GPU of its own but 2 CUDA device\(s\) are visible: "
                                        r"start at most 2 process\(es\) per machine"):
        device("cuda")
    assert gpus == []


def test_no_gpu(gpus):
    gpus.count = 0
    assert device(None) == torch.device("cpu")
    for name in ("cuda", "cuda:0"):
        with pytest.raises(UserError, match=f"--device {name} but no CUDA device is visible: use --device cpu"):
            device(name)
    with pytest.raises(UserError, match="only cpu and cuda"):
        device("meta")
    with pytest.raises(UserError, match="is not a device"):
        device("gpu")
    assert gpus == []


def cli(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def model_commands(tmp_path) -> dict[str, list]:
    """Each model command, failing (one line) just after choosing its device: missing weights or dataset."""
    image = sample_image_paths()[0]
    return {"segment": ["segment", image, "--classes", "cat", "--weights", tmp_path / "none", "--out", tmp_path / "o"],
            "maps": ["maps", image, "--classes", "cat", "--weights", tmp_path / "none", "--out", tmp_path / "g.png"],
            "eval": ["eval", "--dataset", "voc", "--root", tmp_path / "none", "--weights", "w", "--out", tmp_path / "o"],
            "calibrate": ["calibrate", "--dataset", "voc", "--root", tmp_path / "none", "--weights", "w",
                          "--out", tmp_path / "o"],
            "filter": ["filter", image, "--vocabulary", "voc", "--out", tmp_path / "l.json",
                       "--clip-weights", tmp_path / "none"]}


@pytest.mark.parametrize("command", ["segment", "maps", "eval", "calibrate", "filter"])
@pytest.mark.parametrize("flag", [[], ["--device", "cuda"]], ids=["default", "cuda"])
def test_every_model_command_gets_past_the_device_on_a_gpu_machine(gpus, tmp_path, capsys, command, flag):
    code, err = cli(capsys, *model_commands(tmp_path)[command], *flag)
    assert code == 2 and err.count("\n") == 1 and err.startswith("minidiffseg: error: ") and "none" in err, err
    assert gpus == [0]


# ----------------------------------------------------------------------------- the filter's dtype

class Stop(UserError):
    pass


@pytest.fixture
def filter_dtypes(gpus, monkeypatch):
    """The dtypes the filter's / captioner's models are built in, on the fake GPU; SD is not loaded."""
    from minidiffseg import filter as filters
    from minidiffseg.cli import filter as filter_cli
    from minidiffseg.filter.blip import Captioner
    from minidiffseg.method.segmenter import Segmenter

    seen = []

    def make_filter(*args, dtype, **kw):
        seen.append(dtype)
        raise Stop("stop")

    def captioner(folder, device, dtype):
        seen.append(dtype)
        raise Stop("stop")

    def segmenter(weights, *, device, dtype, **kw):  # SD's dtype is the command's
        seen.append(("sd", dtype))
        return argparse.Namespace(device=device, dtype=dtype, template="a photograph of {}")

    monkeypatch.setattr(filters, "make_filter", make_filter)
    monkeypatch.setattr(filter_cli, "make_filter", make_filter)
    monkeypatch.setattr(Captioner, "from_pretrained", staticmethod(captioner))
    monkeypatch.setattr(Segmenter, "from_pretrained", staticmethod(segmenter))
    return seen


@pytest.mark.parametrize("dtype, sd, filt", [([], torch.float16, torch.float32),
                                             (["--dtype", "fp16"], torch.float16, torch.float16),
                                             (["--dtype", "bf16"], torch.bfloat16, torch.bfloat16)],
                         ids=["default", "fp16", "bf16"])
@pytest.mark.parametrize("how", ["segment-vocabulary", "segment-caption", "eval-filter", "filter"])
def test_the_filter_runs_in_fp32_unless_dtype_is_given(filter_dtypes, tmp_path, capsys, dtype, sd, filt, how):
    image = sample_image_paths()[0]
    segment = ["segment", image, "--weights", "w", "--out", tmp_path / "o"]
    write_dataset(tmp_path / "data", "voc")
    argv = {"segment-vocabulary": [*segment, "--vocabulary", "voc"],
            "segment-caption": [*segment, "--classes", "cat", "--caption", "blip"],
            "eval-filter": ["eval", "--dataset", "voc", "--root", tmp_path / "data", "--weights", "w",
                            "--out", tmp_path / "o", "--labels", "filter"],
            "filter": ["filter", image, "--vocabulary", "voc", "--out", tmp_path / "l.json"]}[how]
    code, err = cli(capsys, *argv, *dtype, "--device", "cuda:0")
    assert code == 2 and err == "minidiffseg: error: stop\n", err
    assert filter_dtypes[-1] == filt, filter_dtypes
    if how.startswith("segment"):
        assert filter_dtypes[0] == ("sd", sd)  # Stable Diffusion keeps the command's dtype


# ---------------------------------------------------------------------------------- process group

@pytest.mark.parametrize("where, backend, extra", [
    ("cuda:1", "nccl", {"device_id": torch.device("cuda", 1)}),
    ("cuda", "nccl", {"device_id": torch.device("cuda", 0)}),  # an index-less device: the current GPU
    ("cpu", "gloo", {}),
])
def test_process_group_has_a_long_timeout_and_nccl_its_gpu(gpus, monkeypatch, where, backend, extra):
    torchrun(monkeypatch, local_rank=1, local_world=2)
    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **kw: calls.append((a, kw)))
    ranks = runner.Ranks(where)
    [(args, kw)] = calls
    assert args == (backend,) and set(kw) == {"timeout", *extra} and kw.get("device_id") == extra.get("device_id")
    assert kw["timeout"] >= timedelta(hours=6)  # a shard of slow images, not NCCL's 10 minutes (gloo's 30)
    assert (ranks.rank, ranks.world, ranks.owner) == (1, 2, True)
    assert ranks.device == extra.get("device_id", torch.device("cpu"))
