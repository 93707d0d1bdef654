"""dsp_fast.engine: the fast trainer (`python -m dsp_fast.train`), one module per concern.

    trainer      Trainer: models, optimizer, buffers, graphs, loader, run state; step, state_dict, close;
                 the settings decided once (autocast dtype, graphs on or off, per-rank batch, data backend)
    step         the DSP step as a plain function over static buffers (no host sync); the logged sums
    model_setup  the models built, channels_last, DDP, torch.compile, input normalisation on the device
    optimizer    fused SGD / AdamW with a device lr, the script's repeated updates, lr schedule, GradScaler
    batchnorm    batch norm over ranks (SyncBatchNorm, GlobalBatchNorm2d) and per group (the batched student)
    fused_bn     DeepLabv2's BN -> ReLU (-> + identity) chains as fused kernels (fast.fused_bn)
    graphs       CUDA-graph capture of the step (CUDA only), eager fallback
    data_setup   the data checked, prepared once (cached) and the step-indexed loader built
    distributed  torchrun process group (gloo / NCCL), teardown, the per-rank batch and the collectives
    checkpoint   the fast trainer's checkpoint files: write, keep-last-K, best, RNG state
    monitor      progress line and metrics (run_io.RunLog), TensorBoard (optional), image grids
    loop         one training run over the Trainer: logging, the guard, evaluation, checkpoints, signals
    signals      SIGINT / SIGTERM stop at a step boundary with a checkpoint; SIGUSR1 checkpoints
    job          the job: source-only and DSP runs, the target-mIoU table, resume and exit codes
"""
