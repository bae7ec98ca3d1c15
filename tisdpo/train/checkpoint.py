"""Checkpoint files: the stage's done-marker, the newest resumable checkpoint, the RNG states a
resumed run continues from, and the conversion between a single process's optimiser state and
the FQN-keyed one that distributed state dicts use (so one ``state.pt`` layout serves any number
of processes).
"""
from __future__ import annotations

import json
import os
import random

import numpy as np
import torch

__all__ = ["DONE_FILE", "latest_checkpoint", "stage_done", "read_done", "rng_state",
           "restore_rng_state", "optimizer_state_to_indices", "optimizer_state_to_fqns",
           "fqns_by_group"]

DONE_FILE = "done.json"


def latest_checkpoint(out_dir: str) -> str | None:
    root = os.path.join(out_dir, "checkpoints")
    if not os.path.isdir(root):
        return None
    steps = sorted((int(d.split("-")[1]), d) for d in os.listdir(root)
                   if d.startswith("step-") and os.path.isfile(os.path.join(root, d, "state.pt")))
    return os.path.join(root, steps[-1][1]) if steps else None


def stage_done(out_dir: str) -> bool:
    return os.path.isfile(os.path.join(out_dir, DONE_FILE))


def read_done(out_dir: str) -> dict:
    with open(os.path.join(out_dir, DONE_FILE), encoding="utf-8") as fh:
        return json.load(fh)


def rng_state() -> dict:
    """Every RNG a resumed run must continue from: torch (CPU, CUDA), python, numpy."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def optimizer_state_to_indices(osd: dict) -> dict:
    """FQN-keyed optimiser state (get_optimizer_state_dict) → ``optimizer.state_dict()`` layout.

    Parameters are numbered in param-group order, as torch numbers them.
    """
    index, groups = {}, []
    for g in osd["param_groups"]:
        ids = []
        for fqn in g["params"]:
            index.setdefault(fqn, len(index))
            ids.append(index[fqn])
        groups.append({**g, "params": ids})
    return {"state": {index[k]: v for k, v in osd["state"].items()}, "param_groups": groups}


def optimizer_state_to_fqns(sd: dict, fqns_by_group: list[list[str]]) -> dict:
    """The inverse: an ``optimizer.state_dict()`` → FQN-keyed, with the live groups' FQNs."""
    groups = sd["param_groups"]
    if len(groups) != len(fqns_by_group) or any(
            len(g["params"]) != len(f) for g, f in zip(groups, fqns_by_group)):
        raise ValueError(f"checkpoint optimiser has parameter groups of sizes "
                         f"{[len(g['params']) for g in groups]}, this model "
                         f"{[len(f) for f in fqns_by_group]}: not the same model")
    name = {i: f for g, fs in zip(groups, fqns_by_group) for i, f in zip(g["params"], fs)}
    return {"state": {name[i]: v for i, v in sd["state"].items()},
            "param_groups": [{**g, "params": fs} for g, fs in zip(groups, fqns_by_group)]}


def fqns_by_group(model, optimizer) -> list[list[str]]:
    """The parameter FQNs of each of ``optimizer``'s groups (tied parameters: the first name)."""
    names = {}
    for fqn, p in model.named_parameters():
        names.setdefault(id(p), fqn)
    return [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
