"""Hub safetensors -> MLX weights, in bounded memory (installed as mlxrun.convert)."""
