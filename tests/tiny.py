"""The tiny Llama most training tests build from ``model.init`` (51,360 parameters with the
stories260K tokenizer's 512 tokens): big enough to have every part of a real decoder, small
enough that a step takes milliseconds on one CPU thread."""

TINY = {"arch": "llama", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 64}
