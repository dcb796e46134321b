"""Data parallel over ``torch.distributed``: world info, sharding, sums over ranks, one writer,
and errors that stop every rank.

Every helper is the identity in a single process (no process group, or a group of one), so the
commands run one code path: each rank takes a contiguous shard of the examples, computes its share
of a sum with the single-process weights (``1 / B`` of the whole batch, never of the shard), and
the shares are summed over the ranks (docs/scale.md, "Data parallel"). The products every rank
then sees are bitwise the same, so eigensolvers and trace estimators started from the same seed
build the same basis everywhere.

Errors: :func:`guard` wraps a command. A rank that raises writes its message to the process
group's store; the other ranks watch the store while they wait in a collective (every
collective here is asynchronous and polled), so they raise :class:`RankFailure` with that
message instead of waiting forever for a rank that will not come.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from alignscope.errors import RankFailure

if TYPE_CHECKING:
    from alignscope.data.encode import LMBatch

# How long a rank that failed waits for the others to read its message, and how long the others
# look for that message once a collective broke (seconds).
_ACK_TIMEOUT = 60.0
_READ_TIMEOUT = 10.0
# How often a rank waiting in a collective looks for another rank's failure (seconds).
_POLL_STORE = 0.25
_POLL_MAX = 0.002  # the longest sleep between two looks at a pending collective


def _dist():
    import torch.distributed as dist

    return dist


def initialized() -> bool:
    """A default process group exists."""
    dist = _dist()
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process' rank (0 without a process group)."""
    return _dist().get_rank() if initialized() else 0


def world_size() -> int:
    """How many processes share the work (1 without a process group)."""
    return _dist().get_world_size() if initialized() else 1


def active() -> bool:
    """More than one process: the work is sharded and the sums are reduced."""
    return world_size() > 1


def is_main() -> bool:
    """Rank 0: the one process that writes outputs and shows progress."""
    return rank() == 0


def describe() -> dict[str, Any]:
    """``{"world_size", "backend"}`` for results files."""
    return {
        "world_size": world_size(),
        "backend": str(_dist().get_backend()) if initialized() else None,
    }


# --- setup ---------------------------------------------------------------------------------------


def init_from_env(device: str = "cpu") -> bool:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1 in the environment) when
    none is initialised yet: NCCL for CUDA devices, gloo otherwise; on CUDA each process takes
    the GPU of its ``LOCAL_RANK``.

    Returns:
        True when this call created the group (the caller destroys it at the end).
    """
    if initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    dist = _dist()
    cuda = str(device).startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    return True


def check_unsharded(model: torch.nn.Module) -> None:
    """Refuse parameters that FSDP, DTensor or DeepSpeed ZeRO-3 have split across ranks.

    Curvature products differentiate the selected parameters as whole tensors on every rank;
    alignscope shards the data, not the weights (docs/scale.md says what fits instead).

    Raises:
        ValueError: a wrapped or sharded model, naming the fix.
    """
    kind = type(model).__name__
    if kind in ("DistributedDataParallel", "FullyShardedDataParallel", "DeepSpeedEngine"):
        raise ValueError(
            f"the model is wrapped in {kind}: pass the plain model (ddp_model.module); "
            "alignscope shards the data across ranks itself and keeps whole parameters on each"
        )
    for name, p in model.named_parameters():
        sharded = None
        if type(p).__name__ == "DTensor" or hasattr(p, "_local_tensor"):
            sharded = "a DTensor (FSDP2 / tensor parallel)"
        elif type(p).__name__ == "FlatParameter" or getattr(p, "_is_flat_param", False):
            sharded = "an FSDP FlatParameter"
        elif hasattr(p, "ds_id") or hasattr(p, "ds_status"):
            sharded = "a DeepSpeed ZeRO parameter"
        if sharded is not None:
            raise ValueError(
                f"parameter {name} is {sharded}: sharded parameters are not supported. "
                "alignscope keeps whole parameters on every rank and shards the data; for a model "
                "too large for one device use LoRA (--lora-r) or a block-wise selection of late "
                "layers in 16-bit weights (docs/scale.md)"
            )


# --- sharding ------------------------------------------------------------------------------------


def shard_range(n: int, what: str = "examples") -> range:
    """This rank's contiguous block of ``range(n)``; ranks differ by at most one item.

    Raises:
        ValueError: fewer items than ranks.
    """
    size, r = world_size(), rank()
    if n < size:
        raise ValueError(
            f"{n} {what} cannot be shared by {size} processes: use more examples or fewer "
            "processes (--nproc_per_node)"
        )
    base, extra = divmod(n, size)
    start = r * base + min(r, extra)
    return range(start, start + base + (1 if r < extra else 0))


def shard_batch(batch: LMBatch, what: str = "examples") -> LMBatch:
    """This rank's examples of ``batch`` (the whole batch in one process)."""
    if not active():
        return batch
    part = shard_range(batch.size, what)
    return batch.select(slice(part.start, part.stop))


# --- collectives (identity in one process) -------------------------------------------------------


def _comm_device() -> torch.device:
    dist = _dist()
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _collective(fn, *args, **kwargs) -> None:
    """Run a collective asynchronously and wait for it while watching the store: a rank that
    failed meanwhile (:func:`guard`) never joins it, so its message is raised here instead of
    waiting forever; a broken group raises that message too when there is one."""
    try:
        work = fn(*args, **kwargs, async_op=True)
        delay = 0.0  # short waits first: a product's all-reduce usually ends within a few ms
        last_check = time.monotonic()
        while not work.is_completed():
            time.sleep(delay)
            delay = min(_POLL_MAX, delay + 5e-5)
            if time.monotonic() - last_check > _POLL_STORE:
                last_check = time.monotonic()
                failure = _read_failure(timeout=0.0)
                if failure is not None:
                    raise failure
        work.wait()
    except RankFailure:
        raise
    except Exception as err:  # noqa: BLE001 - any failure of the group: look for the cause
        failure = _read_failure()
        if failure is not None:
            raise failure from err
        raise


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over the ranks (a new tensor; ``tensor`` itself in one process)."""
    if not active():
        return tensor
    dev = _comm_device()
    buf = tensor.detach().to(dev, copy=True).contiguous()
    _collective(_dist().all_reduce, buf)
    return buf.to(tensor.device)


def all_reduce_float(value: float) -> float:
    """A float summed over the ranks (float64)."""
    if not active():
        return value
    return float(all_reduce_sum(torch.tensor([value], dtype=torch.float64))[0])


def all_reduce_grads(params: Sequence[torch.nn.Parameter]) -> None:
    """Sum the ``.grad`` of ``params`` over the ranks in place, through one flat buffer per dtype
    (each rank's loss is already its share of the batch loss, so the sum is the batch gradient)."""
    if not active():
        return
    # Every rank runs the same model and loss, so the same parameters have a gradient on each
    # (a parameter without one is skipped by the optimizer, as in one process).
    with_grad = [p for p in params if p.grad is not None]
    by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
    for p in with_grad:
        by_dtype.setdefault(p.grad.dtype, []).append(p)
    for group in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group])
        flat = all_reduce_sum(flat)
        offset = 0
        for p in group:
            n = p.grad.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
            offset += n


def all_gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Every rank's ``rows`` ``[n_r, ...]`` concatenated in rank order (the shards back in the
    order of the whole batch)."""
    if not active():
        return rows
    dist = _dist()
    dev = _comm_device()
    count = torch.tensor([rows.shape[0]], dtype=torch.long, device=dev)
    counts = [torch.zeros_like(count) for _ in range(world_size())]
    _collective(dist.all_gather, counts, count)
    sizes = [int(c) for c in counts]
    width = max(sizes)
    pad = torch.zeros((width, *rows.shape[1:]), dtype=rows.dtype, device=dev)
    pad[: rows.shape[0]] = rows.to(dev)
    parts = [torch.empty_like(pad) for _ in sizes]
    _collective(dist.all_gather, parts, pad)
    return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)]).to(rows.device)


def _to_bytes(obj: Any) -> torch.Tensor:
    return torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)


def _from_bytes(buf: torch.Tensor) -> Any:
    return pickle.loads(buf.numpy().tobytes())  # noqa: S301 - our own ranks' data


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order."""
    if not active():
        return [obj]
    dist = _dist()
    dev = _comm_device()
    data = _to_bytes(obj)
    count = torch.tensor([data.numel()], dtype=torch.long, device=dev)
    counts = [torch.zeros_like(count) for _ in range(world_size())]
    _collective(dist.all_gather, counts, count)
    sizes = [int(c) for c in counts]
    pad = torch.zeros(max(sizes), dtype=torch.uint8, device=dev)
    pad[: data.numel()] = data.to(dev)
    parts = [torch.empty_like(pad) for _ in sizes]
    _collective(dist.all_gather, parts, pad)
    return [_from_bytes(p[:n].cpu()) for p, n in zip(parts, sizes, strict=True)]


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not active():
        return obj
    dist = _dist()
    dev = _comm_device()
    data = _to_bytes(obj) if rank() == src else None
    count = torch.tensor([0 if data is None else data.numel()], dtype=torch.long, device=dev)
    _collective(dist.broadcast, count, src=src)
    buf = torch.empty(int(count), dtype=torch.uint8, device=dev)
    if data is not None:
        buf.copy_(data.to(dev))
    _collective(dist.broadcast, buf, src=src)
    return obj if data is not None else _from_bytes(buf.cpu())


def barrier() -> None:
    """Wait for every rank; a rank that failed meanwhile raises its message here."""
    if active():
        all_reduce_sum(torch.zeros(1))


def sharded_map(items: Sequence[Any], fn, chunk: int) -> list[Any]:
    """``fn`` applied to consecutive chunks of ``items`` (``fn(chunk_items) -> list``), the chunks
    shared among the ranks and the results gathered in order on every rank.

    The chunks are the ones a single process makes, so a batched computation whose result depends
    on the batch (padding in generation) gives the single-process answer.
    """
    starts = list(range(0, len(items), chunk))
    if not active():
        return [y for s in starts for y in fn(items[s : s + chunk])]
    size, r = world_size(), rank()
    mine = {s: fn(items[s : s + chunk]) for i, s in enumerate(starts) if i % size == r}
    gathered: dict[int, list[Any]] = {}
    for part in all_gather_objects(mine):
        gathered.update(part)
    return [y for s in starts for y in gathered[s]]


# --- operators -----------------------------------------------------------------------------------


class SumOverRanks:
    """A curvature operator whose every product and form is summed over the ranks.

    Each rank builds the operator on its shard with the single-process weights (``n_total``), so
    the sum is the product of the whole batch. In one process it is the operator itself. Other
    attributes (``n_products``, ``theta``, ...) are those of the rank's operator.
    """

    def __init__(self, op: Any, n_examples: int | None = None) -> None:
        self.op = op
        self._n_examples = n_examples

    def __getattr__(self, name: str) -> Any:
        if name in ("op", "_n_examples"):
            raise AttributeError(name)
        return getattr(self.op, name)

    @property
    def shape(self) -> tuple[int, int]:
        return self.op.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.op.dtype

    @property
    def device(self) -> torch.device:
        return self.op.device

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(self.op.matvec(v))

    __call__ = matvec

    def matmat(self, vectors: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(self.op.matmat(vectors))

    def quad(self, u: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
        return all_reduce_sum(torch.as_tensor(self.op.quad(u, w)))

    def quad_diag(self, vectors: torch.Tensor, memory_budget: int | None = None) -> torch.Tensor:
        return all_reduce_sum(self.op.quad_diag(vectors, memory_budget))

    def gram(self, vectors: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(self.op.gram(vectors))

    def gradient(self) -> torch.Tensor:
        return all_reduce_sum(self.op.gradient())

    @property
    def n_examples(self) -> int:
        """Examples of the whole batch (the Gram route's rows per draw)."""
        return self._n_examples if self._n_examples is not None else self.op.n_examples

    def mc_factor_rows(
        self,
        samples_per_example: int = 1,
        generator: torch.Generator | None = None,
        memory_budget: int = 2 * 2**30,
        out_dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Every rank's Monte-Carlo factor rows, in batch order. Each rank draws from its own
        stream (seeded from ``generator`` and its rank): the same distribution as one process,
        not the same draws."""
        if active():
            base = torch.Generator().manual_seed(0) if generator is None else generator
            seed = int(torch.randint(0, 2**62, (1,), generator=base)) + rank()
            generator = torch.Generator().manual_seed(seed)
        rows = self.op.mc_factor_rows(samples_per_example, generator, memory_budget, out_dtype)
        return all_gather_rows(rows)

    def empirical_factor_rows(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return all_gather_rows(self.op.empirical_factor_rows(*args, **kwargs))


# --- errors --------------------------------------------------------------------------------------

_state = {"depth": 0, "runs": 0, "key": None}


def _store():
    try:
        return _dist().distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - no store: errors still stop the ranks, without the message
        return None


def _read_failure(timeout: float = _READ_TIMEOUT) -> RankFailure | None:
    """The failure another rank posted for the current guarded run (None when none shows up)."""
    key = _state["key"]
    store = _store() if initialized() else None
    if key is None or store is None:
        return None
    deadline = time.monotonic() + timeout
    while True:
        try:
            if store.check([f"{key}/error"]):
                info = json.loads(store.get(f"{key}/error").decode())
                store.add(f"{key}/ack", 1)
                return RankFailure(info["rank"], info["kind"], info["message"])
        except Exception:  # noqa: BLE001 - the store went away with the failed rank
            return None
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)


def _post_failure(err: BaseException) -> None:
    """Tell the other ranks why this one stops and wait until they have read it (they look in
    every collective they wait in), so the message outlives this process' store."""
    key, store = _state["key"], _store()
    if store is None or key is None:
        return
    dist = _dist()
    try:
        if store.add(f"{key}/failed", 1) == 1:  # the first failure is the one reported
            info = {"rank": dist.get_rank(), "kind": type(err).__name__, "message": str(err)}
            store.set(f"{key}/error", json.dumps(info))
        others = dist.get_world_size() - store.add(f"{key}/failed", 0)
        deadline = time.monotonic() + _ACK_TIMEOUT
        while store.add(f"{key}/ack", 0) < others and time.monotonic() < deadline:
            time.sleep(0.05)
    except Exception:  # noqa: BLE001 - reporting must never mask the original error
        pass


@contextlib.contextmanager
def guard() -> Iterator[None]:
    """Run a command so that an error on any rank stops every rank with that rank's message.

    Nested guards are one guard. On success the ranks meet once more at the end, so a rank that
    failed after the last collective still stops the others. A rank that raises posts its error
    to the store, waits (up to a minute) until the others have read it and re-raises; the
    others raise :class:`RankFailure` with the message. The group is left as it is: after a
    failure its collectives are out of step, so the caller ends it (the command line exits).
    Identity in one process.
    """
    if not active() or _state["depth"] > 0:
        _state["depth"] += 1
        try:
            yield
        finally:
            _state["depth"] -= 1
        return
    _state["runs"] += 1
    _state["key"] = f"alignscope/run{_state['runs']}"
    _state["depth"] = 1
    try:
        yield
        barrier()
    except RankFailure:
        raise
    except BaseException as err:
        _post_failure(err)
        raise
    finally:
        _state["depth"] = 0
