"""Fine-tuning pretrained models for downstream tasks.

- ``moorelm.finetune.classify``: text classification. Reading and checking labelled
  CSV/TSV/JSONL files and computing classification metrics do not depend on any training
  backend; the Hugging Face backend fine-tunes a pretrained encoder (BERT family, MiniLM-L6 by
  default) with ``transformers.Trainer`` and classifies texts with the saved folder.
- ``moorelm.finetune.genre``: a demo classification set (Shakespeare passage -> genre of its
  play) built from the bundled corpus, split by play.
"""
