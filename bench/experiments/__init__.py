"""One-off measurements, each behind a design decision, each with its results file (bench/README.md lists them).

    peak_memory.py        a whole `segment` run: resident vs --stream vs --low-memory (README "Memory")
    stream_mechanisms.py  one U-Net pass with the weights streamed by each candidate mechanism
    stream_stages.py      a streamed run step by step against a resident one
    crf.py                the dense CRF against the C++ reference, pydensecrf
    sdxl.py               SDXL resident and streamed, fp32 and bf16, 512² and 1024², beside the diffusers recipe
    sd3.py                SD3-medium the same way, with and without T5

Each runs from the repository root as `python -m bench.experiments.NAME`.
"""
