"""The scaling model's pure functions (benchmarks/scaling_model.py): all-reduce formulas, BN traffic,
overlap, efficiency bounds and training time."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))  # the scripts import their helpers as `_common`

import scaling_model as sm  # noqa: E402

GB = 1e9
NVLINK = sm.Link(bandwidth=150 * GB, latency=5e-6)
EDR = sm.Link(bandwidth=12.5 * GB, latency=10e-6)
CLUSTER = sm.Cluster(gpus_per_node=8, intra=NVLINK, inter=EDR)


def _kwargs(**change):
    base = {
        "images_per_gpu": 2,
        "compute_s": 0.21,
        "grad_bytes": 160e6,
        "bucket_bytes": 25 * 2**20,
        "backward_fraction": 2 / 3,
        "bn": sm.bn_traffic([64, 256, 512], [64, 256, 512]),
        "bn_group_size": 0,
        "cluster": CLUSTER,
    }
    base.update(change)
    return base


def test_ring_allreduce_matches_the_formula() -> None:
    link = sm.Link(bandwidth=10 * GB, latency=1e-5)
    # p = 4, 100 MB: 2 * 3/4 * 1e8 / 1e10 + 2 * 3 * 1e-5
    assert sm.ring_allreduce_time(1e8, 4, link) == pytest.approx(0.015 + 6e-5)
    # p = 2: each rank sends half the data twice = bytes / bandwidth, plus 2 latencies
    assert sm.ring_allreduce_time(1e8, 2, link) == pytest.approx(0.01 + 2e-5)


def test_one_rank_or_no_bytes_costs_nothing() -> None:
    assert sm.ring_allreduce_time(1e9, 1, NVLINK) == 0.0
    assert sm.ring_allreduce_time(0, 64, NVLINK) == 0.0
    assert sm.tree_allreduce_time(1e9, 1, NVLINK) == 0.0
    assert sm.allreduce_time(1e9, 1, CLUSTER) == 0.0


def test_ring_bandwidth_term_approaches_twice_the_bytes() -> None:
    # The bandwidth term tends to 2 * bytes / bandwidth; the latency term grows linearly in p.
    link = sm.Link(bandwidth=1 * GB, latency=0.0)
    assert sm.ring_allreduce_time(1e9, 10_000, link) == pytest.approx(2.0, rel=1e-3)
    latency_only = sm.Link(bandwidth=1e30, latency=1e-6)
    assert sm.ring_allreduce_time(8, 101, latency_only) == pytest.approx(200e-6)


def test_tree_is_logarithmic_in_ranks() -> None:
    link = sm.Link(bandwidth=1e30, latency=1e-5)
    assert sm.tree_allreduce_time(8, 128, link) == pytest.approx(2 * 7 * 1e-5)
    assert sm.tree_allreduce_time(8, 100, link) == pytest.approx(2 * 7 * 1e-5)  # ceil(log2 100) = 7
    # Small messages: the tree beats the ring on many ranks.
    assert sm.tree_allreduce_time(8, 128, link) < sm.ring_allreduce_time(8, 128, link)


def test_hierarchical_within_a_node_is_the_intra_node_ring() -> None:
    for p in (2, 4, 8):
        assert sm.allreduce_time(1e8, p, CLUSTER) == sm.ring_allreduce_time(1e8, p, NVLINK)


def test_hierarchical_across_nodes_adds_the_inter_node_ring() -> None:
    t = sm.allreduce_time(1e8, 64, CLUSTER)
    assert t == pytest.approx(sm.ring_allreduce_time(1e8, 8, NVLINK) + sm.ring_allreduce_time(1e8, 8, EDR))
    # The slow network dominates: more than the intra-node part alone, less than a flat ring on it.
    assert t > sm.ring_allreduce_time(1e8, 8, NVLINK)
    assert t < sm.ring_allreduce_time(1e8, 64, EDR)


def test_hierarchical_rejects_partial_nodes_and_unknown_algorithms() -> None:
    with pytest.raises(ValueError, match="whole number"):
        sm.allreduce_time(1e8, 12, CLUSTER)
    with pytest.raises(ValueError, match="unknown algorithm"):
        sm.allreduce_time(1e8, 8, CLUSTER, "butterfly")


def test_bn_traffic_counts_values_and_bytes() -> None:
    t = sm.bn_traffic([64, 128], [64, 128])
    assert t.forward == ((2 * 64 + 1) * 8, (2 * 128 + 1) * 8)  # float64 sum, sum of squares, count
    assert t.backward == (2 * 64 * 4, 2 * 128 * 4)  # float32 sums of dy and dy * x_hat
    assert t.collectives == 4
    assert t.total_bytes == sum(t.forward) + sum(t.backward)
    two = sm.bn_traffic([64], [], forward_collectives_per_layer=2)
    assert len(two.forward) == 2 and two.collectives == 2
    assert sum(two.forward) >= (2 * 64 + 1) * 8


def test_bn_time_is_latency_bound_and_grows_with_the_group() -> None:
    traffic = sm.bn_traffic([256] * 50, [256] * 50)
    t8 = sm.bn_time(traffic, 8, CLUSTER)
    t128 = sm.bn_time(traffic, 128, CLUSTER)
    assert t128 > t8 > 0
    # 100 collectives of ~4 KB: latency 2 * 7 * 5 us each within a node dominates the bytes.
    assert t8 == pytest.approx(100 * 2 * 7 * 5e-6, rel=0.05)


def test_exposed_gradient_time() -> None:
    assert sm.exposed_gradient_time(0.05, 0.01, 0.2, overlap=False) == 0.05
    assert sm.exposed_gradient_time(0.05, 0.01, 0.2, overlap=True) == 0.01  # hidden but the last bucket
    assert sm.exposed_gradient_time(0.5, 0.01, 0.2, overlap=True) == pytest.approx(0.3)  # longer than backward


def test_efficiency_is_one_on_one_gpu_and_bounded() -> None:
    one = sm.predict_step(gpus=1, overlap=True, **_kwargs())
    assert one.efficiency == 1.0 and one.step_s == one.compute_s
    for p in (8, 16, 32, 64, 128, 256):
        for overlap in (False, True):
            s = sm.predict_step(gpus=p, overlap=overlap, **_kwargs())
            assert 0 < s.efficiency < 1
            assert s.images_per_s == pytest.approx(p * 2 / s.step_s)
            assert s.images_per_s <= p * 2 / s.compute_s  # never better than linear
            assert s.step_s == pytest.approx(s.compute_s + s.grad_exposed_s + s.bn_s)


def test_efficiency_falls_with_gpus_and_overlap_helps() -> None:
    prev = 1.0
    for p in (8, 16, 32, 64, 128, 256):
        a = sm.predict_step(gpus=p, overlap=True, **_kwargs())
        b = sm.predict_step(gpus=p, overlap=False, **_kwargs())
        assert a.efficiency <= prev
        assert a.step_s <= b.step_s
        prev = a.efficiency


def test_bn_group_size_limits_the_collectives() -> None:
    all_gpus = sm.predict_step(gpus=128, overlap=True, **_kwargs())
    node = sm.predict_step(gpus=128, overlap=True, **_kwargs(bn_group_size=8))
    none = sm.predict_step(gpus=128, overlap=True, **_kwargs(bn=None))
    assert none.bn_s == 0.0 < node.bn_s < all_gpus.bn_s
    assert node.bn_s == pytest.approx(sm.bn_time(_kwargs()["bn"], 8, CLUSTER))
    with pytest.raises(ValueError, match="does not divide"):
        sm.predict_step(gpus=128, overlap=True, **_kwargs(bn_group_size=48))


def test_predict_step_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="backward_fraction"):
        sm.predict_step(gpus=8, overlap=True, **_kwargs(backward_fraction=1.5))
    with pytest.raises(ValueError, match="compute_s"):
        sm.predict_step(gpus=8, overlap=True, **_kwargs(compute_s=0.0))
    with pytest.raises(ValueError, match="bandwidth"):
        sm.Link(bandwidth=0, latency=1e-6)


def test_training_time_and_pair_scaling() -> None:
    # 118287 images x 12 epochs at 100 img/s
    assert sm.training_hours(100, 118287, 12) == pytest.approx(118287 * 12 / 100 / 3600)
    a = sm.predict_step(gpus=8, overlap=True, **_kwargs())
    b = sm.predict_step(gpus=128, overlap=True, **_kwargs())
    speedup, eff = sm.pair_scaling(a, b)
    assert speedup == pytest.approx(b.images_per_s / a.images_per_s)
    assert eff == pytest.approx(speedup / 16) and 0 < eff < 1
    # MegDet's own pair, for reference: 33 h -> 4 h on 16x the GPUs is 51.6%.
    assert (33 / 4) / 16 == pytest.approx(0.516, abs=1e-3)


def test_implied_seconds_per_image_inverts_training_hours() -> None:
    s = sm.implied_seconds_per_image(33.0, 8, 118287, 12)
    images_per_s = 8 / s
    assert sm.training_hours(images_per_s, 118287, 12) == pytest.approx(33.0)
    assert math.isclose(s, 33 * 3600 * 8 / (118287 * 12))
