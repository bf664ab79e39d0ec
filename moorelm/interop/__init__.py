"""Interoperability with other formats: Hugging Face ``transformers`` (see hf.py)."""

from moorelm.interop.hf import export_hf, import_hf, to_transformers

__all__ = ["export_hf", "import_hf", "to_transformers"]
