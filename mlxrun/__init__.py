"""mlxrun: a local LLM runtime for Apple Silicon on MLX."""

__version__ = "0.1.0"
