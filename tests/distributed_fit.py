"""Run by tests/test_distributed.py under torchrun with two CPU processes (gloo):
``python -m torch.distributed.run --nproc_per_node=2 tests/distributed_fit.py OUT``.

DDP trains and saves each rank's weights; FSDP trains 4 steps with checkpoints,
then a second fit resumes to 6. Rank 0 writes the histories to OUT/histories.json.
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from distributed_setup import FIT_KWARGS, TASK, tiny_gpt

from lab.train import fit

torch.set_num_threads(1)
out = Path(sys.argv[1])
histories = {}

model = tiny_gpt()
histories["ddp"] = fit(model, TASK, strategy="ddp", accelerator="cpu", **FIT_KWARGS).loss
rank = torch.distributed.get_rank()
save_file({k: v.clone() for k, v in model.state_dict().items()}, out / f"ddp-{rank}.safetensors")

kwargs = FIT_KWARGS | {"checkpoint_dir": out / "fsdp", "checkpoint_every": 2}
fit(tiny_gpt(), TASK, strategy="fsdp", accelerator="cpu", **kwargs | {"steps": 4})
resumed = fit(tiny_gpt(seed=1), TASK, strategy="fsdp", accelerator="cpu", **kwargs)
histories["fsdp"] = resumed.loss

if rank == 0:
    (out / "histories.json").write_text(json.dumps(histories))
