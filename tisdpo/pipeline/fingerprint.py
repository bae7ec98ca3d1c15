"""What a stage's output depends on, so that an output made with other options is never
reused or continued as if it were this run's.

Each stage directory holds ``options.json``: the options the stage's result depends on
(flattened ``section.option`` names), a digest of each earlier stage it reads, and the
content identity of each input file or folder (``inputs``: ``data.train``, ``data.eval``,
``model.path``, ``model.tokenizer``), so that a file changed in place under the same path is
a change too. When a stage is entered with ``pipeline.resume`` on and finds a finished
output, checkpoints or partial shards made with different options or inputs, it refuses
with the first difference named; with nothing to reuse, or with ``pipeline.resume`` off, it
records the new options. An ``options.json`` written before inputs were recorded is
accepted as it is and completed with this run's inputs.

An earlier stage a stage reads must have been made from the same records, model and seed
(:data:`RUN_OPTIONS` and the inputs): :func:`upstream` refuses one made from others.

Options that change how a result is computed but not what it is are left out: devices and
threads, kernels (``*.impl``), checkpoint and evaluation cadence, stopping, logging, padding
and packing, and process layout. A training section's ``batch_size`` is per process: what
its result depends on is the global micro-batch, ``batch_size × world size`` pairs (what a
checkpoint records and the trainer checks), recorded as ``<section>.global_batch_size``, so
a run made on one process resumes on two with half the batch size, and the other way round.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict

from tisdpo.train.checkpoint import (
    DONE_FILE, checkpoints, read_json, remove_checkpoints, stage_done, write_json,
)
from tisdpo.train.config import config_to_dict
from tisdpo.train.records import DATA_EXTS

__all__ = ["StageOptionsChanged", "stage_options", "stage_digest", "check_options",
           "enter_stage", "upstream", "contrastive_options", "recorded_options",
           "input_identity", "check_ignored_options", "OPTIONS_FILE", "RUN_OPTIONS",
           "omitted_when_none"]

log = logging.getLogger("tisdpo")

OPTIONS_FILE = "options.json"
_IGNORED_TOP = {"run_dir", "device", "threads", "log", "demo", "distributed"}
_IGNORED = {"model.gradient_checkpointing", "model.attn_implementation", "model.check_head",
            "data.packing",
            "data.pad_to_multiple_of", "pipeline.resume", "weights.batch_size",
            "weights.jsonl", "weights.impl"}
_IGNORED_LEAF = {"impl", "strategy", "eval_every", "eval_batch_size", "save_every",
                 "keep_checkpoints", "stop_after"}
# options recorded only when set: at their default (None: the exact computation, every
# held-out pair) a result is what it was before they were recorded, so outputs recorded then
# stay reusable. eval_max_pairs picks the pairs of the final evaluation in done.json;
# policy.token_weights_resolved is "recompute" where token_weights=auto applies the preset's
# own rule to stored scores made for another.
_OMITTED_WHEN_NONE = {"policy.filter_eps", "policy.token_weights_resolved"}
_OMITTED_LEAF_WHEN_NONE = {"eval_max_pairs"}


def omitted_when_none(name: str) -> bool:
    """Whether option ``name`` is recorded only when set (absent from options.json: None)."""
    return name in _OMITTED_WHEN_NONE or name.split(".")[-1] in _OMITTED_LEAF_WHEN_NONE


#: the options that say which records, model and seed a run uses (with ``model.tiny_*`` and
#: the inputs' content): every stage of a run shares them
RUN_OPTIONS = ("seed", "data.train", "data.eval", "data.synthetic_train", "data.synthetic_eval",
               "data.synthetic_task", "data.eval_fraction", "data.max_records",
               "data.skip_invalid", "model.path", "model.tokenizer")
#: the options whose files or folders are recorded by content (``inputs``)
_INPUTS = ("data.train", "data.eval", "model.path", "model.tokenizer")
#: training sections whose ``batch_size`` is per process (recorded as ``global_batch_size``)
_TRAIN_SECTIONS = ("sft", "contrastive", "policy")
#: an option older options.json files lack -> the name that then held its value (the
#: per-process batch size of a one-process run is its global batch; one of a several-process
#: run differs from it and is refused, naming the option)
_BATCH_AS = {f"{s}.global_batch_size": f"{s}.batch_size" for s in _TRAIN_SECTIONS}
_RENAMED = {"policy.seed": "seed", **_BATCH_AS}


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


def check_ignored_options(cfg) -> None:
    """Refuse options a run would ignore (and yet record): data.eval without data.train."""
    if cfg.data.eval and not cfg.data.train:
        raise ValueError(f"data.eval {cfg.data.eval}: given without data.train, it would be "
                         f"ignored (the synthetic task holds out its own pairs); give "
                         f"data.train too, or leave data.eval empty")


def _world_size() -> int:
    """Processes in the default process group (the training stages' ranks); 1 without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _global_batches(flat: dict) -> dict:
    """``<section>.batch_size`` (per process) of each training section replaced by
    ``<section>.global_batch_size`` (× world size: ``Parallel.global_batch``)."""
    world = None
    for section in _TRAIN_SECTIONS:
        key = f"{section}.batch_size"
        if key in flat:
            world = _world_size() if world is None else world
            flat[f"{section}.global_batch_size"] = flat.pop(key) * world
    return flat


def stage_options(cfg, sections: tuple[str, ...], *, overrides: dict | None = None,
                  upstream: dict | None = None) -> dict:
    """The options of ``sections`` (and seed, model, data) that a stage's result depends on,
    and the content identity of its input files and folders (:func:`input_identity`).

    ``overrides``: a section replaced by the dataclass the stage really uses (a named
    policy's own PolicyConfig); ``upstream``: ``{stage directory: digest}`` of its inputs.
    A training section's per-process ``batch_size`` is recorded as its
    ``global_batch_size`` (times the process group's world size).
    """
    check_ignored_options(cfg)
    tree = config_to_dict(cfg)
    for name, sub in (overrides or {}).items():
        tree[name] = asdict(sub)
    keep = {"seed", "model", "data", *sections}
    flat = {k: v for k, v in _flat(tree).items()
            if (k.split(".")[0] in keep or k in keep) and _kept(k)
            and not (v is None and omitted_when_none(k))}
    dist = cfg.distributed
    if dist.mode == "fsdp2" and dist.mixed_precision == "bf16" and cfg.model.dtype != "bfloat16":
        # FSDP2 computes in bf16 over float32 weights: a precision of the result, as
        # model.dtype is (recorded only then, so other runs' options are unchanged)
        flat["distributed.compute_dtype"] = "bfloat16"
    for section in sections:
        if flat.get(f"{section}.method") == "cdpo_code":
            # a mean over padded position slots: each micro-batch's padding is part of the
            # result, so the batch sizes that set it (per process, and the evaluation's) are
            # options of it (recorded for this preset only: others do not depend on them)
            sub = tree[section]
            flat[f"{section}.process_batch_size"] = sub["batch_size"]
            flat[f"{section}.eval_batch_size"] = sub["eval_batch_size"]
    return {"options": _global_batches(flat), "upstream": dict(upstream or {}),
            "inputs": input_identity(cfg)}


# ---------------------------------------------------------------------------- input identity

_MIB = 1 << 20
#: model-folder files hashed by size, first and last MiB (all others are hashed whole)
_WEIGHT_EXTS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
#: (path, inode, size, mtime, ctime, sampled) -> digest: each file is read once per process
_HASHED: dict = {}


def _file_digest(path: str, sampled: bool = False) -> str:
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns,
           sampled)
    if key not in _HASHED:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            if sampled and st.st_size > 2 * _MIB:
                h.update(b"%d:" % st.st_size + fh.read(_MIB))
                fh.seek(-_MIB, os.SEEK_END)
                h.update(fh.read(_MIB))
            else:
                for block in iter(lambda: fh.read(_MIB), b""):
                    h.update(block)
        _HASHED[key] = h.hexdigest()
    return _HASHED[key]


def _data_files(path: str) -> list[str]:
    """The files a data option reads: the file; a ``save_to_disk`` folder's files (not the
    ``cache-*`` files ``datasets`` writes next to them); a folder's top-level data files."""
    if os.path.isfile(path):
        return [path]
    if any(os.path.isfile(os.path.join(path, f)) for f in ("dataset_dict.json", "state.json")):
        out = []
        for root, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            out += [os.path.join(root, f) for f in sorted(files)
                    if not f.startswith((".", "cache-", "tmp"))]
        return out
    return [os.path.join(path, f) for f in sorted(os.listdir(path))
            if os.path.splitext(f)[1].lower() in DATA_EXTS
            and os.path.isfile(os.path.join(path, f))]


def _digest_of(entries) -> str:
    h = hashlib.sha256()
    for name, digest in entries:
        h.update(f"{name}\0{digest}\n".encode())
    return h.hexdigest()


def _identity(option: str, value) -> str | None:
    """``sha256:<hex>`` of a data option's files, ``folder:<hex>`` of a model folder; None
    when the path is missing (loading it names the option)."""
    paths = [str(p) for p in value] if isinstance(value, (list, tuple)) else [str(value)]
    if not all(os.path.exists(p) for p in paths):
        return None
    if option.startswith("data."):
        files = [(p, f) for p in paths for f in _data_files(p)]
        return "sha256:" + _digest_of((os.path.relpath(f, p), _file_digest(f))
                                      for p, f in files)
    # a model or tokenizer folder: what transformers reads are its top-level files; config,
    # tokenizer and other small files are hashed whole, each weight file by its size and its
    # first and last MiB (cheap for any model, and a retrained or replaced model differs there)
    path = paths[0]
    if os.path.isfile(path):
        return "folder:" + _file_digest(path)
    names = sorted(f for f in os.listdir(path) if not f.startswith(".")
                   and os.path.isfile(os.path.join(path, f)))
    return "folder:" + _digest_of((f, _file_digest(os.path.join(path, f),
                                                   sampled=f.endswith(_WEIGHT_EXTS)))
                                  for f in names)


def input_identity(cfg) -> dict:
    """``{option: identity}`` of the run's set input files and folders (data.train,
    data.eval, model.path, model.tokenizer)."""
    out = {}
    for option in _INPUTS:
        section, _, leaf = option.partition(".")
        value = getattr(getattr(cfg, section), leaf)
        ident = _identity(option, value) if value else None
        if ident is not None:
            out[option] = ident
    return out


# ---------------------------------------------------------------------------- comparing

def _load(path: str) -> dict | None:
    return read_json(path) if os.path.isfile(path) else None


def recorded_options(stage_dir: str) -> dict | None:
    """The flattened options a stage recorded in its options.json; None without one."""
    old = _load(os.path.join(stage_dir, OPTIONS_FILE))
    return None if old is None else dict(old.get("options", {}))


def stage_digest(stage_dir: str) -> str | None:
    """A digest of a finished stage's done.json and recorded options and upstream digests
    (not its inputs: an options.json completed with them keeps its digest); None when not
    finished. ``<section>.global_batch_size`` is digested under its older name
    ``<section>.batch_size``: an options.json rewritten with the new name when a one-process
    run resumes (the same number) keeps its digest, so later stages still match it."""
    if not stage_done(stage_dir):
        return None
    h = hashlib.sha256()
    with open(os.path.join(stage_dir, DONE_FILE), "rb") as fh:
        h.update(fh.read())
    path = os.path.join(stage_dir, OPTIONS_FILE)
    if os.path.isfile(path):
        with open(path, "rb") as fh:
            raw = fh.read()
        try:                        # as options.json was written before inputs were recorded
            old = json.loads(raw)
            if isinstance(old.get("options"), dict):
                old["options"] = {_BATCH_AS.get(k, k): v for k, v in old["options"].items()}
            raw = json.dumps({k: old[k] for k in ("options", "upstream") if k in old},
                             indent=1, sort_keys=True).encode()
        except (ValueError, TypeError):
            pass
        h.update(raw)
    return h.hexdigest()[:16]


def _differences(old: dict, new: dict, *, keys=None) -> list[str]:
    """Each difference, options first, then inputs and earlier stages; ``keys``: compare
    only options (and inputs) named there that both record."""
    out = []
    a, b = old.get("options", {}), new.get("options", {})
    legacy = {k: v for k, v in _RENAMED.items() if k in b and k not in a and v in a}
    names = sorted(set(a) | set(b)) if keys is None else \
        sorted(k for k in set(a) & set(b) if keys(k))
    # an option no longer recorded (model.check_head was) is no difference
    names = [k for k in names if k not in _IGNORED]
    for k in names:
        if k in legacy.values():            # then it held the value now under another name
            continue
        then, now = a.get(legacy.get(k, k), "<unset>"), b.get(k, "<unset>")
        if then != now:
            was = f" (recorded as {legacy[k]})" if k in legacy else ""
            out.append(f"{k}={then!r} then{was}, {now!r} now")
    ia, ib = old.get("inputs", {}), new.get("inputs", {})
    for k in sorted(set(ia) & set(ib)):
        if ia[k] != ib[k] and (keys is None or keys(k)):
            out.append(f"{k} {b.get(k)}: its content has changed ({ia[k][:19]} then, "
                       f"{ib[k][:19]} now)")
    if keys is None:
        ua, ub = old.get("upstream", {}), new.get("upstream", {})
        out += [f"the earlier stage {k} has changed" for k in sorted(set(ua) | set(ub))
                if ua.get(k, "<unset>") != ub.get(k, "<unset>")]
    return out


def _write(path: str, options: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_json(path, options, indent=1, sort_keys=True)


def check_options(out_dir: str, options: dict, *, desc: str, resume: bool,
                  reusable: bool, is_main: bool = True) -> None:
    """Refuse to reuse ``out_dir`` made with other options; record this run's options.

    ``reusable``: the directory holds something the stage would reuse (a finished output,
    checkpoints, shards). An options.json from before inputs were recorded is accepted and
    completed (by the main process).
    """
    path = os.path.join(out_dir, OPTIONS_FILE)
    if resume and reusable:
        old = _load(path)
        if old is None:                   # made before options were recorded: left as it is
            return
        new = json.loads(json.dumps(options))
        diff = _differences(old, new)
        if diff:
            more = f" (and {len(diff) - 1} more)" if len(diff) > 1 else ""
            raise StageOptionsChanged(
                f"{desc}: {out_dir} was made with other options: {diff[0]}{more}; rerun with "
                f"the same options to reuse it, use another --run_dir, or delete {out_dir} to "
                f"redo this stage")
        renamed = any(k in new["options"] and k not in old.get("options", {}) for k in _RENAMED)
        if is_main and ("inputs" not in old or renamed):
            _write(path, options)         # recorded before inputs (or under an older name)
        return
    if is_main:
        _write(path, options)


def enter_stage(ctx, out_dir: str, options: dict, desc: str, *,
                partial: bool = False) -> bool:
    """Check ``out_dir`` against this run's ``options`` (refusing a stage made with others)
    and record them; True when the stage is finished and is to be skipped. ``partial``: the
    directory holds partial work other than checkpoints (the weights pass's shards)."""
    resume, done = ctx.cfg.pipeline.resume, stage_done(out_dir)
    if not resume and ctx.par.is_main:
        # redone: the old results go before the new options are recorded, so that a redo
        # stopped before its first checkpoint never leaves them under the new options
        if done:
            os.remove(os.path.join(out_dir, DONE_FILE))
        remove_checkpoints(out_dir)
        done = False
    check_options(out_dir, options, desc=desc, resume=resume, is_main=ctx.par.is_main,
                  reusable=done or partial or bool(checkpoints(out_dir)))
    if resume and done:
        log.info("%s: already done (%s), skipping", desc, out_dir)
        return True
    ctx.par.barrier()
    return False


def _run_option(name: str) -> bool:
    return name in RUN_OPTIONS or name.startswith("model.tiny_")


def _check_same_run(cfg, stage_dir: str) -> None:
    """Refuse an earlier stage made from other records, model or seed than this run's."""
    old = _load(os.path.join(stage_dir, OPTIONS_FILE))
    if old is None:                       # made before options were recorded
        return
    diff = _differences(old, stage_options(cfg, ()), keys=_run_option)
    if diff:
        rel = os.path.relpath(stage_dir, cfg.run_dir)
        raise StageOptionsChanged(
            f"{rel} ({stage_dir}), an earlier stage this one reads, was made from other data: "
            f"{diff[0]}; give the options it was made with, use another --run_dir, or delete "
            f"{stage_dir} to redo it")


def upstream(ctx, *stage_dirs: str) -> dict:
    """Digests of the finished earlier stages a stage reads (the SFT stage always counts);
    refuses one made from other records, model or seed (:data:`RUN_OPTIONS`, inputs)."""
    out = {}
    for d in (ctx.path("sft"),) + stage_dirs:
        digest = stage_digest(d)
        if digest is not None:
            _check_same_run(ctx.cfg, d)
            out[os.path.relpath(d, ctx.cfg.run_dir)] = digest
    return out


def contrastive_options(ctx, variant: str) -> dict:
    """The options pi+ and pi- record (``contrastive/positive``, ``/negative``) for
    ``contrastive.variant`` = dpo or sft: the weights stage checks them the same way."""
    sections = ("contrastive", "pipeline") if variant == "dpo" else ("contrastive",)
    return stage_options(ctx.cfg, sections, upstream=upstream(ctx))
