"""peftctl: parameter-efficient fine-tuning of language models from YAML recipes."""

__version__ = "0.1.0"
