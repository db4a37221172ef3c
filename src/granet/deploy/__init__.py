"""Deployment: compressed export to ``safetensors`` and sparse CPU inference."""
