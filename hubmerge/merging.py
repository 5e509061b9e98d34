"""Execute a :class:`~hubmerge.plan.MergePlan`: yield every output tensor as blocks of rows, merged in fp32 and cast
once to the output dtype. Nothing larger than a few blocks (plus one adapter's LoRA factors) is ever in memory.

The input rows are read on a reading thread, a couple of blocks ahead (:class:`_Reader`). :func:`merge_into` runs
the merge on the calling thread and hands the blocks to the writers on a writer thread (reading, writing, hashing
and fsync release the GIL, as torch's kernels do), through bounded queues of reused buffers, so reading, computing
and writing overlap and memory stays a few blocks.
"""

from __future__ import annotations

import gc
import queue
import threading
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass

import torch

from .directio import ALIGN
from .errors import CorruptFileError, IncompatibleError
from .model.adapters import LoraPair
from .plan import MergePlan, TensorPlan
from .tensorio.source import aligned_buffer, row_count

DEFAULT_BLOCK_BYTES = 64 * 1024 * 1024  # fp32 working size of one block: big enough for full-speed I/O
QUEUE_BLOCKS = 3  # blocks computed ahead of the writer
READ_AHEAD = 2  # input blocks read ahead of the merge, on the reading thread
CHUNK_ELEMS = 512 * 1024  # fp32 elements updated at once (2 MB: stays in the CPU's cache)


@dataclass
class Block:
    """Rows ``[start, start + len(data))`` of output tensor ``index`` (``name``), in the output dtype.

    ``data`` may live in a buffer the merge reuses (see :class:`BufferPool`): a consumer that keeps it beyond
    handing it back must copy it.
    """

    index: int
    name: str
    start: int
    data: torch.Tensor
    buffer: torch.Tensor | None = None  # the pool buffer ``data`` views, returned to the pool once written


class BufferPool:
    """A fixed number of byte buffers for output blocks: the merge takes one per block and the writer gives it back
    once every writer wrote it, so at most ``count`` blocks exist at a time and no block faults in fresh memory."""

    def __init__(self, count: int):
        self._free: queue.Queue[torch.Tensor | None] = queue.Queue()
        for _ in range(count):
            self._free.put(None)  # allocated on first use, at the size the first block needs
        self.failed = threading.Event()

    def take(self, nbytes: int, stop: threading.Event | None = None) -> torch.Tensor:
        """A buffer of at least ``nbytes``, once one is free; raises once the writer failed (or ``stop`` is set)."""
        while True:
            try:
                buf = self._free.get(timeout=0.1)
                break
            except queue.Empty:
                if self.failed.is_set() or (stop is not None and stop.is_set()):
                    raise RuntimeError("the writer thread stopped") from None
        if buf is None or buf.numel() < nbytes + 2 * ALIGN:
            buf = aligned_buffer(nbytes)  # a block may be read into it with O_DIRECT
        return buf

    def give(self, buf: torch.Tensor | None) -> None:
        if buf is not None:
            self._free.put(buf)


_ZEROS: list[torch.Tensor] = []  # CHUNK_ELEMS fp16 zeros, made on first use


def _finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in ``t``: one pass, no boolean temporary.

    fp16 (the common case): a dot product with zeros, a cache-sized piece at a time, is NaN exactly when a value is
    Inf or NaN (0 * Inf is NaN), and runs ~3x faster than a min/max. Other dtypes: one min/max pass (NaN propagates
    into both)."""
    if t.numel() == 0:
        return True
    flat = t.reshape(-1)
    if t.dtype == torch.float16:
        if not _ZEROS:
            _ZEROS.append(torch.zeros(CHUNK_ELEMS, dtype=torch.float16))
        zeros = _ZEROS[0]
        return all(
            bool(torch.isfinite(torch.dot(flat[i : i + CHUNK_ELEMS], zeros[: min(CHUNK_ELEMS, len(flat) - i)])))
            for i in range(0, len(flat), CHUNK_ELEMS)
        )
    lo, hi = torch.aminmax(flat)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def block_rows(shape: tuple[int, ...], align: int, block_bytes: int) -> int:
    """Rows per block: as many as fit ``block_bytes`` in fp32, rounded down to a multiple of ``align``
    (writers that permute rotary rows need whole heads), at least ``align``."""
    row_elems = 1
    for d in shape[1:]:
        row_elems *= d
    rows = max(align, block_bytes // (4 * max(row_elems, 1)) // align * align)
    return min(rows, max(row_count(shape), 1))


@dataclass
class _Term:
    """One adapter's change to a tensor, loaded in fp32, applied to rows a..b of the fp32 work block by
    :func:`_apply`: ``rows += scale * left[a:b] @ right``, then with ``magnitude`` (DoRA) each row scaled to
    magnitude / its norm, or with ``columns`` (DoRA on an embedding) each column to magnitude / its norm over all
    rows (``column_factor``, found by :func:`_column_factors` first); without ``right``, ``rows += scale *
    left[a:b]`` (a bias); with ``index`` (sorted token ids), the rows at those ids become the rows of ``left``."""

    left: torch.Tensor
    right: torch.Tensor | None
    scale: float
    magnitude: torch.Tensor | None = None
    index: torch.Tensor | None = None
    columns: bool = False
    column_factor: torch.Tensor | None = None

    @property
    def plain(self) -> bool:
        return self.right is not None and self.magnitude is None


def _term(pair: LoraPair, tensors: list[torch.Tensor]) -> _Term:
    if pair.kind == "linear":
        a, b, *magnitude = tensors
        return _Term(b, a, pair.scale, magnitude[0] if magnitude else None)
    if pair.kind == "embedding":
        a, b, *magnitude = tensors
        return _Term(a.t(), b.t(), pair.scale, magnitude[0] if magnitude else None, columns=bool(magnitude))
    if pair.kind == "bias":
        return _Term(tensors[0], None, pair.scale)
    order = sorted(range(len(pair.indices)), key=pair.indices.__getitem__)
    return _Term(tensors[0][order], None, 1.0, index=torch.tensor([pair.indices[i] for i in order]))


def _factors(plan: MergePlan, tensor: TensorPlan, join: bool) -> list[_Term]:
    """Load each term's adapter tensors in fp32, in the order the adapters apply.

    With ``join``, several plain LoRA terms become one (lefts scaled, ranks stacked): the same sum in another fp32
    order, ~25% faster for r=8 + r=64. Used for 16-bit outputs, where the order is invisible after the cast but for
    rare ties; an fp32 output keeps PEFT's adapter-by-adapter order bit for bit. DoRA, biases and trained rows keep
    their order: each depends on what came before."""
    out = []
    for term in tensor.terms:
        pair = term.pair
        tensors = [t.read().float() for t in pair.tensors]
        if not all(_finite(t) for t in tensors):
            raise CorruptFileError(
                f"{plan.adapters[term.adapter].weights}: {pair.variant} weights of {pair.module} contain "
                "NaN or Inf; the adapter is damaged, download or train it again"
            )
        out.append(_term(pair, tensors))
    if len(out) > 1 and join and all(t.plain for t in out):  # several adapters (Plus recipe): one GEMM of rank sum(r)
        left = torch.cat([t.scale * t.left for t in out], dim=1)
        return [_Term(left, torch.cat([t.right for t in out if t.right is not None], dim=0), 1.0)]
    return out


def _apply(term: _Term, w: torch.Tensor, a: int, b: int) -> None:
    """Apply ``term`` to ``w``, the rows a..b of a tensor in fp32 (see :class:`_Term`)."""
    if term.index is not None:
        lo, hi = (int(i) for i in torch.searchsorted(term.index, torch.tensor([a, b])))
        if hi > lo:
            w[term.index[lo:hi] - a] = term.left[lo:hi]
    elif term.right is None:
        w.add_(term.left[a:b], alpha=term.scale)
    else:
        w.addmm_(term.left[a:b], term.right, alpha=term.scale)
        if term.column_factor is not None:
            w.mul_(term.column_factor)
        elif term.magnitude is not None and not term.columns:  # rows are whole: each row's norm is complete here
            w.mul_((term.magnitude[a:b] / torch.linalg.vector_norm(w, dim=1)).unsqueeze(1))


def _column_factors(reader: _Reader, index: int, rows: int, terms: list[_Term], step: int) -> None:
    """DoRA on an embedding scales each column by magnitude / that column's norm over every row: for each such term,
    one pass over the tensor (``index``, from ``reader``; with the terms before it applied) sums the squares first.
    Memory: one block."""
    for j, term in enumerate(terms):
        if not term.columns or term.magnitude is None:
            continue
        squares = torch.zeros_like(term.magnitude)
        for start in range(0, rows, step):
            _, raw, buf = reader.take(index, start)
            w = raw.float()
            reader.give(buf)
            for t in terms[: j + 1]:  # this term's factor is not set yet: W + delta
                _apply(t, w, start, start + w.shape[0])
            squares += w.square().sum(dim=0)
        term.column_factor = term.magnitude / squares.sqrt()


def _add_factors(raw: torch.Tensor, out: torch.Tensor, terms: list[_Term], start: int, work: torch.Tensor) -> bool:
    """``out = raw`` changed by each term in turn, in fp32, a few rows at a time: each chunk is converted, updated,
    cast and checked for NaN/Inf while it sits in the CPU's cache, instead of four passes over a block in memory.
    Returns whether every value of ``out`` is finite."""
    rows = raw.shape[0]
    row_elems = raw.numel() // rows if rows else 0
    step = max(1, CHUNK_ELEMS // max(row_elems, 1))
    finite = True
    for lo in range(0, rows, step):
        hi = min(lo + step, rows)
        w = work[: (hi - lo) * row_elems].view(hi - lo, *raw.shape[1:])
        w.copy_(raw[lo:hi])
        for term in terms:
            _apply(term, w, start + lo, start + hi)
        chunk = out[lo:hi]
        chunk.copy_(w)
        finite = finite and _finite(chunk)  # after the cast: a finite fp32 value can overflow fp16
    return finite


def _column_passes(tensor: TensorPlan) -> int:
    """How many DoRA embedding terms the tensor has: its rows are read once more for each (their column norms)."""
    return sum(t.pair.kind == "embedding" and len(t.pair.tensors) > 2 for t in tensor.terms)


@dataclass(frozen=True)
class _Step:
    """Rows ``[start, stop)`` of plan tensor ``index``, read as they are into a block of the output
    (``passthrough``) or into a raw input buffer for the arithmetic."""

    index: int
    start: int
    stop: int
    passthrough: bool


def _input_steps(plan: MergePlan, todo: Sequence[int], block_bytes: int) -> list[_Step]:
    """Every block of input rows :func:`merge_blocks` reads, in the order it reads them."""
    steps = []
    for index in todo:
        tensor = plan.tensors[index]
        rows = row_count(tensor.shape)
        step = block_rows(tensor.shape, plan.base.head_dim, block_bytes)
        passthrough = not tensor.terms and tensor.source.dtype == plan.out_dtype(tensor)
        for _ in range(_column_passes(tensor)):
            steps += [_Step(index, a, min(a + step, rows), False) for a in range(0, rows, step)]
        steps += [_Step(index, a, min(a + step, rows), passthrough) for a in range(0, rows, step)]
    return steps


class _Reader:
    """Reads the input rows of :func:`_input_steps` on a thread of its own, up to ``READ_AHEAD`` blocks ahead of
    the merge: the copy out of the page cache, a wait for the disk or for a shard still downloading happen there,
    while the merge thread computes. A failed read is raised by :meth:`take`, where the merge would have read.

    A pass-through block is read into an ``out`` pool buffer (it goes to the writer as it is); every other block
    into one of this reader's own buffers, which the merge gives back (:meth:`give`) once it is done with it."""

    def __init__(self, plan: MergePlan, steps: list[_Step], out: BufferPool | None) -> None:
        self._plan, self._steps, self._out = plan, steps, out
        self._raw = BufferPool(READ_AHEAD + 1)  # queued + being read + being merged
        self._ready: queue.Queue[tuple[_Step, torch.Tensor | None, torch.Tensor | None, BaseException | None]]
        self._ready = queue.Queue(maxsize=READ_AHEAD)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hubmerge-reader", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        order = list(dict.fromkeys(step.index for step in self._steps))
        following = dict(zip(order, order[1:], strict=False))
        current = -1
        for step in self._steps:
            data = buffer = None
            error: BaseException | None = None
            try:
                source = self._plan.tensors[step.index].source
                if step.index != current:  # the disk reads the next tensor while this one is read and merged
                    current = step.index
                    if current in following:
                        self._plan.tensors[following[current]].source.prefetch()
                nbytes = (step.stop - step.start) * _numel(source.shape[1:]) * source.dtype.itemsize
                pool = self._out if step.passthrough else self._raw
                if pool is None:  # pass-through blocks without a pool are the caller's to keep: fresh ones
                    buffer = torch.empty(nbytes, dtype=torch.uint8)
                else:
                    buffer = pool.take(nbytes, self._stop)
                data = source.read_into(buffer, step.start, step.stop)
            except BaseException as exc:  # raised on the merge thread, where it reads this block
                error = exc
            while not self._stop.is_set():
                try:
                    self._ready.put((step, data, buffer, error), timeout=0.1)
                    break
                except queue.Full:
                    pass
            if error is not None or self._stop.is_set():
                return

    def take(self, index: int, start: int) -> tuple[_Step, torch.Tensor, torch.Tensor | None]:
        """The next step (rows of tensor ``index`` from row ``start``), its rows and the buffer holding them."""
        while True:
            try:
                step, data, buffer, error = self._ready.get(timeout=0.2)  # a timed wait keeps Ctrl-C working
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._ready.empty():
                    raise RuntimeError("the reading thread stopped") from None
        if error is not None:
            raise error
        assert (step.index, step.start) == (index, start) and data is not None, "merge and reader out of step"
        return step, data, buffer

    def give(self, buffer: torch.Tensor | None) -> None:
        self._raw.give(buffer)

    def close(self) -> None:
        """Stop reading: the merge ended (the thread is done) or failed. A read still waiting for a shard that is
        downloading is not waited for: the thread ends at its next step, touching nothing the merge uses."""
        self._stop.set()
        self._thread.join(timeout=1.0)


RUNTIME_BYTES = 320 * 2**20  # python, torch and hubmerge themselves (measured: ~300 MB before the first block)


def estimate_memory(plan: MergePlan, block_bytes: int = DEFAULT_BLOCK_BYTES, depth: int = QUEUE_BLOCKS) -> int:
    """Peak resident bytes :func:`merge_into` needs for ``plan``: the runtime, the pool of output blocks, the input
    block and fp32 scratch, and the largest tensor's LoRA factors in fp32. It does not grow with the model."""
    align = plan.base.head_dim
    largest_out = largest_in = factors = 0
    for t in plan.tensors:
        rows = max(row_count(t.shape), 1)
        row_elems = _numel(t.shape) // rows
        n = block_rows(t.shape, align, block_bytes) * row_elems
        largest_out = max(largest_out, n * plan.out_dtype(t).itemsize)
        largest_in = max(largest_in, n * t.source.dtype.itemsize)
        factors = max(factors, sum(4 * _numel(r.shape) for x in t.terms for r in x.pair.tensors))
    blocks = (depth + 2) * largest_out + (READ_AHEAD + 1) * largest_in  # the output pool and the reader's own
    return RUNTIME_BYTES + blocks + CHUNK_ELEMS * 4 + 2 * factors


def merge_blocks(
    plan: MergePlan,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    *,
    pool: BufferPool | None = None,
    skip: Collection[int] = (),
) -> Iterator[Block]:
    """Yield the merged model, tensor after tensor in plan order, block after block.

    ``W = W0 + sum_i s_i * (B_i @ A_i)`` in fp32, cast once. Tensors with nothing to add are passed through as
    bytes (one cast when the output dtype differs). With a ``pool``, each block's data lives in a pool buffer that
    the consumer must give back (``pool.give(block.buffer)``) once done with it; without, every block is fresh.
    Tensors whose index is in ``skip`` (already written by an interrupted run) are neither read nor yielded.

    Raises:
        IncompatibleError: a merged value is NaN/Inf in the output dtype.
        CorruptFileError: an adapter tensor is NaN/Inf, or a file is truncated.
    """
    align = plan.base.head_dim
    scratch: dict[str, torch.Tensor] = {}  # reused between blocks: the fp32 work block

    def buffer(key: str, nbytes: int) -> torch.Tensor:
        buf = scratch.get(key)
        if buf is None or buf.numel() < nbytes:
            buf = scratch[key] = torch.empty(nbytes, dtype=torch.uint8)
        return buf

    todo = [i for i in range(len(plan.tensors)) if i not in skip]
    reader = _Reader(plan, _input_steps(plan, todo, block_bytes), pool)
    try:
        for index in todo:
            tensor = plan.tensors[index]
            out_dtype = plan.out_dtype(tensor)
            factors = _factors(plan, tensor, join=out_dtype.itemsize < 4)
            rows = row_count(tensor.shape)
            step = block_rows(tensor.shape, align, block_bytes)
            if _column_passes(tensor):
                _column_factors(reader, index, rows, factors, step)
            for start in range(0, rows, step):
                read, raw, raw_buf = reader.take(index, start)
                shape = (read.stop - start, *tensor.shape[1:]) if tensor.shape else ()
                n = (read.stop - start) * (_numel(tensor.shape) // rows if rows else 0)
                if read.passthrough:  # no arithmetic: the reader read the rows into the block itself
                    block, out_buf = raw, (raw_buf if pool is not None else None)
                else:
                    out_buf = pool.take(n * out_dtype.itemsize) if pool is not None else None
                    if out_buf is not None:
                        out = out_buf[: n * out_dtype.itemsize].view(out_dtype).reshape(shape)
                    else:
                        out = torch.empty(shape, dtype=out_dtype)
                    if factors:
                        work = buffer("work", CHUNK_ELEMS * 4).view(torch.float32)
                        finite = _add_factors(raw, out, factors, start, work)
                    else:
                        out.copy_(raw)
                    reader.give(raw_buf)
                    block = out
                if tensor.changed and block.is_floating_point() and not (finite if factors else _finite(block)):
                    if pool is not None:
                        pool.give(out_buf)
                    origin = (
                        tensor.origin
                        if not factors
                        else ", ".join(plan.adapters[t.adapter].label for t in tensor.terms)
                    )
                    raise IncompatibleError(
                        f"{tensor.name}: the merge gives NaN/Inf in {str(out_dtype).removeprefix('torch.')} "
                        f"(from {origin}); the adapter is damaged or its values overflow: try --dtype bfloat16"
                    )
                yield Block(index, tensor.name, start, block, out_buf)
    finally:
        reader.close()


def merge_into(
    plan: MergePlan,
    writers: Sequence,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    on_block: Callable[[int], None] | None = None,
    depth: int = QUEUE_BLOCKS,
    skip: Collection[int] = (),
) -> None:
    """Run the merge and hand every block to each of ``writers`` (``writer.write(block)``, in plan order).

    The merge runs on this thread; the writers run on one writer thread fed through a queue of at most ``depth``
    blocks, so computing overlaps writing. ``on_block(nbytes)`` is called as each block is queued (progress).
    Errors of either side stop both and are raised here, after the writer thread has ended (writers can then be
    aborted safely).
    """
    pool = BufferPool(depth + 2)  # queued + being written + being computed or read (estimate_memory counts them)
    blocks: queue.Queue[Block | None] = queue.Queue(maxsize=depth)
    failure: list[BaseException] = []
    stop = threading.Event()

    def drain() -> None:
        try:
            while (block := blocks.get()) is not None and not stop.is_set():
                for w in writers:
                    w.write(block)
                pool.give(block.buffer)
        except BaseException as exc:  # handed to the merging thread
            failure.append(exc)
            pool.failed.set()

    def put(item: Block | None) -> bool:
        while thread.is_alive():
            try:
                blocks.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    thread = threading.Thread(target=drain, name="hubmerge-writer", daemon=True)
    thread.start()
    # One torch thread: the writer thread (writing, hashing) and the input hashing keep the other cores busy, and
    # torch's fork-join threads lose more waiting on a descheduled partner than they gain on cache-sized chunks.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # No garbage collection while merging: the loop frees everything by reference counting, and the collector would
    # otherwise keep walking the young objects, and now and then every object torch's import created.
    collecting = gc.isenabled()
    gc.disable()
    try:
        for block in merge_blocks(plan, block_bytes, pool=pool, skip=skip):
            if not put(block):
                break
            if on_block is not None:
                on_block(block.data.numel() * block.data.element_size())
    except BaseException:
        stop.set()
        if not failure:
            raise
    finally:
        if collecting:
            gc.enable()
        torch.set_num_threads(threads)
        put(None)
        thread.join()
    if failure:
        raise failure[0]
