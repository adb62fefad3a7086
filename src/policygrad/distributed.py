"""Data-parallel training under ``torchrun``: the processes of one run, and the few numbers they must share.

``torchrun --nproc-per-node W -m policygrad train ...`` starts W copies of the program, each told its ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` in its environment. :func:`init_world` reads them and joins the process group
(gloo on CPU, NCCL on CUDA); without them it returns the single-process :class:`World`, in which every method below
is the identity and no process group exists, so a plain run computes exactly what it did before this module.

What data parallelism changes, and nothing more (letters as in :mod:`policygrad.lm.rollout`; W processes):

- **The batch is sharded by whole groups.** A step's B prompts are split into W consecutive shards of B / W prompts;
  each rank samples, scores and back-propagates the G completions of its own prompts only. A group never straddles
  two ranks, so group statistics (GRPO's group mean and std, RLOO) need no communication.
- **Batch-wide numbers are global.** Each rank gathers every rank's rewards (N floats) and computes the advantages,
  the batch std of ``scale_rewards: batch``, the REINFORCE moving-average baseline and the dynamic entropy weight
  from the whole batch, identically on every rank; then keeps its own rows. The loss's normaliser is global too: a
  token-mean loss divides by the tokens of all ranks (:meth:`World.sum`), so that the ranks' gradients *sum* to the
  one-process gradient of the whole batch,

      grad L = sum_r sum_{m in micro(r)} tokens(m) / tokens(batch) * grad L_m      (L_m: micro-batch m's token mean)

  which :meth:`World.all_reduce_gradients` forms after each rank has accumulated its micro-batches. Logged numbers
  (reward mean, pass rates, loss, ...) are computed from the gathered batch or summed in the same way.
- **Gradients are summed by hand, not by DistributedDataParallel.** Three reasons: (1) a step accumulates many
  micro-batches and communicates once, so DDP's overlap of communication with the backward pass would only cover the
  last micro-batch (with ``no_sync`` on the others); (2) one micro-batch's forward is not one call of the model (an
  embedding lookup outside it, a prompt pass and a completion pass that share a key/value cache,
  :func:`policygrad.lm.rollout.completion_logprobs`), which DDP's one-forward-per-backward bookkeeping does not
  expect; (3) sampling must call the bare model anyway. The cost is one flattened all-reduce per optimiser step
  (in buckets), after the backward passes instead of overlapped with the last one.
- **Decisions that could otherwise deadlock are agreed** (:meth:`World.agree`, any rank's flag): a stop signal that
  reached only some ranks, a reward function that failed on one rank, a non-finite loss. All ranks then stop, skip
  or save at the same step, and only rank 0 writes logs, metrics and checkpoints. A rank that dies ends the others
  with one line naming it (:class:`RankLost`) instead of a hang: gloo notices a closed connection at once, and every
  collective is bounded by the process group's timeout (``collective_timeout``).

Sampling seeds. Under torchrun the G completions of the step's global prompt b are drawn from a generator seeded with
``step_seed(seed, step, b)`` (:func:`policygrad.rng.step_seed`), whatever rank samples them: rank r's sampling is a
function of (seed, step, r) through the prompts it holds, and a prompt's completions do not depend on how the batch
was split. That is what makes two processes train (to float rounding) the parameters one process trains on the same
global batch. A plain run keeps its one stream per step (its samples, recorded in tests/lm/reproducibility.json, do
not change), so ``torchrun --nproc-per-node 1`` and a plain run sample differently, and a run resumes only under
the launch that started it. The global generators (Python's, NumPy's, torch's) are seeded per rank
(:meth:`World.seed`), so a reward function that draws random numbers does not draw the same ones on every rank.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import shlex
import shutil
import socket
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from policygrad.errors import UsageError, first_line

__all__ = ["EXIT_RANK_LOST", "Launch", "RankLost", "World", "init_world", "launch_from_env", "launcher_command"]

EXIT_RANK_LOST = 4
"""Exit status of the ranks that stopped because another rank died or stopped answering."""

BUCKET_ELEMENTS = 1 << 24
"""Gradient elements per all-reduce (64 MiB of float32): one collective for a small model, a few for a large one,
never a second copy of the whole gradient."""


@dataclass(frozen=True)
class Launch:
    """Where this process sits in a torchrun launch: from its environment, before any process group exists."""

    rank: int
    size: int
    local_rank: int
    local_size: int

    @property
    def nodes(self) -> int:
        return max(1, self.size // max(self.local_size, 1))


def launch_from_env(environ: Mapping[str, str] | None = None) -> Launch | None:
    """The torchrun launch this process belongs to, or None for a plain process (no ``RANK``/``WORLD_SIZE``).

    >>> launch_from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    Launch(rank=1, size=2, local_rank=1, local_size=2)
    >>> launch_from_env({}) is None
    True
    """
    environ = os.environ if environ is None else environ
    if "RANK" not in environ or "WORLD_SIZE" not in environ:
        return None
    try:
        rank, size = int(environ["RANK"]), int(environ["WORLD_SIZE"])
        local_rank = int(environ.get("LOCAL_RANK", rank))
        local_size = int(environ.get("LOCAL_WORLD_SIZE", size))
    except ValueError:
        raise UsageError(
            "torchrun", "RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE must be whole numbers"
        ) from None
    if not 0 <= rank < size:
        raise UsageError("torchrun", f"RANK {rank} is not in 0..WORLD_SIZE-1 ({size})")
    return Launch(rank, size, local_rank, local_size)


class RankLost(Exception):
    """Another rank died or stopped answering during a collective. ``str(err)`` is one line naming it; ``reporter``
    says whether this rank is the one that prints it (the lowest rank still alive), so W - 1 ranks do not repeat it."""

    exit_code = EXIT_RANK_LOST

    def __init__(self, message: str, reporter: bool):
        super().__init__(message)
        self.reporter = reporter


@dataclass
class World:
    """The processes of one run: this one's rank, their number, and the collectives the trainer needs.

    The single-process world (``World()``) holds no process group and every method is the identity: ``sum`` and
    ``maximum`` return their argument, ``gather`` a one-element list, ``barrier`` and ``all_reduce_gradients`` do
    nothing. Under torchrun with one process (``launched`` but ``size == 1``) the same holds.
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    launch: Launch | None = None  # None: a plain process, not started by torchrun
    timeout: float = 1800.0  # seconds a collective waits
    device: Any = None  # where collectives' tensors live: cpu (gloo) or this rank's GPU (NCCL)
    peers: list[tuple[str, int]] = field(default_factory=list)  # (host, pid) of every rank, to name a dead one

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes the run folder and speaks for the run."""
        return self.rank == 0

    @property
    def launched(self) -> bool:
        """Started by torchrun (even with one process): sampling is seeded per prompt group."""
        return self.launch is not None

    # ------------------------------------------------------------------------------------------------------------
    # sharding and seeds
    # ------------------------------------------------------------------------------------------------------------

    def shard(self, count: int) -> slice:
        """This rank's consecutive part of ``count`` items split evenly (``count`` a multiple of ``size``)."""
        each = count // self.size
        return slice(self.rank * each, (self.rank + 1) * each)

    def seed(self, seed: int) -> int:
        """The seed of this rank's global generators: ``seed`` on rank 0, a different one on every other rank, below
        2**32 (NumPy's limit)."""
        from policygrad.rng import step_seed

        return seed if self.rank == 0 else step_seed(seed, 0, self.rank) % 2**32

    # ------------------------------------------------------------------------------------------------------------
    # collectives (the identity for one process)
    # ------------------------------------------------------------------------------------------------------------

    def sum(self, value: float) -> float:
        """``value`` summed over the ranks (float64 on the wire, so integer counts stay exact)."""
        if self.size == 1:
            return value
        import torch
        import torch.distributed as dist

        tensor = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        self._collective(dist.all_reduce, tensor)
        return float(tensor.item())

    def maximum(self, value: int) -> int:
        """The largest ``value`` over the ranks."""
        if self.size == 1:
            return value
        import torch
        import torch.distributed as dist

        tensor = torch.tensor([int(value)], dtype=torch.int64, device=self.device)
        self._collective(dist.all_reduce, tensor, op=dist.ReduceOp.MAX)
        return int(tensor.item())

    def agree(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any: a decision all ranks must take together (stop, save,
        skip), or the ones that did not take it would wait forever for the others at the next collective."""
        return bool(self.maximum(int(bool(flag))))

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (picklable; tensors on the CPU), in rank order, on every rank."""
        if self.size == 1:
            return [value]
        import torch.distributed as dist

        values: list[Any] = [None] * self.size
        self._collective(dist.all_gather_object, values, value)
        return values

    def first(self, value: Any) -> Any:
        """The first non-None ``value`` in rank order, the same on every rank (None when every rank has None)."""
        if not self.agree(value is not None):
            return None
        return next(v for v in self.gather(value) if v is not None)

    def sum_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Each key's values summed over the ranks that have it (a rank whose rows held no tokens has none)."""
        if self.size == 1:
            return metrics
        total: dict[str, float] = {}
        for part in self.gather(metrics):
            for key, value in part.items():
                total[key] = total.get(key, 0.0) + value
        return total

    def barrier(self) -> None:
        """Wait until every rank gets here (rank 0 evaluating or saving while the others wait)."""
        if self.size == 1:
            return
        import torch.distributed as dist

        self._collective(dist.barrier)

    def broadcast_parameters(self, parameters: Iterable[Any]) -> None:
        """Rank 0's values into every rank's ``parameters`` (the same weights everywhere at the start, even for a
        model that initialises some weights at random on loading)."""
        if self.size == 1:
            return
        import torch.distributed as dist

        for parameter in parameters:
            self._collective(dist.broadcast, parameter.data, src=0)

    def all_reduce_gradients(self, parameters: Iterable[Any]) -> None:
        """Replace every rank's accumulated gradients by their sum over the ranks, in buckets of
        :data:`BUCKET_ELEMENTS`. A parameter with no gradient on some ranks counts as zero there; one with no
        gradient on every rank keeps ``grad = None``, as in one process (AdamW then leaves it alone)."""
        if self.size == 1:
            return
        import torch
        import torch.distributed as dist

        trainable = [p for p in parameters if p.requires_grad]
        has_grad = torch.tensor([p.grad is not None for p in trainable], dtype=torch.int32, device=self.device)
        self._collective(dist.all_reduce, has_grad, op=dist.ReduceOp.MAX)
        chosen = [p for p, has in zip(trainable, has_grad.tolist()) if has]
        for p in chosen:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        bucket: list[Any] = []
        for p in chosen:
            bucket.append(p)
            if sum(q.numel() for q in bucket) >= BUCKET_ELEMENTS:
                self._reduce_bucket(bucket)
                bucket = []
        if bucket:
            self._reduce_bucket(bucket)

    def _reduce_bucket(self, bucket: list[Any]) -> None:
        import torch
        import torch.distributed as dist

        flat = torch.cat([p.grad.reshape(-1) for p in bucket])
        self._collective(dist.all_reduce, flat)
        for p, part in zip(bucket, flat.split([p.numel() for p in bucket])):
            p.grad.copy_(part.view_as(p.grad))

    def close(self) -> None:
        """Leave the process group (at the end of a run that finished or stopped cleanly)."""
        import torch.distributed as dist

        if self.launched and dist.is_initialized():
            # every rank leaves together (only finished runs get here): once in CI a resumed 2-process FSDP run
            # aborted a rank at its end ("terminate called without an active exception") while its peer was
            # still saving; tearing gloo down under a peer that has not finished is the suspected cause
            with contextlib.suppress(RuntimeError):  # a peer gone after finishing: nothing left to wait for
                dist.barrier()
            dist.destroy_process_group()

    # ------------------------------------------------------------------------------------------------------------
    # a rank that died
    # ------------------------------------------------------------------------------------------------------------

    def _collective(self, function: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except RuntimeError as err:  # gloo's "Connection closed by peer", a timeout, NCCL's DistBackendError
            raise self.lost(err) from None

    def lost(self, err: BaseException) -> RankLost:
        """The one-line :class:`RankLost` for a collective that failed with ``err``: the ranks on this node whose
        process has ended, by name; otherwise what is known (a timeout, or a rank on another node)."""
        host = socket.gethostname()
        dead = [rank for rank, (where, pid) in enumerate(self.peers) if where == host and not _alive(pid)]
        if dead:
            who = "rank " + ", ".join(map(str, dead)) if len(dead) < 3 else f"ranks {dead[0]}..{dead[-1]}"
            reporter = self.rank == min(r for r in range(self.size) if r not in dead)
            return RankLost(f"{who} of {self.size} ended (killed or crashed; its own output says why)", reporter)
        elsewhere = sorted({where for where, _ in self.peers if where != host})
        timed_out = "timed out" in str(err).lower() or "timeout" in str(err).lower()
        reason = (
            f"a collective waited more than --collective-timeout {self.timeout:g} s (a rank hangs or died)"
            if timed_out
            else f"lost contact with another rank ({first_line(err)[:160]})"
        )
        nodes = f" on {', '.join(elsewhere[:3])}" if elsewhere else ""
        return RankLost(f"{reason}{nodes}", self.rank == 0 or bool(elsewhere))

    # ------------------------------------------------------------------------------------------------------------
    # the command that resumes a run
    # ------------------------------------------------------------------------------------------------------------

    def program(self) -> str | None:
        """:func:`launcher_command` of this process's launch."""
        return launcher_command(self.launch)


def launcher_command(launch: Launch | None) -> str | None:
    """How to start the program again with the same processes (``torchrun --nproc-per-node 2 -m policygrad``), or
    None for a plain process (:func:`policygrad.runs.program` then says)."""
    if launch is None:
        return None
    beside = Path(sys.executable).with_name("torchrun")  # .venv/bin/torchrun, which may not be on the PATH
    found = shutil.which("torchrun")
    on_path = not beside.exists() or (found is not None and Path(found).resolve() == beside.resolve())
    torchrun = "torchrun" if on_path else shlex.quote(str(beside))
    if launch.nodes == 1:
        return f"{torchrun} --nproc-per-node {launch.size} -m policygrad"
    return f"{torchrun} --nnodes {launch.nodes} --nproc-per-node {launch.local_size} <your rendezvous options> -m policygrad"


def _alive(pid: int) -> bool:
    """Whether process ``pid`` still runs: not gone and not a zombie (a killed child its launcher has not yet
    reaped still answers ``kill(pid, 0)``)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            state = stat.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except FileNotFoundError:
        return False
    except (OSError, IndexError):  # not Linux
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except OSError:
            return True
        return True


def init_world(device: Any, timeout: float, launch: Launch | None = None) -> World:
    """The world of this process: a plain one without torchrun's environment, else joined to the process group
    (NCCL for a CUDA ``device``, gloo otherwise) with every collective bounded by ``timeout`` seconds. Under
    torchrun with CUDA, ``device`` should already be this rank's GPU (``cuda:LOCAL_RANK``)."""
    launch = launch or launch_from_env()
    if launch is None:
        return World()
    import torch
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    world = World(launch.rank, launch.size, launch.local_rank, launch, timeout, device)
    world.peers = [tuple(peer) for peer in world.gather((socket.gethostname(), os.getpid()))]
    return world
