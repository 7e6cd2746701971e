"""A tiny random Llama with a chat template, for chat tests: the template is made of vocabulary
words (w0 system, w1 user, w2 assistant, w3 end of a message) so the word tokenizer reads it."""

from transformers import LlamaConfig, LlamaForCausalLM

from llama_specs import BASE
from support import TinySpec

TEMPLATE = ("{% for m in messages %}{{ {'system': 'w0', 'user': 'w1', 'assistant': 'w2'}[m['role']] }} "
            "{{ m['content'] }} w3 {% endfor %}{% if add_generation_prompt %}w2{% endif %}")

# A long context (2048 positions) so that a pasted line of 5,000 characters (1,250 words) fits;
# untied embeddings, since a random tied model greedily repeats its last token.
CHAT_SPEC = TinySpec(
    "llama_chat",
    lambda: LlamaForCausalLM(LlamaConfig(**{**BASE, "max_position_embeddings": 2048}, num_attention_heads=4,
                                         num_key_value_heads=2, tie_word_embeddings=False)),
    chat_template=TEMPLATE,
)
