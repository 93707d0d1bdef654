"""The fast DSP trainer: DALI or torch loaders, fused kernels, AMP, channels_last, DDP, CUDA graphs.

    python -m dsp_fast.train                                     # the synthetic preset: source-only vs DSP
    torchrun --nproc_per_node=8 -m dsp_fast.train --config gta2cs \
        data.source_root=/data/gta5 data.target_root=/data/cityscapes   # prepared once, cached beside the data
    python -m dsp_fast.train --resume auto                       # continue the newest checkpoint, bit for bit

    python -m dsp_fast.train --config gta2cs --print-config      # the resolved config, nothing trained or created

`--config` takes a shipped preset's name (`--help` lists them) or a YAML file; flags and `section.field=value`
overrides mix in any order. Data and run folders are relative to the current folder.
Exit codes (docs/training.md): 0 done; 2 bad config, flag, data or --resume target; 3 too many non-finite steps;
4 a checkpoint could not be written; 130 / 143 SIGINT / SIGTERM, after the step in flight, with a checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

# OpenMP threads spin 1000 times, not libgomp's 300000, before they sleep while they wait for work: on a CPU shared
# with another job a spinning thread takes the core from a descheduled one and every operator stalls (two main jobs
# at once: 201 s with 1000 spins, over 20 minutes with 300000), while sleeping at once (OMP_WAIT_POLICY=PASSIVE)
# costs each of the step's operators a wake-up (the main job alone: 113 s with 1000 spins, 95 s with 300000, 175 s
# passive; docs/performance.md). libgomp reads this once, when torch loads it (the imports below); `python -m`
# runs only the package's __init__ (no torch) before this line. A spin count or wait policy the user set wins.
if "GOMP_SPINCOUNT" not in os.environ and "OMP_WAIT_POLICY" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = "1000"

from dsp_fast.checkpoint_file import EXIT_WRITE_FAILED, RunWriteError
from dsp_fast.config import (
    Config,
    ConfigError,
    add_cli_args,
    apply_cli_args,
    config_yaml,
    load_config,
    presets_help,
    split_overrides,
)
from dsp_fast.data import DatasetError
from dsp_fast.engine.checkpoint import CHECKPOINTS
from dsp_fast.engine.distributed import DistInfo
from dsp_fast.engine.job import run_all
from dsp_fast.engine.loop import NonFiniteStop
from dsp_fast.engine.signals import StopRequested
from dsp_fast.engine.trainer import resolved_settings
from dsp_fast.resume import ResumeError, resume_config
from dsp_fast.run_io import resolve_device


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Flags by argparse; every `section.field=value` word, wherever it stands, is an override."""
    parser = argparse.ArgumentParser(prog="python -m dsp_fast.train", description=__doc__.split("\n")[0],
                                     epilog=presets_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="synthetic", help="a preset's name (listed below) or a YAML file")
    parser.add_argument("--resume", nargs="?", const="auto", default="", metavar="PATH|auto",
                        help="continue from a checkpoint file, a run folder, or 'auto' (the newest in train.out_dir)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the config the run would write as config.yaml, with what this machine resolves "
                             "(amp, data backend, device), and exit: nothing trained, no folder or data created")
    add_cli_args(parser)
    parser.add_argument("overrides", nargs="*", help="section.field=value overrides, e.g. train.max_steps=100")
    flags, overrides = split_overrides(sys.argv[1:] if argv is None else list(argv))
    args = parser.parse_args(flags)
    args.overrides = [*args.overrides, *overrides]  # a stray word lands here and is named by load_config
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        def command_config() -> Config:
            return load_config(args.config, args.overrides)

        # --resume: the run folder's own config, the overrides on top (what it says goes to stderr under
        # --print-config, whose stdout is the YAML alone)
        with contextlib.redirect_stdout(sys.stderr) if args.print_config else contextlib.nullcontext():
            cfg = apply_cli_args(resume_config(args.resume, args.overrides, command_config, CHECKPOINTS), args)
        if args.print_config:
            info = DistInfo(device=resolve_device(cfg.train.device))
            print(config_yaml(cfg, resolved_settings(cfg.fast, info)), end="", flush=True)
            return 0
        run_all(cfg, args.resume)
    except (ConfigError, ResumeError, DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteStop as e:
        print(f"stopped: {e}", file=sys.stderr)
        return 3
    except RunWriteError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_WRITE_FAILED
    except StopRequested as e:  # every rank stopped at the same step; rank 0 tells the user
        if os.environ.get("RANK", "0") == "0":
            print(e.report(), file=sys.stderr, flush=True)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
