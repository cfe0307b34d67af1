import pytest
import torch
import torch.multiprocessing as mp
from fed_spawn import WORLD, worker


@pytest.fixture(scope="session")
def fed_ranks(tmp_path_factory) -> list[dict]:
    """The results of tests/fed_spawn.py's 4 gloo ranks (one spawn for three test files)."""
    tmp = tmp_path_factory.mktemp("fed")
    out = str(tmp / "res")
    mp.spawn(worker, args=(str(tmp / "store"), out), nprocs=WORLD, join=True)
    return [torch.load(f"{out}.{r}", weights_only=False) for r in range(WORLD)]
