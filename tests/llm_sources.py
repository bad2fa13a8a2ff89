"""Tiny random text LLMs in the layouts `navil init-from-llm` reads: Llama, Qwen2, Qwen3 (transformers'
own classes, saved with `save_pretrained`) and InternLM2 (its own tensor names and fused `wqkv`, written
here independently of the converter, next to the Llama model that computes the same function)."""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "What is the capital of France? Paris is the capital of France.",
    "The quick brown fox jumps over the lazy dog. 1 + 1 = 2; ünïcödé, 中文.",
    "Describe the image. A red square on a blue background, and a cat.",
    "Hello! How are you? I am fine, thank you. Which of the two is brighter?",
] * 4
TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6)  # fmt: skip


def make_tokenizer():
    """A byte-level BPE tokenizer (< 300 tokens) with ChatML chat tokens and a chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=280, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )  # fmt: skip
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _randomize(model, seed):
    """Non-trivial norms and biases too, so a mis-mapped norm or bias cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def hf_llm(family, seed=0, **overrides):
    """A random transformers model of `family` (llama, qwen2, qwen3) with the tiny dims."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
               "qwen3": (Qwen3Config, Qwen3ForCausalLM)}  # fmt: skip
    config_class, model_class = classes[family]
    kwargs = dict(TINY, **overrides)
    if family != "llama":
        kwargs.setdefault("head_dim", 16)
    torch.manual_seed(seed)
    return _randomize(model_class(config_class(**kwargs)), seed)


def write_hf_llm(folder, family, seed=0, **overrides):
    """Save a random `family` model and the tiny tokenizer to `folder`; returns the model."""
    model = hf_llm(family, seed, **overrides)
    model.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return model


def write_internlm2_llm(folder, seed=0):
    """An InternLM2-layout folder (config.json `model_type: internlm2`, `wqkv` grouped per KV head,
    InternLM2 tensor names) holding the same decoder as the returned `LlamaForCausalLM`."""
    llama = hf_llm("llama", seed)
    c = llama.config
    heads, kv, d = c.num_attention_heads, c.num_key_value_heads, c.hidden_size // c.num_attention_heads
    state = {}
    for key, tensor in llama.state_dict().items():
        if ".self_attn.k_proj." in key or ".self_attn.v_proj." in key:
            continue
        if ".self_attn.q_proj.weight" in key:
            prefix = key.replace("self_attn.q_proj.weight", "")
            q = tensor.reshape(kv, heads // kv, d, -1)
            k = llama.state_dict()[prefix + "self_attn.k_proj.weight"].reshape(kv, 1, d, -1)
            v = llama.state_dict()[prefix + "self_attn.v_proj.weight"].reshape(kv, 1, d, -1)
            state[prefix + "attention.wqkv.weight"] = torch.cat([q, k, v], 1).reshape(-1, c.hidden_size).clone()
            continue
        new = (
            key.replace("model.embed_tokens", "model.tok_embeddings")
            .replace("self_attn.o_proj", "attention.wo")
            .replace("mlp.gate_proj", "feed_forward.w1")
            .replace("mlp.up_proj", "feed_forward.w3")
            .replace("mlp.down_proj", "feed_forward.w2")
            .replace("input_layernorm", "attention_norm")
            .replace("post_attention_layernorm", "ffn_norm")
            .replace("lm_head", "output")
        )
        state[new] = tensor.clone()
    Path(folder).mkdir(parents=True, exist_ok=True)
    save_file(state, str(Path(folder) / "model.safetensors"))
    config = {
        "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "bias": False,
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": heads, "num_key_value_heads": kv,
        "hidden_act": "silu", "max_position_embeddings": c.max_position_embeddings, "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_parameters["rope_theta"], "rope_scaling": None, "tie_word_embeddings": False,
        "torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
    }  # fmt: skip
    (Path(folder) / "config.json").write_text(json.dumps(config, indent=2))
    make_tokenizer().save_pretrained(folder)
    return llama


if __name__ == "__main__":  # python tests/llm_sources.py FAMILY OUT_DIR
    family, out = sys.argv[1], sys.argv[2]
    (write_internlm2_llm if family == "internlm2" else lambda f: write_hf_llm(f, family))(out)
