"""distributed.py in one process: the world read from torchrun's variables, the checks, and collectives that
are no-ops (tests/cli/test_distributed_cli.py runs them on 2 gloo ranks)."""

from __future__ import annotations

import pytest
import torch

from qbert_hessian import distributed
from qbert_hessian.distributed import World, check_world, world_from_env
from qbert_hessian.errors import QBHError

TORCHRUN = {
    "RANK": "3",
    "LOCAL_RANK": "1",
    "WORLD_SIZE": "4",
    "LOCAL_WORLD_SIZE": "2",
    "MASTER_ADDR": "h",
    "MASTER_PORT": "1",
}


def test_world_from_torchrun_variables():
    assert world_from_env({}) == World() and not World().distributed and World().is_main
    assert world_from_env({"WORLD_SIZE": "1"}) == World()
    w = world_from_env(TORCHRUN)
    assert w == World(rank=3, size=4, local_rank=1, local_size=2) and w.distributed and not w.is_main
    one_host = {k: v for k, v in TORCHRUN.items() if not k.startswith("LOCAL")}
    assert world_from_env(one_host) == World(rank=3, size=4, local_rank=3, local_size=4)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"WORLD_SIZE": "4"}, "RANK, MASTER_ADDR and MASTER_PORT are not"),
        ({**TORCHRUN, "MASTER_ADDR": ""}, "MASTER_ADDR is not"),
        ({**TORCHRUN, "RANK": "4"}, "RANK=4 lies outside WORLD_SIZE=4"),
        ({**TORCHRUN, "LOCAL_RANK": "2"}, "LOCAL_RANK=2 with LOCAL_WORLD_SIZE=2 does not fit"),
        ({**TORCHRUN, "WORLD_SIZE": "0"}, "WORLD_SIZE=0 must be at least 1"),
        ({**TORCHRUN, "RANK": "x"}, "RANK='x' is not an integer"),
    ],
)
def test_world_from_env_refuses_inconsistent_variables(env, message):
    with pytest.raises(QBHError, match=message):
        world_from_env(env)


def test_check_world_gives_each_rank_its_device():
    two = World(rank=1, size=2, local_rank=1, local_size=2)
    assert check_world(World(), "cuda") == "cuda"  # one process: unchanged
    assert check_world(two, "cpu") == "cpu"
    with pytest.raises(QBHError, match="--device mps cannot run distributed"):
        check_world(two, "mps")
    if torch.cuda.device_count() >= 2:
        assert check_world(two, "cuda") == "cuda:1"
    else:
        with pytest.raises(QBHError, match="2 processes on this host need a GPU each"):
            check_world(two, "cuda")


def test_collectives_are_no_ops_in_one_process():
    t = [torch.ones(2), torch.zeros(3, dtype=torch.float64)]
    assert distributed.all_reduce_(t) is not None and torch.equal(t[0], torch.ones(2))
    assert distributed.all_reduce_floats([1.5, 2.0], op="max") == [1.5, 2.0]
    assert distributed.all_gather_objects({"a": 1}) == [{"a": 1}] and distributed.broadcast_object(7) == 7
    assert distributed.shard(range(5)) == [0, 1, 2, 3, 4] and distributed.rank() == 0 and distributed.is_main()
    assert distributed.world_size() == 1 and not distributed.start(World(), "cpu")
    distributed.barrier()
