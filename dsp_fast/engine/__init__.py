"""dsp_fast.engine: the pieces of the fast trainer (`python -m dsp_fast.train`), one module per concern.

    options      the AMP dtype and whether graphs are on, from the config's `fast:` section
    step         the DSP step as a plain function over static buffers (no host sync), device-side choices
    features     channels_last, fused SGD with a device lr, GradScaler, DDP, input normalisation
    graphs       CUDA-graph capture of the step (CUDA only)
    checkpoint   exact-resume checkpoints (weights_only), keep-last-K, best
    data         prepared folders (the synthetic shift prepared once, cached) and the step-indexed loader
    monitor      progress line, TensorBoard (optional), image grids
    distributed  torchrun process group (gloo / NCCL) and teardown
    trainer      Trainer: models, optimizer, buffers, graphs, loader, run state; step, state_dict, close
    loop         one training run over the Trainer: logging, the guard, evaluation, checkpoints
    signals      SIGINT / SIGTERM stop at a step boundary with a checkpoint; SIGUSR1 checkpoints
    runner       the job: source-only and DSP runs, the target-mIoU table
"""
