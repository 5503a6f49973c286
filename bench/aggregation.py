"""Benchmark: the server's aggregation path against a memory copy of the same bytes.

For n real reply messages (Flower ``Message`` with an ``ArrayRecord`` of float32 tensors, as a
site sends them: one packed ``Array`` for a LoRA delta, :func:`common.wire.packed_record`;
``--wire tensors`` builds the older one-``Array``-per-tensor layout, which the server still
reads), the server path is what the strategies run (:class:`server.blocks.BlockedSum`):
LoRA (:class:`server.lora_strategy.DPFedAvgLoRA`): ``read_update`` per reply (keys, shapes,
dtype, finite, flat norm <= C; float32 views), then ``GaussianSumMechanism.add_bounded_block``
per block of 8 checked replies (bound each by its norm, add the block in one pass); DPAgg-TI
(:class:`server.dpagg_strategy.DPAggTIStrategy`): ``read_vector_view`` + ``add_block``; then one
``release`` (seeded Gaussian noise over the total, divided by the denominator). The "sum"
arm is a round after the first (the LoRA strategy writes its float64 sum over the last round's
buffer), "first" a run's first round (a new buffer, whose pages the OS faults in and zeroes).
The arms "validate" (the checks alone) and "add" (the blocked adds alone, on replies already
read) split the sum's cost. The baseline copies the same float32 bytes (every reply's Arrays, out of
the same Array objects) into a preallocated buffer with ``numpy.copyto``, in the same process,
interleaved with the server path. Throughput = float32 payload bytes / seconds.

    .venv/bin/python -m bench.aggregation --replies 16 --repeats 5
    .venv/bin/python -m bench.aggregation --clock cpu   # this process's CPU time:
                                                                    # steadier on a shared machine
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch
from flwr.app import Message, RecordDict
from flwr.common import Metadata

from bench.native_passes import compile_passes
from bench.shapes import SD15_EMBEDDING_DIM, SD15_UNET, lora_shapes, tiny_unet_config
from common import keys
from common.dp import GaussianSumMechanism, NoiseSource
from common.dp import kernels as fused
from common.dp.flatsum import FlatRecord, FlatSum, RunningSum
from common.wire import Layout, packed_record, tree_record
from server.blocks import BLOCK, BlockedSum
from server.replies import read_update, read_vector_view

CLIP = 1.0
# "cpu" (this process's CPU time) resists other load on a shared CPU; "wall" is the default
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


WIRES = ("packed", "tensors")  # a site's LoRA reply layout (common.wire): what sites send, the older one


def reply_message(arrays: dict[str, np.ndarray], node: int, wire: str = "packed") -> Message:
    """A site's reply as the server pulls it: ``arrays`` in the ``wire`` layout."""
    meta = Metadata(run_id=1, message_id=f"r{node}", src_node_id=node, dst_node_id=0, reply_to_message_id=f"q{node}",
                    group_id="1", created_at=0.0, ttl=60.0, message_type="train")
    tree = {k: torch.from_numpy(v) for k, v in arrays.items()}
    record = packed_record(tree) if wire == "packed" else tree_record(tree)
    return Message(content=RecordDict({keys.ARRAYS: record}), metadata=meta)


def random_update(shapes: dict[str, tuple[int, ...]], seed: int, norm: float) -> dict[str, np.ndarray]:
    """float32 tensors of the given shapes with flat L2 norm ``norm`` (a clipped site delta)."""
    rng = np.random.default_rng(seed)
    tree = {k: rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()}
    scale = norm / math.sqrt(sum(float(np.dot(v.ravel(), v.ravel())) for v in tree.values()))
    return {k: (v * np.float32(scale)) for k, v in tree.items()}


def sum_lora(replies: list[Message], shapes, mechanism: GaussianSumMechanism, out: FlatSum | None = None) -> RunningSum:
    """What :class:`server.lora_strategy.DPFedAvgLoRA` runs on a round's replies (private);
    ``out``: the previous round's sum, written over as the strategy does from its second round."""
    sums = BlockedSum(mechanism, bounded=True, out=out)
    for reply in sums.receive(replies):
        update, norm = read_update(reply, shapes, max_norm=mechanism.clip_norm)
        sums.add(reply, update, norm)
    return sums.result()


def sum_ti(replies: list[Message], dim: int, mechanism: GaussianSumMechanism) -> RunningSum:
    """What :class:`server.dpagg_strategy.DPAggTIStrategy` runs on a release's replies."""
    sums = BlockedSum(mechanism, bounded=False)
    for reply in sums.receive(replies):
        sums.add(reply, FlatRecord([keys.EMBEDDING_SUM], [(dim,)], [read_vector_view(reply, keys.EMBEDDING_SUM, dim)]))
    return sums.result()


def release(total: RunningSum, mechanism: GaussianSumMechanism, n: int) -> dict[str, torch.Tensor]:
    return mechanism.release(total, denominator=n, noise=NoiseSource.seeded(0), sample_rate=1.0, unit="site")[0]


def copy_bytes(replies: list[Message], buffer: np.ndarray) -> None:
    """Copy every reply's float32 payload into ``buffer`` (the memcpy baseline)."""
    for reply in replies:
        offset = 0
        for array in reply.content[keys.ARRAYS].values():
            src = np.frombuffer(array.data, dtype=np.uint8)
            np.copyto(buffer[offset:offset + src.size], src)
            offset += src.size


MIN_SAMPLE = 0.02  # seconds: an arm faster than this is timed over enough calls to last it


def _loops(fn) -> int:
    """Calls per timed sample so that one sample lasts about MIN_SAMPLE (the tiny model's
    16 replies copy in ~0.1 ms, where one call's timing is mostly jitter); runs ``fn`` twice."""
    fn()
    start = time.perf_counter()
    fn()
    return max(1, math.ceil(MIN_SAMPLE / max(time.perf_counter() - start, 1e-6)))


def measure(name: str, shapes: dict[str, tuple[int, ...]], n: int, repeats: int, ti: bool, clock: str = "wall",
            wire: str = "packed") -> dict:
    """One adapter's arms; ``wire``: the LoRA replies' layout (a TI reply is one vector either way)."""
    if wire not in WIRES:
        raise ValueError(f"wire must be one of {WIRES}, got {wire!r}")
    wire = "tensors" if ti else wire
    shapes = shapes if ti else Layout(shapes)  # as the LoRA strategy holds them
    mechanism = GaussianSumMechanism(clip_norm=CLIP, noise_multiplier=1.0)
    replies = []
    for i in range(n):
        update = random_update(shapes, i, 0.9 * CLIP)
        replies.append(reply_message({keys.EMBEDDING_SUM: update["v"]} if ti else update, node=i + 1, wire=wire))
    payload = sum(a.nbytes for a in random_update(shapes, 0, 1.0).values())
    wire_bytes = max(sum(len(a.data) for a in r.content[keys.ARRAYS].values()) for r in replies)
    buffer = np.empty(wire_bytes, dtype=np.uint8)
    dim = shapes["v"][0] if ti else 0

    def first_round() -> RunningSum:  # the sum in a new buffer, as in a run's first round
        return sum_ti(replies, dim, mechanism) if ti else sum_lora(replies, shapes, mechanism)

    last = first_round()

    def add_all() -> RunningSum:  # later rounds: the LoRA strategy writes over the last round's sum
        return sum_ti(replies, dim, mechanism) if ti else sum_lora(replies, shapes, mechanism, out=last)

    def read(reply: Message) -> tuple[FlatRecord, float]:
        if ti:
            return FlatRecord([keys.EMBEDDING_SUM], [(dim,)], [read_vector_view(reply, keys.EMBEDDING_SUM, dim)]), 0.0
        return read_update(reply, shapes, max_norm=CLIP)

    def validate() -> None:  # the checks alone (decode, finite, norm), to split the sum's cost
        for reply in replies:
            read(reply)

    records = [read(reply) for reply in replies]

    def adds() -> None:  # the blocked adds alone, on replies already read and checked
        total = None
        for lo in range(0, n, BLOCK):
            block = records[lo:lo + BLOCK]
            if ti:
                total = mechanism.add_block(total, [r for r, _ in block])
            else:
                total = mechanism.add_bounded_block(total, [r for r, _ in block], [norm for _, norm in block], out=last)

    total = add_all()

    def noise() -> None:
        release(total, mechanism, n)

    def copy() -> None:
        copy_bytes(replies, buffer)

    arms = (("sum", add_all), ("first", first_round), ("validate", validate), ("add", adds), ("release", noise),
            ("copy", copy))
    loops = {arm: _loops(fn) for arm, fn in arms}  # also the warm-up
    times: dict[str, list[float]] = {arm: [] for arm, _ in arms}
    for _ in range(repeats):  # interleaved, so every arm sees the same load
        for arm, fn in arms:
            start = CLOCKS[clock]()
            for _ in range(loops[arm]):
                fn()
            times[arm].append((CLOCKS[clock]() - start) / loops[arm])
    best = {k: min(v) for k, v in times.items()}
    gb = n * payload / 1e9
    whole = best["sum"] + best["release"]
    return {
        "adapter": name,
        "tensors": len(shapes),
        "parameters": payload // 4,
        "adapter_mb": round(payload / 1e6, 3),
        "replies": n,
        "wire": "one vector" if ti else wire,
        "server_path": ("read_vector_view + add_block" if ti else "read_update + add_bounded_block") + f" in blocks of {BLOCK}, then one release",
        "validate_clip_sum_s": round(best["sum"], 5),
        "first_round_sum_s": round(best["first"], 5),
        "validate_only_s": round(best["validate"], 5),
        "add_only_s": round(best["add"], 5),
        "release_noise_s": round(best["release"], 5),
        "copy_s": round(best["copy"], 5),
        "validate_clip_sum_gb_s": round(gb / best["sum"], 3),
        "with_release_gb_s": round(gb / whole, 3),
        "copy_gb_s": round(gb / best["copy"], 3),
        "ratio_validate_clip_sum_to_copy": round(best["copy"] / best["sum"], 3),
        "ratio_first_round_sum_to_copy": round(best["copy"] / best["first"], 3),
        "ratio_validate_only_to_copy": round(best["copy"] / best["validate"], 3),
        "ratio_add_only_to_copy": round(best["copy"] / best["add"], 3),
        "ratio_with_release_to_copy": round(best["copy"] / whole, 3),
        "noise_ns_per_parameter": round(best["release"] / (payload // 4) * 1e9, 1),
        "clock": clock,
        "calls_per_sample": loops,
    }


def passes(parameters: int, repeats: int = 7, clock: str = "wall", native: bool = True) -> dict:
    """The passes the exact path is made of, in ns per parameter, on one float32 array of
    ``parameters`` entries (the SD 1.5 rank-64 adapter's size: far larger than the caches),
    walked in runs of 64K entries; the ceilings they set for the sum/copy ratio.

    An exact sum of checked replies reads every reply twice from memory: the norm must be known
    (the reply checked, its clip factor fixed) before any of it enters the sum, and a reply or a
    block of them does not stay in cache between the two passes. Each NumPy pass converts float32
    to float64 (``cast``: read 4 B/param from memory, write 8 B to a cache-resident stage); the
    first then takes a float64 ``dot`` of the stage, the second ``add``s it into the run of the sum
    (``mixed_add``: NumPy's float32 + float64 -> float64 loop, which does both in one call).

    Two ceilings that no implementation of these two passes can pass on this machine: ``read``
    is BLAS's float32 ``dot`` of the array with itself, a streaming read of its bytes and almost
    nothing else, so ``copy / (2 * read)`` bounds any sum that reads every reply twice, even with
    free arithmetic and a sum that never leaves cache. ``server_norm`` and ``server_add`` are
    the server's own fused loops (:mod:`common.dp.kernels`, compiled by numba: the norm over the
    whole array, the add of one record at a time into a cache-resident run, as the NumPy ``add``
    arms, the sum's own traffic left out). With ``native`` (and a C compiler on PATH),
    :mod:`bench.native_passes` times the same two passes as fused, vectorised C loops
    (``native_norm``, ``native_add``), a second compiler's figure for the same loops."""
    x = np.random.default_rng(0).standard_normal(parameters, dtype=np.float32)
    copy_to, run, stage = np.empty_like(x), np.zeros(1 << 16), np.empty(1 << 16)

    def walk(step) -> None:
        for lo in range(0, parameters, 1 << 16):
            step(x[lo:lo + (1 << 16)])

    steps = {
        "copy": lambda: np.copyto(copy_to, x),
        "read": lambda: np.dot(x, x),
        "cast": lambda: walk(lambda piece: np.copyto(stage[:piece.size], piece)),
        "dot": lambda: walk(lambda piece: np.dot(stage[:piece.size], stage[:piece.size])),
        "add": lambda: walk(lambda piece: np.add(run[:piece.size], stage[:piece.size], out=run[:piece.size])),
        "mixed_add": lambda: walk(lambda piece: np.add(run[:piece.size], piece, out=run[:piece.size])),
        "server_norm": lambda: fused.run_squares(x, 1 << 16),
        "server_add": lambda: walk(lambda piece: fused.add_block(run[:piece.size], [piece], [1.0], fresh=False)),
    }
    kernels, built = compile_passes() if native else (None, "not asked for")
    if kernels is not None:
        steps["native_norm"] = lambda: kernels.sum_of_squares(x)
        steps["native_add"] = lambda: kernels.add_runs(run, x)
    best = {name: math.inf for name in steps}
    for _ in range(repeats):  # interleaved
        for name, step in steps.items():
            start = CLOCKS[clock]()
            step()
            best[name] = min(best[name], CLOCKS[clock]() - start)
    ns = {name: round(t / parameters * 1e9, 3) for name, t in best.items()}
    floor = ns["cast"] + ns["dot"] + min(ns["mixed_add"], ns["cast"] + ns["add"])  # norm pass + add pass, nothing else
    out = {"parameters": parameters, "ns_per_parameter": ns, "clock": clock,
           "best_ratio_two_passes": round(ns["copy"] / floor, 3),
           "ceiling_two_reads": round(ns["copy"] / (2 * ns["read"]), 3),
           "server_ratio_two_passes": round(ns["copy"] / (ns["server_norm"] + ns["server_add"]), 3), "native": built}
    if kernels is not None:
        out["native_ratio_two_passes"] = round(ns["copy"] / (ns["native_norm"] + ns["native_add"]), 3)
    return out


def adapters(include_sd15: bool) -> list[tuple[str, dict, bool]]:
    out = [("tiny model LoRA r4 (UNet attention)", lora_shapes(tiny_unet_config(), 4), False)]
    if include_sd15:
        out += [("SD 1.5 LoRA r4 (to_q/k/v/out.0)", lora_shapes(SD15_UNET, 4), False),
                ("SD 1.5 LoRA r64 (to_q/k/v/out.0)", lora_shapes(SD15_UNET, 64), False),
                ("SD 1.5 TI embedding (768)", {"v": (SD15_EMBEDDING_DIM,)}, True)]
    return out


def run(replies: int = 16, repeats: int = 5, large_replies: int = 4, include_sd15: bool = True,
        clock: str = "wall", wire: str = "packed") -> list[dict]:
    rows = []
    for name, shapes, ti in adapters(include_sd15):
        n = large_replies if "r64" in name else replies
        rows.append(measure(name, shapes, n, repeats, ti, clock, wire))
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replies", type=int, default=16, help="replies per aggregation")
    parser.add_argument("--large-replies", type=int, default=4, help="replies for the SD 1.5 rank-64 LoRA (51 MB each)")
    parser.add_argument("--repeats", type=int, default=5, help="best of N, arms interleaved")
    parser.add_argument("--tiny-only", action="store_true", help="only the tiny model's adapter")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall time, or this process's CPU time (steadier on a shared machine)")
    parser.add_argument("--wire", choices=WIRES, default="packed",
                        help="LoRA replies as sites send them (one packed Array) or one Array per tensor")
    parser.add_argument("--passes", action="store_true",
                        help="only time the passes the exact sum is made of (NumPy, and compiled C when a compiler is there) "
                             "against a copy and a plain read")
    args = parser.parse_args(argv)
    if args.passes:
        print(json.dumps(passes(sum(math.prod(s) for s in lora_shapes(SD15_UNET, 64).values()), clock=args.clock),
                         indent=2))
        return []
    rows = run(args.replies, args.repeats, args.large_replies, not args.tiny_only, args.clock, args.wire)
    print(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
