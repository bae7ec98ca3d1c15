"""``tisdpo``: the command line of the TIS-DPO(D) pipeline.

    tisdpo demo                                   # the whole pipeline on a synthetic task, CPU
    tisdpo pipeline --config run.yaml             # sft? -> contrastive -> weights -> train
    tisdpo contrastive --model.path ./llama --data.train pairs.jsonl --run_dir runs/x
    tisdpo weights --run_dir runs/x               # offline token weights (+ reference log-probs)
    tisdpo weights --run_dir runs/x --trl         # ... and a copy aligned to TRL's tokenisation
    tisdpo train --run_dir runs/x --policy.method tisdpo --policy.lr 5e-7
    tisdpo inspect --run_dir runs/x               # token-weight heat map (HTML + PNG)
    tisdpo train --run_dir runs/x --policy.name dpo-s1 --policy.method dpo --policy.seed 1
    tisdpo compare --run_dir runs/x --baseline dpo  # named policies: mean ± SE, paired diffs
    torchrun --nproc_per_node=8 -m tisdpo.cli train --run_dir runs/x --distributed.mode fsdp2

Every option is ``--section.option value`` (``tisdpo <command> --help`` lists them with their
defaults) and may instead be set in the YAML file given by ``--config``; flags win over the
file, the file over the defaults. The resolved configuration is logged, and written to
``<run_dir>/config.yaml`` by a run's first command and by every command that finishes (by
rank 0 alone when there are several processes), with the options of one command alone
(``pipeline.resume``, ``*.stop_after``) at their defaults.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
import traceback

from tisdpo.pipeline import stages, weights
from tisdpo.pipeline.compare import DEFAULT_GROUP, run_compare
from tisdpo.pipeline.context import StageStopped, make_context
from tisdpo.pipeline.demo import check_demo_options, demo_config, run_demo
from tisdpo.pipeline.heatmap import inspect_run
from tisdpo.pipeline.lock import RankFailed, RunLocked, run_lock
from tisdpo.train.config import (ConfigFileError, RunConfig, as_recorded, build_config,
                                 dump_yaml, field_specs)
from tisdpo.train.model import resolve_device
from tisdpo.train.parallel import setup, teardown, torchrun_env
from tisdpo.train.trainer import TrainingDiverged
from tisdpo_kernels.validate import check_env

COMMANDS = {
    "sft": ("supervised fine-tuning on the chosen responses (optional first stage)",
            ("model", "data", "sft", "pipeline", "log", "distributed")),
    "contrastive": ("train pi+ (DPO on the pairs) and pi- (DPO on reversed pairs), or the "
                    "SFT-/prompt-based variants",
                    ("model", "data", "contrastive", "pipeline", "log", "distributed")),
    "weights": ("offline token-weight estimation with pi+/pi- (+ reference log-probs); "
                "writes a weighted dataset", ("model", "data", "contrastive", "weights",
                                               "policy", "pipeline", "log",
                                               "distributed")),
    "train": ("train the policy with any loss preset (TIS-DPO by default) on the weighted data",
              ("model", "data", "policy", "weights", "pipeline", "log", "distributed")),
    "pipeline": ("run every stage in order: sft (if sft.enabled) -> contrastive -> weights -> "
                 "train; finished stages are skipped, unfinished ones resume",
                 ("model", "data", "sft", "contrastive", "weights", "policy", "pipeline",
                  "log", "distributed")),
    "inspect": ("render chosen/rejected token weights as a colour heat map (HTML + PNG)",
                ("model", "data", "weights", "policy")),
    "compare": ("compare a run's named policies (policy.name): per method mean ± standard "
                "error over seeds of the held-out metrics (and the synthetic task's sampled "
                "reward), paired differences vs a baseline; Markdown to stdout, JSON to "
                "<run_dir>/compare.json. Options default to <run_dir>/config.yaml",
                ("model", "data", "demo")),
    "demo": ("the whole pipeline on a synthetic task with planted good/bad tokens, on CPU in "
             "minutes; prints AUC of the weights and DPO vs TIS-DPO vs ablations",
             ("model", "data", "sft", "contrastive", "weights", "policy", "pipeline", "log",
              "demo")),
}
_TOP = ("seed", "run_dir", "device", "threads")


# defaults a command sets for itself (``demo_config``, whose values its --help shows) that
# --task and --fast change
_COMMAND_DEFAULTS = {("demo", "run_dir"): "'runs/demo'; 'runs/demo-hard' with --task hard; "
                                          "'-fast' appended with --fast"}


def _option(cfg, name: str):
    for part in name.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _add_options(parser: argparse.ArgumentParser, sections, command: str) -> None:
    own = demo_config() if command == "demo" else None      # the demo's own defaults
    groups = {}
    for spec in field_specs():
        section = spec.name.split(".")[0] if "." in spec.name else None
        if section is None and spec.name not in _TOP:
            continue
        if section is not None and section not in sections:
            continue
        group = groups.get(section)
        if group is None:
            group = groups[section] = parser.add_argument_group(
                f"{section} options" if section else "run options")
        help_text = spec.help
        if spec.choices:
            help_text += f" {{{', '.join(map(str, spec.choices))}}}"
        value = spec.default if own is None else _option(own, spec.name)
        default = _COMMAND_DEFAULTS.get((command, spec.name)) or (
            "empty" if value is None else repr(value))
        help_text += f" (default: {default})".replace("%", "%%")
        kwargs = dict(dest=spec.name, default=argparse.SUPPRESS, help=help_text,
                      metavar=spec.type.__name__.upper())
        if spec.type is bool:
            kwargs.update(nargs="?", const="true", metavar="BOOL")
        parser.add_argument(f"--{spec.name}", **kwargs)


class _Parser(argparse.ArgumentParser):
    """argparse without prefix matching (``--policy.warmup`` is not ``warmup_steps``), whose
    errors are one line naming the command, as every other refusal of the CLI is."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tisdpo", description=__doc__.split("\n\n")[0].replace("``", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `tisdpo <command> --help` for the options of a command.")
    sub = parser.add_subparsers(dest="command", metavar="command", required=True)
    for name, (help_text, sections) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", metavar="YAML", default=None,
                       help="YAML file of options, nested by section (flags override it)")
        p.add_argument("--print-config", action="store_true",
                       help="print the resolved configuration and exit")
        p.add_argument("--debug", action="store_true",
                       help="show the full traceback of an error instead of one line")
        if name == "demo":
            p.add_argument("--fast", action="store_true",
                           help="tiny sizes for a smoke test (seconds; numbers meaningless)")
            p.add_argument("--task", choices=("easy", "hard"), default=None,
                           help="the synthetic task (data.synthetic_task): easy = one-token "
                                "words; hard = multi-token words whose quality depends on "
                                "the prompt")
        if name == "compare":
            _compare_args(p)
        if name == "weights":
            p.add_argument("--trl", action="store_true",
                           help="also write the weighted records with their per-token weights "
                                "aligned to TRL's DPOTrainer tokenisation, for "
                                "tisdpo.integrations.trl (<run_dir>/weights/trl/{train,eval} "
                                "and .jsonl)")
        if name == "inspect":
            p.add_argument("--data", default=None, metavar="PATH",
                           help="weighted records to show (a save_to_disk directory or a "
                                ".jsonl file); default: <run_dir>/weights/<split>")
            p.add_argument("--split", default="eval", choices=("train", "eval"),
                           help="which split of <run_dir>/weights (default: eval)")
            p.add_argument("--pairs", type=int, default=6, help="how many pairs to show")
            p.add_argument("--start", type=int, default=0, help="first pair shown")
            p.add_argument("--out", default=None, metavar="DIR",
                           help="where to write inspect.html/inspect.png "
                                "(default: <run_dir>/inspect)")
        _add_options(p, sections, name)
    return parser


def _compare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policies", nargs="+", default=None, metavar="PATTERN",
                   help="only policies whose name matches one of these shell-style patterns "
                        "(default: every finished policy: policy/, policies/<name>/ and the "
                        "demo's policy-*/)")
    p.add_argument("--group", default=None, metavar="REGEX",
                   help="regular expression splitting a policy name into (?P<method>...) and "
                        "optionally (?P<seed>...); default %r reads <method>-s<seed> "
                        "(tisdpo_lr3e-5-s2: method tisdpo_lr3e-5, seed 2); a name without a "
                        "seed uses the seed its done.json records" % DEFAULT_GROUP.replace(
                            "%", "%%"))
    p.add_argument("--baseline", default=None, metavar="METHOD",
                   help="method the others are paired with by seed (default: dpo when "
                        "present, else the first method in sorted order)")
    p.add_argument("--metrics", default=None, metavar="KEYS",
                   help="comma-separated done.json metrics (default: eval/rewards/accuracies_"
                        "unweighted, eval/rewards/accuracies, eval/logps/chosen_delta, "
                        "eval/logps/rejected_delta)")
    p.add_argument("--reward", default="auto", choices=("auto", "on", "off"),
                   help="sample responses for the held-out pairs' prompts and score them with "
                        "the synthetic task's reward (auto: when data.train is empty)")


def _compare_config(args: argparse.Namespace) -> None:
    """compare and inspect read the run's own options: --config defaults to
    <run_dir>/config.yaml."""
    if args.config is None:
        run_dir = vars(args).get("run_dir", RunConfig().run_dir)
        path = os.path.join(run_dir, "config.yaml")
        if os.path.isfile(path):
            args.config = path


def resolve(args: argparse.Namespace, base: RunConfig | None = None, *,
            check: bool = True) -> RunConfig:
    """Defaults (or ``base``) < YAML file < command-line flags."""
    flags = {k: v for k, v in vars(args).items() if k in _TOP or "." in k}
    for short, name, value in (("--fast", "demo.fast", getattr(args, "fast", False) or None),
                               ("--task", "data.synthetic_task", getattr(args, "task", None))):
        if value is not None:
            if name in flags:
                raise ValueError(f"{short} and --{name} both given; give one")
            flags[name] = value
    return build_config(args.config, flags, base=base, check=check)


def _quiet_libraries() -> None:
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:  # pragma: no cover
        pass
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def main(argv: list[str] | None = None) -> int:
    args, extra = build_parser().parse_known_args(argv)
    if extra:                            # named under the command, in one line
        print(f"tisdpo {args.command}: unrecognized arguments: {' '.join(extra)} (see tisdpo "
              f"{args.command} --help)", file=sys.stderr)
        return 2
    if args.command in ("compare", "inspect"):   # the run's own tokenizer and lengths
        _compare_config(args)
    try:
        _check_args(args)
        base = None
        if args.command == "demo":       # its defaults follow demo.fast and the task, which
            probe = resolve(args, check=False)    # the file may set as well as the flags
            base = demo_config(fast=probe.demo.fast, task=probe.data.synthetic_task)
        cfg = resolve(args, base)
        if args.command == "demo":
            check_demo_options(cfg)  # before a run folder is written
        if args.command in STAGES or args.command == "demo":
            check_env()              # the TISDPO_* variables, before any stage reads them
    except ConfigFileError as err:
        print(f"tisdpo {args.command}: --config {err.path}: {err.reason}", file=sys.stderr)
        return 2
    except ValueError as err:
        print(f"tisdpo {args.command}: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return 0
    try:            # the machine's devices: after --print-config, which may be for another one
        if args.command in _ON_DEVICE and cfg.distributed.mode == "none":
            resolve_device(cfg.device)
    except ValueError as err:
        print(f"tisdpo {args.command}: {err}", file=sys.stderr)
        return 2
    rank = (torchrun_env() or (0, 1, 0))[0]           # under torchrun only rank 0 logs info
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    _quiet_libraries()
    try:
        code = _locked_run(args, cfg)
        teardown()                 # every rank got here: the process group goes, as torch asks
        return code
    except StageStopped as stop:
        teardown()                 # all ranks stopped at the same step
        logging.getLogger("tisdpo").info("%s", stop)
        return 128 + signal.Signals[stop.signal].value if stop.signal else 0
    except _EXPECTED as err:
        if args.debug:
            raise
        if isinstance(err, (RunLocked, RankFailed)):
            teardown()             # raised by the run lock on every rank, which all agreed on
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"tisdpo {args.command}: error: {first} (--debug shows the traceback)",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:                 # a second Ctrl-C: stop at once
        if args.debug:
            raise
        print(f"tisdpo {args.command}: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT.value
    except Exception as err:
        if args.debug or not _collective_failure(err):
            raise
        print(f"tisdpo {args.command}: error: another rank failed (see its error above); this "
              f"rank stopped at a collective ({_gist(err)}) (--debug shows the traceback)",
              file=sys.stderr)
        return 1


def _check_args(args: argparse.Namespace) -> None:
    """The options of a command that are not configuration options (``--pairs``, ...), and
    the launch: the commands that are not stages run as one process."""
    env = torchrun_env()
    if args.command not in STAGES and env is not None and env[1] > 1:
        raise ValueError(f"{args.command} runs as one process; launch it without torchrun "
                         f"(WORLD_SIZE={env[1]})")
    if args.command == "inspect":
        if args.pairs < 1:
            raise ValueError(f"--pairs must be >= 1, got {args.pairs}")
        if args.start < 0:
            raise ValueError(f"--start must be >= 0, got {args.start}")


# commands that always run on the ``device`` option's device (checked before they start;
# under distributed.mode ddp/fsdp2 each rank takes its LOCAL_RANK's GPU instead)
_ON_DEVICE = ("sft", "contrastive", "weights", "train", "pipeline", "demo")

# errors that are the user's input, data, files or a diverged run: one line, exit status 1
_EXPECTED = (ValueError, OSError, RunLocked, RankFailed, TrainingDiverged)

# where torch raises when a collective fails: a peer closed the connection or timed out
_COLLECTIVE_FILES = (os.sep.join(("torch", "distributed", "")),
                     os.sep.join(("torch", "nn", "parallel", "distributed.py")))
# autograd's engine, where DDP's gradient all-reduce raises (from C++: the message then
# starts with the communication library's source location, e.g. "[.../pair.cc:553] ...")
_BACKWARD_FILE = os.sep.join(("torch", "autograd", "graph.py"))
_NATIVE_LOCATION = re.compile(r"^\[[^\]\s]+\.(cc|cpp|cu|h):\d+\] ")


def _collective_failure(err: BaseException) -> bool:
    """Whether ``err`` is this rank's collective failing, with no error of its own before.

    Recognised by where torch raised it, not by its text (gloo raises a plain RuntimeError):
    a DistError, or a RuntimeError raised within torch.distributed or DDP, or in autograd's
    engine (DDP's gradient all-reduce), from the communication library (a native source
    location leading its message), while several processes share a process group and no
    other exception was being handled. A RuntimeError that torch.distributed's own Python
    code raises (FSDP2 refusing a shape, say) is this rank's error: its traceback stands.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return False
    if err.__context__ is not None or err.__cause__ is not None:
        return False
    if isinstance(err, dist.DistError):
        return True
    frames = traceback.extract_tb(err.__traceback__)
    if type(err) is not RuntimeError or not frames:
        return False
    # the collective may be a few frames down (FSDP2's state dict gathers through torch._ops)
    inside = any(part in f.filename for f in frames for part in _COLLECTIVE_FILES)
    return (inside or _BACKWARD_FILE in frames[-1].filename) and \
        bool(_NATIVE_LOCATION.match(str(err)))


def _gist(err: BaseException) -> str:
    """The first sentence of torch's message, without gloo's source location."""
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
    return text.split(". ")[0][:120]


def _processes(args, cfg: RunConfig):
    """A stage command's process group when it is one of several processes (None otherwise),
    made before the run lock so that rank 0 can tell the others whether it got it."""
    env = torchrun_env()
    if args.command not in STAGES or env is None or env[1] == 1:
        return None
    return setup(cfg.distributed, cfg.device, cfg.model.dtype)


def _locked_run(args, cfg: RunConfig) -> int:
    text = dump_yaml(cfg)
    if args.command in ("inspect", "compare"):    # they only read the run (compare.json aside)
        return _run(args, cfg)
    path = os.path.join(cfg.run_dir, "config.yaml")
    par = _processes(args, cfg)
    # the one rank that writes config.yaml (and holds the lock): rank 0 (several processes
    # run only a stage command, which then has its process group)
    first = par is None or par.is_main
    with run_lock(cfg.run_dir, par):       # before anything in run_dir is written
        if first and not os.path.isfile(path):   # a new run: its options from its first command
            dump_yaml(as_recorded(cfg), path)
        logging.getLogger("tisdpo").info("tisdpo %s, resolved configuration:\n%s",
                                         args.command, text)
        code = _run(args, cfg)
        # only a command that finished replaces it: a refused, failed or stopped one (options
        # that do not match the run's outputs, say) leaves the run's record as it was
        if first:
            dump_yaml(as_recorded(cfg), path)
        return code


# the stage commands: what each runs on the run's context
STAGES = {"sft": stages.run_sft, "contrastive": stages.run_contrastive,
          "weights": weights.run_weights, "train": stages.run_policy,
          "pipeline": stages.run_pipeline}


def _run(args, cfg: RunConfig) -> int:
    if args.command == "demo":
        run_demo(cfg)
        return 0
    if args.command == "compare":
        run_compare(cfg, policies=args.policies, group=args.group, baseline=args.baseline,
                    metrics=[m.strip() for m in args.metrics.split(",") if m.strip()]
                    if args.metrics else None, reward=args.reward)
        return 0
    if args.command == "inspect":
        paths = inspect_run(cfg, data=args.data, split=args.split, pairs=args.pairs,
                            start=args.start, out_dir=args.out)
        for p in paths:
            print(p)
        return 0
    ctx = make_context(cfg)
    out = STAGES[args.command](ctx)
    if args.command == "weights" and args.trl:
        from tisdpo.integrations.trl_weights import export_trl_weights, trl_weight_paths

        with ctx.par.main_first():                  # rank 0 writes the copy, the others wait
            paths = export_trl_weights(out, ctx.tokenizer) if ctx.par.is_main else \
                trl_weight_paths(out)
        out = "\n".join([out, *paths])
    if isinstance(out, dict):                       # pipeline: every stage's output
        out = "\n".join(f"{stage}: {o}" for stage, o in out.items())
    elif isinstance(out, tuple):                    # contrastive: pi+ and pi-
        out = "\n".join(out)
    print(out)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
