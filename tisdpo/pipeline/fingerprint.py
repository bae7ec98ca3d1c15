"""What a stage's output depends on, so that an output made with other options is never
reused or continued as if it were this run's.

Each stage directory holds ``options.json``: the options the stage's result depends on
(flattened ``section.option`` names) and a digest of each earlier stage it reads. When a
stage is entered with ``pipeline.resume`` on and finds a finished output, checkpoints or
partial shards made with different options, it refuses with the first differing option
named; with nothing to reuse, or with ``pipeline.resume`` off, it records the new options.

Options that change how a result is computed but not what it is are left out: devices and
threads, kernels (``*.impl``), checkpoint and evaluation cadence, stopping, logging, padding
and packing, and process layout.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict

from tisdpo.train.checkpoint import DONE_FILE, checkpoints, stage_done
from tisdpo.train.config import config_to_dict

__all__ = ["StageOptionsChanged", "stage_options", "stage_digest", "check_options",
           "enter_stage", "upstream", "OPTIONS_FILE"]

log = logging.getLogger("tisdpo")

OPTIONS_FILE = "options.json"
_IGNORED_TOP = {"run_dir", "device", "threads", "log", "demo", "distributed"}
_IGNORED = {"model.gradient_checkpointing", "model.attn_implementation", "data.packing",
            "data.pad_to_multiple_of", "pipeline.resume", "weights.batch_size",
            "weights.jsonl", "weights.impl"}
_IGNORED_LEAF = {"impl", "strategy", "eval_every", "eval_batch_size", "eval_max_pairs", "save_every",
                 "keep_checkpoints", "stop_after"}
# options recorded only when set: at their default (None, the exact computation) a result is
# what it was before the option existed, so outputs recorded then stay reusable
_OMITTED_WHEN_NONE = {"policy.filter_eps"}


class StageOptionsChanged(ValueError):
    """A stage's existing output was made with other options than this run's."""


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, name + "."))
        else:
            out[name] = v
    return out


def _kept(name: str) -> bool:
    return (name.split(".")[0] not in _IGNORED_TOP and name not in _IGNORED
            and name.split(".")[-1] not in _IGNORED_LEAF)


def stage_options(cfg, sections: tuple[str, ...], *, overrides: dict | None = None,
                  upstream: dict | None = None) -> dict:
    """The options of ``sections`` (and seed, model, data) that a stage's result depends on.

    ``overrides``: a section replaced by the dataclass the stage really uses (a named
    policy's own PolicyConfig); ``upstream``: ``{stage directory: digest}`` of its inputs.
    """
    tree = config_to_dict(cfg)
    for name, sub in (overrides or {}).items():
        tree[name] = asdict(sub)
    keep = {"seed", "model", "data", *sections}
    flat = {k: v for k, v in _flat(tree).items()
            if (k.split(".")[0] in keep or k in keep) and _kept(k)
            and not (v is None and k in _OMITTED_WHEN_NONE)}
    return {"options": flat, "upstream": dict(upstream or {})}


def stage_digest(stage_dir: str) -> str | None:
    """A digest of a finished stage's done.json and options.json; None when not finished."""
    if not stage_done(stage_dir):
        return None
    h = hashlib.sha256()
    for name in ("done.json", OPTIONS_FILE):
        path = os.path.join(stage_dir, name)
        if os.path.isfile(path):
            with open(path, "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()[:16]


def _difference(old: dict, new: dict) -> list[str]:
    out = []
    for group in ("options", "upstream"):
        a, b = old.get(group, {}), new.get(group, {})
        for k in sorted(set(a) | set(b)):
            if a.get(k, "<unset>") != b.get(k, "<unset>"):
                if group == "options":
                    out.append(f"{k}={a.get(k, '<unset>')!r} then, {b.get(k, '<unset>')!r} now")
                else:
                    out.append(f"the earlier stage {k} has changed")
    return out


def check_options(out_dir: str, options: dict, *, desc: str, resume: bool,
                  reusable: bool, is_main: bool = True) -> None:
    """Refuse to reuse ``out_dir`` made with other options; record this run's options.

    ``reusable``: the directory holds something the stage would reuse (a finished output,
    checkpoints, shards).
    """
    path = os.path.join(out_dir, OPTIONS_FILE)
    if resume and reusable:
        if not os.path.isfile(path):      # made before options were recorded: left as it is
            return
        with open(path, encoding="utf-8") as fh:
            old = json.load(fh)
        diff = _difference(old, json.loads(json.dumps(options)))
        if diff:
            more = f" (and {len(diff) - 1} more)" if len(diff) > 1 else ""
            raise StageOptionsChanged(
                f"{desc}: {out_dir} was made with other options: {diff[0]}{more}; rerun with "
                f"the same options to reuse it, use another --run_dir, or delete {out_dir} to "
                f"redo this stage")
        return
    if is_main:
        os.makedirs(out_dir, exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(options, fh, indent=1, sort_keys=True)
        os.replace(tmp, path)


def enter_stage(ctx, out_dir: str, options: dict, desc: str, *,
                partial: bool = False) -> bool:
    """Check ``out_dir`` against this run's ``options`` (refusing a stage made with others)
    and record them; True when the stage is finished and is to be skipped. ``partial``: the
    directory holds partial work other than checkpoints (the weights pass's shards)."""
    resume, done = ctx.cfg.pipeline.resume, stage_done(out_dir)
    check_options(out_dir, options, desc=desc, resume=resume, is_main=ctx.par.is_main,
                  reusable=done or partial or bool(checkpoints(out_dir)))
    if resume and done:
        log.info("%s: already done (%s), skipping", desc, out_dir)
        return True
    if not resume and done and ctx.par.is_main:     # redone: never "done" with old results
        os.remove(os.path.join(out_dir, DONE_FILE))
    ctx.par.barrier()
    return False


def upstream(ctx, *stage_dirs: str) -> dict:
    """Digests of the finished earlier stages a stage reads (the SFT stage always counts)."""
    dirs = (ctx.path("sft"),) + stage_dirs
    return {os.path.relpath(d, ctx.cfg.run_dir): stage_digest(d) for d in dirs
            if stage_digest(d) is not None}
