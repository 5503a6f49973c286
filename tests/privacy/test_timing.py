"""Red team, issue 21 finding 5: a site's work time must not reveal its secret Poisson count.

In ``secure`` and ``distributed`` aggregation the server never sees a site's DPAgg-TI sum,
but it does see how long each site takes to answer. Before padding, the batched textual
inversion took time linear in the number of sampled images (0 s for 0 images, 0.57 s for 2,
1.45 s for 12), so an honest-but-curious server read every site's count, which the
amplification by subsampling (Peetathawatchai et al. 2024, Alg. 1; Poisson sampling as the
accountant assumes it) needs to stay secret. The attack here is the server's: time the
site's real contribution code (:func:`client.app.dpagg_contribution`, the function that
``secure_reply`` runs) when it samples none of its images and when it samples all of them,
and compare. A linear leak gives a ratio near 0; padded work gives a ratio near 1.
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch
from flwr.app import ConfigRecord, Message, RecordDict

from client.app import dpagg_contribution, padding_capacity
from common import keys
from common.config import RunConfig
from common.paths import REPO_ROOT

SITE = REPO_ROOT / "data/demo/site-0"  # 12 images
CAPACITY = 12  # the declared public bound on a site's images
NONE, ALL = 1e-9, 1.0  # sampling rates that keep none (with probability 1 - 1.2e-8) and all of them
REPEATS = 5


def site_config(tiny_sd_path, sampling_rate: float, aggregation: str = "distributed") -> RunConfig:
    return RunConfig.from_run_config({
        "model-path": str(tiny_sd_path), "aggregation": aggregation, "sampling-rate": sampling_rate,
        "site-dataset-size": CAPACITY, "dataset-size": 4 * CAPACITY, "ti-steps": 5, "batch-size": 8,
    })


def release_message() -> Message:
    config = ConfigRecord({keys.ROUND: 1, keys.METHOD: "dpagg"})
    return Message(content=RecordDict({keys.CONFIG: config}), dst_node_id=1, message_type="train")


def timed_contribution(cfg: RunConfig) -> tuple[float, float, torch.Tensor]:
    """Wall time (what the server's clock sees, less the network) and this thread's CPU time
    (the site's own work, which other processes on a busy machine do not inflate) of one
    site's contribution, and the contribution."""
    wall, cpu = time.perf_counter(), time.thread_time()
    total = dpagg_contribution(release_message(), cfg, 0, "site-0", str(SITE))
    return time.perf_counter() - wall, time.thread_time() - cpu, total


@pytest.fixture()
def one_thread():
    """torch's work on this thread only, so that thread time counts all of it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_the_capacity_is_the_declared_site_size_in_the_modes_that_hide_the_sum(tiny_sd_path):
    assert padding_capacity(site_config(tiny_sd_path, ALL, "distributed")) == CAPACITY
    assert padding_capacity(site_config(tiny_sd_path, ALL, "secure")) == CAPACITY
    assert padding_capacity(site_config(tiny_sd_path, ALL, "central")) == 0  # trusted server: stay fast


def test_reply_time_does_not_depend_on_the_number_of_sampled_images(one_thread, tiny_sd_path):
    """0 against all 12 sampled: the median CPU time of the site's work must agree within
    [0.8, 1.25], and the best-of-N wall time within [0.5, 2] (on a busy 2-core CI machine other
    processes swing the wall time by 2x; the CPU time is the work that depends on the data).
    A leak linear in the count gives about 0.01 on both (the unpadded code: 0.010 s against
    0.98 s)."""
    none, full = site_config(tiny_sd_path, NONE), site_config(tiny_sd_path, ALL)
    timed_contribution(full)  # warm-up: the pipeline is loaded and cached once per process
    wall: dict[str, list[float]] = {"none": [], "all": []}
    cpu: dict[str, list[float]] = {"none": [], "all": []}
    for _ in range(REPEATS):  # interleaved, so that load on the machine hits both alike
        for label, cfg in (("none", none), ("all", full)):
            seconds, work, total = timed_contribution(cfg)
            wall[label].append(seconds)
            cpu[label].append(work)
            # the two cases really differ: no image sampled gives an exact zero sum
            assert torch.count_nonzero(total) == 0 if label == "none" else torch.count_nonzero(total) > 0
    wall_ratio = min(wall["none"]) / min(wall["all"])
    cpu_ratio = statistics.median(cpu["none"]) / statistics.median(cpu["all"])
    print(f"wall best-of-{REPEATS}: 0 sampled {min(wall['none']):.3f} s, {CAPACITY} sampled {min(wall['all']):.3f} s, "
          f"ratio {wall_ratio:.3f}; CPU median: {statistics.median(cpu['none']):.3f} s, "
          f"{statistics.median(cpu['all']):.3f} s, ratio {cpu_ratio:.3f}")
    assert 0.5 <= wall_ratio <= 2.0, f"0 vs {CAPACITY} sampled images: wall-time ratio {wall_ratio:.3f} ({wall})"
    assert 0.8 <= cpu_ratio <= 1.25, f"0 vs {CAPACITY} sampled images: CPU-time ratio {cpu_ratio:.3f} ({cpu})"

