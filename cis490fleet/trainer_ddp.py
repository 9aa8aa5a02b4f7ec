"""The built-in trainer on several GPUs: one process per GPU, DistributedDataParallel, rank 0 saves.

Used by ``train`` when ``CIS490_GPUS`` (how many GPUs the job was given, set by the worker) is above 1 and
the model is a network (gbt trains in one process). Each rank trains on every world-th sample of the
epoch's shuffled order (one shared seed, so the ranks agree on it), gradients are averaged across ranks
by DDP, and rank 0 writes progress and the output folder exactly as the one-process trainer does. With
CUDA each rank uses its own device (``cuda:<rank>`` of the visible ones) and the NCCL backend; without
CUDA the ranks are CPU processes on gloo, which is how the tests run it.

A SIGTERM reaches every rank (the worker signals the trainer's process group); the ranks agree on it
once per step (a max all-reduce), stop together and rank 0 saves what there is. This mode keeps no
checkpoints: an interrupted multi-GPU job starts over on its next attempt.
"""

from __future__ import annotations

import os
import signal
import socket
import sys

from cis490fleet import trainer


def _rendezvous_port() -> int:
    """A free loopback port below the kernel's ephemeral range (32768 and up by default): a port the kernel
    picked for us is free only until rank 0 binds it, and on a busy host an outgoing connection may be given
    it meanwhile (rank 0 then aborts)."""
    import random

    for port in random.sample(range(20000, 32768), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(job: "trainer.Job", world: int) -> int:
    """Train ``job`` on ``world`` processes; the exit code of rank 0 (143 after a SIGTERM)."""
    import torch
    import torch.multiprocessing as mp

    port = _rendezvous_port()
    cuda = job.device_requested and torch.cuda.is_available()
    if cuda and torch.cuda.device_count() < world:
        print(f"cis490fleet train: the job was given {world} GPUs but CUDA sees {torch.cuda.device_count()}; "
              f"training on {torch.cuda.device_count()}", file=sys.stderr)
        world = torch.cuda.device_count()
    job.out.mkdir(parents=True, exist_ok=True)
    print(f"train {job.model}: DistributedDataParallel over {world} processes "
          f"({'nccl on CUDA' if cuda else 'gloo on the CPU'})", flush=True)
    done = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_rank, args=(world, port, job, cuda, done), nprocs=world, join=True)
    return int(done.get())


def _rank(rank: int, world: int, port: int, job: "trainer.Job", cuda: bool, done) -> None:
    import torch
    import torch.distributed as dist

    stop = trainer._Stop()
    signal.signal(signal.SIGTERM, stop)
    torch.set_num_threads(1)
    torch.manual_seed(job.seed)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        device = torch.device(f"cuda:{rank}" if cuda else "cpu")
        if cuda:
            torch.cuda.set_device(device)
        code = _fit(torch, dist, rank, world, job, device, stop)
        if rank == 0:
            done.put(code)
        # Every rank leaves the group together: a rank that tore its gloo context down while rank 0 was still
        # saving was seen to abort ("terminate called without an active exception") on a busy host.
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Leave without the interpreter's teardown: gloo's threads can still be joinable when C++ destroys its
    # statics, and the process then aborts ("terminate called without an active exception") after finishing.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _fit(torch, dist, rank: int, world: int, job: "trainer.Job", device, stop) -> int:
    h = job.hyper
    x_train, y_train, x_val, y_val, classes = trainer.load_dataset(job)
    xt = torch.tensor(x_train, dtype=torch.float32, device=device)
    yt = torch.tensor(y_train, dtype=torch.long, device=device)
    check = ((torch.tensor(x_val, dtype=torch.float32, device=device),
              torch.tensor(y_val, dtype=torch.long, device=device)) if len(y_val) else (xt, yt))
    split = "val" if len(y_val) else "train"
    net = trainer.make_net(torch, job, xt.shape[1], len(classes))
    net.to(device)
    model = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda"
                                                      else None)
    optimizer = torch.optim.SGD(model.parameters(), lr=h["lr"], momentum=0.9, weight_decay=h["weight_decay"])
    loss_fn = torch.nn.CrossEntropyLoss()
    shuffle = torch.Generator().manual_seed(job.seed)
    lines = [f"train {job.model} mode={job.mode} seed={job.seed} split={job.split_recipe} device={device.type} "
             f"world={world} hyper={job.hyper}"]
    history: list[dict] = []
    step, epochs, interrupted = 0, h["epochs"], False
    batch = max(1, h["batch_size"] // world)
    for epoch in range(1, epochs + 1):
        model.train()
        mine = torch.randperm(len(yt), generator=shuffle)[rank::world].to(device)
        total, seen = 0.0, 0
        for start in range(0, len(mine), batch):
            if _any(torch, dist, stop.requested, device):
                interrupted = True
                break
            idx = mine[start:start + batch]
            optimizer.zero_grad()
            loss = loss_fn(model(xt[idx]), yt[idx])
            loss.backward()
            optimizer.step()
            step += 1
            total += loss.item() * len(idx)
            seen += len(idx)
        if interrupted:
            break
        metrics = trainer._evaluate(torch, net, loss_fn, *check, split)
        row = {"step": step, "epoch": epoch, "epochs": epochs, "loss": total / max(seen, 1), "metrics": metrics,
               "fraction": epoch / epochs}
        peak = _peak_vram_gib(torch, dist, device)
        if peak is not None:
            row["peak_vram_gib"] = peak
        history.append({"epoch": epoch, "train_loss": row["loss"], **metrics})
        if rank == 0:
            line = f"epoch {epoch}/{epochs} loss {row['loss']:.6f} " + " ".join(
                f"{k} {v:.6f}" for k, v in sorted(metrics.items()))
            lines.append(line)
            print(line, flush=True)
            trainer._report(job.progress, row)
    if rank == 0:
        if interrupted:
            lines.append(f"stopped by SIGTERM after {len(history)} of {epochs} epochs; saving what there is")
            print(lines[-1], flush=True)
        trainer._save(torch, job, net.state_dict(), history, lines, device.type, epochs, interrupted)
    return trainer.EXIT_TERMINATED if interrupted else 0


def _any(torch, dist, flag: bool, device) -> bool:
    """Whether any rank has the flag set (every rank must call it at the same step)."""
    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _peak_vram_gib(torch, dist, device) -> float | None:
    """The largest peak of allocated VRAM over the ranks, in GiB; None on the CPU."""
    if device.type != "cuda":
        return None
    t = torch.tensor([torch.cuda.max_memory_allocated(device) / 2**30], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return round(float(t.item()), 3)


def world_size() -> int:
    """How many GPUs the worker gave the job (``CIS490_GPUS``); 1 when unset or not a number."""
    try:
        return max(1, int(os.environ.get("CIS490_GPUS") or 1))
    except ValueError:
        return 1
