"""Weight conversion between Hugging Face / PyTorch and leo_jax (one name-map table per family)."""

from leo_jax.convert.api import export_hf, export_module, import_hf, load_hf, load_leo
from leo_jax.convert.core import ConversionError

__all__ = ["ConversionError", "export_hf", "export_module", "import_hf", "load_hf", "load_leo"]
