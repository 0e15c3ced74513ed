"""What only the benchmarks and the tests use, kept out of the lisa_dist wheel: the baselines LISA is measured
against, the count of the bytes collectives move and the count of host syncs."""

from benchmarks.lib.baselines import BAdamBackend, NaiveLisaBackend, build_baseline
from benchmarks.lib.comm import CommCounter, count_collectives
from benchmarks.lib.syncs import SyncLog, count_syncs

__all__ = [
    "BAdamBackend",
    "CommCounter",
    "NaiveLisaBackend",
    "SyncLog",
    "build_baseline",
    "count_collectives",
    "count_syncs",
]
