"""The built-in example trainer (``train``): the reference for the trainer contract.

The contract a worker relies on, for this trainer and any other:

- arguments ``--model M --mode MODE --hyper JSON --seed N --split-recipe R --out DIR``
  (``--out`` defaults to ``$CIS490_OUT``); also set: ``CIS490_JOB_ID``,
  ``CIS490_ATTEMPT``, ``CIS490_PROGRESS``, ``CUDA_VISIBLE_DEVICES`` and ``CIS490_GPUS``;
- everything the job produces goes into the output folder, which the worker
  bundles and uploads; the same job on the same host should give bit-identical
  files (no timestamps, no attempt numbers) so re-runs deduplicate;
- one JSON line per step appended to ``$CIS490_PROGRESS``:
  ``{"step", "epoch", "epochs", "loss", "metrics": {...}, "fraction"}``;
- exit 0 on success, 2 for bad arguments (a one-line message), and on SIGTERM
  save what there is and exit 143;
- checkpoints, optional: ``CIS490_CHECKPOINT_DIR`` is a folder to keep the newest
  checkpoint in, each written atomically (a temporary file, then a rename), after
  which a progress line names it (``"checkpoint": "<file name>"``); the worker
  uploads that folder. ``CIS490_RESUME_FROM``, when set, is a folder holding the
  newest checkpoint folder of an earlier attempt of the same job, verified by the
  worker: the trainer carries on from there. This trainer checkpoints after every
  epoch (every tree for gbt) and on SIGTERM, and a resumed run ends with the same
  bytes in its output folder as an uninterrupted one (on the CPU): the checkpoint
  holds the model, the optimizer, every random state, the shuffled order of the
  epoch in progress and the history;
- ``--describe`` prints ``{model: [hyper keys]}`` as JSON, quickly.

- ``CIS490_GPUS``: how many GPUs the job was given (``CUDA_VISIBLE_DEVICES`` lists
  them); above 1 this trainer runs one process per GPU with DistributedDataParallel
  (trainer_ddp.py; gloo CPU processes without CUDA), networks only;
- on CUDA a progress line may carry ``peak_vram_gib`` (``torch.cuda.max_memory_allocated``):
  the coordinator keeps each job's peak and uses its model's as a rerun's VRAM need.

This module and trainer_ddp.py are the only ones that import torch, and only inside
``_train`` (and the ranks trainer_ddp starts).
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import math
import os
import random
import re
import signal
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

EXIT_USAGE = 2
EXIT_TERMINATED = 128 + 15
CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = 1

# Defaults per model; the keys are what `--describe` reports.
HYPER_DEFAULTS: dict[str, dict[str, float | int]] = {
    "gbt": {"lr": 0.3, "trees": 20, "max_depth": 3, "min_leaf": 5, "bins": 32, "l2": 1.0},
    "logreg": {"lr": 0.1, "epochs": 10, "batch_size": 32, "weight_decay": 0.0},
    "mlp": {"lr": 0.05, "epochs": 10, "hidden": 32, "batch_size": 32, "weight_decay": 0.0},
}
# Whole-number keys and their upper bounds (a deep tree has 2**max_depth leaves).
INT_KEYS = {"epochs": None, "hidden": None, "batch_size": None, "trees": None, "max_depth": 12, "min_leaf": None,
            "bins": 256}

SAMPLES = 512
FEATURES = 8
CLASSES = 2
RECIPE_RE = re.compile(r"^holdout-(\d{1,2})$")
DATA_KEY = "data"            # hyper key naming a table, so the table is part of the job's id
PACKAGE_DATA = "package:"    # a table shipped in cis490fleet/data/ (inside the zipapp: on every worker)
LABEL_COLUMN = "label"       # else the last column is the label


class UsageError(Exception):
    """Bad arguments: printed as one line, exit 2."""


@dataclass(frozen=True)
class Job:
    model: str
    mode: str
    hyper: dict
    seed: int
    split_recipe: str
    holdout: float
    out: Path
    progress: Path | None
    device_requested: bool
    checkpoint_dir: Path | None = None
    resume_from: Path | None = None
    init_from: Path | None = None  # a parent job's extracted bundle: start from its model.pt
    data: str | None = None

    def identity(self) -> dict:
        """What a checkpoint must match to be resumed by this job."""
        return {"model": self.model, "mode": self.mode, "hyper": self.hyper, "seed": self.seed,
                "split_recipe": self.split_recipe}


def describe() -> dict[str, list[str]]:
    return {name: sorted([*keys, DATA_KEY]) for name, keys in sorted(HYPER_DEFAULTS.items())}


def validate_hyper(model_name: str, raw: object) -> dict:
    """Defaults filled in; every problem named in one message."""
    if not isinstance(raw, dict):
        raise UsageError(f"--hyper must be a JSON object like '{{\"lr\": 0.01}}', got {json.dumps(raw)}")
    accepted = HYPER_DEFAULTS[model_name]
    unknown = sorted(set(raw) - set(accepted) - {DATA_KEY})
    if unknown:
        raise UsageError(f"unknown hyper key(s) {', '.join(map(repr, unknown))} for model {model_name}; "
                         f"accepted: {', '.join(sorted(accepted))}")
    hyper = dict(accepted)
    for key, value in raw.items():
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if key == DATA_KEY:
            if not isinstance(value, str) or not value.strip():
                raise UsageError(f"hyper data must name a table (package:NAME or a CSV file), got {json.dumps(value)}")
            hyper[key] = value
            continue
        if key in INT_KEYS:
            top = INT_KEYS[key]
            if not (is_number and float(value).is_integer() and 1 <= value <= (top or value)):
                bounds = f"from 1 to {top}" if top else ">= 1"
                raise UsageError(f"hyper {key} must be a whole number {bounds}, got {json.dumps(value)}")
            value = int(value)
        elif key == "lr":
            if not (is_number and math.isfinite(value) and value > 0):
                raise UsageError(f"hyper lr must be a number > 0, got {json.dumps(value)}")
        elif not (is_number and math.isfinite(value) and value >= 0):
            raise UsageError(f"hyper {key} must be a number >= 0, got {json.dumps(value)}")
        hyper[key] = value if key in INT_KEYS else float(value)
    return hyper


def holdout_fraction(recipe: str) -> float:
    if recipe == "default":
        return 0.2
    if recipe == "full":
        return 0.0
    match = RECIPE_RE.match(recipe)
    if match and 1 <= int(match.group(1)) <= 90:
        return int(match.group(1)) / 100
    raise UsageError(f"unknown split recipe {recipe!r}; use 'default' (20% held out), 'full' (none) "
                     "or 'holdout-N' with N from 1 to 90")


def make_dataset(seed: int, holdout: float) -> tuple[list, list, list, list]:
    """A synthetic, non-linear two-class problem drawn from ``seed`` alone (no download, any platform)."""
    rng = random.Random(f"cis490fleet-data-{seed}")
    xs, ys = [], []
    for _ in range(SAMPLES):
        x = [rng.gauss(0.0, 1.0) for _ in range(FEATURES)]
        score = math.sin(2 * x[0]) + x[1] * x[2] - 0.5 * x[3] + 0.25 * x[4] + rng.gauss(0.0, 0.2)
        xs.append(x)
        ys.append(1 if score > 0 else 0)
    order = list(range(SAMPLES))
    rng.shuffle(order)
    n_val = int(round(SAMPLES * holdout))
    val, train = order[:n_val], order[n_val:]
    return [xs[i] for i in train], [ys[i] for i in train], [xs[i] for i in val], [ys[i] for i in val]


def read_table(ref: str) -> tuple[str, str]:
    """(the CSV text, where it came from) of ``package:NAME`` (cis490fleet/data/NAME) or a file path."""
    if ref.startswith(PACKAGE_DATA):
        import importlib.resources

        name = ref[len(PACKAGE_DATA):]
        entry = importlib.resources.files("cis490fleet").joinpath("data", name)
        if "/" in name or "\\" in name or not name or not entry.is_file():
            shipped = sorted(e.name for e in importlib.resources.files("cis490fleet").joinpath("data").iterdir()
                             if e.name.endswith(".csv"))
            raise UsageError(f"no table {name!r} ships with cis490fleet; shipped: {', '.join(shipped)}")
        return entry.read_text(encoding="utf-8"), ref
    try:
        return Path(ref).read_text(encoding="utf-8"), ref
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"cannot read the data file {ref!r} ({getattr(err, 'strerror', None) or err}); give a "
                         f"path every worker has (an absolute path on a shared mount) or {PACKAGE_DATA}NAME") from None


def load_table(ref: str) -> tuple[list[list[float]], list[str]]:
    """Features and labels of a CSV with a header: the ``label`` column (else the last) is the class, every
    other column a number. Every problem is a UsageError naming the line."""
    import csv

    text, where = read_table(ref)
    rows = [r for r in csv.reader(io.StringIO(text)) if any(cell.strip() for cell in r)]
    if len(rows) < 3:
        raise UsageError(f"{where}: expected a header and at least two rows")
    header = [h.strip() for h in rows[0]]
    label_at = header.index(LABEL_COLUMN) if LABEL_COLUMN in header else len(header) - 1
    xs, ys = [], []
    for number, row in enumerate(rows[1:], 2):
        if len(row) != len(header):
            raise UsageError(f"{where} line {number}: {len(row)} values, the header has {len(header)}")
        try:
            x = [float(v) for i, v in enumerate(row) if i != label_at]
        except ValueError:
            raise UsageError(f"{where} line {number}: every column but {header[label_at]!r} must be a number") from None
        if not all(math.isfinite(v) for v in x):
            raise UsageError(f"{where} line {number}: a value is not finite")
        xs.append(x)
        ys.append(row[label_at].strip())
    return xs, ys


def load_dataset(job: "Job") -> tuple[list, list, list, list, list[str]]:
    """(x_train, y_train, x_val, y_val, class names) of the job: its table, split by its recipe with its seed
    and standardised by the training rows' mean and spread; else the synthetic set of ``make_dataset``."""
    if job.data is None:
        return (*make_dataset(job.seed, job.holdout), ["0", "1"])
    xs, labels = load_table(job.data)
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise UsageError(f"{job.data}: the label column has one class ({classes[0]!r}); a classifier needs two")
    if job.model == "gbt" and len(classes) != 2:
        raise UsageError(f"{job.data}: gbt is a two-class model and the labels have {len(classes)} classes "
                         f"({', '.join(classes)}); use mlp or logreg, or a two-class table")
    ys = [classes.index(v) for v in labels]
    order = list(range(len(xs)))
    random.Random(f"cis490fleet-split-{job.seed}").shuffle(order)
    n_val = int(round(len(xs) * job.holdout))
    val, train = order[:n_val], order[n_val:]
    if not train:
        raise UsageError(f"{job.data}: split {job.split_recipe!r} leaves no training rows")
    columns = list(zip(*(xs[i] for i in train)))
    mean = [sum(c) / len(c) for c in columns]
    spread = [math.sqrt(sum((v - m) ** 2 for v in c) / len(c)) or 1.0 for c, m in zip(columns, mean)]

    def scaled(i: int) -> list[float]:
        return [(v - m) / d for v, m, d in zip(xs[i], mean, spread)]

    return ([scaled(i) for i in train], [ys[i] for i in train], [scaled(i) for i in val], [ys[i] for i in val],
            classes)


def parse_args(argv: list[str]) -> Job | None:
    parser = argparse.ArgumentParser(prog="cis490fleet train", description="The built-in example trainer.")
    parser.add_argument("--describe", action="store_true", help="print the accepted hyper keys per model as JSON")
    parser.add_argument("--model", choices=sorted(HYPER_DEFAULTS))
    parser.add_argument("--mode", default="default", help="a label for the variant; recorded in metrics.json")
    parser.add_argument("--hyper", default="{}", help="JSON object of hyper-parameters")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split-recipe", default="default")
    parser.add_argument("--train-hosts", default="[]", help="accepted for the contract; unused here")
    parser.add_argument("--data", metavar="FILE", help="train on this CSV (a 'label' column, else the last one, is "
                        f"the class) instead of the synthetic set: {PACKAGE_DATA}NAME for a table shipped with "
                        "cis490fleet, else a path every worker has; a manifest's job gives it as hyper data")
    parser.add_argument("--out", default=os.environ.get("CIS490_OUT"), help="output folder (default: $CIS490_OUT)")
    parser.add_argument("--init-from", metavar="DIR",
                        help="start from the weights in DIR/model.pt (an earlier job's bundle, e.g. {input.NAME}); "
                             "with --mode finetune and no --init-from: the one input in $CIS490_INPUTS")
    args = parser.parse_args(argv)
    if args.describe:
        return None
    if not args.model:
        raise UsageError(f"--model is required; one of {', '.join(sorted(HYPER_DEFAULTS))}")
    if not args.out:
        raise UsageError("no output folder: pass --out DIR or set CIS490_OUT")
    try:
        raw = json.loads(args.hyper)
    except json.JSONDecodeError as err:
        raise UsageError(f"--hyper is not valid JSON ({err.msg} at character {err.pos}): {args.hyper}") from None
    hyper = validate_hyper(args.model, raw)
    if args.data and hyper.get(DATA_KEY, args.data) != args.data:
        raise UsageError(f"--data {args.data!r} and hyper data {hyper[DATA_KEY]!r} differ; give one of them")
    cuda = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    progress = os.environ.get("CIS490_PROGRESS")
    checkpoint_dir = os.environ.get("CIS490_CHECKPOINT_DIR")
    resume_from = os.environ.get("CIS490_RESUME_FROM")
    init_from = Path(args.init_from) if args.init_from else None
    if init_from is None and args.mode == "finetune":
        init_from = _only_input(os.environ.get("CIS490_INPUTS"))
    if init_from is not None and args.model == "gbt":
        raise UsageError("--init-from (or --mode finetune) works for mlp and logreg; gbt trains its trees afresh")
    if init_from is not None and not (init_from / "model.pt").is_file():
        raise UsageError(f"{init_from / 'model.pt'} does not exist: --init-from needs the folder of an earlier "
                         "job's bundle (one that holds model.pt)")
    return Job(model=args.model, mode=args.mode, hyper=hyper, seed=args.seed,
               split_recipe=args.split_recipe, holdout=holdout_fraction(args.split_recipe), out=Path(args.out),
               progress=Path(progress) if progress else None,
               device_requested=bool(cuda) and cuda not in ("-1", "none", "NoDevFiles"),
               checkpoint_dir=Path(checkpoint_dir) if checkpoint_dir else None,
               resume_from=Path(resume_from) if resume_from else None, init_from=init_from,
               data=hyper.get(DATA_KEY) or args.data)


def _only_input(inputs: str | None) -> Path:
    """The one input folder a finetune job starts from; a usage error when there is none or several."""
    folders = sorted(p for p in Path(inputs).iterdir() if p.is_dir()) if inputs and Path(inputs).is_dir() else []
    if len(folders) != 1:
        found = ", ".join(p.name for p in folders) or "none"
        raise UsageError(f"--mode finetune starts from the one job this job is 'after' (inputs found: {found}); "
                         "give the job exactly one 'after', or pass --init-from DIR")
    return folders[0]


class _Stop:
    """Set by SIGTERM; the training loop checks it between batches."""

    requested = False

    def __call__(self, signum, frame) -> None:
        self.requested = True


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        job = parse_args(argv)
    except UsageError as err:
        print(f"cis490fleet train: {err}", file=sys.stderr)
        return EXIT_USAGE
    if job is None:
        print(json.dumps(describe(), sort_keys=True))
        return 0
    stop = _Stop()
    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: the caller owns signals
        previous = None
    try:
        return _train(job, stop)
    except UsageError as err:
        print(f"cis490fleet train: {err}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _train(job: Job, stop: _Stop) -> int:
    # cuBLAS is only deterministic with a fixed workspace; it must be set before CUDA starts.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # torch warns on stderr when numpy is absent; this trainer never uses numpy.
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    try:
        import torch
    except ImportError:
        print("cis490fleet train: torch is not installed; install it (pip install torch) or use another trainer",
              file=sys.stderr)
        return 1
    if stop.requested:
        return EXIT_TERMINATED
    from cis490fleet import trainer_ddp

    world = trainer_ddp.world_size()
    if world > 1 and job.model != "gbt":
        return trainer_ddp.run(job, world)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.manual_seed(job.seed)
    device = torch.device("cuda" if job.device_requested and torch.cuda.is_available() else "cpu")

    try:
        x_train, y_train, x_val, y_val, classes = load_dataset(job)
    except UsageError as err:
        print(f"cis490fleet train: {err}", file=sys.stderr)
        return EXIT_USAGE
    xt = torch.tensor(x_train, dtype=torch.float32, device=device)
    yt = torch.tensor(y_train, dtype=torch.long, device=device)
    xv = torch.tensor(x_val, dtype=torch.float32, device=device)
    yv = torch.tensor(y_val, dtype=torch.long, device=device)

    job.out.mkdir(parents=True, exist_ok=True)
    lines = [f"train {job.model} mode={job.mode} seed={job.seed} split={job.split_recipe} device={device.type} "
             f"hyper={json.dumps(job.hyper, sort_keys=True)} train={len(y_train)} val={len(y_val)}"]
    print(lines[0], flush=True)
    history: list[dict] = []
    epochs = job.hyper["trees" if job.model == "gbt" else "epochs"]

    resumed = _load_checkpoint(torch, job)
    if resumed is not None:
        history[:] = resumed["history"]
        lines[1:] = resumed["lines"][1:]
        torch.set_rng_state(resumed["torch_rng"])
        random.setstate(resumed["python_rng"])
        print(f"resuming from the checkpoint in {job.resume_from} after {len(history)} of {epochs} epochs",
              flush=True)

    def checkpoint(fit_state: dict) -> str | None:
        """Write the newest checkpoint (atomically); its file name, or None without CIS490_CHECKPOINT_DIR."""
        if job.checkpoint_dir is None:
            return None
        data = {"format": CHECKPOINT_FORMAT, "job": job.identity(), "fit": fit_state, "history": history,
                "lines": lines, "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}
        buffer = io.BytesIO()
        torch.save(data, buffer)
        try:
            _write_atomic(job.checkpoint_dir / CHECKPOINT_NAME, buffer.getvalue())
        except OSError as err:
            print(f"cis490fleet train: cannot write a checkpoint to {job.checkpoint_dir}: {err}", file=sys.stderr)
            return None
        return CHECKPOINT_NAME

    def epoch_done(epoch: int, step: int, train_loss: float, metrics: dict, fit_state: dict) -> None:
        entry = {"epoch": epoch, "train_loss": train_loss, **metrics}
        history.append(entry)
        line = f"epoch {epoch}/{epochs} loss {train_loss:.6f} " + " ".join(
            f"{k} {v:.6f}" for k, v in sorted(metrics.items()))
        lines.append(line)
        print(line, flush=True)
        row = {"step": step, "epoch": epoch, "epochs": epochs, "loss": train_loss, "metrics": metrics,
               "fraction": epoch / epochs}
        if device.type == "cuda":
            row["peak_vram_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
        name = checkpoint(fit_state)
        _report(job.progress, {**row, "checkpoint": name} if name else row)

    def stopped(fit_state: dict) -> None:
        name = checkpoint(fit_state)
        if name:
            done = len(history)
            _report(job.progress, {"epoch": done, "epochs": epochs, "fraction": done / epochs, "checkpoint": name})

    fit = _fit_gbt if job.model == "gbt" else functools.partial(_fit_net, classes=len(classes))
    state = fit(torch, job, device, (xt, yt), (xv, yv) if len(y_val) else (xt, yt),
                "val" if len(y_val) else "train", stop, epoch_done, stopped,
                resumed["fit"] if resumed is not None else None)
    interrupted = stop.requested
    if interrupted:
        note = f"stopped by SIGTERM after {len(history)} of {epochs} epochs; saving what there is"
        print(note, flush=True)
        lines = lines + [note]
    _save(torch, job, state, history, lines, device.type, epochs, interrupted)
    return EXIT_TERMINATED if interrupted else 0


def _write_atomic(path: Path, data: bytes) -> None:
    """``path`` holds either its old bytes or all of ``data``, never a part: a temporary file, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _load_checkpoint(torch, job: Job) -> dict | None:
    """The checkpoint in ``CIS490_RESUME_FROM`` when it is one of this job's; else None, saying why on stderr.

    A checkpoint that cannot be used never fails the job: training starts from the beginning.
    """
    if job.resume_from is None:
        return None
    path = job.resume_from / CHECKPOINT_NAME
    if not path.is_file():
        print(f"cis490fleet train: no {CHECKPOINT_NAME} in {job.resume_from}; starting from the beginning",
              file=sys.stderr)
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many kinds for a damaged file
        print(f"cis490fleet train: cannot read the checkpoint {path} ({type(err).__name__}: {err}); "
              "starting from the beginning", file=sys.stderr)
        return None
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        print(f"cis490fleet train: {path} is not a checkpoint of this trainer (format "
              f"{data.get('format') if isinstance(data, dict) else None!r}, expected {CHECKPOINT_FORMAT}); "
              "starting from the beginning", file=sys.stderr)
        return None
    if data.get("job") != job.identity():
        print(f"cis490fleet train: the checkpoint {path} belongs to another job ({json.dumps(data.get('job'))}); "
              "starting from the beginning", file=sys.stderr)
        return None
    return data


def make_net(torch, job: Job, features: int, classes: int):
    """The job's network: ``features`` inputs, one output per class."""
    if job.model == "mlp":
        return torch.nn.Sequential(torch.nn.Linear(features, job.hyper["hidden"]), torch.nn.ReLU(),
                                   torch.nn.Linear(job.hyper["hidden"], classes))
    return torch.nn.Linear(features, classes)


def _fit_net(torch, job: Job, device, train, check, split: str, stop: _Stop, epoch_done, stopped,
             resume: dict | None, *, classes: int = CLASSES) -> dict:
    """An MLP or a logistic regression, minibatch SGD with momentum.

    A checkpoint holds the weights, the optimizer's momentum, the shuffling generator and, when
    taken mid-epoch (SIGTERM), that epoch's order and where in it training stopped.
    """
    h = job.hyper
    net = make_net(torch, job, train[0].shape[1], classes)
    net.to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=h["lr"], momentum=0.9, weight_decay=h["weight_decay"])
    loss_fn = torch.nn.CrossEntropyLoss()
    shuffle = torch.Generator().manual_seed(job.seed)
    xt, yt = train
    step, first, position = 0, 1, None
    if resume is None and job.init_from is not None:
        try:
            net.load_state_dict(torch.load(job.init_from / "model.pt", map_location="cpu", weights_only=True))
        except (RuntimeError, OSError, ValueError) as err:
            raise UsageError(f"cannot start from {job.init_from / 'model.pt'}: {str(err).splitlines()[0]} "
                             f"(it must be a {job.model} with the same hidden size)") from None
        net.to(device)
    if resume is not None:
        net.load_state_dict(resume["net"])
        optimizer.load_state_dict(resume["optimizer"])
        shuffle.set_state(resume["shuffle"])
        step, first, position = resume["step"], resume["epoch"] + 1, resume["position"]

    def snapshot(epoch: int, position: dict | None = None) -> dict:
        return {"net": {k: v.detach().cpu() for k, v in net.state_dict().items()},
                "optimizer": _to_cpu(optimizer.state_dict()), "shuffle": shuffle.get_state(), "step": step,
                "epoch": epoch, "position": position}

    n = len(yt)
    for epoch in range(first, h["epochs"] + 1):
        net.train()
        if position is not None:
            order, done = position["order"].to(device), position["next"]
            total, seen = position["total"], position["seen"]
            position = None
        else:
            order, done = torch.randperm(n, generator=shuffle).to(device), 0
            total, seen = 0.0, 0
        for start in range(done, n, h["batch_size"]):
            if stop.requested:
                break
            idx = order[start:start + h["batch_size"]]
            optimizer.zero_grad()
            loss = loss_fn(net(xt[idx]), yt[idx])
            loss.backward()
            optimizer.step()
            step += 1
            total += loss.item() * len(idx)
            seen += len(idx)
            done = start + len(idx)
        if stop.requested:
            stopped(snapshot(epoch - 1, {"order": order.cpu(), "next": done, "total": total, "seen": seen}))
            break
        metrics = _evaluate(torch, net, loss_fn, *check, split)
        epoch_done(epoch, step, total / seen, metrics, snapshot(epoch))
    return net.state_dict()


def _to_cpu(value):
    """A copy of a (nested) state dict with every tensor on the CPU, so a checkpoint resumes on any host."""
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_cpu(v) for v in value]
    return value.detach().cpu() if hasattr(value, "detach") else value


def _fit_gbt(torch, job: Job, device, train, check, split: str, stop: _Stop, epoch_done, stopped,
             resume: dict | None) -> dict:
    """Gradient-boosted trees on the logistic loss, in torch alone (no new dependency).

    Each tree is complete, of depth ``max_depth``, stored level by level: node i
    sends a sample to child 2i+1, or 2i+2 when its feature is above the node's
    threshold (a node that does not split has threshold +inf). Split search is
    histogram-based over ``bins`` quantile bins per feature, done for a whole
    level at once as matrix products rather than scatter-adds, which CUDA does not run deterministically.
    One tree is one "epoch" of progress; a checkpoint holds the trees so far and the training logits.
    """
    h = job.hyper
    depth, l2 = h["max_depth"], h["l2"]
    xt, yt = train
    y = yt.float()
    n = len(y)
    bins = min(h["bins"], n)
    cuts = [(k * n) // bins for k in range(1, bins)]
    n_features = xt.shape[1]
    edges = xt.sort(dim=0).values[cuts].T.contiguous()                    # (n_features, bins-1)
    binned = (xt.unsqueeze(2) > edges.unsqueeze(0)).sum(dim=2)            # (n, n_features) in [0, bins-1]
    offsets = torch.arange(n_features, device=device) * bins
    onehot = torch.nn.functional.one_hot(binned + offsets, n_features * bins).sum(dim=1).float()
    flat_edges = torch.cat([edges, torch.full((n_features, 1), math.inf, device=device)], dim=1).flatten()
    inner = 2 ** depth - 1
    rate = y.mean().clamp(1e-6, 1 - 1e-6)
    base = torch.log(rate / (1 - rate))
    raw = base.expand(n).clone()
    features, thresholds, leaves = [], [], []
    next_tree = 1
    if resume is not None:
        base, raw = resume["base"].to(device), resume["raw"].to(device)
        features, thresholds, leaves = ([t.to(device) for t in resume[k]] for k in ("features", "thresholds", "leaves"))
        next_tree = resume["tree"] + 1

    def snapshot(tree: int) -> dict:
        return {"tree": tree, "base": base.cpu(), "raw": raw.cpu(), "features": [t.cpu() for t in features],
                "thresholds": [t.cpu() for t in thresholds], "leaves": [t.cpu() for t in leaves]}

    def as_model() -> dict:
        if not features:
            return {"base": base}
        return {"base": base, "feature": torch.stack(features), "threshold": torch.stack(thresholds),
                "leaf": torch.stack(leaves)}

    inf = torch.tensor(-math.inf, device=device)
    for tree in range(next_tree, h["trees"] + 1):
        if stop.requested:
            stopped(snapshot(tree - 1))
            break
        p = torch.sigmoid(raw)
        grad, hess = p - y, p * (1 - p)
        node = torch.zeros(n, dtype=torch.long, device=device)
        feature = torch.zeros(inner, dtype=torch.long, device=device)
        threshold = torch.full((inner,), math.inf, device=device)
        for level in range(depth):
            first, width = 2 ** level - 1, 2 ** level
            member = torch.nn.functional.one_hot(node - first, width).float()          # (n, width)
            sums = [(member * w.unsqueeze(1)).T @ onehot for w in (grad, hess, torch.ones_like(grad))]
            g, hs, c = (t.view(width, n_features, bins) for t in sums)
            gl, hl, cl = (t.cumsum(dim=2) for t in (g, hs, c))
            gt, ht, ct = gl[..., -1:], hl[..., -1:], cl[..., -1:]
            gain = gl ** 2 / (hl + l2) + (gt - gl) ** 2 / (ht - hl + l2) - gt ** 2 / (ht + l2)
            allowed = (cl >= h["min_leaf"]) & (ct - cl >= h["min_leaf"])
            allowed[..., -1] = False
            gain = torch.where(allowed, gain, inf).view(width, -1)
            best_gain, best = gain.max(dim=1)
            split_here = best_gain > 1e-9
            feature[first:first + width] = torch.where(split_here, best // bins, 0)
            threshold[first:first + width] = torch.where(split_here, flat_edges[best], math.inf)
            node = 2 * node + 1 + (xt.gather(1, feature[node].unsqueeze(1)).squeeze(1) > threshold[node]).long()
        member = torch.nn.functional.one_hot(node - inner, inner + 1).float()
        weight = member.T @ hess + l2
        leaf = torch.where(weight > 0, -h["lr"] * (member.T @ grad) / weight.clamp_min(1e-12), 0.0)  # 0: empty leaf
        raw = raw + leaf[node - inner]
        features.append(feature)
        thresholds.append(threshold)
        leaves.append(leaf)
        train_loss = torch.nn.functional.binary_cross_entropy_with_logits(raw, y).item()
        epoch_done(tree, tree, train_loss, _evaluate_gbt(torch, as_model(), *check, split), snapshot(tree))
    return as_model()


def predict_gbt(torch, model: dict, x):
    """Logits (log-odds of class 1) of a saved gbt model for the rows of ``x``."""
    raw = model["base"].expand(len(x)).clone()
    if "feature" not in model:
        return raw
    inner = model["feature"].shape[1]
    for feature, threshold, leaf in zip(model["feature"], model["threshold"], model["leaf"]):
        node = torch.zeros(len(x), dtype=torch.long, device=x.device)
        for _ in range(inner.bit_length()):
            node = 2 * node + 1 + (x.gather(1, feature[node].unsqueeze(1)).squeeze(1) > threshold[node]).long()
        raw = raw + leaf[node - inner]
    return raw


def _evaluate_gbt(torch, model: dict, x, y, split: str) -> dict:
    raw = predict_gbt(torch, model, x)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(raw, y.float()).item()
    accuracy = ((raw > 0).long() == y).float().mean().item()
    return {f"{split}_loss": loss, f"{split}_accuracy": accuracy}


def _evaluate(torch, net, loss_fn, x, y, split: str) -> dict:
    net.eval()
    with torch.no_grad():
        logits = net(x)
        loss = loss_fn(logits, y).item()
        accuracy = (logits.argmax(dim=1) == y).float().mean().item()
    return {f"{split}_loss": loss, f"{split}_accuracy": accuracy}


def _report(progress: Path | None, row: dict) -> None:
    if progress is None:
        return
    try:
        with open(progress, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
    except OSError as err:
        print(f"cis490fleet train: cannot write progress to {progress}: {err}", file=sys.stderr)


def _save(torch, job: Job, state: dict, history: list[dict], lines: list[str], device: str, epochs: int,
          interrupted: bool) -> None:
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in state.items()}, buffer)
    (job.out / "model.pt").write_bytes(buffer.getvalue())
    final = history[-1] if history else {}
    metrics = {
        "model": job.model, "mode": job.mode, "seed": job.seed, "split_recipe": job.split_recipe,
        "hyper": job.hyper, "device": device, "torch": torch.__version__.split("+")[0],
        "epochs": epochs, "epochs_done": len(history), "interrupted": interrupted,
        "history": history, **{k: v for k, v in final.items() if k != "epoch"},
    }
    (job.out / "metrics.json").write_text(json.dumps(metrics, sort_keys=True, indent=2) + "\n", encoding="utf-8")
    (job.out / "train.log").write_text("\n".join(lines) + "\n", encoding="utf-8")
