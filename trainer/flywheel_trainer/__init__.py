"""Flywheel trainer: fine-tunes Hugging Face causal LMs on `chat-tools` data with FSDP2.

Run contract (one pod per node, torchrun inside):

    torchrun --nnodes N --nproc-per-node G --node-rank $JOB_COMPLETION_INDEX \\
        --rdzv-backend c10d --rdzv-endpoint <rank-0 pod DNS>:29400 \\
        -m flywheel_trainer --config /etc/flywheel/config.json
    python -m flywheel_trainer --config CONFIG.json --preflight [--output PATH] [--world-size N]

Environment: FLYWHEEL_SUMMARY_PATH (default /dev/termination-log), FLYWHEEL_EXPERIMENT_KEY,
FLYWHEEL_RUN_NAME, FLYWHEEL_ATTEMPT, COMET_API_KEY (optional, from a Secret),
COMET_WORKSPACE, COMET_PROJECT_NAME, COMET_OFFLINE_DIRECTORY (optional), HF_TOKEN (hf:// base
models), FLYWHEEL_PVC_ROOT (where pvc://claim/path URIs are mounted, default /pvc).

Modules: config (torch-free spec models), storage (every URI: s3, gs, pvc, file, hf), data,
model (load + parallelize), checkpoint, evaluate, export, tracking (Comet + summary),
train (the loop), preflight, toy (test assets).
"""
