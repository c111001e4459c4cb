"""One sDPO step on N ranks: the launcher, the rank's set-up and the few collectives the step needs.

No parallelism of our own: the ranks are started by `torch.distributed.run` (torchrun), gradients are
averaged by DDP or sharded by FSDP2 (`fully_shard`) through the Trainer's `accelerate`, and the only
collectives written here are the gathers around the engine's own reference pass, the agreement on a stop
and the broadcast of what rank 0 wrote.

How a step runs on N ranks (`StepSpec.distributed = {"num_processes": N, "strategy": "ddp" | "fsdp"}`):

- `python -m sdpo_engine step SPEC.json` stays one command for the supervisor. With N > 1 it is the
  *launcher* (`launch`): it starts `python -m torch.distributed.run --standalone --nproc-per-node N -m
  sdpo_engine step RANK_SPEC.json` in its own session (killed by the kernel if the launcher dies), relays
  rank 0's JSON lines to its own stdout and exits with the exit code rank 0's last line stands for.
- Every rank runs `run_step` on the whole chunk (same tokenisation, same pairs dropped); only rank 0
  prints lines and writes the checkpoint and its manifest (`on_main_rank`). The Trainer gathers the
  logged loss and TRL's metrics across ranks before it logs them.
- Batch: the hyperparameters' `batch_size` stays the global batch of one micro-step; each rank takes
  batch_size / N pairs (`trainer_overrides`), so global batch = per-rank batch x N x gradient
  accumulation = batch_size x gradient_accumulation_steps, whatever N. With the same seed the ranks'
  micro-batches together are the one-process micro-batch (accelerate's seedable sampler, sharded by
  batch), so the loss and the weights match the one-process step (tests/engine/test_distributed.py).
  When the pairs kept are not a multiple of the global batch, accelerate fills the last global batch by
  repeating pairs from the start (`even_batches`): then the last step differs from the one-process step.
- Reference pass (`reference_pass`): the one-process pass's length-sorted batches are dealt to the ranks
  in turn (batch j to rank j mod N), each rank scores its batches with the initial policy, and the
  log-probs are gathered back in pair order: the same numbers as one process (each pair sits in the same
  batch), no second model and never TRL's `precompute_ref_log_probs` path. Under FSDP every forward is
  a collective, so a rank with one batch fewer runs one more (repeated) batch and drops its numbers.
- Stop: SIGTERM to the launcher (or the spec's stop file appearing) makes the launcher create the ranks'
  stop file; every rank sees it after the same optimizer step (`any_rank`), the Trainer saves one resumable
  checkpoint (rank 0 the weights and optimizer, every rank its RNG state) and rank 0's last line is
  `stopped`: the launcher exits 75. Once every rank has written its part, rank 0 seals the checkpoint with the
  layout it was written with (`checkpoint_seal`); a rerun resumes from the newest sealed checkpoint of the same
  world size and strategy, and starts afresh with a warning when the layout changed (`resume_point`).
- One FSDP2 rank: `{"num_processes": 1, "strategy": "fsdp"}` also runs under the launcher (world size 1), to
  measure FSDP against the plain process (bench/ranks.py); `{"num_processes": 1}` with ddp is the plain process.
- Death: a rank that dies makes torchrun end the others (and a rank blocked in a collective fails on the
  closed connection); the launcher then exits 1 (`step_failed`) unless rank 0 already printed its last
  line. Killing the launcher kills torchrun and every rank (PR_SET_PDEATHSIG), so the supervisor's
  SIGKILL of the process group ends the whole step.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar

from .protocol import TRAINER_CHECKPOINT_SEAL, EventKind, ExitCode, StepSpec

if TYPE_CHECKING:
    import torch

    from .config import StepConfig

__all__ = [
    "RANK_SPEC_NAME",
    "SEAL_NAME",
    "STOP_FILE_NAME",
    "any_rank",
    "checkpoint_seal",
    "exit_code_of",
    "fsdp_on_cpu",
    "init_rank",
    "is_main_rank",
    "is_rank_process",
    "is_sharded",
    "launch",
    "last_sealed_checkpoint",
    "launch_command",
    "layout",
    "manifest_entry",
    "on_main_rank",
    "rank",
    "ranks_sharing_memory",
    "reference_pass",
    "resume_point",
    "saveable_policy",
    "state_shards",
    "trainer_overrides",
    "world_size",
]

T = TypeVar("T")

PR_SET_PDEATHSIG = 1
# In the step's work_dir: the spec the ranks run (the launcher's stop file in place of the spec's own) and
# the file whose appearance stops every rank at the same optimizer step.
RANK_SPEC_NAME = ".sdpo-rank-spec.json"
STOP_FILE_NAME = ".sdpo-launcher-stop"
SEAL_NAME = TRAINER_CHECKPOINT_SEAL  # protocol.py: what it holds, and why the worker reads it
POLL_SECONDS = 0.2


# ---------------------------------------------------------------------------------------------
# Where this process stands


def is_rank_process() -> bool:
    """True in a process started by torchrun (or any launcher that sets its variables)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def rank() -> int:
    """This process's global rank (0 outside torchrun)."""
    return int(os.environ.get("RANK", "0")) if is_rank_process() else 0


def world_size() -> int:
    """Ranks of this step (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1")) if is_rank_process() else 1


def is_main_rank() -> bool:
    """Rank 0, the only one that prints lines and writes files (True in a single process)."""
    return rank() == 0


def _active() -> bool:
    if world_size() <= 1:
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _collective_device() -> torch.device:
    import torch
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _die_with_parent(sig: int) -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, sig)
    except OSError:
        pass


def init_rank(device: str) -> None:
    """Set up a rank before `run_step`: die with torchrun (its parent), take GPU LOCAL_RANK when on
    CUDA, and join the process group (gloo on CPU, nccl on CUDA), which accelerate then reuses."""
    import torch
    import torch.distributed as dist

    _die_with_parent(signal.SIGKILL)
    if os.getppid() == 1:  # torchrun died before the line above: nothing left to train for
        raise SystemExit(ExitCode.FAILED)
    on_gpu = device != "cpu" and torch.cuda.is_available()
    if on_gpu:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if on_gpu else "gloo")


# ---------------------------------------------------------------------------------------------
# Collectives


def any_rank(flag: bool) -> bool:
    """`flag` or'ed over every rank (a collective: every rank must call it at the same point)."""
    if not _active():
        return flag
    import torch
    import torch.distributed as dist

    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def on_main_rank(fn: Callable[[], T]) -> T:
    """`fn()` on rank 0 only (writing files); every rank returns rank 0's result. A collective."""
    if not _active():
        return fn()
    import torch.distributed as dist

    box: list[Any] = [fn() if is_main_rank() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def reference_pass(n_rows: int, order: Sequence[int], batch_size: int,
                   score: Callable[[list[int]], tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs (chosen, rejected), float32 of shape [n_rows], of every row, in row order.

    `order` is the rows in the order they are batched (length-sorted by the caller), `score(rows)` one
    batch's (chosen, rejected) log-probs. One process scores every batch; N ranks deal the same batches
    in turn (batch j to rank j mod N) and gather the results, so each row is scored in the same batch as
    in one process. Every rank runs the same number of forwards (a rank with one batch fewer repeats its
    first batch and drops the numbers): under FSDP a forward is a collective.
    """
    import torch

    batches = [list(order[s:s + batch_size]) for s in range(0, len(order), batch_size)]
    chosen = torch.zeros(n_rows, dtype=torch.float32)
    rejected = torch.zeros(n_rows, dtype=torch.float32)
    n, me = (world_size(), rank()) if _active() else (1, 0)
    mine = batches[me::n]
    rounds = math.ceil(len(batches) / n) if batches else 0
    local: list[tuple[list[int], list[float], list[float]]] = []
    for j in range(rounds):
        idx = mine[j] if j < len(mine) else (mine[0] if mine else batches[0])
        c, r = score(idx)
        if j < len(mine):
            local.append((idx, c.detach().float().cpu().tolist(), r.detach().float().cpu().tolist()))
    gathered: list[list[tuple[list[int], list[float], list[float]]] | None] = [local]
    if n > 1:
        import torch.distributed as dist

        gathered = [None] * n
        dist.all_gather_object(gathered, local)
    for part in gathered:
        for idx, c_list, r_list in part or []:
            chosen[idx] = torch.tensor(c_list, dtype=torch.float32)
            rejected[idx] = torch.tensor(r_list, dtype=torch.float32)
    return chosen, rejected


# ---------------------------------------------------------------------------------------------
# What the Trainer and the manifest get


def trainer_overrides(cfg: StepConfig, spec: StepSpec) -> dict[str, Any]:
    """DPOConfig arguments of a step on `spec.num_processes` ranks: the per-rank batch (batch_size / N;
    ConfigError when N does not divide it) and, for fsdp, FSDP2 wrapping each decoder layer (also on one
    FSDP2 rank). Empty for one plain process."""
    from .config import ConfigError

    n = spec.num_processes
    if spec.strategy is None:  # one plain process
        return {}
    if cfg.batch_size % n:
        raise ConfigError("batch_size", f"{cfg.batch_size} is not a multiple of distributed.num_processes={n}: "
                          "batch_size is the global batch and each rank takes batch_size / N pairs")
    overrides: dict[str, Any] = {"per_device_train_batch_size": cfg.batch_size // n,
                                 # The reference pass is dealt to the ranks by batch (reference_pass).
                                 "precompute_ref_batch_size": max(cfg.batch_size, 8)}
    if spec.strategy == "fsdp":
        overrides["fsdp"] = True
        # FSDP2 with the model's own decoder-layer classes (`_no_split_modules`) as units. Resumable trainer
        # checkpoints (stop, save_steps) are sharded: every rank writes its own shard of weights and optimizer
        # states (torch.distributed.checkpoint), nothing is gathered for them; the step's output is the full
        # state dict, gathered once at the end (`saveable_policy`).
        overrides["fsdp_config"] = {"version": 2, "reshard_after_forward": True,
                                    "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                                    "state_dict_type": "SHARDED_STATE_DICT", "cpu_ram_efficient_loading": False}
    return overrides


def is_sharded(model: Any) -> bool:
    """True for a model FSDP2 has sharded (`fully_shard`): its weights are DTensors, and every forward
    gathers them from the ranks (a collective), so it must go through the model's own forward."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def fsdp_on_cpu(trainer: Any) -> None:
    """Let FSDP2 run on gloo CPU ranks, as it does on GPUs.

    accelerate 1.15 (`AcceleratorState.__init__`) turns a run into FSDP only when its distributed type is
    a GPU-class one; CPU ranks (MULTI_CPU) would silently get DDP instead of the FSDP the spec asks for.
    torch's `fully_shard` itself runs on CPU over gloo, so on CPU ranks with an FSDP plugin the state is
    promoted to FSDP right after the Trainer built its accelerator, before anything is prepared: training
    then goes through accelerate's own FSDP2 path (`fully_shard` per decoder layer, full state dict). A
    no-op on GPUs, without FSDP, and in one process. Checked by tests/engine/test_distributed.py (the
    parameters are DTensors after training)."""
    if not getattr(trainer.args, "fsdp_plugin_args", None) or trainer.is_fsdp_enabled:
        return
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    # One CPU rank (world size 1) is no distributed run to accelerate unless the Trainer asked for CPU (NO).
    if state.distributed_type not in (DistributedType.MULTI_CPU, DistributedType.NO) or not is_rank_process():
        return
    plugin = FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    trainer.is_fsdp_enabled = True


def state_shards(trainer: Any) -> int:
    """Ranks the trainable state (gradients, optimizer states) is split over: N under FSDP, else 1."""
    return world_size() if getattr(trainer, "is_fsdp_enabled", False) else 1


def ranks_sharing_memory(device: str) -> int:
    """Ranks of this step that draw on the same memory: every local rank on CPU, one per GPU."""
    return 1 if device == "cuda" else int(os.environ.get("LOCAL_WORLD_SIZE", world_size())) if is_rank_process() else 1


def manifest_entry(spec: StepSpec) -> dict[str, Any]:
    """The manifest's `distributed`: {"world_size", "strategy"} as the step ran (strategy None for one plain
    process, "fsdp" for one FSDP2 rank)."""
    return {"world_size": world_size(), "strategy": spec.strategy}


def saveable_policy(trainer: Any, policy: Any) -> Any:
    """What rank 0 saves with `save_pretrained`: `policy` itself where it holds its whole weights (one
    process, DDP); under FSDP a plain model of the same class holding the full state dict gathered from
    the shards (a collective: every rank calls it; None on the other ranks). The plain model is built on
    the meta device and takes the gathered tensors as they are (`assign`): no third copy of the weights.
    It shares `policy.config`, so what `_restore_dropout_config` puts back is saved; it takes the policy's
    non-persistent buffers too, so rank 0 can decode with it (samples)."""
    if not getattr(trainer, "is_fsdp_enabled", False):
        return policy
    import torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # torch's own gather of the FSDP2 shards into plain tensors (on CPU, rank 0 only).
    state_dict = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_main_rank():
        return None
    plain_class = next(c for c in type(policy).__mro__ if not c.__name__.startswith("FSDP"))
    with torch.device("meta"):
        plain = plain_class(policy.config)
    plain.load_state_dict(state_dict, assign=True, strict=False)
    # Non-persistent buffers (rotary inv_freq) are in no state dict: FSDP2 leaves them whole on every rank.
    for name, buffer in list(plain.named_buffers()):
        if buffer.is_meta:
            owner_name, _, leaf = name.rpartition(".")
            owner = plain.get_submodule(owner_name) if owner_name else plain
            owner.register_buffer(leaf, policy.get_buffer(name).detach().to("cpu").clone(), persistent=False)
    plain.tie_weights()
    plain.config = policy.config
    plain.generation_config = policy.generation_config
    return plain


# ---------------------------------------------------------------------------------------------
# Trainer checkpoints: sealed when every rank has written its part; resumed only with the same layout


def _barrier() -> None:
    if _active():
        import torch.distributed as dist

        dist.barrier()


def layout(spec: StepSpec) -> dict[str, Any]:
    """How a step's trainer state is laid out: {"world_size": N, "strategy": "ddp" | "fsdp" | None}. A
    trainer checkpoint holds one RNG file per rank (`rng_state_R.pth`, or `rng_state.pth` on one) and,
    under FSDP, one shard of weights and optimizer states per rank: it resumes only with the same layout."""
    return {"world_size": spec.num_processes, "strategy": spec.strategy}


def checkpoint_seal(spec: StepSpec) -> Any:
    """A TrainerCallback that seals each trainer checkpoint once every rank has written its part.

    transformers' `Trainer._save_checkpoint` has every rank write its own `rng_state_R.pth` (and, under
    FSDP, its shards) while rank 0 writes `trainer_state.json` and rotates old checkpoints, with no barrier
    after: a step killed in between leaves a folder that looks complete to rank 0 but lacks, or holds half of,
    another rank's RNG file (which `_load_rng_state` skips silently, or fails to load on every retry). Here
    every rank meets at a barrier after its save (`on_save`), then rank 0 writes `SEAL_NAME` (the layout)
    atomically. `resume_point` resumes only from sealed checkpoints."""
    from transformers import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    sealed = layout(spec)

    class SealCheckpoint(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            _barrier()  # every rank's RNG state and shards are on disk
            if is_main_rank():
                folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
                tmp = folder / f".{SEAL_NAME}.tmp"
                tmp.write_text(json.dumps(sealed))
                os.replace(tmp, folder / SEAL_NAME)

    return SealCheckpoint()


def _checkpoints(work_dir: Path) -> list[tuple[int, Path]]:
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    found = []
    for folder in work_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if work_dir.is_dir() else []:
        number = folder.name.rsplit("-", 1)[-1]
        if number.isdigit() and folder.is_dir():
            found.append((int(number), folder))
    return sorted(found)


def last_sealed_checkpoint(work_dir: str) -> str | None:
    """The newest trainer checkpoint in `work_dir` every rank finished writing (`checkpoint_seal`), or None."""
    sealed = [folder for _, folder in _checkpoints(Path(work_dir)) if (folder / SEAL_NAME).is_file()]
    return str(sealed[-1]) if sealed else None


def resume_point(spec: StepSpec, emit: Callable[[dict[str, Any]], None]) -> str | None:
    """The trainer checkpoint this step resumes from: the newest sealed one in `spec.work_dir`, or None.

    Folders newer than it (a save cut short) are removed. A sealed checkpoint of another layout (written
    with M ranks or another strategy, resumed with N) is not resumed: its per-rank RNG files and FSDP shards
    do not map onto N ranks. The step then starts afresh, with a `resume_layout_changed` warning, and every
    trainer checkpoint of the old layout is removed first (the new run writes the same folder names). Starting
    afresh is the same training as an uninterrupted step (same seed, data and global batch): only time is
    lost, where refusing would fail a job whose inputs are fine on every retry. A collective: rank 0 removes,
    every rank returns the same answer."""
    work = Path(spec.work_dir)
    chosen = last_sealed_checkpoint(spec.work_dir)
    found = json.loads((Path(chosen) / SEAL_NAME).read_text()) if chosen else None
    expected = layout(spec)
    stale = chosen is not None and found != expected

    def tidy() -> None:
        for number, folder in _checkpoints(work):
            if stale or chosen is None or number > int(Path(chosen).name.rsplit("-", 1)[-1]):
                shutil.rmtree(folder, ignore_errors=True)

    on_main_rank(tidy)
    if stale:
        emit({"event": "warning", "code": "resume_layout_changed", "step": spec.index, "checkpoint": chosen,
              "checkpoint_layout": found, "layout": expected,
              "message": f"the trainer checkpoint {chosen} was written by {found} and this step runs as {expected}: "
                         "its per-rank RNG states and shards do not map onto these ranks, so the step starts "
                         "afresh (same seed and data: the same training, only the time is lost)"})
        return None
    return chosen


# ---------------------------------------------------------------------------------------------
# The launcher


def launch_command(rank_spec: Path, n: int) -> list[str]:
    """torchrun of `python -m sdpo_engine step RANK_SPEC` on `n` local ranks (a free port of its own)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
            "--max-restarts=0", "--monitor-interval=0.2", "-m", "sdpo_engine", "step", str(rank_spec)]


def exit_code_of(last: dict[str, Any] | None) -> ExitCode:
    """The exit code a step's last line stands for (as main_step returns it)."""
    if last is None:
        return ExitCode.FAILED
    kind = last.get("event")
    if kind == EventKind.RESULT:
        return ExitCode.OK
    if kind == EventKind.STOPPED:
        return ExitCode.STOPPED
    code = last.get("code")
    if code == "non_finite":
        return ExitCode.NON_FINITE
    if code == "step_failed":
        return ExitCode.FAILED
    return ExitCode.BAD_INPUT


def _torchrun_preexec() -> None:  # pragma: no cover - runs in the child between fork and exec
    # torchrun leads its own session (the supervisor's SIGTERM goes to the launcher alone, which stops the
    # ranks through the stop file) and dies with the launcher (the supervisor's SIGKILL ends it all).
    _die_with_parent(signal.SIGKILL)
    os.setsid()


def launch(spec: StepSpec, spec_dict: dict[str, Any], out: IO[str]) -> int:
    """Run `spec` on `spec.num_processes` ranks through torchrun; rank 0's lines go to `out`.

    Returns the exit code (protocol.ExitCode) of rank 0's last line; 1 with a `step_failed` error line
    when the ranks ended without one (a rank died).
    """
    work = Path(spec.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    stop_file = work / STOP_FILE_NAME
    stop_file.unlink(missing_ok=True)
    rank_spec = work / RANK_SPEC_NAME
    rank_spec.write_text(json.dumps({**spec_dict, "stop_file": str(stop_file)}))
    user_stop = Path(spec.stop_file) if spec.stop_file else None
    stop_signalled = threading.Event()

    def on_sigterm(signum: int, frame: Any) -> None:
        stop_signalled.set()

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    env = dict(os.environ)
    # torchrun sets one thread per rank when unset (and warns); share the cores between the ranks instead.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // spec.num_processes)))
    last: list[dict[str, Any]] = []
    t0 = time.monotonic()
    proc = subprocess.Popen(launch_command(rank_spec, spec.num_processes), stdout=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True, env=env, preexec_fn=_torchrun_preexec)

    def relay() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                event = None
            if not isinstance(event, dict):  # a library's print on a rank: the log, not the protocol
                sys.stderr.write(line)
                continue
            if event.get("event") in (EventKind.RESULT, EventKind.ERROR, EventKind.STOPPED):
                last[:] = [event]
            out.write(line if line.endswith("\n") else line + "\n")
            out.flush()

    reader = threading.Thread(target=relay, name="rank0-stdout", daemon=True)
    reader.start()
    try:
        while proc.poll() is None:
            if (stop_signalled.is_set() or (user_stop is not None and user_stop.exists())) and not stop_file.exists():
                stop_file.touch()
            time.sleep(POLL_SECONDS)
    finally:
        if proc.poll() is None:  # the launcher itself failed: never leave ranks training unsupervised
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        reader.join(timeout=10)
        signal.signal(signal.SIGTERM, previous)
        stop_file.unlink(missing_ok=True)
    final = last[0] if last else None
    if final is None:
        message = (f"the step's {spec.num_processes} ranks ended without a result (torchrun exited "
                   f"{proc.returncode} after {time.monotonic() - t0:.1f} s): a rank died; see the log")
        out.write(json.dumps({"event": "error", "code": "step_failed", "message": message}) + "\n")
        out.flush()
    return int(exit_code_of(final))
