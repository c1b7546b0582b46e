"""gloo collectives, with what gloo has lacked built from what it has.

gloo gained reduce_scatter late and still lacks it for some dtypes; all-reduce then slice is
exact everywhere, and the reference backend prefers exactness over speed.
"""

from __future__ import annotations

from cachedit.parallel.communicator import Communicator


class GlooCommunicator(Communicator):
    def reduce_scatter(self, tensor, dim=0, op="sum"):
        return self.all_reduce(tensor, op).chunk(self.world_size, dim=dim)[self.rank].contiguous()
