"""Helpers for tests that spawn gloo process groups on the CPU."""
import os
import sys


def quiet_worker() -> None:
    """One thread, and no progress bars or info logs from datasets and transformers."""
    import datasets
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(1)
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def exit_without_teardown() -> None:
    """End a spawned worker whose results are on disk, skipping interpreter teardown.

    Freeing a DDP reducer joins gloo's worker thread while holding the GIL, and that thread
    may still need the GIL to free the last collective's tensors: a deadlock seen
    intermittently with torch 2.13 (gloo, CPU). Exit status 0; stdout/stderr flushed first.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
