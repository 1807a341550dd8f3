"""Tiny Hugging Face causal LMs of eight families, from configs with random weights (nothing is
downloaded): the one builder every test that runs an HF model uses.

Each family is here for what it does differently: learned absolute positions (GPT-2; OPT, which
also derives positions from the attention mask when given none), rotary positions with grouped-query
attention (Llama, Qwen2, Mistral, Gemma with its scaled embeddings), partial rotary (GPT-NeoX, Phi).
"""
import torch
import transformers

FAMILIES = ["gpt2", "llama", "qwen2", "gpt_neox", "mistral", "gemma", "phi", "opt"]
WIDTH, HEADS, KV_HEADS = 32, 4, 2


def config(family: str, vocab: int, positions: int, layers: int, **extra):
    """The family's config at width 32 with ``layers`` layers; ``extra`` goes to the config as is."""
    common = {"vocab_size": vocab, "attn_implementation": "sdpa", **extra}
    rope = dict(hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=layers,
                num_attention_heads=HEADS, max_position_embeddings=positions)
    if family == "gpt2":  # 2 heads of 16, as the first tests were written
        return transformers.GPT2Config(n_layer=layers, n_head=2, n_embd=WIDTH, n_positions=positions, **common)
    if family in ("llama", "qwen2", "mistral"):
        cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
               "mistral": transformers.MistralConfig}[family]
        return cls(num_key_value_heads=KV_HEADS, **({"sliding_window": None} if family == "mistral" else {}),
                   **rope, **common)
    if family == "gemma":
        return transformers.GemmaConfig(num_key_value_heads=KV_HEADS, head_dim=WIDTH // HEADS, **rope, **common)
    if family == "gpt_neox":
        return transformers.GPTNeoXConfig(rotary_pct=0.5, **rope, **common)
    if family == "phi":
        return transformers.PhiConfig(partial_rotary_factor=0.5, **rope, **common)
    if family == "opt":
        return transformers.OPTConfig(hidden_size=WIDTH, ffn_dim=2 * WIDTH, num_hidden_layers=layers,
                                      num_attention_heads=HEADS, max_position_embeddings=positions,
                                      word_embed_proj_dim=WIDTH, **common)
    raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")


def tiny_hf(family: str, *, vocab: int = 50, positions: int = 64, layers: int = 2, seed: int = 0,
            **extra) -> torch.nn.Module:
    """A random-weight causal LM of ``family`` in eval mode, seeded by ``seed``."""
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config(family, vocab, positions, layers, **extra)).eval()


def bias_token(model: torch.nn.Module, token: int, bias: float) -> torch.nn.Module:
    """Give the lm head a bias of ``bias`` on ``token`` and 0 elsewhere (towards or away from EOS)."""
    head = model.get_output_embeddings()
    with torch.no_grad():
        head.bias = torch.nn.Parameter(torch.zeros(head.out_features))
        head.bias[token] = bias
    return model
