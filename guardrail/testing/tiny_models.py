"""Tiny random causal LMs for tests: a config, random weights and a byte-level BPE tokenizer
trained in milliseconds on a built-in corpus, saved as a local Hugging Face model directory
(safetensors, tokenizer.json, chat template). Nothing is downloaded.

Example (a pytest fixture)::

    @pytest.fixture(scope="session")
    def tiny_llama(tmp_path_factory):
        return build_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", arch="llama")

Needs the ``observer`` extra (torch, transformers, tokenizers).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

__all__ = ["CHAT_TEMPLATE", "CORPUS", "build_tiny_model", "train_tokenizer"]

# ChatML, as SmolLM2 uses it; the tiny models read conversations the same way, and like SmolLM2's
# template this one concatenates strings, so content that is not a string fails as it would there.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# A small corpus with words, numbers, punctuation, newlines and multi-byte characters, so the
# learned merges look like a real byte-level BPE's (spaces glued to the word after them).
CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Marie Curie was born in Warsaw in 1867 and won two Nobel prizes.",
    "How do I bake bread? Mix flour, water, salt and yeast; knead it for ten minutes.",
    "Albert Einstein published the theory of general relativity in 1915.",
    "I can't help with that request, but here is some safety information.",
    "The river flows north through the valley, past the old mill and the church.",
    "Once upon a time there was a small robot who wanted to learn to paint.\n\n"
    "It painted the sea, the sky and the mountains.",
    "Café, naïve, résumé, déjà vu: words with accents. 東京 is Tokyo; 🙂 is a smile.",
    "def add(a, b):\n    return a + b\n",
    "Numbers: 3.14159, 2,718, 42%, $100 and 1/2.",
] * 4


def train_tokenizer(vocab_size: int = 400) -> object:
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on ``CORPUS`` (no prefix space,
    ChatML special tokens and chat template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(
    path: str | Path,
    *,
    arch: Literal["llama", "gpt2"] = "llama",
    num_layers: int = 4,
    hidden_size: int = 32,
    seed: int = 0,
    max_positions: int = 4096,
    spread: float | None = None,
) -> Path:
    """Write a tiny random causal LM and its tokenizer to ``path`` (created); return the path.

    ``arch="llama"`` (rotary positions, grouped-query attention) or ``"gpt2"`` (learned absolute
    positions, ``max_positions`` of them). The weights depend only on ``seed``.
    ``spread``: redraw every matrix from N(0, spread²) (seeded): the default init makes a tiny
    random model predict the same token everywhere, which leaves greedy decoding nothing to do.
    """
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer()
    vocab = len(tokenizer)  # type: ignore[arg-type]
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")  # type: ignore[attr-defined]
    config: LlamaConfig | GPT2Config
    if arch == "llama":
        config = LlamaConfig(
            vocab_size=vocab, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=max_positions, tie_word_embeddings=True,
            bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
        )
    elif arch == "gpt2":
        config = GPT2Config(
            vocab_size=vocab, n_embd=hidden_size, n_layer=num_layers, n_head=4,
            n_positions=max_positions, bos_token_id=eos, eos_token_id=eos,
        )
    else:
        raise ValueError(f"arch must be 'llama' or 'gpt2', got {arch!r}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    if spread is not None:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param in model.parameters():
                if param.ndim == 2:
                    param.copy_(torch.randn(param.shape, generator=generator) * spread)
    model.save_pretrained(path)  # safetensors
    tokenizer.save_pretrained(path)  # type: ignore[attr-defined]
    return path
