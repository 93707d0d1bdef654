"""The naive DSP reference trainer: plain eager PyTorch (fp32, NCHW, a PIL DataLoader), to be read beside the paper.

It is the correctness oracle of the fast trainer and the baseline of the throughput comparison, so it shares no
code with the fast path: it imports only config, data, models, evaluate, run_io, resume and the kernels'
plain-PyTorch twins (tests/test_reference_imports.py guards the rule). Its files: docs/layout.md.

    python -m dsp_fast.reference [--config synthetic|gta2cs|synthia2cs|FILE.yaml] [section.field=value ...]
"""

# ruff: noqa: F401 - the imports below are the package's public names
from dsp_fast.reference.choices import StepChoices, draw_choices, select_classes
from dsp_fast.reference.data import LongTailSource, RandomCrops, forever, random_window, to_tensor
from dsp_fast.reference.job import BadInputStop, ReferenceRun, build_run, main, next_batch, run, run_eval, train
from dsp_fast.reference.optim import Torch171SGD, build_optimizer, get_1x_lr_params_NOscale, poly_lr
from dsp_fast.reference.step import (
    class_mask,
    dsp_losses,
    ema_alpha,
    ema_update,
    paste_long_tail,
    seg_forward,
    soft_paste,
    source_loss,
    step_masks,
    train_step,
)
from dsp_fast.reference.strong_aug import StrongAug, draw_step_aug, draw_strong_aug, strong_augment
