"""Interoperability with other formats: Hugging Face ``transformers`` (``moorelm.interop.hf``:
``export_hf``, ``import_hf``, ``to_transformers``)."""
