"""Storage throughput: DCP checkpoint save and load, and model export (streamed safetensors +
digest, then the digest re-verified by reading back), against the local S3 server
(versitygw, posix backend, loopback) and against local disk, with the same state.

The state is a randomly initialised Qwen3-architecture model in bf16 (~630 MB with the
defaults; `--hidden/--layers` change it), in one process (world size 1, gloo). DCP writes the
model's state dict through `checkpoint.writer`/`checkpoint.reader` (DCP's FileSystemWriter
on disk; on S3 the parallel part streams of checkpoint.py); export is `export.export_hf`.
MB/s = bytes written or read / wall seconds (MB = 10^6 bytes); `*_cpu_s` are the CPU seconds
this process (`client`) and the S3 server (`server`) spent in that phase: the two share the
machine's cores. With `--repeat N` the summary keeps each store's best of N, disk and S3
measured alternately, and `s3_vs_disk` divides the two. The last stdout line is JSON.

Each checkpoint is loaded twice: straight after its save, from the page cache (the disk load
is then a memory copy), and again with its files evicted from the page cache, on disk and in
the S3 server's store alike (`dcp_load_cold_mb_s`): what a new attempt's pod reads when it
resumes, usually on another node.

    nice -n 10 .venv/bin/python bench/storage_throughput.py [--repeat 1]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build(hidden: int, layers: int):
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    from hack import sample as toy

    tok = toy.build_tokenizer()
    cfg = Qwen3Config(vocab_size=32000, hidden_size=hidden, intermediate_size=4 * hidden,
                      num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=8,
                      head_dim=hidden // 16, tie_word_embeddings=False, dtype="bfloat16")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    return model, tok


def init_dist():
    import torch.distributed as dist
    from flywheel_trainer.model import init_distributed

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    d = init_distributed()
    assert dist.get_world_size() == 1
    return d


def cpu_s(server: int) -> tuple[float, float]:
    """CPU seconds used so far by this process and by the S3 server's."""
    mine = resource.getrusage(resource.RUSAGE_SELF)
    with open(f"/proc/{server}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return mine.ru_utime + mine.ru_stime, (int(fields[11]) + int(fields[12])) / os.sysconf(
        "SC_CLK_TCK")


def evict(root: Path) -> None:
    """Write back and drop root's files from the page cache (as on a node that never read
    them); both stores' files live on this machine's disk."""
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def measure(label: str, uri: str, model, tok, base: str, d, server: int,
            files: Path) -> dict:
    import torch
    import torch.distributed.checkpoint as dcp
    from flywheel_trainer import checkpoint, storage
    from flywheel_trainer.export import digest_dir, export_hf

    state = {"model": model.state_dict()}
    ckpt = storage.join(uri, "ckpt")
    c0, t0 = cpu_s(server), time.perf_counter()
    dcp.save(state, storage_writer=checkpoint.writer(ckpt))
    save_s, c1 = time.perf_counter() - t0, cpu_s(server)
    ckpt_bytes = sum(e["size"] for e in storage.listdir(ckpt) if e["type"] == "file")
    target = {"model": {k: torch.empty_like(v) for k, v in state["model"].items()}}
    t0 = time.perf_counter()
    dcp.load(target, storage_reader=checkpoint.reader(ckpt))
    load_s, c2 = time.perf_counter() - t0, cpu_s(server)
    assert all(torch.equal(target["model"][k], v) for k, v in state["model"].items())
    evict(files)
    target = {"model": {k: torch.empty_like(v) for k, v in state["model"].items()}}
    t0 = time.perf_counter()
    dcp.load(target, storage_reader=checkpoint.reader(ckpt))
    cold_s = time.perf_counter() - t0
    assert all(torch.equal(target["model"][k], v) for k, v in state["model"].items())
    del target
    out = storage.join(uri, "model")
    t0 = time.perf_counter()
    artifact = export_hf(model, tok, base, out, d, shard_bytes=256 * 1024**2)
    export_s = time.perf_counter() - t0
    export_bytes = sum(e["size"] for e in storage.listdir(out) if e["type"] == "file")
    t0 = time.perf_counter()
    assert digest_dir(out) == artifact["digest"]
    verify_s = time.perf_counter() - t0
    mb = 1e6
    row = {"store": label, "checkpoint_mb": round(ckpt_bytes / mb, 1),
           "dcp_save_mb_s": round(ckpt_bytes / mb / save_s, 1),
           "dcp_load_mb_s": round(ckpt_bytes / mb / load_s, 1),
           "dcp_load_cold_mb_s": round(ckpt_bytes / mb / cold_s, 1),
           "save_cpu_s": {"client": round(c1[0] - c0[0], 2), "server": round(c1[1] - c0[1], 2)},
           "load_cpu_s": {"client": round(c2[0] - c1[0], 2), "server": round(c2[1] - c1[1], 2)},
           "export_mb": round(export_bytes / mb, 1),
           "export_mb_s": round(export_bytes / mb / export_s, 1),
           "verify_mb_s": round(export_bytes / mb / verify_s, 1)}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    from hack import local_s3

    work = Path(tempfile.mkdtemp(prefix="storage-bench-"))
    s3 = local_s3.new_credentials(local_s3.free_port())
    proc = local_s3.launch(s3, work / "s3", work / "versitygw.log")
    try:
        local_s3.create_buckets(s3, ["bench"])
        os.environ.update(s3.env())
        model, tok = build(args.hidden, args.layers)
        base = str(work / "base")  # no generation_config.json: export writes config + tokenizer
        os.makedirs(base)
        d = init_dist()
        rows = []
        for i in range(args.repeat):
            rows.append(measure("disk", str(work / f"disk-{i}"), model, tok, base, d, proc.pid,
                                work / f"disk-{i}" / "ckpt"))
            rows.append(measure("s3", f"s3://bench/run-{i}", model, tok, base, d, proc.pid,
                                work / "s3" / "data" / "bench" / f"run-{i}" / "ckpt"))
        best = {}
        for store in ("disk", "s3"):
            mine = [r for r in rows if r["store"] == store]
            best[store] = {k: max(r[k] for r in mine) for k in mine[0] if k.endswith("_mb_s")}
            best[store]["checkpoint_mb"] = mine[0]["checkpoint_mb"]
            best[store]["export_mb"] = mine[0]["export_mb"]
        ratio = {k: round(best["s3"][k] / best["disk"][k], 2)
                 for k in ("dcp_save_mb_s", "dcp_load_mb_s", "dcp_load_cold_mb_s")}
        print(json.dumps({"disk": best["disk"], "s3": best["s3"], "s3_vs_disk": ratio,
                          "repeat": args.repeat,
                          "params": sum(p.numel() for p in model.parameters())}))
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
