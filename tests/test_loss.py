"""The chunked loss equals the plain one, and never saves full-vocabulary logits."""

import pytest
import torch

from lab import GPT, Config
from lab.data import IGNORE_INDEX
from lab.loss import chunked_cross_entropy, cross_entropy_sum

V = 97


def model_and_batch(**fields):
    torch.manual_seed(0)
    config = Config(n_layer=1, n_embd=32, n_head=4, vocab_size=V, block_size=32, **fields)
    x = torch.randint(0, V, (3, 11))
    y = torch.randint(0, V, (3, 11))
    y[0, :4] = IGNORE_INDEX  # prompt positions without a label
    return GPT(config), x, y


def gradients(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("chunk_size", [1, 7, 33, 1000])
@pytest.mark.parametrize("fields", [{}, {"final_logit_softcapping": 3.0, "tie_embeddings": True}])
def test_chunked_loss_and_gradients_equal_the_full_loss(chunk_size, fields):
    model, x, y = model_and_batch(**fields)
    full = cross_entropy_sum(model(x), y)
    expected = gradients(model, full)
    chunked = chunked_cross_entropy(model.hidden_states(x), model.head, y, chunk_size)
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)
    for name, grad in gradients(model, chunked).items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_no_saved_tensor_holds_the_logits_of_every_token():
    model, x, y = model_and_batch()
    sizes = []

    def pack(t):  # the sizes of saved logit-shaped tensors (last dimension: the vocabulary)
        sizes.append(t.numel() if t.shape[-1:] == (V,) else 0)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        chunked_cross_entropy(model.hidden_states(x), model.head, y, chunk_size=8)
    assert max(sizes) < x.numel() * V / 2  # a chunk's logits at most (8 x V)
    sizes.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        cross_entropy_sum(model(x), y)
    assert max(sizes) >= x.numel() * V  # the plain loss saves them (the test can fail)


def test_hidden_states_then_head_is_forward():
    model, x, _ = model_and_batch(final_logit_softcapping=2.0)
    torch.testing.assert_close(model.head(model.hidden_states(x)), model(x))


def test_chunk_size_must_be_positive():
    model, x, y = model_and_batch()
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_cross_entropy(model.hidden_states(x), model.head, y, chunk_size=0)
