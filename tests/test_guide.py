"""The user's guide (shared/seed/custom-models.md), pattern by pattern, with lab imports.

Each snippet is written as a user would write it; where the guide's code is buggy
the fix is marked ``# FIX:`` (see DESIGN.md, "Bugs in the guide's snippets").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from lab.config import Config
from lab.model import GPT, MLP, Block, CausalSelfAttention


# --- Step 1: define configuration -----------------------------------------------------
@dataclass
class MyModelConfig(Config):
    """Configuration for my custom model."""

    # Standard parameters
    name: str = "my-model-7b"
    block_size: int = 4096
    vocab_size: int = 32000
    n_layer: int = 32
    n_head: int = 32
    n_embd: int = 4096

    # Custom parameters
    custom_param: float = 0.1
    use_custom_attention: bool = True

    # Optional: override defaults
    rope_base: int = 10000
    intermediate_size: int = 11008


# --- Step 2, option A: custom attention -----------------------------------------------
class CustomAttention(CausalSelfAttention):
    """Custom attention mechanism."""

    def __init__(self, config):
        super().__init__(config)
        # Add custom components
        self.custom_proj = nn.Linear(config.n_embd, config.n_embd)
        self.custom_param = config.custom_param

    def forward(self, x, mask=None, input_pos=None):
        B, T, C = x.size()

        # FIX: the fused projection holds Q, K and V (with GQA sizes); split it
        # instead of using all of it as each of q, k and v.
        q, k, v = self.attn(x).split(self.qkv_sizes, dim=-1)

        # Custom modification
        q = q + self.custom_proj(x) * self.custom_param

        # Rest of attention computation
        q = q.view(B, T, self.n_head, self.head_size)
        k = k.view(B, T, self.n_query_groups, self.head_size)
        v = v.view(B, T, self.n_query_groups, self.head_size)
        q, k = self.add_positions(q, k, input_pos)  # FIX: keep RoPE

        # Scaled dot-product attention
        y = self.scaled_dot_product_attention(q, k, v, mask=mask)

        y = y.reshape(B, T, C)
        return self.proj(y)


# --- Step 2, option B: custom MLP ------------------------------------------------------
class CustomMLP(MLP):
    """Custom feed-forward network."""

    def __init__(self, config):
        super().__init__(config)
        # Add custom layers
        self.custom_layer = nn.Linear(config.intermediate_size, config.intermediate_size)

    def forward(self, x):
        x = self.fc_1(x)
        x = self.act(x)
        x = self.custom_layer(x)  # Custom modification
        x = self.fc_2(x)
        return x


# --- Step 2, option C: custom block ------------------------------------------------------
class CustomBlock(Block):
    """Custom transformer block."""

    def __init__(self, config):
        super().__init__(config)
        # Replace attention or MLP
        self.attn = CustomAttention(config)
        # Or: self.mlp = CustomMLP(config)

        # Add custom components
        self.custom_norm = nn.LayerNorm(config.n_embd)

    def forward(self, x, input_pos=None, mask=None):
        # Custom forward pass
        h = self.norm_1(x)
        h = self.attn(h, mask=mask, input_pos=input_pos)
        x = x + h

        # Custom normalization
        x = x + self.custom_norm(x)

        x = x + self.mlp(self.norm_2(x))
        return x


# --- Step 3: custom GPT model -----------------------------------------------------------
class CustomGPT(GPT):
    """Custom GPT model."""

    def __init__(self, config: MyModelConfig):
        # Don't call super().__init__() - we reimplement
        nn.Module.__init__(self)
        self.config = config

        # Standard components
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                h=nn.ModuleList(CustomBlock(config) for _ in range(config.n_layer)),
                ln_f=nn.LayerNorm(config.n_embd),
            )
        )

        # Custom components
        if config.use_custom_attention:
            self.custom_embedding = nn.Linear(config.n_embd, config.n_embd)

        # Initialize weights
        self.apply(self._init_weights)

    def _init_weights(self, module):
        """Initialize weights (required)."""
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, input_pos=None):
        """Forward pass (must match base signature)."""
        B, T = idx.size()

        # Token embeddings
        x = self.transformer.wte(idx)

        # Custom embedding modification
        if self.config.use_custom_attention:
            x = x + self.custom_embedding(x)

        # Transformer blocks
        for block in self.transformer.h:
            x = block(x, input_pos=input_pos)

        # Final norm + LM head
        x = self.transformer.ln_f(x)
        return self.lm_head(x)


SMALL = dict(n_layer=2, n_head=4, n_embd=128, vocab_size=1000, block_size=256)


# --- Testing your custom model: the guide's unit test --------------------------------------
def test_custom_model():
    """Test custom model forward pass."""
    config = MyModelConfig(
        n_layer=2,
        n_head=4,
        n_embd=128,
        vocab_size=1000,
        block_size=256,
    )

    model = CustomGPT(config)
    model.eval()

    # Test forward pass
    batch_size = 2
    seq_length = 16
    idx = torch.randint(0, config.vocab_size, (batch_size, seq_length))

    with torch.no_grad():
        logits = model(idx)

    assert logits.shape == (batch_size, seq_length, config.vocab_size)
    print("✓ Forward pass works")


def test_config_subclass_keeps_custom_fields_and_derives_the_rest():
    config = MyModelConfig()
    assert (config.name, config.custom_param, config.use_custom_attention) == (
        "my-model-7b", 0.1, True,
    )  # fmt: skip
    assert config.head_size == 128 and config.n_query_groups == 32
    assert MyModelConfig(**SMALL).intermediate_size == 11008


def test_custom_mlp_in_a_block():
    config = MyModelConfig(**SMALL, intermediate_size=64)
    block = Block(config)
    block.mlp = CustomMLP(config)
    x = torch.randn(2, 8, 128)
    assert block(x).shape == x.shape


def test_custom_attention_with_zero_custom_param_equals_the_base_attention():
    """Debugging tip 4, "compare to base": the custom path must reduce to the base."""
    torch.manual_seed(0)
    config = MyModelConfig(**SMALL, custom_param=0.0, n_query_groups=2)
    base, custom = CausalSelfAttention(config), CustomAttention(config)
    custom.load_state_dict(base.state_dict(), strict=False)
    x = torch.randn(2, 10, 128)
    torch.testing.assert_close(custom(x), base(x))


def test_custom_model_shapes_and_gradients():
    """Debugging tips 2 and 3: check shapes, and that every parameter gets a gradient."""
    torch.manual_seed(0)
    model = CustomGPT(MyModelConfig(**SMALL, intermediate_size=64))
    idx = torch.randint(0, 1000, (2, 12))
    logits = model(idx)
    assert logits.shape == (2, 12, 1000)
    loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), idx[:, 1:].flatten())
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_custom_block_registered_and_built_from_a_config():
    from lab.registry import block

    block.register("guide-custom-block", CustomBlock)
    config = MyModelConfig(**SMALL, intermediate_size=64, block_class_name="guide-custom-block")
    model = GPT(config)
    assert all(type(b) is CustomBlock for b in model.transformer.h)
    assert model(torch.randint(0, 1000, (1, 5))).shape == (1, 5, 1000)


def test_template_attention_registered_as_a_component():
    """The guide's "Adding New Attention Mechanism" template, completed and registered."""
    from lab.registry import attention

    class MyAttention(nn.Module):
        """Template for custom attention."""

        def __init__(self, config):
            super().__init__()
            self.n_head = config.n_head
            self.n_embd = config.n_embd
            self.head_size = self.n_embd // self.n_head

            # Q, K, V projections
            self.q_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
            self.k_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
            self.v_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

            # Output projection
            self.out_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

        def forward(self, x, mask=None, input_pos=None):  # FIX: blocks pass input_pos
            B, T, C = x.size()

            # Project Q, K, V
            q = self.q_proj(x).view(B, T, self.n_head, self.head_size)
            k = self.k_proj(x).view(B, T, self.n_head, self.head_size)
            v = self.v_proj(x).view(B, T, self.n_head, self.head_size)

            # FIX: the guide leaves `attn` undefined; any causal attention works here.
            attn = nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
            ).transpose(1, 2)

            # Output projection
            out = self.out_proj(attn.reshape(B, T, C))
            return out

    attention.register("guide-template-attention", MyAttention)
    config = Config(**SMALL, attention_class_name="guide-template-attention")
    model = GPT(config)
    assert type(model.transformer.h[1].attn) is MyAttention
    assert model(torch.randint(0, 1000, (2, 7))).shape == (2, 7, 1000)


def test_custom_positional_encoding_registered_as_a_scheme():
    """The guide's "Adding Positional Encoding" class, made a registered scheme."""
    from lab.registry import positional

    class CustomPositionalEncoding(nn.Module):
        """Custom positional encoding."""

        level = "embedding"  # FIX: tell lab where the scheme acts

        def __init__(self, config):
            super().__init__()
            self.n_embd = config.n_embd
            self.register_buffer(
                "pos_encoding", self._create_encoding(config.block_size, config.n_embd)
            )

        def _create_encoding(self, max_len, d_model):
            """Create positional encoding matrix."""
            pos = torch.arange(max_len).unsqueeze(1)
            div = torch.exp(
                torch.arange(0, d_model, 2) * -(torch.log(torch.tensor(10000.0)) / d_model)
            )

            encoding = torch.zeros(max_len, d_model)
            encoding[:, 0::2] = torch.sin(pos * div)
            encoding[:, 1::2] = torch.cos(pos * div)
            return encoding

        def forward(self, x, input_pos=None):  # FIX: positions of cached decoding
            """Add positional encoding."""
            if input_pos is not None:
                return x + self.pos_encoding[input_pos]
            return x + self.pos_encoding[: x.size(1), :]

    positional.register("guide-sinusoidal", CustomPositionalEncoding)
    torch.manual_seed(0)
    config = Config(**SMALL, positional="guide-sinusoidal")
    model = GPT(config)
    builtin = GPT(config.replace(positional="sinusoidal"))
    loaded = builtin.load_state_dict(model.state_dict(), strict=False)
    assert not loaded.missing_keys  # only the guide's extra buffer is left over
    idx = torch.randint(0, 1000, (1, 9))
    torch.testing.assert_close(model(idx), builtin(idx), atol=1e-5, rtol=1e-5)


# --- Step 4: register a configuration ---------------------------------------------------
def test_register_config_then_build_by_name(monkeypatch):
    from lab import configs
    from lab.configs import register_config

    monkeypatch.setitem(configs.configs, "my-model-7b", None)  # removed again after the test

    register_config(
        # My custom model
        dict(
            name="my-model-7b",
            hf_config=dict(org="myorg", name="my-model-7b"),
            block_size=4096,
            vocab_size=32000,
            n_layer=32,
            n_head=32,
            n_embd=4096,
            custom_param=0.1,
        )
    )
    config = MyModelConfig.from_name("my-model-7b")
    assert (config.n_layer, config.n_embd, config.custom_param) == (32, 4096, 0.1)
    with torch.device("meta"):  # a 7B model, inspected without allocating it
        assert sum(p.numel() for p in CustomGPT(config).parameters()) > 6e9
    small = MyModelConfig.from_name("my-model-7b", **SMALL, intermediate_size=64)
    assert CustomGPT(small)(torch.randint(0, 1000, (1, 4))).shape == (1, 4, 1000)


# --- Step 5: use your custom model --------------------------------------------------------
def test_step_5_llm_generates_with_a_custom_model(tmp_path):
    from lab.api import LLM
    from lab.tokenizer import Tokenizer

    Tokenizer.train(["Once upon a time there was a tiny model."] * 20, vocab_size=300).save(
        tmp_path / "tokenizer"
    )

    # Initialize
    config = MyModelConfig(**{**SMALL, "intermediate_size": 64})  # 7B does not fit a laptop
    model = CustomGPT(config)

    # Wrap with LLM API
    llm = LLM(model=model, tokenizer_dir=tmp_path / "tokenizer")

    # Generate
    result = llm.generate("Once upon a time", max_new_tokens=100, seed=0)
    print(result)
    assert isinstance(result, str) and result


# --- Testing your custom model: the guide's training test, with the training code ------------
def test_training():
    """Test custom model training."""
    from lab.api import LLM
    from lab.data import InstructionDataset
    from lab.train import fit

    torch.manual_seed(0)
    config = MyModelConfig(n_layer=2, n_head=4, n_embd=128, intermediate_size=256)
    model = CustomGPT(config)

    # Small dataset for testing
    data = [{"instruction": "Test", "input": "", "output": "OK"}]

    # Should run without errors
    llm = LLM(model=model)
    history = fit(
        llm.model, InstructionDataset(data, llm.tokenizer), steps=40, batch_size=2, lr=3e-3,
        warmup_steps=0, progress=False,
    )  # fmt: skip
    assert history.loss[-1] < history.loss[0] / 10
    answer = llm.generate(InstructionDataset.prompt(data[0]), max_new_tokens=5, temperature=0)
    assert answer == "OK"
    print("✓ Training works")


# --- Common patterns: mixture of experts -----------------------------------------------------
def test_mixture_of_experts_from_a_config():
    """The guide's ``MoELayer`` (num_experts, moe_top_k, a boolean-mask loop and no load
    balancing), done as lab does it: ``mlp_class_name="MoE"`` with sorted dispatch and a
    load-balancing loss collected by ``lab.moe.auxiliary_loss``."""
    from lab.moe import MoE, auxiliary_loss

    config = Config(**SMALL, mlp_class_name="MoE", n_expert=4, n_expert_per_token=2,
                    intermediate_size=64, moe_aux_loss_coef=0.01)  # fmt: skip
    model = GPT(config)
    assert all(isinstance(block.mlp, MoE) for block in model.transformer.h)
    idx = torch.randint(0, 1000, (2, 9))
    loss = nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten())
    (loss + auxiliary_loss(model)).backward()
    assert auxiliary_loss(model) > 0
    assert all(p.grad is not None for p in model.parameters())


# --- Real example: adapter fine-tuning ----------------------------------------------------
def test_adapter_config_and_gpt_start_as_the_base_model():
    """The guide's adapter ``Config`` subclass and adapter ``GPT``. FIX: the prefix is
    attended to through a zero-initialised gate (LLaMA-Adapter) instead of being
    concatenated onto the sequence, so the adapted model starts as the base model."""
    from lab import adapter
    from lab.config import Config as BaseConfig

    @dataclass
    class Config(BaseConfig):
        """Adds adapter-specific parameters."""

        adapter_prompt_length: int = 10
        adapter_start_layer: int = 2

    torch.manual_seed(0)
    config = Config(**{**SMALL, "n_layer": 3, "intermediate_size": 64})
    model = adapter.GPT(config)
    base = GPT(config)
    base.load_state_dict(model.state_dict(), strict=False)
    idx = torch.randint(0, 1000, (2, 8))
    torch.testing.assert_close(model(idx), base(idx))
    adapted = [
        i for i, b in enumerate(model.transformer.h) if b.attn.__class__ is not CausalSelfAttention
    ]
    assert adapted == [2]  # from adapter_start_layer on
    adapter.mark_only_adapter_as_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("transformer.h.2.attn.") for n in trainable)


def test_adapter_v2_linear_is_the_identity_at_init():
    """The guide's ``AdapterV2Linear(in_features, out_features)``. FIX: AdapterV2 learns
    a scale and a bias on the frozen linear (Gao et al., 2023), not a low-rank update
    (that is ``lab.lora.LoRALinear``); both start as the plain linear layer."""
    from lab.adapter_v2 import AdapterV2Linear

    torch.manual_seed(0)
    layer = AdapterV2Linear(16, 8)
    plain = nn.Linear(16, 8)
    plain.load_state_dict(layer.state_dict(), strict=False)
    x = torch.randn(3, 16)
    torch.testing.assert_close(layer(x), plain(x))
    assert {"adapter_scale", "adapter_bias"} <= {n for n, _ in layer.named_parameters()}
