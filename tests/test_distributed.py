"""fit on two CPU processes (gloo) through Lightning Fabric, launched by torchrun.

One launch (tests/distributed_fit.py) trains with DDP, then with FSDP (interrupted
after 4 steps by design and resumed to 6); here one process trains the same model on
the same global batches, which both must reproduce to rounding.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lab.model import GPT
from lab.train import fit, latest_checkpoint, load_weights

sys.path.insert(0, str(Path(__file__).parent))
from distributed_setup import FIT_KWARGS, TASK, tiny_gpt

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not available"
)


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed")
    script = Path(__file__).parent / "distributed_fit.py"
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    command += ["--standalone", str(script), str(out)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return out, json.loads((out / "histories.json").read_text())


@pytest.fixture(scope="module")
def single():
    torch.set_num_threads(1)
    model = tiny_gpt()
    history = fit(model, TASK, **FIT_KWARGS)
    return model, history.loss


def test_ddp_ranks_agree_and_match_one_process(launched, single):
    out, histories = launched
    model, losses = single
    rank0, rank1 = (load_file(out / f"ddp-{r}.safetensors") for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert histories["ddp"] == pytest.approx(losses, rel=1e-5)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(rank0[name], value, rtol=1e-4, atol=1e-6)


def test_fsdp_trains_checkpoints_and_resumes(launched, single):
    out, histories = launched
    model, losses = single
    assert histories["fsdp"] == pytest.approx(losses, rel=1e-5)
    checkpoint = latest_checkpoint(out / "fsdp")
    assert checkpoint.name == "step-00000006"
    assert {p.name for p in checkpoint.glob("rng-*")} == {"rng-0.safetensors", "rng-1.safetensors"}
    gathered = load_weights(tiny_gpt(seed=2), checkpoint)  # whole weights from the shards
    assert gathered.lm_head.weight is gathered.transformer.wte.weight
    assert GPT.from_pretrained(checkpoint).config == model.config  # a lab checkpoint
    for (name, a), b in zip(
        gathered.state_dict().items(), model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
