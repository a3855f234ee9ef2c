"""Flywheel trainer: fine-tunes Hugging Face causal LMs on `chat-tools` data with FSDP2.

Run contract, as the operator renders it (one pod per node of an Indexed Job, torchrun inside,
static rendezvous at rank 0's stable DNS name, `<job>-0.<job>.<namespace>.svc`, port 29500):

    torchrun --nnodes N --nproc-per-node G --node-rank $(JOB_COMPLETION_INDEX) \\
        --master-addr <job>-0.<job>.<namespace>.svc --master-port 29500 \\
        -m flywheel_trainer --config /etc/flywheel/config.json
    python -m flywheel_trainer --config CONFIG.json --preflight [--output PATH] \\
        [--world-size N] [--device-memory-gb GB] [--show-examples N]

Environment: FLYWHEEL_SUMMARY_PATH (default /dev/termination-log), FLYWHEEL_EXPERIMENT_KEY,
FLYWHEEL_RUN_NAME, FLYWHEEL_ATTEMPT, COMET_API_KEY (optional, from a Secret),
COMET_WORKSPACE, COMET_PROJECT_NAME, COMET_OFFLINE_DIRECTORY (optional), HF_TOKEN (hf:// base
models), FLYWHEEL_PVC_ROOT (where pvc://claim/path URIs are mounted, default /pvc; the
operator mounts each claim a run names at /pvc/CLAIM).

Modules: config (torch-free spec models), storage (every URI: s3, gs, pvc, file, hf),
chat (chat templates: loss spans, tool-call formats), data, model (load + parallelize), memory
(per-GPU memory plan), checkpoint, evaluate, export, tracking (Comet + summary), train (the
Trainer and its steps), preflight. The sample's tiny model and data live in hack/sample.py.
"""
