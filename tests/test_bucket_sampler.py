import random

import pytest

from data.audio.bucket_sampler import BucketBatchSampler


def lengths(n=500, seed=0):
    rng = random.Random(seed)
    return [rng.randint(20, 400) for _ in range(n)]


def test_token_budget_and_coverage():
    ls = lengths()
    s = BucketBatchSampler(ls, max_tokens=2000, seed=1)
    batches = list(s)
    assert all(max(ls[i] for i in b) * len(b) <= 2000 for b in batches)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(len(ls)))  # every item once per epoch
    padded = sum(max(ls[i] for i in b) * len(b) for b in batches)
    assert padded < 1.15 * sum(ls)  # bucketing keeps padding small
    unsorted = BucketBatchSampler(ls, max_tokens=2000, seed=1, pool_batches=0)
    assert len(unsorted) >= len(s)


def test_fixed_batch_size_and_drop_last():
    s = BucketBatchSampler(lengths(10), batch_size=3, shuffle=False, drop_last=True)
    assert [len(b) for b in s] == [3, 3, 3]
    s = BucketBatchSampler(lengths(10), batch_size=3, shuffle=False)
    assert sorted(len(b) for b in s) == [1, 3, 3, 3]


def test_epochs_differ_and_are_deterministic():
    ls = lengths()
    a, b = (
        BucketBatchSampler(ls, max_tokens=1500, seed=3),
        BucketBatchSampler(ls, max_tokens=1500, seed=3),
    )
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first


def test_ranks_get_disjoint_equal_shares():
    ls = lengths()
    shares = [
        list(BucketBatchSampler(ls, max_tokens=1500, seed=2, rank=r, world_size=3))
        for r in range(3)
    ]
    assert len({len(s) for s in shares}) == 1
    sets = [{tuple(b) for b in s} for s in shares]
    assert not (sets[0] & sets[1]) and not (sets[1] & sets[2])
    covered = {i for s in shares for b in s for i in b}
    assert covered == set(range(len(ls)))


def test_resume_mid_epoch():
    ls = lengths()
    s = BucketBatchSampler(ls, max_tokens=1500, seed=4)
    s.set_epoch(2)
    full = list(s)
    s2 = BucketBatchSampler(ls, max_tokens=1500, seed=4)
    s2.set_epoch(2, start_batch=5)
    assert list(s2) == full[5:]


def test_errors_and_epoch_callback():
    with pytest.raises(ValueError, match="exactly one"):
        BucketBatchSampler([5], max_tokens=10, batch_size=2)
    with pytest.raises(ValueError, match="longest item"):
        BucketBatchSampler([50, 500], max_tokens=100)
    seen = []
    s = BucketBatchSampler([5, 6], batch_size=1, on_epoch=seen.append)
    s.set_epoch(7)
    assert seen == [7]
