"""mmalign: align multimodal LLMs with human preferences, measured on an embedded synthetic world."""

__version__ = "0.1.0"
