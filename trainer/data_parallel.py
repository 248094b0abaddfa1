"""Data-parallel rounds: one training round shared by the WORLD_SIZE processes torchrun starts.

`torchrun --nproc-per-node N $(which densealign) trainer` (torch's own launcher: no dependency beyond
torch, and it sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT for each process) runs N
copies of the trainer. Each one:

1. joins the process group: gloo on CPU, nccl on CUDA with the device cuda:LOCAL_RANK, with a finite
   timeout (`dpo.collective_timeout_seconds`), so a rank that died or hangs makes the others fail;
2. trains the round rank 0 picked, from rank 0's adapter. Rank 0 alone writes: the round's rows,
   heartbeats, checkpoints, the published version. The others only read (pairs, blobs, checkpoints);
3. at each optimizer step draws the pairs and the (B, M) step indices exactly as one process would (the
   same generator, the same stream) and trains on its contiguous share of them. Its loss is the
   (weighted) mean over its b_r pairs, so its gradient is scaled by b_r / B and the ranks' gradients
   summed: the result is the gradient of the mean over all B pairs, what one process computes, up to
   the order of the float additions. Clipping and AdamW then see the same numbers on every rank, and
   the adapters stay identical (the all-reduce hands every rank the same sums);
4. before rank 0 publishes, checks that every rank ended with the same adapter.

A stop asked of any rank (SIGTERM) travels with each step's metrics and with rank 0's messages, so
every rank stops after the same step, where rank 0 checkpoints, and every rank's loop ends.

A collective that fails (a peer died, or the timeout passed) raises `DataParallelError`; the trainer
exits non-zero with its one-line message. Nothing is published (rank 0 publishes only after the last
step and a barrier), and the next start, with any number of processes, resumes from the checkpoint.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from core.diffusion.training import StepMetrics

logger = logging.getLogger(__name__)

T = TypeVar("T")


class DataParallelError(RuntimeError):
    """A data-parallel round cannot go on (a rank died, timed out, or the ranks disagree)."""


@dataclass(frozen=True)
class DataParallel:
    """This process's place in the group: rank `rank` of `world`; rank 0 is the one that writes."""

    rank: int
    world: int
    timeout_seconds: float

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def share(self, n: int) -> slice:
        """This rank's contiguous share of n items (sizes differ by at most one; rank order = item order)."""
        if n < self.world:
            raise DataParallelError(
                f"a step of {n} pairs cannot be shared by {self.world} ranks: run at most {n} processes, or "
                "raise DENSEALIGN_DPO__PAIRS_PER_STEP (the round resumes from its checkpoint either way)"
            )
        return slice(self.rank * n // self.world, (self.rank + 1) * n // self.world)

    def _collective(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except DataParallelError:
            raise
        except Exception as exc:
            # gloo's messages start with its source location: "[.../gloo/transport/tcp/pair.cc:553] ..."
            first = re.sub(r"^\[[^\]]*\]\s*", "", (str(exc).strip().splitlines() or [""])[0])
            first = first if len(first) <= 160 else first[:159] + "…"
            raise DataParallelError(
                f"rank {self.rank} of {self.world}: {what} failed ({type(exc).__name__}: {first}); "
                f"another rank died or stalled past DENSEALIGN_DPO__COLLECTIVE_TIMEOUT_SECONDS="
                f"{self.timeout_seconds:g}. Nothing was published: restart the trainer (any number of "
                "processes) and the round resumes from its last checkpoint"
            ) from exc

    def gather(self, what: str, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank (small picklable objects)."""
        out: list[Any] = [None] * self.world
        self._collective(what, lambda: dist.all_gather_object(out, obj))
        return out

    def broadcast_parameters(self, params: Sequence[torch.Tensor]) -> None:
        """Copy rank 0's values into every rank's `params` (one flattened broadcast)."""
        flat = torch.cat([p.detach().reshape(-1) for p in params])
        self._collective("sharing rank 0's adapter", lambda: dist.broadcast(flat, src=0))
        with torch.no_grad():
            for p, value in zip(params, _split_like(flat, params), strict=True):
                p.copy_(value)

    def reduce_gradients(self, params: Sequence[torch.Tensor], weight: float) -> None:
        """Replace each rank's gradients by the sum over ranks of weight_r x gradient_r (one all-reduce).

        Parameters without a gradient are left out; the ranks run the same model on batches of the same
        kind, so it is the same set on every rank."""
        with_grad = [p for p in params if p.grad is not None]
        if not with_grad:
            return
        flat = torch.cat([p.grad.reshape(-1) for p in with_grad if p.grad is not None]) * weight
        self._collective("the gradient all-reduce", lambda: dist.all_reduce(flat, op=dist.ReduceOp.SUM))
        for p, value in zip(with_grad, _split_like(flat, with_grad), strict=True):
            assert p.grad is not None
            p.grad.copy_(value)

    def combine(self, metrics: StepMetrics, pairs: int, stop: bool) -> tuple[StepMetrics, bool]:
        """The whole batch's step metrics from every rank's share (weighted by its pairs), and whether any
        rank was asked to stop (so all stop at the same step)."""
        parts = self.gather("sharing the step's metrics", (metrics, pairs, stop))
        total = sum(n for _, n, _ in parts)

        def mean(key: str) -> float:
            return sum(float(getattr(m, key)) * n for m, n, _ in parts) / total

        combined = replace(
            metrics,
            loss=mean("loss"),
            implicit_accuracy=mean("implicit_accuracy"),
            mean_abs_logratio=mean("mean_abs_logratio"),
            clipped_share=mean("clipped_share"),
            # the norm of the reduced gradient, the same on every rank
            step_indices=torch.cat([m.step_indices.cpu() for m, _, _ in parts]),
            logratio_w=torch.cat([m.logratio_w for m, _, _ in parts]),
            logratio_l=torch.cat([m.logratio_l for m, _, _ in parts]),
        )
        return combined, any(s for _, _, s in parts)

    def check_same(self, params: Sequence[torch.Tensor]) -> None:
        """Raise unless every rank holds the same values in `params` (also a barrier before publishing)."""
        digest = hashlib.sha256()
        for p in params:
            digest.update(p.detach().to("cpu").contiguous().numpy().tobytes())
        digests = self.gather("the end-of-round check", digest.hexdigest())
        if len(set(digests)) != 1:
            raise DataParallelError(
                f"the ranks ended the round with different adapters ({', '.join(d[:12] for d in digests)}); "
                "nothing published: report this as a bug"
            )

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def _split_like(flat: torch.Tensor, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    sizes = [p.numel() for p in params]
    return [chunk.view_as(p) for chunk, p in zip(flat.split(sizes), params, strict=True)]


def data_parallel_from_env(*, timeout_seconds: float, device: str) -> tuple[DataParallel | None, str]:
    """Join the process group torchrun describes (WORLD_SIZE > 1), or None for a single process; returns it
    with the device this rank's model goes on (cuda:LOCAL_RANK on GPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None, device
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise DataParallelError(
            f"WORLD_SIZE={world} but {', '.join(missing)} unset: start the trainer with torchrun "
            "(torchrun --nproc-per-node N $(which densealign) trainer), which sets them all"
        )
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    parallel = DataParallel(rank, world, timeout_seconds)
    backend = "nccl" if cuda else "gloo"
    parallel._collective(
        "joining the process group",
        lambda: dist.init_process_group(backend, timeout=timedelta(seconds=timeout_seconds)),
    )
    logger.info("rank %d of %d (%s, model on %s)", rank, world, backend, device)
    return parallel, device
