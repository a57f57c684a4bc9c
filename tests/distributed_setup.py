"""The model, task and fit arguments shared by test_distributed.py and the script it
launches (distributed_fit.py), so both sides train exactly the same thing. The model
ties its embeddings: FSDP gathers a tied tensor once per name, a checkpoint stores it
once."""

import torch

from lab.config import Config
from lab.data import MQAR
from lab.model import GPT

TASK = MQAR(num_pairs=4, num_keys=16, num_values=16)
FIT_KWARGS = dict(
    steps=6, batch_size=8, grad_accum_steps=2, lr=3e-3, schedule="constant", progress=False
)


def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    sizes = dict(n_layer=2, n_embd=32, n_head=2, vocab_size=TASK.vocab_size, block_size=32)
    return GPT(Config(**sizes, tie_embeddings=True))
