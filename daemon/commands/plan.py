"""`gitlora plan [--vram GB --compute-capability X.Y] [--model M]`: the round configuration for a GPU."""
from __future__ import annotations

import argparse

from .. import config as config_mod


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="print the training plan for the detected or given GPU")
    p.add_argument("--model", default=None, help="base model (default: the configured one)")
    p.add_argument("--vram", type=float, default=None, help="GPU memory in GB (default: detect with nvidia-smi)")
    p.add_argument("--compute-capability", type=float, default=None, help="e.g. 7.5 for Turing")
    p.add_argument("--cpu", action="store_true", help="plan for the CPU fallback")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from gitlora.trainer import plan as planlib  # torch-free

    config = config_mod.load()
    model = args.model or config.train.base_model
    try:
        shape = planlib.model_shape(model)
    except ValueError as exc:
        print(f"gitlora: {exc}")
        return 2
    gpu = None
    if args.cpu:
        plan = planlib.make_plan(shape, None, lora_r=config.train.lora_r)
    elif args.vram is not None:
        plan = planlib.make_plan(shape, args.vram, args.compute_capability or 7.5, lora_r=config.train.lora_r)
    else:
        gpu = planlib.detect_gpu()
        plan = (planlib.make_plan(shape, gpu.total_gb, gpu.compute_capability, used_gb=gpu.used_gb,
                                  lora_r=config.train.lora_r) if gpu else planlib.make_plan(shape, None))
    print(planlib.format_plan(plan, gpu))
    return 0 if plan.fits else 1
