"""imgcls: image-classification training from TOML recipes on Hugging Face Accelerate."""

__version__ = "0.1.0"
